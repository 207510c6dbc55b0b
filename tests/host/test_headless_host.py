"""Headless training's conditioning against the real AUTOMATIC1111's on the same checkpoint files (the
tiny SD1 and SDXL test checkpoints, with their yaml configs): the web UI encodes the prompts with its own
code, the test loads the same file through ``lib_ti.headless`` and encodes them again."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from lib_ti.headless.models import LoadOptions, build_parts, load_model
from lib_ti.io.formats import read_embedding

from ..conftest import define_torchvision_ops
from .test_a1111_training import switch, unique

pytestmark = pytest.mark.host

PROMPTS = [
    "a photo of a cat in a garden",
    "a (red:1.3) car, [blurry], painting BREAK a second chunk",
    ", ".join(f"word{i}" for i in range(60)) + ", " + " ".join(["cat"] * 40),
    "",
]


@pytest.mark.parametrize(("ckpt", "emb"), [("tiny-sd1", "ti-sd1"), ("tiny-sdxl", "ti-sdxl")])
def test_headless_conditioning_equals_a1111(a1111, host_paths, ckpt, emb, tmp_path, monkeypatch):
    define_torchvision_ops()
    monkeypatch.setenv("LIB_TI_CACHE", str(tmp_path))
    switch(a1111, ckpt)
    prompts = [unique(p) for p in PROMPTS] + [unique(f"a photo of {emb} on a beach")]
    r = a1111.post("/ti/v1/_checks/conditioning", {"prompts": prompts})
    host = load(base64.b64decode(r["tensors"]))
    path = Path(r["file"])
    assert path.name == f"{ckpt}.safetensors"
    model = load_model(str(path), LoadOptions())
    assert model.kind == ("sdxl" if "xl" in ckpt else "sd1")
    parts = build_parts(model)
    vectors = read_embedding(host_paths[2] / f"{emb}.safetensors").vectors  # the host's embeddings folder
    with torch.no_grad():
        ours = parts.prompt_encoder.encode(prompts, {emb: vectors})
    assert ours.crossattn.shape == host["crossattn"].shape
    diff = float((ours.crossattn - host["crossattn"]).abs().max())
    scale = float(host["crossattn"].abs().max())
    print(f"{ckpt}: crossattn max |diff| {diff:.3g} (scale {scale:.3g})")
    assert diff < 1e-4 * scale
    if "pooled" in host:
        pdiff = float((ours.pooled - host["pooled"]).abs().max())
        print(f"{ckpt}: pooled max |diff| {pdiff:.3g}")
        assert pdiff < 1e-4 * float(host["pooled"].abs().max())
    switch(a1111, "tiny-sd1")

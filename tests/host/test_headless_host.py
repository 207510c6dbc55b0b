"""Headless training's conditioning against the real AUTOMATIC1111's on the same checkpoint files (the
tiny SD1 and SDXL test checkpoints, with their yaml configs): the web UI encodes the prompts with its own
code, the test loads the same file through ``lib_ti.headless`` and encodes them again."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from lib_ti.headless.models import LoadOptions, build_parts, load_model
from lib_ti.host.checks import unet_inputs
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


FORKS = {
    "forge": "SD_FORGE_DIR",
    "neo": "SD_NEO_DIR",
    "classic": "SD_CLASSIC_DIR",
    "reforge": "SD_REFORGE_DIR",
}


@pytest.fixture(scope="module", params=list(FORKS))
def fork(request):
    return request.getfixturevalue(request.param), request.param


def test_headless_conditioning_equals_the_forks_on_full_shape_sd15(fork, tmp_path, monkeypatch):
    """The Forge family's full-shape random SD1.5 has no yaml: the headless loader reads the real SD1.5
    architecture from the tensors' shapes, and its conditioning is the host's own (an embedding
    included); on Forge and Neo the UNet's output too (8 heads inferred)."""
    h, which = fork
    define_torchvision_ops()
    monkeypatch.setenv("LIB_TI_CACHE", str(tmp_path))
    h.post(
        "/sdapi/v1/options", {"sd_model_checkpoint": os.environ.get(f"SD_{which.upper()}_CKPT", "rand-sd15")}
    )
    name = f"hl{which}{time.time_ns() % 10**6}"
    h.post("/ti/v1/create", {"name": name, "vectors": 2, "init_text": "a red sports car"})
    prompts = [unique(p) for p in PROMPTS] + [unique(f"a photo of {name} on a beach")]
    r = h.post("/ti/v1/_checks/conditioning", {"prompts": prompts, "unet": True})
    host = load(base64.b64decode(r["tensors"]))
    default = Path(os.environ[FORKS[which]]).expanduser() / "models/Stable-diffusion/rand-sd15.safetensors"
    path = Path(r["file"]) if r["file"] else default
    assert not path.with_suffix(".yaml").exists()
    model = load_model(str(path), LoadOptions())
    assert (model.kind, list(model.unet.config.block_out_channels)) == ("sd1", [320, 640, 1280, 1280])
    listing = h.get("/ti/v1/embeddings")
    rel = next(e["file"] for e in listing["embeddings"] if e.get("name") == name)
    vectors = read_embedding(Path(listing["folder"]) / rel).vectors
    with torch.no_grad():
        ours = build_parts(model).prompt_encoder.encode(prompts, {name: vectors})
    diff = float((ours.crossattn - host["crossattn"]).abs().max())
    scale = float(host["crossattn"].abs().max())
    print(f"{which} {path.name}: crossattn max |diff| {diff:.3g} (scale {scale:.3g})")
    assert ours.crossattn.shape == host["crossattn"].shape
    assert diff < 1e-4 * max(scale, 1.0)
    if "unet" in r:
        x, t, cond = unet_inputs(
            "sd1"
        )  # the inferred architecture (8 heads included) computes the host's UNet
        with torch.no_grad():
            mine = build_parts(model).denoise(x, t, cond).flatten()
        theirs = torch.tensor(r["unet"])
        udiff = float((mine - theirs).abs().max())
        print(f"{which}: UNet max |diff| {udiff:.3g} (scale {float(theirs.abs().max()):.3g})")
        assert udiff < 1e-4 * max(float(theirs.abs().max()), 1.0)
    else:
        assert which in ("classic", "reforge")  # their route gives the conditioning only

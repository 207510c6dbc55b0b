"""The extension inside a real Forge (lllyasviel/stable-diffusion-webui-forge) on the CPU.

Skipped unless SD_FORGE_DIR points at a Forge checkout with SD1.5 and SDXL checkpoints in the real
shapes (random weights are fine; tests/host/README.md). Needs about 18 GB of RAM
for the SDXL part. Forge reports a used embedding in the infotext as ``TI: name`` (SDXL lists it
once per text encoder), not as TI hashes.
"""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

from lib_ti.io.formats import read_embedding

from .inline_flow import check_same_image
from .test_a1111_training import PROMPTS, wait_job

pytestmark = pytest.mark.host


def unique(prompt: str) -> str:
    return f"{prompt} {time.time_ns() % 10**9}"  # Forge caches conditioning per prompt


def infotext(res) -> str:
    return json.loads(res["info"])["infotexts"][0]


def txt2img(host, prompt, seed=7, size=64):
    body = {
        "prompt": prompt,
        "steps": 2,
        "width": size,
        "height": size,
        "seed": seed,
        "sampler_name": "Euler",
    }
    return host.post("/sdapi/v1/txt2img", body, timeout=900)


def pixels(res) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).convert("RGB").tobytes()


def switch(host, ckpt):
    host.post("/sdapi/v1/options", {"sd_model_checkpoint": ckpt})


def train(host, name, dataset, steps=10, **extra):
    body = {"embedding": name, "dataset_dir": str(dataset), "steps": steps, "width": 64, "height": 64,
            "validation_every": 5, "batch_size": 1, "seed": 3, **extra}  # fmt: skip
    job = host.post("/ti/v1/train", body)
    return wait_job(host, job["job"])


def test_loaded_on_forge_with_its_tab(forge):
    log = forge.log.read_text(errors="replace")
    assert "Textual Inversion tab (lib_ti" in log and "loaded on forge" in log
    ids = {c.get("props", {}).get("elem_id") for c in forge.config()["components"]}
    assert {"ti_create_button", "ti_train_start", "ti_inspect_file", "ti_merge_expression"} <= ids
    forge.post("/sdapi/v1/options", {"ti_preview_size": 64})


def test_sd1_create_use_parity_and_gradients(forge):
    name = "fg-sd1"
    made = forge.post("/ti/v1/create", {"name": name, "init_text": "a red sports car", "vectors": 2})
    assert made["kind"] == "sd1"
    listed = forge.get("/ti/v1/embeddings")
    assert name in listed["loaded"]  # Forge's engines have it, no restart
    assert name in forge.get("/sdapi/v1/embeddings")["loaded"]  # and the API's database
    info = infotext(txt2img(forge, unique(f"a photo of {name}")))
    assert f"TI: {name}" in info, info[-300:]
    for prompt in PROMPTS:
        r = forge.post("/ti/v1/_checks/parity", {"prompt": prompt.replace("ti-sd1", name), "embedding": name})
        print("Forge SD1 parity", r)
        assert r["shape_host"] == r["shape_ours"]
        assert r["max_abs_diff"] <= 1e-4
    r = forge.post("/ti/v1/_checks/unet", {"size": 8})
    print("Forge SD1 UNet", r)
    assert r["max_abs_diff"] <= 1e-4 and r["context_grad_abs_sum"] > 0
    g = forge.post("/ti/v1/_checks/gradient", {"prompt": f"a photo of {name}", "embedding": name})
    print("Forge SD1 gradient", g)
    assert g["vector_grad_abs_sum"]["clip_l"] > 0 and g["weights_with_grad"] == 0


def test_sd1_training_leaves_generation_unchanged(forge, dataset):
    name = "fg-sd1-train"
    forge.post("/ti/v1/create", {"name": name, "init_text": "a photo", "vectors": 1})
    prompt = unique("a landscape, oil painting")
    before = pixels(txt2img(forge, prompt, seed=11))
    t0 = time.time()
    st = train(forge, name, dataset, steps=10, preview_every=5)
    print(
        f"Forge SD1 10 steps: {time.time() - t0:.1f}s", {k: st[k] for k in ("state", "step", "loss", "file")}
    )
    assert st["state"] == "done", st
    assert st["previews"] and st["loss"] is not None
    emb = read_embedding(st["file"])
    assert emb.step == 10
    after = pixels(txt2img(forge, prompt, seed=11))
    assert before == after  # same seed, same image: the model was left as it was
    info = infotext(txt2img(forge, unique(f"a photo of {name}")))
    assert f"TI: {name}" in info


def test_bad_requests_are_4xx(forge, dataset):
    import urllib.error

    for body in (
        {"embedding": "nope", "dataset_dir": str(dataset), "steps": 1},
        {"embedding": "../x", "dataset_dir": str(dataset), "steps": 1},
        {"embedding": "fg-sd1", "dataset_dir": str(dataset), "steps": 1, "learning_rate": "0.1:abc"},
    ):
        with pytest.raises(urllib.error.HTTPError) as e:
            forge.post("/ti/v1/train", body)
        assert 400 <= e.value.code < 500


def test_sdxl_create_use_parity_and_train(forge, dataset):
    switch(forge, "rand-sdxl")
    name = "fg-sdxl"
    t0 = time.time()
    made = forge.post(
        "/ti/v1/create", {"name": name, "init_text": "a red sports car", "vectors": 2}, timeout=1800
    )
    print(f"SDXL load + create: {time.time() - t0:.1f}s")
    assert made["kind"] == "sdxl"
    listed = forge.get("/ti/v1/embeddings")
    assert name in listed["loaded"] and "fg-sd1" in listed["skipped"]
    info = infotext(txt2img(forge, unique(f"a photo of {name}")))
    assert f'TI: "{name}, {name}"' in info or f"TI: {name}, {name}" in info, info[-300:]
    for prompt in PROMPTS[:2]:
        r = forge.post("/ti/v1/_checks/parity", {"prompt": prompt.replace("ti-sd1", name), "embedding": name})
        print("Forge SDXL parity", r)
        assert r["shape_host"] == r["shape_ours"]
        assert r["max_abs_diff"] <= 1e-4 and r["pooled_max_abs_diff"] <= 1e-4
    r = forge.post("/ti/v1/_checks/unet", {"size": 8}, timeout=1800)
    print("Forge SDXL UNet", r)
    assert r["max_abs_diff"] <= 1e-4 and r["context_grad_abs_sum"] > 0
    start = read_embedding(made["file"])
    prompt = unique("a landscape, oil painting")
    before = pixels(txt2img(forge, prompt, seed=5))
    t0 = time.time()
    st = train(forge, name, dataset, steps=10)
    print(
        f"Forge SDXL 10 steps: {time.time() - t0:.1f}s", {k: st[k] for k in ("state", "step", "loss", "file")}
    )
    assert st["state"] == "done", st
    emb = read_embedding(st["file"])
    assert emb.step == 10 and emb.kind == "sdxl"
    for key in ("clip_l", "clip_g"):
        assert not emb.vectors[key].equal(start.vectors[key])
    assert pixels(txt2img(forge, prompt, seed=5)) == before


def test_sdxl_embedding_math_in_prompts(forge):
    """On SDXL (both encoders, Forge's two engines): an inline expression gives the saved one's image."""
    switch(forge, "rand-sdxl")
    res = check_same_image(forge, "xl")
    assert "TI:" not in json.loads(res["info"])["infotexts"][0]


def test_checkpoint_switch_stops_training_cleanly(forge, dataset):
    """Forge records a checkpoint choice at once and loads it on the next use: the run notices, saves, stops."""
    name = "fg-sdxl"
    job = forge.post("/ti/v1/train", {"embedding": name, "dataset_dir": str(dataset), "steps": 500, "width": 64,
                                      "height": 64, "validation_every": 0, "resume": False})  # fmt: skip
    deadline = time.time() + 900
    while forge.get(f"/ti/v1/jobs/{job['job']}")["step"] < 1:
        assert time.time() < deadline
        time.sleep(1)
    switch(forge, "rand-sd15")
    st = wait_job(forge, job["job"])
    print("after the switch:", {k: st[k] for k in ("state", "outcome", "step", "message")})
    assert st["state"] == "stopped" and st["outcome"] == "model_changed", st
    assert "saved" in st["message"]
    emb = read_embedding(st["file"])
    assert emb.kind == "sdxl" and 1 <= emb.step < 500
    made = forge.post("/ti/v1/create", {"name": "fg-after-switch", "init_text": "a cat"}, timeout=1800)
    assert made["kind"] == "sd1"  # the switch went through

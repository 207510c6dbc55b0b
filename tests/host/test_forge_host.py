"""SDXL inside a real Forge (lllyasviel) and Forge Neo (Haoming02) on the CPU; the SD1 flow runs on
every host in test_hosts_flow.py.

Each host runs when SD_FORGE_DIR / SD_NEO_DIR points at a checkout with SD1.5 and SDXL checkpoints
(``rand-sd15``, ``rand-sdxl``) in the real shapes (random weights are fine; tests/host/README.md). The
SDXL part needs about 18 GB of RAM and skips, saying so, when the machine has less available. Forge
and Neo report a used embedding in the infotext as ``TI: name`` (SDXL lists it once per text encoder).
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

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


LABELS = {"forge": "Forge", "neo": "Forge Neo"}
#: what the SDXL tests need free (MemAvailable) besides the host's SD1.5 model
SDXL_RAM_GB = 14


@pytest.fixture(scope="module", params=list(LABELS))
def forge(request):
    """Forge, then Forge Neo (the same backend): each skipped unless its variable is set."""
    h = request.getfixturevalue(request.param)
    h.post("/sdapi/v1/options", {"ti_preview_size": 64})
    return h


@pytest.fixture(scope="module")
def sdxl(forge):
    """The host with room for its SDXL checkpoint, or a skip that says what is missing."""
    titles = [m["model_name"] for m in forge.get("/sdapi/v1/sd-models")]
    if "rand-sdxl" not in titles:
        pytest.skip(
            f"no rand-sdxl checkpoint in {forge.webui}/models/Stable-diffusion (tests/host/README.md)"
        )
    meminfo = Path("/proc/meminfo").read_text()
    avail = int(next(ln.split()[1] for ln in meminfo.splitlines() if ln.startswith("MemAvailable"))) / 2**20
    if avail < SDXL_RAM_GB:
        pytest.skip(f"SDXL needs about {SDXL_RAM_GB} GB of free RAM; {avail:.1f} GB available")
    return forge


def test_loaded_with_its_tab(forge, request):
    which = request.node.callspec.params["forge"]
    log = forge.log.read_text(errors="replace")
    assert f"loaded on {LABELS[which]} ({which})." in log
    ids = {c.get("props", {}).get("elem_id") for c in forge.config()["components"]}
    assert {"ti_create_button", "ti_train_start", "ti_inspect_file", "ti_merge_expression"} <= ids


def test_sdxl_create_use_parity_and_train(sdxl, dataset):
    forge = sdxl
    made_sd1 = forge.post("/ti/v1/create", {"name": "fg-sd1", "init_text": "a red car", "overwrite": True})
    assert made_sd1["kind"] == "sd1"  # on the start-up SD1.5 checkpoint; skipped on SDXL below
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


def test_sdxl_embedding_math_in_prompts(sdxl):
    """On SDXL (both encoders, Forge's two engines): an inline expression gives the saved one's image."""
    switch(sdxl, "rand-sdxl")
    res = check_same_image(sdxl, "xl")
    assert "TI:" not in json.loads(res["info"])["infotexts"][0]


def test_checkpoint_switch_stops_training_cleanly(sdxl, dataset):
    """Forge records a checkpoint choice at once and loads it on the next use: the run notices, saves, stops."""
    forge = sdxl
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

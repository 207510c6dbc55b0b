"""SDXL on the Forge family's real hosts: Forge, Forge Neo, Forge Classic and reForge, on the CPU (A1111's
SDXL runs on its tiny checkpoint in test_a1111_training.py; the SD1 flow is test_hosts_flow.py).

Each host runs when its variable is set and its ``models/Stable-diffusion`` holds ``rand-sd15`` and
``rand-sdxl`` in the real shapes (random weights are fine; a hard link of Forge's works;
tests/host/README.md). SDXL needs about 18 GB of RAM: the tests skip, saying so, when less is
available. Parity of our conditioning (both encoders, pooled), UNet and VAE with the host's own; the
embedding used in the next prompt; a 10-step run with the same image before and after; embedding math
in prompts; a switch to SD1.5 mid-run.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from lib_ti.io.formats import read_embedding

from . import inline_flow as flow
from .inline_flow import check_same_image
from .test_a1111_training import PROMPTS, wait_job, wait_step
from .test_hosts_flow import FLAVORS, switch

pytestmark = pytest.mark.host

#: what the SDXL tests need free (MemAvailable) besides the host's SD1.5 model
SDXL_RAM_GB = 14


@pytest.fixture(scope="module", params=["forge", "neo", "classic", "reforge"])
def host(request):
    h = request.getfixturevalue(request.param)
    h.post("/sdapi/v1/options", {"ti_preview_size": 64})
    return h, request.param


@pytest.fixture(scope="module")
def sdxl(host):
    """The host with room for its SDXL checkpoint, or a skip that says what is missing."""
    h, _ = host
    titles = [m["model_name"] for m in h.get("/sdapi/v1/sd-models")]
    if "rand-sdxl" not in titles:
        pytest.skip(f"no rand-sdxl checkpoint in {h.webui}/models/Stable-diffusion (tests/host/README.md)")
    meminfo = Path("/proc/meminfo").read_text()
    avail = int(next(ln.split()[1] for ln in meminfo.splitlines() if ln.startswith("MemAvailable"))) / 2**20
    if avail < SDXL_RAM_GB:
        pytest.skip(f"SDXL needs about {SDXL_RAM_GB} GB of free RAM; {avail:.1f} GB available")
    return host


def used(which: str, name: str, info: str) -> bool:
    """The infotext says the SDXL embedding was used (Forge's engines list it once per encoder)."""
    if FLAVORS[which].forge_marker:
        return f'TI: "{name}, {name}"' in info or f"TI: {name}, {name}" in info
    return f"{name}: " in info


def train(h, name, dataset, steps=10, **extra):
    body = {"embedding": name, "dataset_dir": str(dataset), "steps": steps, "width": 64, "height": 64,
            "validation_every": 5, "batch_size": 1, "seed": 3, **extra}  # fmt: skip
    return wait_job(h, h.post("/ti/v1/train", body)["job"])


def test_sdxl_create_use_parity_and_train(sdxl, dataset):
    h, which = sdxl
    made_sd1 = h.post("/ti/v1/create", {"name": "fg-sd1", "init_text": "a red car", "overwrite": True})
    assert made_sd1["kind"] == "sd1"  # on the start-up SD1.5 checkpoint; skipped on SDXL below
    switch(h, which, "rand-sdxl")
    name = "fg-sdxl"
    t0 = time.time()
    made = h.post(
        "/ti/v1/create", {"name": name, "init_text": "a red sports car", "vectors": 2}, timeout=1800
    )
    print(f"SDXL load + create: {time.time() - t0:.1f}s")
    assert made["kind"] == "sdxl"
    listed = h.get("/ti/v1/embeddings")
    assert name in listed["loaded"] and "fg-sd1" in listed["skipped"]
    info = flow.info(flow.txt2img(h, f"a photo of {name} {flow.unique()}"))
    assert used(which, name, info), info[-300:]
    for prompt in PROMPTS[:2]:
        r = h.post("/ti/v1/_checks/parity", {"prompt": prompt.replace("ti-sd1", name), "embedding": name})
        print(which, "SDXL parity", r)
        assert r["shape_host"] == r["shape_ours"]
        assert r["max_abs_diff"] <= 1e-4 and r["pooled_max_abs_diff"] <= 1e-4
    r = h.post("/ti/v1/_checks/unet", {"size": 8}, timeout=1800)
    print(which, "SDXL UNet", r)
    assert r["max_abs_diff"] <= 1e-4 * max(r["scale"], 1.0) and r["context_grad_abs_sum"] > 0
    g = h.post("/ti/v1/_checks/gradient", {"prompt": f"a photo of {name}", "embedding": name}, timeout=1800)
    print(which, "SDXL gradient", g)
    assert g["vector_grad_abs_sum"]["clip_l"] > 0 and g["vector_grad_abs_sum"]["clip_g"] > 0
    assert g["weights_with_grad"] == 0
    if "vae" in FLAVORS[which].checks:
        v = h.post("/ti/v1/_checks/vae", {"size": 64}, timeout=1800)
        print(which, "SDXL vae", v)
        assert min(v["max_abs_diff"], v["mean_only_diff"]) <= 1e-4 * max(v["scale"], 1.0)
    start = read_embedding(made["file"])
    prompt = f"a landscape, oil painting {flow.unique()}"
    before = flow.pixels(flow.txt2img(h, prompt, seed=5))
    t0 = time.time()
    st = train(h, name, dataset, steps=10)
    print(
        f"{which} SDXL 10 steps: {time.time() - t0:.1f}s",
        {k: st[k] for k in ("state", "step", "loss", "file")},
    )
    assert st["state"] == "done", st
    emb = read_embedding(st["file"])
    assert emb.step == 10 and emb.kind == "sdxl"
    for key in ("clip_l", "clip_g"):
        assert not emb.vectors[key].equal(start.vectors[key])
    assert flow.pixels(flow.txt2img(h, prompt, seed=5)) == before


def test_sdxl_embedding_math_in_prompts(sdxl):
    """On SDXL (both encoders): an inline expression gives the saved one's image."""
    h, which = sdxl
    switch(h, which, "rand-sdxl")
    res = check_same_image(h, "xl")
    assert "TI:" not in json.loads(res["info"])["infotexts"][0]


def test_checkpoint_switch_stops_training_cleanly(sdxl, dataset):
    """A switch to SD1.5 requested while an SDXL run trains: the run notices, saves and stops; the
    switch goes through (Forge and Neo load it on the next use, Classic and reForge at once)."""
    h, which = sdxl
    switch(h, which, "rand-sdxl")
    name = "fg-sdxl"
    job = h.post("/ti/v1/train", {"embedding": name, "dataset_dir": str(dataset), "steps": 500, "width": 64,
                                  "height": 64, "validation_every": 0, "resume": False})  # fmt: skip
    wait_step(h, job["job"], 1, timeout=900)
    t = threading.Thread(target=switch, args=(h, which, "rand-sd15"))
    t.start()
    st = wait_job(h, job["job"])
    t.join(timeout=900)
    print(which, "after the switch:", {k: st[k] for k in ("state", "outcome", "step", "message")})
    assert st["state"] == "stopped" and st["outcome"] == "model_changed", st
    assert "saved" in st["message"]
    emb = read_embedding(st["file"])
    assert emb.kind == "sdxl" and 1 <= emb.step < 500
    made = h.post("/ti/v1/create", {"name": "fg-after-switch", "init_text": "a cat"}, timeout=1800)
    assert made["kind"] == "sd1"  # the switch went through

"""One flow on every real host: AUTOMATIC1111, Forge, Forge Neo, Forge Classic, reForge.

Each host runs when its variable is set (SD_WEBUI_DIR, SD_FORGE_DIR, SD_NEO_DIR, SD_CLASSIC_DIR,
SD_REFORGE_DIR: tests/host/README.md) and skips otherwise; run one host at a time. On the host's SD1
checkpoint: create and merge, used in the next prompt (the host's infotext marker: ``TI:`` on Forge and
Neo, ``TI hashes`` on the A1111-style hosts), inspect, bad requests, our conditioning / UNet / VAE
against the host's own code, training (progress, 409 while busy, the same image before and after),
Interrupt then resume, and a checkpoint switch mid-run. SDXL runs are in the per-host files.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import pytest

from lib_ti.io.formats import read_embedding

from . import inline_flow as flow
from .test_a1111_training import PROMPTS, wait_job, wait_step

pytestmark = pytest.mark.host


@dataclass(frozen=True)
class Flavor:
    #: Forge's "TI: name" infotext line, else A1111's TI hashes
    forge_marker: bool
    #: the self-check routes the adapter adds besides parity and gradient
    checks: tuple[str, ...]
    #: a checkpoint switch loads at once (A1111-style) or on the next use (Forge)
    lazy_load: bool


FLAVORS = {
    "a1111": Flavor(False, ("vae",), False),
    "forge": Flavor(True, ("unet",), True),
    "neo": Flavor(True, ("unet",), True),
    "classic": Flavor(False, ("unet", "vae"), False),
    "reforge": Flavor(False, ("unet", "vae"), False),
}


@pytest.fixture(scope="module", params=list(FLAVORS))
def host(request):
    h = request.getfixturevalue(request.param)
    h.post("/sdapi/v1/options", {"ti_preview_size": 64})
    return h, request.param


def marker(which: str, name: str) -> str:
    return f"TI: {name}" if FLAVORS[which].forge_marker else f"{name}: "


def current_checkpoint(h) -> dict:
    """The loaded (or, on Forge, selected) checkpoint's entry of /sdapi/v1/sd-models."""
    title = str(h.get("/sdapi/v1/options")["sd_model_checkpoint"])
    models = h.get("/sdapi/v1/sd-models")
    return next(m for m in models if title in (m["title"], m["model_name"]) or m["title"].startswith(title))


def second_checkpoint(h, first: dict) -> str:
    """A hard link of ``first`` under another name (with its .yaml), made once; the host's list refreshed."""
    src = Path(first["filename"])
    dst = src.with_name(f"{src.stem}-b{src.suffix}")
    if not dst.exists():
        os.link(src, dst)
    if src.with_suffix(".yaml").exists() and not dst.with_suffix(".yaml").exists():
        os.link(src.with_suffix(".yaml"), dst.with_suffix(".yaml"))
    h.post("/sdapi/v1/refresh-checkpoints", {})
    return dst.stem


def switch(h, which: str, title: str) -> None:
    h.post("/sdapi/v1/options", {"sd_model_checkpoint": title}, timeout=900)
    if not FLAVORS[which].lazy_load:
        h.post("/sdapi/v1/reload-checkpoint", {}, timeout=900)


def train_body(name, dataset, steps, **extra):
    return {"embedding": name, "dataset_dir": str(dataset), "steps": steps, "resolution": 64, "batch_size": 1,
            "grad_accum": 1, "warmup_steps": 0, "seed": 3, **extra}  # fmt: skip


def test_create_is_used_in_the_next_prompt(host):
    h, which = host
    name = f"flow-{which}-{flow.unique()}"
    made = h.post("/ti/v1/create", {"name": name, "vectors": 2, "init_text": "a red car"})
    assert made["kind"] == "sd1" and made["vectors"] == 2
    assert name in h.get("/ti/v1/embeddings")["loaded"]  # hot reload: no restart
    assert name in h.get("/sdapi/v1/embeddings")["loaded"]  # and the host's own API sees it
    text = flow.info(flow.txt2img(h, f"a photo of {name} {flow.unique()}"))
    assert marker(which, name) in text, text[-400:]
    shown = h.get(f"/ti/v1/inspect/{name}")
    assert (shown["kind"], shown["vectors"]) == ("sd1", 2)
    near = h.post("/ti/v1/inspect", {"name": name, "nearest": 3})
    assert len(near["nearest"]["clip_l"]) == 2 and len(near["nearest"]["clip_l"][0]) == 3


def test_a_rewritten_embedding_changes_the_same_prompts_image(host):
    """The host caches the last prompt's conditioning by its text; after a write the same prompt and
    seed must use the new vectors (and writing the old ones back gives the old image)."""
    h, which = host
    name = f"flowc-{which}-{flow.unique()}"
    prompt = f"a photo of {name}, {flow.unique()}"
    h.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "car"})
    first = flow.pixels(flow.txt2img(h, prompt, seed=5))
    h.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "dog", "overwrite": True})
    assert flow.pixels(flow.txt2img(h, prompt, seed=5)) != first
    h.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "car", "overwrite": True})
    assert flow.pixels(flow.txt2img(h, prompt, seed=5)) == first


def test_merge_is_used_in_the_next_prompt(host):
    h, which = host
    name = f"flowm-{which}-{flow.unique()}"
    made = h.post("/ti/v1/merge", {"expression": "'cat' + 'dog'*0.5", "name": name})
    assert made["vectors"] == 1
    text = flow.info(flow.txt2img(h, f"a photo of {name} {flow.unique()}"))
    assert marker(which, name) in text, text[-400:]


@pytest.mark.parametrize(
    ("route", "body", "status"),
    [
        ("/ti/v1/create", {"name": "../escape"}, 400),
        ("/ti/v1/create", {"name": "x", "vector": 2}, 422),
        ("/ti/v1/merge", {"expression": "'cat' +", "name": "bad"}, 400),
        ("/ti/v1/inspect", {"name": "no-such-embedding"}, 404),
        ("/ti/v1/train", {"embedding": "no-such-embedding", "dataset_dir": "DATA", "steps": 1}, 404),
        ("/ti/v1/train", {"embedding": "MADE", "dataset_dir": "/nonexistent", "steps": 1}, 400),
        (
            "/ti/v1/train",
            {"embedding": "MADE", "dataset_dir": "DATA", "steps": 1, "learning_rate": "0.1:abc"},
            400,
        ),
        ("/ti/v1/train", {"embedding": "MADE", "dataset_dir": "DATA", "steps": 1, "stepz": 2}, 422),
    ],
)
def test_bad_requests_are_4xx(host, dataset, route, body, status):
    h, which = host
    made = f"flowbad-{which}"
    h.post("/ti/v1/create", {"name": made, "vectors": 1, "overwrite": True})
    body = {
        k: {"MADE": made, "DATA": str(dataset)}.get(v, v) if isinstance(v, str) else v
        for k, v in body.items()
    }
    with pytest.raises(urllib.error.HTTPError) as e:
        h.post(route, body)
    assert e.value.code == status, e.value.read()
    assert "detail" in e.value.read().decode()


def test_ours_equals_the_hosts_own_code(host):
    """Conditioning (three prompts: plain, emphasis + BREAK, over 75 tokens), one backward pass that
    reaches only the vectors, and the host's UNet forward and VAE encode where the adapter has its own."""
    h, which = host
    name = f"flowp-{which}-{flow.unique()}"
    h.post("/ti/v1/create", {"name": name, "vectors": 2, "init_text": "a red sports car"})
    for prompt in PROMPTS:
        r = h.post("/ti/v1/_checks/parity", {"prompt": prompt.replace("ti-sd1", name), "embedding": name})
        print(which, "parity", r)
        assert r["shape_host"] == r["shape_ours"]
        assert r["max_abs_diff"] <= 1e-4 * max(r["scale"], 1.0)
    g = h.post("/ti/v1/_checks/gradient", {"prompt": f"a photo of {name}", "embedding": name})
    print(which, "gradient", g)
    assert g["vector_grad_abs_sum"]["clip_l"] > 0 and g["weights_with_grad"] == 0
    if "unet" in FLAVORS[which].checks:
        u = h.post("/ti/v1/_checks/unet", {"size": 8})
        print(which, "unet", u)
        assert u["max_abs_diff"] <= 1e-4 * max(u["scale"], 1.0) and u["context_grad_abs_sum"] > 0
    if "vae" in FLAVORS[which].checks:
        v = h.post("/ti/v1/_checks/vae", {"size": 64})
        print(which, "vae", v)
        # the host samples the posterior (same seed: mean + std * noise) or takes its mean
        assert min(v["max_abs_diff"], v["mean_only_diff"]) <= 1e-4 * max(v["scale"], 1.0)


def test_training_409_and_the_same_image_after(host, dataset):
    h, which = host
    name = f"flowt-{which}-{flow.unique()}"
    h.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "a painting"})
    start = read_embedding(h.embeddings / f"{name}.safetensors").matrix.clone()
    prompt = f"a landscape, oil painting {flow.unique()}"
    before = flow.pixels(flow.txt2img(h, prompt, seed=11))
    body = train_body(name, dataset, 8, validation_every=4, preview_every=8)
    job = h.post("/ti/v1/train", body)["job"]
    with pytest.raises(urllib.error.HTTPError) as busy:
        h.post("/ti/v1/train", body)
    assert busy.value.code == 409
    seen = None
    while (st := h.get(f"/ti/v1/jobs/{job}"))["state"] in ("queued", "running"):
        p = h.get("/sdapi/v1/progress?skip_current_image=true")
        if p["state"]["job"] == "ti-train" and p["progress"] > 0:
            seen = p
        time.sleep(0.3)
    print(which, "training", {k: st[k] for k in ("state", "step", "loss", "val_loss", "message", "previews")})
    assert st["state"] == "done" and st["step"] == 8, st
    assert seen is not None  # the host's own progress bar showed the run
    assert [s for s, _ in st["val_losses"]] == [0, 4, 8] and all(v == v for _, v in st["losses"])
    assert len(st["previews"]) == 1 and read_embedding(st["previews"][0]).step == 8  # the PNG holds it
    assert (h.embeddings / f"{name}.preview.png").exists()  # the Extra Networks card's picture
    trained = read_embedding(h.embeddings / f"{name}.safetensors")
    assert trained.step == 8 and (trained.matrix - start).abs().max() > 0
    assert flow.pixels(flow.txt2img(h, prompt, seed=11)) == before  # the model was left as it was
    assert marker(which, name) in flow.info(flow.txt2img(h, f"a photo of {name} {flow.unique()}"))


def test_interrupt_saves_then_resume_finishes(host, dataset):
    h, which = host
    name = f"flowi-{which}-{flow.unique()}"
    h.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "a painting"})
    body = train_body(name, dataset, 500, validation_every=0)
    job = h.post("/ti/v1/train", body)["job"]
    wait_step(h, job, 2, timeout=600)
    h.post("/sdapi/v1/interrupt", {})
    st = wait_job(h, job)
    print(which, "interrupted", {k: st[k] for k in ("state", "outcome", "step", "message")})
    assert st["state"] == "stopped", st
    stopped_at = st["step"]
    assert read_embedding(h.embeddings / f"{name}.safetensors").step == stopped_at >= 2
    assert name in h.get("/ti/v1/embeddings")["loaded"]
    st = wait_job(h, h.post("/ti/v1/train", dict(body, steps=stopped_at + 2, resume=True))["job"])
    print(which, "resumed", {k: st[k] for k in ("state", "step", "message")})
    assert st["state"] == "done", st
    assert read_embedding(h.embeddings / f"{name}.safetensors").step == stopped_at + 2


def test_checkpoint_switch_mid_run_stops_cleanly(host, dataset):
    h, which = host
    first = current_checkpoint(h)
    other = second_checkpoint(h, first)
    name = f"flows-{which}-{flow.unique()}"
    h.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "a painting"})
    h.post("/ti/v1/merge", {"expression": "'cat' + 'dog'", "name": f"{name}-m"})  # fills our model caches
    flow.txt2img(h, f"a photo of <'cat' + 'dog'> {flow.unique()}")
    live_before = h.get("/ti/v1/_checks/live_tensors")["bytes"]
    job = h.post("/ti/v1/train", train_body(name, dataset, 500, validation_every=0))["job"]
    try:
        wait_step(h, job, 2, timeout=600)
        t = threading.Thread(target=switch, args=(h, which, other))
        t.start()
        st = wait_job(h, job)
        t.join(timeout=900)
        print(which, "switch", {k: st[k] for k in ("state", "outcome", "step", "message")})
        assert (st["state"], st["outcome"]) == ("stopped", "model_changed"), st
        assert "saved" in st["message"]
        assert 2 <= read_embedding(h.embeddings / f"{name}.safetensors").step < 500
        assert other in str(h.get("/sdapi/v1/options")["sd_model_checkpoint"])
        # the switch went through: the next generation runs on the other checkpoint
        assert other in flow.info(flow.txt2img(h, f"a photo {flow.unique()}"))
        # and nothing of ours keeps the old model's tensors reachable (same-size checkpoint)
        live_after = h.get("/ti/v1/_checks/live_tensors")["bytes"]
        print(which, "live tensors before / after the switch:", live_before, live_after)
        assert live_after <= live_before * 1.02
    finally:
        switch(h, which, first["title"])

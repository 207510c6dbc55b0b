"""Create, merge and train on the real AUTOMATIC1111 web UI (SD1, then SDXL), through /ti/v1."""

from __future__ import annotations

import threading
import time

import pytest

from lib_ti.io.formats import read_embedding

pytestmark = pytest.mark.host

PROMPTS = [
    "a photo of ti-sd1 in a garden",
    "a (red:1.3) car, [blurry], ti-sd1 BREAK a second chunk",
    ", ".join(f"word{i}" for i in range(60)) + ", ti-sd1, " + " ".join(["cat"] * 40),
]


def unique(prompt: str) -> str:
    return f"{prompt} {time.time_ns() % 10**9}"  # the host caches conditioning per prompt


def wait_job(host, job_id, timeout=1800):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = host.get(f"/ti/v1/jobs/{job_id}")
        if st["state"] not in ("queued", "running"):
            return st
        time.sleep(1)
    pytest.fail(f"job {job_id} did not end")
    return None


def wait_step(host, job_id, step, timeout=120):
    """Wait until a running job has done ``step`` optimizer steps."""
    deadline = time.time() + timeout
    while host.get(f"/ti/v1/jobs/{job_id}")["step"] < step:
        if time.time() > deadline:
            pytest.fail(f"job {job_id} did not reach step {step}")
        time.sleep(0.2)


def train_body(name, dataset, steps, **extra):
    """A /ti/v1/train request on the 64 px test images."""
    return {"embedding": name, "dataset": str(dataset), "steps": steps, "resolution": 64, **extra}


def switch(host, ckpt):
    host.post("/sdapi/v1/options", {"sd_model_checkpoint": ckpt})
    host.post("/sdapi/v1/reload-checkpoint", {})


def txt2img(host, prompt, seed=7):
    return host.post(
        "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": seed}
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sd1_conditioning_equals_the_hosts(a1111, prompt):
    r = a1111.post("/ti/v1/_checks/parity", {"prompt": prompt, "embedding": "ti-sd1"})
    print("SD1 parity", r)
    assert r["shape_host"] == r["shape_ours"]
    assert r["max_abs_diff"] <= 1e-4 * max(r["scale"], 1.0)


def test_sd1_gradients_reach_only_the_vectors(a1111):
    r = a1111.post("/ti/v1/_checks/gradient", {"prompt": "a photo of ti-sd1", "embedding": "ti-sd1"})
    print("SD1 gradient", r)
    assert r["vector_grad_abs_sum"]["clip_l"] > 0
    assert r["weights_with_grad"] == 0


def test_create_and_merge_usable_in_next_prompt(a1111):
    name = f"ti-new-{time.time_ns() % 10**6}"
    r = a1111.post("/ti/v1/create", {"name": name, "vectors": 2, "init_text": "a cute dog"})
    assert r["name"] == name
    info = txt2img(a1111, unique(f"a photo of {name}"))["info"]
    assert f"{name}:" in info  # TI hashes: the host used it in the very next prompt
    merged = f"{name}-m"
    a1111.post("/ti/v1/merge", {"expression": f"'{name}' * 0.5 + 'cat' : 2", "name": merged})
    assert f"{merged}:" in txt2img(a1111, unique(f"a photo of {merged}"))["info"]
    assert (a1111.embeddings / f"{name}.json").exists()


def test_sd1_training_progress_409_and_same_images_after(a1111, dataset):
    before = txt2img(a1111, "a fixed prompt for comparison", seed=42)["images"][0]
    a1111.post(
        "/ti/v1/create", {"name": "ti-train1", "vectors": 1, "init_text": "a painting", "overwrite": True}
    )
    start = read_embedding(a1111.embeddings / "ti-train1.safetensors").matrix.clone()
    body = {"embedding": "ti-train1", "dataset": str(dataset), "steps": 12, "resolution": 64,
            "validation_every": 4, "snapshot_every": 5, "preview_every": 6}  # fmt: skip
    job_id = a1111.post("/ti/v1/train", body)["job"]
    seen_progress = None
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:
        a1111.post("/ti/v1/train", body)
    assert refused.value.code == 409
    for _ in range(300):
        p = a1111.get("/sdapi/v1/progress?skip_current_image=true")
        if p["state"]["job"] == "ti-train" and p["state"]["sampling_step"] > 0:
            seen_progress = p
            break
        if a1111.get(f"/ti/v1/jobs/{job_id}")["state"] != "running":
            break
        time.sleep(0.2)
    st = wait_job(a1111, job_id)
    print(
        "SD1 training",
        st["state"],
        st["message"],
        "val",
        st["val_losses"],
        "progress seen",
        bool(seen_progress),
    )
    assert st["state"] == "done", st
    assert st["step"] == 12
    assert seen_progress is not None and seen_progress["progress"] > 0
    assert "ti-train1" in a1111.get("/sdapi/v1/embeddings")["loaded"]
    assert len(st["previews"]) == 2  # steps 6 and 12, through the host's own txt2img
    shown = read_embedding(st["previews"][-1])  # the preview PNG carries the embedding, as A1111 does it
    assert (shown.name, shown.step) == ("ti-train1", 12)
    assert (a1111.embeddings / "ti-train1.preview.png").exists()
    # the host reads "step" only from .pt files; our safetensors keep it in the header
    trained = read_embedding(a1111.embeddings / "ti-train1.safetensors")
    assert trained.step == 12
    assert (trained.matrix - start).abs().max() > 0  # the vectors changed (and are finite: the reader checks)
    assert all(v is not None and v == v for _, v in st["losses"])  # finite losses
    assert "ti-train1:" in txt2img(a1111, unique("a photo of ti-train1"))["info"]
    after = txt2img(a1111, "a fixed prompt for comparison", seed=42)["images"][0]
    assert after == before  # generation is exactly as before training


def test_interrupt_ends_training_after_saving(a1111, dataset):
    a1111.post(
        "/ti/v1/create", {"name": "ti-int", "vectors": 1, "init_text": "a painting", "overwrite": True}
    )
    body = train_body("ti-int", dataset, 500, validation_every=0)
    job_id = a1111.post("/ti/v1/train", body)["job"]
    wait_step(a1111, job_id, 2)
    a1111.post("/sdapi/v1/interrupt", {})
    st = wait_job(a1111, job_id)
    assert st["state"] == "stopped", st
    assert "ti-int" in a1111.get("/sdapi/v1/embeddings")["loaded"]
    stopped_at = st["step"]
    assert read_embedding(a1111.embeddings / "ti-int.safetensors").step == stopped_at >= 2
    # the run resumes from its resume file (optimizer state included) and finishes
    body.update(steps=stopped_at + 2, resume=True)
    st = wait_job(a1111, a1111.post("/ti/v1/train", body)["job"])
    assert st["state"] == "done", st
    assert read_embedding(a1111.embeddings / "ti-int.safetensors").step == stopped_at + 2


def test_sdxl_parity_train_and_model_switch(a1111, dataset):
    switch(a1111, "tiny-sdxl")
    try:
        for prompt in ["a photo of ti-sdxl", "(ti-sdxl:1.2), " + ", ".join(f"w{i}" for i in range(80))]:
            r = a1111.post("/ti/v1/_checks/parity", {"prompt": prompt, "embedding": "ti-sdxl"})
            print("SDXL parity", r)
            assert r["shape_host"] == r["shape_ours"]
            assert r["max_abs_diff"] <= 1e-4 * max(r["scale"], 1.0)
            assert r["pooled_max_abs_diff"] <= 1e-4
        g = a1111.post("/ti/v1/_checks/gradient", {"prompt": "a photo of ti-sdxl", "embedding": "ti-sdxl"})
        assert g["vector_grad_abs_sum"]["clip_l"] > 0 and g["vector_grad_abs_sum"]["clip_g"] > 0
        assert g["weights_with_grad"] == 0
        a1111.post(
            "/ti/v1/create", {"name": "ti-xl", "vectors": 2, "init_text": "a painting", "overwrite": True}
        )
        body = train_body("ti-xl", dataset, 10, validation_every=5)
        st = wait_job(a1111, a1111.post("/ti/v1/train", body)["job"])
        print("SDXL training", st["state"], st["message"], st["val_losses"])
        assert st["state"] == "done", st
        assert "ti-xl" in a1111.get("/sdapi/v1/embeddings")["loaded"]
        assert read_embedding(a1111.embeddings / "ti-xl.safetensors").step == 10
        assert "ti-xl" in txt2img(a1111, unique("a photo of ti-xl"))["info"]

        # a checkpoint switch requested mid-training: saved, stopped, then the switch goes through
        body["steps"] = 500
        job_id = a1111.post("/ti/v1/train", body)["job"]
        wait_step(a1111, job_id, 2)
        t = threading.Thread(target=switch, args=(a1111, "tiny-sd1"))
        t.start()
        st = wait_job(a1111, job_id)
        t.join(timeout=300)
        print("model switch", st["state"], st["message"])
        assert (st["state"], st["outcome"]) == ("stopped", "model_changed"), st
        assert "checkpoint change requested" in st["message"]
        assert "tiny-sd1" in a1111.get("/sdapi/v1/options")["sd_model_checkpoint"]
    finally:
        switch(a1111, "tiny-sd1")

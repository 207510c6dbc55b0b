"""SDXL on the real AUTOMATIC1111 web UI through /ti/v1: parity, gradients, training, a checkpoint switch
mid-run; and the helpers the other host tests share. The SD1 flow (create, merge, parity, training,
Interrupt, resume, switch) runs on every host in test_hosts_flow.py."""

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

"""A web UI killed with SIGKILL mid-run loses only the steps since the last automatic resume point.

On the real AUTOMATIC1111 (SD_WEBUI_DIR) and Forge Neo (SD_NEO_DIR) hosts, each started for this test
on a port of its own (SD_WEBUI_CRASH_PORT 7862, SD_NEO_CRASH_PORT 7892) with its own embeddings and
log folders: a run with the default resume points (every 100 steps) is killed with ``kill -9`` (the
whole process group, as the out-of-memory killer or a closed terminal does) after step 110; after a
restart ``GET /ti/v1/embeddings`` and the Train view show the unfinished run, ``"resume": true``
continues it from step 101 with its own settings, and the final vectors equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lib_ti.io.formats import read_embedding
from lib_ti.training.resume import POINT_EVERY_STEPS, read_info_file

from .conftest import A1111_FLAGS, NEO_FLAGS, checkout, running_host, start_on
from .test_a1111_training import wait_job

pytestmark = pytest.mark.host

#: the run: the tab's defaults except what keeps it short on a CPU (64 px, one image per step)
STEPS = 150
KILL_AFTER = POINT_EVERY_STEPS + 10


def body(name: str, dataset: Path) -> dict:
    return {"embedding": name, "dataset_dir": str(dataset), "steps": STEPS, "resolution": 64,
            "batch_size": 1, "grad_accum": 1}  # fmt: skip


@contextlib.contextmanager
def start(which: str, root: Path, run: int) -> Iterator[tuple[object, object]]:
    """The host ``which`` on the CPU with ``root/embeddings`` and ``root/logs``; its log is ``root/webui-<run>.log``."""
    log = root / f"webui-{run}.log"
    folders = ["--ti-log-dir", str(root / "logs")]
    if which == "a1111":
        webui, python = checkout("SD_WEBUI_DIR", "SD_WEBUI_PYTHON", "AUTOMATIC1111 host")
        port = int(os.environ.get("SD_WEBUI_CRASH_PORT", "7862"))
        with running_host(webui, python, root / "embeddings", log, port, folders, flags=A1111_FLAGS) as (
            h,
            proc,
        ):
            h.post("/sdapi/v1/reload-checkpoint", {})
            yield h, proc
        return
    webui, python = checkout("SD_NEO_DIR", "SD_NEO_PYTHON", "Forge Neo host")
    start_on(webui, os.environ.get("SD_NEO_CKPT", "rand-sd15"))
    port = int(os.environ.get("SD_NEO_CRASH_PORT", "7892"))
    with running_host(webui, python, root / "embeddings", log, port, folders, flags=NEO_FLAGS,
                      ckpt_flags=False, started_line="Startup time:") as (h, proc):  # fmt: skip
        h.post("/sdapi/v1/options", {"sd_model_checkpoint": os.environ.get("SD_NEO_CKPT", "rand-sd15")})
        yield h, proc


def unfinished(h, name: str) -> dict | None:
    items = h.get("/ti/v1/embeddings")["embeddings"]
    return next(i for i in items if i.get("name") == name)["unfinished"]


@pytest.mark.parametrize("which", ["a1111", "neo"])
def test_kill_9_mid_run_then_resume_finishes_like_an_uninterrupted_run(which, tmp_path, dataset):
    root = tmp_path
    (root / "embeddings").mkdir()
    crashed, whole = f"crash-{which}", f"whole-{which}"
    with start(which, root, 1) as (h, proc):
        for name in (crashed, whole):
            h.post("/ti/v1/create", {"name": name, "vectors": 2, "init_text": "a painting"})
        job = h.post("/ti/v1/train", body(crashed, dataset))["job"]
        deadline = time.time() + 1800
        while (st := h.get(f"/ti/v1/jobs/{job}"))["step"] < KILL_AFTER:
            assert st["state"] == "running" and time.time() < deadline, st
            time.sleep(0.2)
        seen = unfinished(h, crashed)  # the last point, seen while the run goes on
        assert seen["state"] == "training" and 0 < seen["step"] < KILL_AFTER, seen
        os.killpg(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        proc.wait(timeout=60)  # type: ignore[attr-defined]
        print(which, "killed at step", st["step"], "exit", proc.returncode)  # type: ignore[attr-defined]
    emb_file = root / "embeddings" / f"{crashed}.safetensors"
    info = read_info_file(root / "logs" / crashed / f"{crashed}.resume.safetensors")
    # the last automatic point: step 100, or an earlier one made by the 3-minute clock on a slow host
    point = info.step
    print(which, "last point", point)
    assert info.state == "running" and point in (POINT_EVERY_STEPS, seen["step"]), (info, seen)
    assert read_embedding(emb_file).step == point  # the name in prompts is the point's

    with start(which, root, 2) as (h, _proc):
        run = unfinished(h, crashed)
        print(which, "after the restart", {k: run[k] for k in ("step", "steps", "state")})
        assert (run["step"], run["steps"], run["state"]) == (point, STEPS, "interrupted")
        assert run["settings"]["dataset_dir"] == str(dataset) and run["settings"]["resolution"] == 64
        if which == "a1111":  # the Train view's note about the embedding, as the browser asks for it
            note = h.call(["ti_train_embedding"], [crashed], outputs_first="ti_train_unfinished")[0]
            assert (
                f"Unfinished run of {crashed}**: cut off (the web UI stopped, or a file could not be written) at step **{point}/{STEPS}**"
                in note
            )
        st = wait_job(h, h.post("/ti/v1/train", {"embedding": crashed, "resume": True})["job"])
        print(which, "resumed", {k: st[k] for k in ("state", "step", "resumed_from", "message")})
        assert st["state"] == "done" and st["step"] == STEPS, st
        assert st["resumed_from"] == point and st["losses"][0][0] == point + 1
        assert unfinished(h, crashed) is None
        st = wait_job(h, h.post("/ti/v1/train", body(whole, dataset))["job"])
        assert st["state"] == "done" and st["step"] == STEPS, st
    a, b = read_embedding(emb_file), read_embedding(root / "embeddings" / f"{whole}.safetensors")
    diff = max(float((a.vectors[k] - b.vectors[k]).abs().max()) for k in a.vectors)
    print(which, "max |resumed - uninterrupted| =", diff)
    for k in a.vectors:
        torch.testing.assert_close(a.vectors[k], b.vectors[k], atol=1e-5, rtol=1e-4)
    assert list(root.rglob("*.tmp")) == []  # a write the kill cut short is cleaned up by the next run
    rows = (root / "logs" / crashed / f"{crashed}.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, STEPS + 1))

"""Data-parallel training (``--parallel data``) on tiny real models: a real 2-process gloo job on the CPU,
started the way torchrun starts one (its environment, :func:`init_from_env`), against the same runs in
one process. N processes with batch B must give the vectors of one process with batch B."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lib_ti.headless import distributed
from lib_ti.io.safetensors_io import load_bytes
from lib_ti.training.errors import TrainingError
from lib_ti.training.parallel import LocalShard

from . import dp_worker as dpw
from . import train_models as tm
from .test_train import start

ROOT = Path(__file__).resolve().parents[1]
#: seconds the 2-process job may take before it counts as hung (a collective waits at most 120 s)
TIMEOUT = 600
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(out: Path, images: Path) -> list[dict[str, Any]]:
    """Run tests.dp_worker as ranks 0 and 1 of a job (torchrun's environment); what each wrote."""
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
        logs.append(out / f"rank{rank}.log")
        with open(logs[-1], "w") as log:
            cmd = [sys.executable, "-m", "tests.dp_worker", str(out), str(images)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(f"--- rank {r}\n{logs[r].read_text()[-3000:]}" for r in range(2))
    assert [p.returncode for p in procs] == [0, 0], tails
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process results, [rank 0's, rank 1's], the job's folder)."""
    out = tmp_path_factory.mktemp("dp")
    images = dpw.image_folder(out / "images")
    one = {
        name: dpw.run_scenario(name, images, out / "one")
        for name in ("b2", "b3a2", "sdxl", "full", "stop", "nan_all")
    }
    (out / "resume1.bin").write_bytes(one["stop"]["resume_written"][-1])
    started = time.perf_counter()
    two = launch(out, images)
    print(f"2-process job: {time.perf_counter() - started:.1f} s")
    # the resume file the 2-process job wrote when stopped, resumed in one process
    one["resume"] = dpw.run_scenario(
        "resume", images, out / "one", resume=two[0]["stop"]["resume_written"][-1]
    )
    return one, two, out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def resume_contents(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = load_bytes(data, "resume")
    info = json.loads(meta["resume"])
    info.pop("saved_at")
    return tensors, info


def assert_ranks_agree(two: list[dict[str, Any]], name: str) -> None:
    """Both processes ended alike, with bit-identical vectors and resume state."""
    r0, r1 = two[0][name], two[1][name]
    assert (r0["status"], r0["step"]) == (r1["status"], r1["step"])
    assert all(torch.equal(r0["vectors"][k], r1["vectors"][k]) for k in r0["vectors"])
    assert r0["losses"] == r1["losses"]
    assert r0["val_losses"] == r1["val_losses"]
    (t0, i0), (t1, i1) = resume_contents(r0["state"]), resume_contents(r1["state"])
    assert i0 == i1
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)


@pytest.mark.parametrize("name", ["b2", "b3a2", "sdxl"])
def test_two_processes_equal_one(runs, name):
    """batch 2; batch 3 x accumulation 2 (rank 1 gets one row of three, and none of the last
    micro-batch); SDXL."""
    one, two, _ = runs
    assert two[0]["world"] == 2 and two[0]["backend"] == "gloo"
    ref, got = one[name], two[0][name]
    steps = dpw.SCENARIOS[name].args["steps"]
    assert ref["status"] == got["status"] == "finished"
    assert got["step"] == steps
    assert_ranks_agree(two, name)
    diff = max_diff(got["vectors"], ref["vectors"])
    print(f"{name}: max abs diff of the vectors, 2 processes vs 1: {diff:.3g}")
    assert diff < ATOL
    first = start(tm.make_parts(dpw.SCENARIOS[name].kind)).vectors
    assert max_diff(ref["vectors"], first) > 100 * ATOL  # the run did move the vectors
    # rank 0 logs the loss of the whole step (the sum over processes)
    assert [s for s, _, _ in got["progress"]] == list(range(1, steps + 1))
    assert [loss for _, loss, _ in got["progress"]] == pytest.approx(ref["losses"], rel=1e-5)
    assert all(fast for _, _, fast in got["progress"])
    assert [s for s, _ in got["val_losses"]] == [s for s, _ in ref["val_losses"]]
    assert [v for _, v in got["val_losses"]] == pytest.approx([v for _, v in ref["val_losses"]], rel=1e-5)
    if name == "b2":
        assert len(got["val_losses"]) == 3  # step 0, 2 and the last


def test_only_rank_0_writes(runs):
    one, two, out = runs
    for name in dpw.PAIR:
        r1 = two[1][name]
        assert (r1["saved"], r1["progress"], r1["previews"], r1["resume_written"]) == ([], [], [], []), name
    assert two[0]["b2"]["saved"] == one["b2"]["saved"] == [("final", 3)]
    assert len(two[0]["b2"]["resume_written"]) == 1
    # both processes were given the same log folder; one CSV log, written once
    rows = (out / "logs" / "b2" / "tiemb.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss")
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_stop_under_two_resume_under_one(runs):
    one, two, _ = runs
    for rank in range(2):
        assert (two[rank]["stop"]["status"], two[rank]["stop"]["step"]) == ("stopped", 2)
    assert two[0]["stop"]["saved"] == [("stopped", 2)]
    assert_ranks_agree(two, "stop")
    resumed, full = one["resume"], one["full"]
    assert resumed["status"] == "finished"
    diff = max_diff(resumed["vectors"], full["vectors"])
    print(f"stopped under 2, resumed under 1: max abs diff {diff:.3g}")
    assert diff < ATOL
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-5)
    assert [s for s, _ in resumed["val_losses"]] == [s for s, _ in full["val_losses"]] == [0, 2, 4]
    assert [v for _, v in resumed["val_losses"]] == pytest.approx(
        [v for _, v in full["val_losses"]], rel=1e-5
    )


def test_a_stop_seen_by_one_process_stops_both(runs):
    """Only rank 1 is asked to stop (Ctrl-C reaching it first): both stop at the same step, and
    rank 0 saves."""
    _, two, _ = runs
    for rank in range(2):
        r = two[rank]["stop_rank_1"]
        assert (r["status"], r["step"]) == ("stopped", 2), r["message"]
    assert_ranks_agree(two, "stop_rank_1")
    assert two[0]["stop_rank_1"]["saved"] == [("stopped", 2)]


def test_stop_under_one_resume_under_two(runs):
    one, two, _ = runs
    assert (one["stop"]["status"], one["stop"]["step"]) == ("stopped", 2)
    assert_ranks_agree(two, "resume")
    resumed, full = two[0]["resume"], one["full"]
    assert (resumed["status"], resumed["step"]) == ("finished", 4)
    diff = max_diff(resumed["vectors"], full["vectors"])
    print(f"stopped under 1, resumed under 2: max abs diff {diff:.3g}")
    assert diff < ATOL
    assert [loss for _, loss, _ in resumed["progress"]] == pytest.approx(full["losses"][2:], rel=1e-5)
    assert [s for s, _ in resumed["val_losses"]] == [0, 2, 4]


def test_nan_on_one_process_fails_both_at_the_same_step(runs):
    """NaN from rank 1's denoiser in step 2 only: both processes end "failed" after step 1 with the
    vectors of step 1 (those one process keeps when its step 2 gives NaN); nobody hangs."""
    one, two, _ = runs
    for rank in range(2):
        r = two[rank]["nan"]
        assert (r["status"], r["step"]) == ("failed", 1), r["message"]
        assert "NaN" in r["message"] and "at step 2" in r["message"]
    assert_ranks_agree(two, "nan")
    assert two[0]["nan"]["saved"] == [("failed", 1)]
    ref = one["nan_all"]
    assert (ref["status"], ref["step"]) == ("failed", 1)
    assert all(torch.isfinite(v).all() for v in two[0]["nan"]["vectors"].values())
    diff = max_diff(two[0]["nan"]["vectors"], ref["vectors"])
    print(f"NaN on rank 1: max abs diff of the kept vectors {diff:.3g}")
    assert diff < ATOL


def test_a_write_failing_on_rank_0_ends_both(runs):
    """Rank 0 cannot write its resume point after step 1: both end at the next step boundary."""
    _, two, _ = runs
    r0, r1 = two[0]["write"], two[1]["write"]
    assert (r0["status"], r0["step"]) == (r1["status"], r1["step"]) == ("failed", 1)
    assert "No space left on device" in r0["message"]
    assert "another process could not write" in r1["message"]
    assert r0["resume_written"]  # the resume file of the point went first, then the embedding failed


def test_sharded_code_path_of_one_process_is_exact(runs, tmp_path):
    """A one-process shard runs the data-parallel code path; it must give today's bits."""
    one, _, out = runs
    shard = LocalShard()
    assert (shard.rows(3), shard.sum_floats([1.5]), shard.any(False, True)) == (
        [0, 1, 2],
        [1.5],
        (False, True),
    )
    got = dpw.run_scenario("b3a2", out / "images", tmp_path, shard=shard)
    ref = one["b3a2"]
    assert all(torch.equal(got["vectors"][k], ref["vectors"][k]) for k in ref["vectors"])
    assert got["losses"] == ref["losses"]


def test_rows_of_a_micro_batch():
    class Two(LocalShard):
        def __init__(self, rank: int) -> None:
            super().__init__()
            self.rank, self.world = rank, 2

    assert [Two(r).rows(3) for r in range(2)] == [[0, 2], [1]]
    assert [Two(r).rows(1) for r in range(2)] == [[0], []]


def test_init_from_env_without_a_job(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="RANK"):
        distributed.init_from_env()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TrainingError, match="MASTER_ADDR and MASTER_PORT"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(TrainingError, match="whole number"):
        distributed.init_from_env()

"""``torchrun`` launches of ``python -m lib_ti train`` with 2 CPU processes (gloo): a queue shared between
them (--parallel jobs), and one run split over them (--parallel data) equal to one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lib_ti.io.formats import read_embedding

from .conftest import ROOT
from .test_headless import base_args, ckpts, images, read_sha  # noqa: F401 (fixtures)

ENTRY = str(ROOT / "tests" / "headless_entry.py")


def torchrun(args, tmp_path, n=2):
    env = {**os.environ, "LIB_TI_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        ENTRY,
        *args,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_jobs_mode_trains_two_concepts_in_two_processes(ckpts, images, tmp_path):  # noqa: F811
    q = tmp_path / "jobs.toml"
    q.write_text(
        f"""
[defaults]
checkpoint = "{ckpts["sd1"].path.as_posix()}"
resolution = 64
steps = 3
batch_size = 2
grad_accum = 1
validation_every = 0
snapshot_every = 0
preview_every = 0
out = "emb"

[[job]]
name = "pa"
data = "{images.as_posix()}"
init_text = "a cat"

[[job]]
name = "pb"
data = "{images.as_posix()}"
init_text = "a dog"
""",
        encoding="utf-8",
    )
    r = torchrun(["train", "--queue", str(q)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("pa", "pb"):
        emb = read_embedding(tmp_path / "emb" / f"{name}.safetensors")
        assert (emb.step, emb.sd_checkpoint) == (3, read_sha(ckpts["sd1"].path))
    started = {line.split("]")[0] + "]": line for line in r.stderr.splitlines() if ": starting [" in line}
    assert set(started) == {"[rank 0]", "[rank 1]"}, r.stderr[-3000:]  # one job each
    assert r.stderr.count("pa: starting [") == 1 and r.stderr.count("pb: starting [") == 1  # once each
    assert "claimed by another process" in r.stderr
    # run again: both finished, nothing trained
    r2 = torchrun(["train", "--queue", str(q)], tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert ": starting [" not in r2.stderr and "already finished" in r2.stderr


def test_data_mode_equals_one_process(ckpts, images, tmp_path):  # noqa: F811
    """Batch 3 over 2 processes (rows 2 + 1) equals batch 3 in one process; only rank 0 writes."""
    args = ["--name", "dp", "--init-text", "a tabby cat", "--batch-size", "3", "--grad-accum", "2"]
    args += ["--steps", "4", "--validation-every", "2", "--seed", "11"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, ENTRY, *base_args(ckpts["sd1"], images, one, *args), "--log-dir", str(one / "logs")],
        cwd=tmp_path, env={**os.environ, "LIB_TI_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    r = torchrun(
        [*base_args(ckpts["sd1"], images, two, *args), "--parallel", "data", "--log-dir", str(two / "logs")],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_embedding(one / "dp.safetensors"), read_embedding(two / "dp.safetensors")
    diff = float((a.vectors["clip_l"] - b.vectors["clip_l"]).abs().max())
    print(f"dp2 vs 1: max abs diff {diff:.3g}")
    assert diff < 1e-5
    assert b.step == 4
    assert "[rank 1]" in r.stderr and "dp: finished" in r.stderr
    rows = (two / "logs" / "dp" / "dp.csv").read_text().splitlines()  # one writer: one row per step
    assert len(rows) == 5
    assert rows[1:] != [] and [r.split(",")[1] for r in rows[1:]] == [
        r.split(",")[1] for r in (one / "logs" / "dp" / "dp.csv").read_text().splitlines()[1:]
    ]  # rank 0 logs the whole batch's loss


@pytest.mark.parametrize("mode", ["jobs"])
def test_jobs_mode_without_a_queue_is_refused(mode, tmp_path):
    r = torchrun(["train", "--parallel", mode, "--name", "x", "--data", "."], tmp_path)
    assert r.returncode != 0
    assert "--queue" in r.stderr


def test_data_mode_queue_fails_a_job_together_and_goes_on(ckpts, images, tmp_path):  # noqa: F811
    """A job that cannot start (no init text, no file) fails on both processes at once, without a hang,
    and the next job trains."""
    q = tmp_path / "jobs.toml"
    q.write_text(
        f"""
[defaults]
checkpoint = "{ckpts["sd1"].path.as_posix()}"
data = "{images.as_posix()}"
resolution = 64
steps = 2
batch_size = 2
grad_accum = 1
validation_every = 0
preview_every = 0
out = "emb"
parallel = "data"

[[job]]
name = "da"

[[job]]
name = "db"
init_text = "a dog"
""",
        encoding="utf-8",
    )
    r = torchrun(["train", "--queue", str(q)], tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("da: failed") == 2  # both ranks, the same reason
    assert "give --init-text to create it" in r.stderr
    assert read_embedding(tmp_path / "emb" / "db.safetensors").step == 2

"""Nothing lost when the web UI dies: automatic resume points, resume after a real SIGKILL, failing
writes, corrupt or foreign resume files, and two clients at once (tiny real models, the service)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from lib_ti.create import CreateArgs
from lib_ti.embedding import Embedding
from lib_ti.errors import EmbeddingExists, TIError
from lib_ti.io import atomic
from lib_ti.io.atomic import atomic_write_bytes
from lib_ti.io.formats import read_embedding
from lib_ti.training import trainer as trainer_module
from lib_ti.training.resume import read_info_file
from lib_ti.training.trainer import TrainArgs, TrainCallbacks, Trainer

from . import crash_worker as cw
from .test_train import dataset, start

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path):
    for d in ("embeddings", "logs", "data"):
        (tmp_path / d).mkdir()
    for i, c in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        Image.new("RGB", (64, 64), c).save(tmp_path / "data" / f"{i}.png")
        (tmp_path / "data" / f"{i}.txt").write_text(f"color {i}, plain")
    return tmp_path


@pytest.fixture
def every_point(monkeypatch):
    """Points exactly every N steps: the 1 % cost limit would space the tests' frequent points out."""
    monkeypatch.setattr(trainer_module, "POINT_MAX_SHARE", 1.0)


def request(root: Path, name: str, steps: int, **kw) -> dict:
    return {"embedding": name, "dataset_dir": str(root / "data"), "steps": steps, **cw.REQUEST, **kw}


def new(service, name: str) -> Path:
    return service.create(CreateArgs(name, 2, "text", "a painting"))[0]


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def steps_of_reloads(service, name: str) -> list[int]:
    """Record the embedding file's step at every hot reload of the host."""
    seen: list[int] = []
    path = Path(service.host.embeddings_dir()) / f"{name}.safetensors"
    service.host.reload_embeddings = lambda: seen.append(read_embedding(path).step)
    return seen


def stop_at(service, step: int) -> None:
    """The host's Interrupt button, pressed once the run reached ``step``."""
    reached = {"step": 0}
    service.host.progress_update = lambda s, text: reached.update(step=s)
    service.host.interrupted = lambda: reached["step"] >= step


# ---------------------------------------------------------------------- automatic resume points
def test_points_update_the_embedding_and_the_resume_file(root, every_point):
    service = cw.service(root, point_every=2)
    new(service, "pts")
    seen = steps_of_reloads(service, "pts")
    (root / "logs" / "pts").mkdir()
    left = [root / "embeddings" / ".pts.safetensors.k1l2.tmp", root / "logs" / "pts" / ".pts.csv.x.tmp"]
    other = root / "embeddings" / ".ptsx.safetensors.k1l2.tmp"
    for p in (*left, other):
        p.write_bytes(b"half a file a killed run left")
    st = service.start_training(request(root, "pts", 5), background=False).status
    assert not any(p.exists() for p in left) and other.exists()  # only this embedding's are removed
    assert st.state == "finished", st.message
    assert seen == [2, 4, 5]  # the name in prompts follows the points, then the final vectors
    info = read_info_file(service.resume_file("pts"))
    assert (info.step, info.steps, info.state, info.kind) == (5, 5, "finished", "sd1")
    assert info.settings["dataset_dir"] == str(root / "data") and info.settings["seed"] == 3
    assert service.unfinished_runs() == {}
    assert st.timings["points"] > 0


def test_points_by_time_and_a_slow_disk_spaces_them_out(root):
    parts, data = dataset(root / "data", "sd1")
    emb = start(parts)
    points: list[int] = []

    def record(e, why):
        if why == "point":
            points.append(e.step)

    args = TrainArgs(steps=4, validation_every=0, point_every=0, point_seconds=1e-6)
    Trainer(parts, data, emb, args, TrainCallbacks(save=record)).run()
    assert points == [1, 2, 3]  # due by time at every step (not at the last: the final save is)

    points.clear()

    def slow(e, why):
        record(e, why)
        if why == "point":
            time.sleep(0.2)  # a point that costs 0.2 s may come again only after 20 s (1 %)

    args = TrainArgs(steps=4, validation_every=0, point_every=1)
    result = Trainer(parts, data, emb, args, TrainCallbacks(save=slow)).run()
    assert points == [1]
    assert result.timings["points"] >= 0.2


def test_points_off_by_setting_zero_keeps_the_time_limit(root):
    service = cw.service(root, point_every=0)
    assert service._point_every() == 0
    service.host.get_option = lambda key, default: {"ti_resume_every": "bad"}.get(key, default)
    assert service._point_every() == 100


# ---------------------------------------------------------------------- a real crash
def test_sigkill_then_resume_equals_an_uninterrupted_run(root):
    service = cw.service(root, point_every=6)
    new(service, "crashed")
    new(service, "whole")
    resume_file = service.resume_file("crashed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_worker", str(root), "crashed", "16", "6"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        emb_file = root / "embeddings" / "crashed.safetensors"
        while not resume_file.exists() or not read_embedding(emb_file).step:  # both files of the point
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "no resume point within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    run = service.unfinished_runs()["crashed"]
    point = run["step"]
    assert run["state"] == "interrupted" and run["steps"] == 16 and point in (6, 12), run
    assert run["settings"]["seed"] == 3 and run["settings"]["resolution"] == 64
    assert read_embedding(root / "embeddings" / "crashed.safetensors").step == point  # updated at the point
    assert temporary_files(root) == []

    # one click: only the name and "resume"; the rest comes from the run that was cut off
    st = service.start_training({"embedding": "crashed", "resume": True}, background=False).status
    assert st.state == "finished", st.message
    assert st.resumed_from == point and st.losses[0][0] == point + 1 and st.step == 16
    whole = service.start_training(request(root, "whole", 16), background=False).status
    assert whole.state == "finished", whole.message
    a = read_embedding(root / "embeddings" / "crashed.safetensors")
    b = read_embedding(root / "embeddings" / "whole.safetensors")
    torch.testing.assert_close(a.vectors["clip_l"], b.vectors["clip_l"], atol=1e-6, rtol=1e-5)
    rows = (root / "logs" / "crashed" / "crashed.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 17))  # the steps after the point, once
    assert service.unfinished_runs() == {}


# ---------------------------------------------------------------------- failing writes
class _Disk:
    """Stands in for ``os`` and ``tempfile`` inside :mod:`lib_ti.io.atomic`: writes to files whose
    name contains ``fail_for`` fail like a full disk halfway through, or like a read-only folder."""

    def __init__(self) -> None:
        self.fail_for: str | None = None
        self.how = "enospc"
        self._names: dict[int, str] = {}
        self.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        self.os.fdopen = self.fdopen
        self.tempfile = types.SimpleNamespace(mkstemp=self.mkstemp)

    def armed(self, name: str) -> bool:
        return self.fail_for is not None and self.fail_for in name

    def mkstemp(self, prefix: str, suffix: str, dir: Path):  # noqa: A002 (tempfile's name)
        if self.how == "eacces" and self.armed(prefix):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
        self._names[fd] = name
        return fd, name

    def fdopen(self, fd: int, mode: str):
        f = os.fdopen(fd, mode)
        if self.how != "enospc" or not self.armed(Path(self._names.get(fd, "")).name):
            return f
        real_write = f.write

        def write(data):
            real_write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        f.write = write
        return f


@pytest.fixture
def disk(monkeypatch):
    d = _Disk()
    monkeypatch.setattr(atomic, "os", d.os)
    monkeypatch.setattr(atomic, "tempfile", d.tempfile)
    return d


@pytest.mark.parametrize(
    ("target", "how", "reason", "kept"),
    [
        ("resume", "enospc", "No space left on device", 2),
        ("embedding", "enospc", "No space left on device", 4),
        ("resume", "eacces", "Permission denied", 2),
    ],
)
def test_a_failing_write_stops_the_run_and_keeps_the_last_good_files(
    root, disk, every_point, target, how, reason, kept
):
    service = cw.service(root, point_every=2)
    new(service, "full")
    files = {"resume": service.resume_file("full"), "embedding": root / "embeddings" / "full.safetensors"}
    disk.how = how

    def arm(step: int, text: str) -> None:
        if step == 3:  # the point at step 4 fails
            disk.fail_for = files[target].name

    service.host.progress_update = arm
    st = service.start_training(request(root, "full", 7), background=False).status
    assert st.state == "failed" and st.step == 4, st.message
    assert f"could not write {files[target]}: {reason}" in st.message
    assert f"resuming continues from step {kept}" in st.message
    assert read_embedding(files["embedding"]).step == 2  # the last good point, readable
    assert read_info_file(files["resume"]).step == kept
    assert temporary_files(root) == []

    disk.fail_for = None  # space freed: the run goes on from its last point
    service.host.progress_update = lambda step, text: None
    st = service.start_training({"embedding": "full", "resume": True}, background=False).status
    assert st.state == "finished" and st.resumed_from == kept and st.step == 7, st.message


def test_a_failing_final_save_keeps_the_last_point_resumable(root, disk, every_point):
    service = cw.service(root, point_every=2)
    new(service, "last")
    emb_file = root / "embeddings" / "last.safetensors"

    def arm(step: int, text: str) -> None:
        if step == 7:  # the final save's embedding write fails
            disk.fail_for = emb_file.name

    service.host.progress_update = arm
    st = service.start_training(request(root, "last", 7), background=False).status
    assert st.state == "failed" and st.step == 7, st.message
    assert f"could not write {emb_file}: No space left on device" in st.message
    assert "resuming continues from step 6" in st.message
    assert read_embedding(emb_file).step == 6
    assert service.unfinished_runs()["last"]["state"] == "interrupted"  # not "finished": it can go on
    disk.fail_for = None
    service.host.progress_update = lambda step, text: None
    st = service.start_training({"embedding": "last", "resume": True}, background=False).status
    assert st.state == "finished" and st.resumed_from == 6 and read_embedding(emb_file).step == 7


def test_an_unusable_log_folder_is_named_and_the_embedding_untouched(root):
    service = cw.service(root)
    path = new(service, "nolog")
    before = path.read_bytes()
    (root / "logs" / "nolog").write_text("a file where the run's folder goes")
    job = service.start_training(request(root, "nolog", 3), background=False)
    assert job.status.state == "error"
    assert f"could not write {root / 'logs' / 'nolog'}" in job.status.message
    assert path.read_bytes() == before


def test_a_write_that_fails_halfway_leaves_the_old_file(tmp_path, disk):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    disk.fail_for = "x.bin"
    with pytest.raises(OSError, match=f"could not write {target}: No space left on device") as e:
        atomic_write_bytes(target, b"new" * 1000)
    assert isinstance(e.value, TIError) and e.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


# ---------------------------------------------------------------------- corrupt or foreign resume files
def stopped_run(service, root: Path, name: str) -> Path:
    new(service, name)
    stop_at(service, 2)
    st = service.start_training(request(root, name, 6), background=False).status
    assert st.state == "stopped" and st.step == 2, st.message
    service.host.interrupted = lambda: False
    return service.resume_file(name)


def test_a_stopped_run_is_listed_and_resumes_with_its_settings(root):
    service = cw.service(root)
    stopped_run(service, root, "halt")
    run = service.unfinished_runs()["halt"]
    assert (run["step"], run["steps"], run["state"]) == (2, 6, "stopped")
    assert run["settings"]["lr"] == "2e-2" and run["model"] == "tiny-sd1"
    st = service.start_training({"embedding": "halt", "resume": True}, background=False).status
    assert st.state == "finished" and st.step == 6 and st.resumed_from == 2, st.message


def test_a_replaced_embedding_or_a_new_run_forgets_the_old_run(root):
    service = cw.service(root)
    stopped_run(service, root, "gone")
    service.create(CreateArgs("gone", 2, "text", "a dog"), overwrite=True)  # same layout, new vectors
    assert "gone" not in service.unfinished_runs() and not service.resume_file("gone").exists()
    with pytest.raises(TIError, match="gone has no unfinished run"):
        service.start_training({"embedding": "gone", "resume": True})
    stopped_run(service, root, "anew")
    service.host.interrupted = lambda: True  # a new run (Resume off), stopped before its first point
    st = service.start_training(request(root, "anew", 4), background=False).status
    assert st.state == "stopped" and "anew" not in service.unfinished_runs()


def sdxl_resume_bytes(name: str, folder: Path) -> bytes:
    parts, data = dataset(folder, "sdxl", name=name)
    emb = Embedding(name, start(parts).vectors)
    return Trainer(parts, data, emb, TrainArgs(steps=1, validation_every=0)).resume_bytes()


@pytest.mark.parametrize(
    ("make", "why"),
    [
        ("truncated", "truncated"),
        ("garbage", "too short to be a safetensors file"),
        ("an embedding", "is not a resume file of this extension"),
        ("another embedding", "belongs to the embedding 'other', not 'odd'"),
        ("another kind", "was made on an SDXL model; the loaded model is SD1"),
        ("another shape", "holds vectors clip_l 3x768 but odd has clip_l 2x768 (the embedding was replaced"),
        ("missing", "odd has no unfinished run"),
    ],
)
def test_a_bad_resume_file_is_refused_with_the_reason_then_a_fresh_start_works(root, make, why):
    service = cw.service(root)
    good = stopped_run(service, root, "other")
    target = service.resume_file("odd")
    new(service, "odd")
    target.parent.mkdir(parents=True, exist_ok=True)
    if make == "truncated":
        data = good.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif make == "garbage":
        target.write_bytes(b"hello")
    elif make == "an embedding":
        shutil.copy(root / "embeddings" / "odd.safetensors", target)
    elif make == "another embedding":
        shutil.copy(good, target)
    elif make == "another kind":
        target.write_bytes(sdxl_resume_bytes("odd", root / "data"))
    elif make == "another shape":
        parts, data = dataset(root / "data", "sd1", name="odd")
        three = Embedding("odd", {"clip_l": torch.randn(3, 768) * 0.01})
        target.write_bytes(Trainer(parts, data, three, TrainArgs(steps=3, validation_every=0)).resume_bytes())
    listed = service.unfinished_runs().get("odd")
    if make in ("truncated", "garbage", "an embedding"):
        assert why in listed["error"]  # GET /ti/v1/embeddings shows why the run cannot go on
    with pytest.raises(TIError) as e:
        service.start_training({"embedding": "odd", "resume": True, "dataset_dir": str(root / "data")})
    assert why in str(e.value) and "cannot resume" in str(e.value)
    assert 'untick Resume (or send "resume": false) to start a new run' in str(e.value)
    # start fresh without deleting anything by hand: the new run replaces the resume file
    st = service.start_training(request(root, "odd", 2), background=False).status
    assert st.state == "finished", st.message
    assert read_info_file(target).name == "odd"


# ---------------------------------------------------------------------- two clients at once
def test_create_and_merge_during_a_run_leave_the_trained_file_alone(root):
    service = cw.service(root, point_every=1)
    new(service, "busy")
    job = service.start_training(request(root, "busy", 8))
    try:
        deadline = time.monotonic() + 120
        while job.status.step < 2:
            assert job.status.running and time.monotonic() < deadline, job.status.message
            time.sleep(0.02)
        assert service.unfinished_runs()["busy"]["state"] == "training"  # not offered for resuming
        assert new(service, "beside").exists()  # files only: no wait for the GPU
        assert service.merge("'beside' * 2", "merged").exists()
        for attempt in (
            lambda: service.create(CreateArgs("busy", 1, "zeros"), overwrite=True),
            lambda: service.merge("'beside'", "busy", overwrite=True),
        ):
            with pytest.raises(EmbeddingExists, match=f"'busy' is being trained \\(job {job.id}\\)"):
                attempt()
        assert job.status.running
    finally:
        job.thread.join(timeout=300)
    assert job.status.state == "finished", job.status.message
    trained = read_embedding(root / "embeddings" / "busy.safetensors")
    assert trained.step == 8 and trained.num_vectors == 2


def test_two_creates_of_one_name_at_once_give_one_file_and_one_refusal(root):
    service = cw.service(root)
    barrier = threading.Barrier(6)
    results: list[object] = []

    def create(fmt: str) -> None:
        barrier.wait()
        try:
            results.append(service.create(CreateArgs("twin", 1, "zeros"), fmt=fmt)[0])
        except EmbeddingExists as e:
            results.append(e)

    threads = [threading.Thread(target=create, args=(f,)) for f in ["safetensors", "pt"] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [r for r in results if isinstance(r, Path)]
    refused = [r for r in results if isinstance(r, EmbeddingExists)]
    assert len(made) == 1 and len(refused) == 5
    assert "an embedding named 'twin' already exists" in str(refused[0])
    assert sorted(p.name for p in (root / "embeddings").glob("twin.*")) == sorted([made[0].name, "twin.json"])


def test_racing_no_overwrite_writes_give_one_winner(tmp_path):
    target = tmp_path / "race.bin"
    barrier = threading.Barrier(16)
    won: list[bytes] = []

    def write(i: int) -> None:
        data = f"writer {i}".encode() * 1000
        barrier.wait()
        try:
            atomic_write_bytes(target, data, overwrite=False)
            won.append(data)
        except EmbeddingExists:
            pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and target.read_bytes() == won[0]
    assert [p.name for p in tmp_path.iterdir()] == ["race.bin"]


# ---------------------------------------------------------------------- the REST API
def test_the_api_lists_unfinished_runs_and_resumes_one_with_its_settings(root):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    service = cw.service(root)
    stopped_run(service, root, "api")
    new(service, "fresh")
    app = FastAPI()
    add_routes(app, service)
    client = TestClient(app)
    items = {i["name"]: i for i in client.get("/ti/v1/embeddings").json()["embeddings"]}
    assert items["fresh"]["unfinished"] is None
    run = items["api"]["unfinished"]
    assert (run["step"], run["steps"], run["state"]) == (2, 6, "stopped") and run["settings"]["seed"] == 3
    r = client.post(
        "/ti/v1/train", json={"embedding": "fresh", "resume": True, "dataset_dir": str(root / "data")}
    )
    assert r.status_code == 400 and "fresh has no unfinished run" in r.json()["detail"]
    r = client.post("/ti/v1/train", json={"embedding": "api", "resume": True})
    assert r.status_code == 202, r.text
    job = service.jobs.get(r.json()["job"])
    job.thread.join(timeout=300)
    st = client.get(f"/ti/v1/jobs/{job.id}").json()
    assert st["state"] == "done" and st["resumed_from"] == 2 and st["step"] == 6, st


def test_a_stop_while_latents_are_cached_ends_the_job_at_once(root):
    service = cw.service(root)
    path = new(service, "early")
    before = path.read_bytes()
    service.host.interrupted = lambda: True  # the host's Interrupt, pressed before the first step
    st = service.start_training(request(root, "early", 5), background=False).status
    assert st.state == "stopped" and st.step == 0
    assert "stopped while caching latents (0/3); nothing was trained or written" in st.message
    assert path.read_bytes() == before and not service.resume_file("early").exists()


def test_temporaries_of_other_files_are_left_alone(tmp_path):
    from lib_ti.io.atomic import remove_temporaries

    mine = [tmp_path / ".cat.safetensors.a1b2c3d4.tmp", tmp_path / ".cat.json.zz_9xk2m.tmp"]
    others = [tmp_path / ".cat.v2.safetensors.a1b2c3d4.tmp", tmp_path / ".cats.json.a1b2c3d4.tmp"]
    for p in (*mine, *others):
        p.write_bytes(b"")
    assert sorted(remove_temporaries(tmp_path, ["cat.safetensors", "cat.json"])) == sorted(mine)
    assert all(p.exists() for p in others)


def test_windows_retries_a_replace_that_a_reader_blocks(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    fake.name = "nt"

    def replace(src, dst):
        calls.append(dst)
        if len(calls) < 3:  # another process holds the old file open
            raise PermissionError(errno.EACCES, "Access is denied")
        os.replace(src, dst)

    fake.replace = replace
    monkeypatch.setattr(atomic, "os", fake)
    monkeypatch.setattr(atomic, "REPLACE_PAUSE", 0.0)
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and len(calls) == 3
    fake.name = "posix"  # elsewhere a refused replace is an error at once
    calls.clear()
    with pytest.raises(OSError, match="could not write"):
        atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_resume_keeps_the_validation_history_and_the_best_vectors(root):
    """Early stopping after a resume decides as the uninterrupted run does: the validation history and
    the best vectors so far travel in the resume file."""
    parts, data = dataset(root / "data", "sd1", templates=("a photo of [name]", "[name], [filewords]"))
    emb = start(parts)
    # the best validation is at step 1, and the third one without improvement (step 4) ends the run
    args = TrainArgs(steps=16, lr="5e-2", validation_every=1, validation_size=3, early_stop_patience=3,
                     norm_control="off", seed=4)  # fmt: skip
    full = Trainer(parts, data, emb, args).run()
    calls = {"n": 0}
    resume: dict[str, bytes] = {}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 2

    cb = TrainCallbacks(should_stop=should_stop, save_resume=lambda b: resume.update(data=b))
    first = Trainer(parts, data, emb, args, cb).run()
    assert first.status == "stopped" and first.step == 2
    resumed = Trainer(parts, data, emb, args, resume=resume["data"])
    assert resumed.best is not None and resumed.best.step == 1
    assert [s for s, _ in resumed.val_losses] == [0, 1, 2]
    second = resumed.run()
    print("full:", full.status, full.step, full.message)
    assert full.status == "early_stopped" and full.step == 4  # the case this test is about
    assert (second.status, second.step, second.message) == (full.status, full.step, full.message)
    torch.testing.assert_close(second.embedding.vectors["clip_l"], full.embedding.vectors["clip_l"])
    assert second.embedding.step == full.embedding.step

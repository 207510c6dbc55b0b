"""The queue of headless training jobs: the TOML file, claims between processes, running and the summary."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest

from lib_ti.errors import InvalidNameError, TIError
from lib_ti.headless.queue import (
    Claims,
    JobOutcome,
    QueueError,
    QueueInterrupted,
    QueueJob,
    _toml_module,
    exit_code,
    format_seconds,
    load_queue,
    run_queue,
    summary_table,
)

KNOWN = ("checkpoint", "steps", "vectors", "out", "init_text", "learning_rate")

QUEUE = """
[defaults]
checkpoint = "models/sdxl.safetensors"
steps = 1500
vectors = 4
out = "embeddings"

[[job]]
name = "mycat"
data = "images/mycat"
init_text = "a tabby cat"

[[job]]
name = "mydog"
data = "images/mydog"
init_text = "a dog"
steps = 2000
"""


def write(tmp_path: Path, text: str, name: str = "jobs.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> list[QueueJob]:
    return load_queue(write(tmp_path, text), KNOWN)


# ------------------------------------------------------------------------------------------ the file


def test_defaults_are_merged_and_jobs_override_them(tmp_path):
    sub = tmp_path / "queues"
    sub.mkdir()
    cat, dog = load_queue(write(sub, QUEUE), KNOWN)
    assert (cat.name, cat.number, dog.name, dog.number) == ("mycat", 1, "mydog", 2)
    assert cat.options == {
        "checkpoint": "models/sdxl.safetensors",
        "steps": 1500,
        "vectors": 4,
        "out": "embeddings",
        "name": "mycat",
        "data": "images/mycat",
        "init_text": "a tabby cat",
    }
    assert (
        dog.options["steps"] == 2000 and dog.options["vectors"] == 4 and dog.options["init_text"] == "a dog"
    )
    assert cat.base_dir == sub
    assert cat.path(cat.options["data"]) == sub / "images" / "mycat"
    assert cat.path(str(tmp_path / "abs")) == tmp_path / "abs"
    assert dog.label == "job 2 (mydog)"


def test_defaults_are_optional_and_data_may_come_from_them(tmp_path):
    (job,) = load(tmp_path, '[[job]]\nname = "a"\ndata = "x"\n')
    assert job.options == {"name": "a", "data": "x"}
    one, two = load(
        tmp_path, '[defaults]\ndata = "shared"\n[[job]]\nname = "a"\n[[job]]\nname = "b"\nvectors = 8\n'
    )
    assert one.options["data"] == two.options["data"] == "shared" and two.options["vectors"] == 8


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'[[job]]\nname = "a"\ndata = "x"\n')
    assert [j.name for j in load_queue(path, KNOWN)] == ["a"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[default]\nsteps = 1\n[[job]]\nname = "a"\ndata = "x"\n',
            r"unknown top-level .*'default'.*'defaults'",
        ),
        ('title = "x"\n[[job]]\nname = "a"\ndata = "x"\n', r"unknown top-level table or key 'title'"),
        ("[defaults]\nstpes = 1\n", r"\[defaults\]: unknown key 'stpes' \(did you mean 'steps'\?\)"),
        (
            '[[job]]\nname = "a"\ndata = "x"\ninit-text = "c"\n',
            r"job 1 \(a\): unknown key 'init-text' \(did you mean 'init_text'\?\)",
        ),
        ('[[job]]\nname = "a"\ndata = "x"\nbogus = 1\n', r"known keys are checkpoint, data, init_text"),
        ('[defaults]\nname = "a"\n[[job]]\ndata = "x"\n', r"'name' belongs in each \[\[job\]\]"),
        ('defaults = 3\n[[job]]\nname = "a"\ndata = "x"\n', r"'defaults' must be a table"),
        ('[[job]]\nname = "a"\ndata = "x"\n[[job]]\ndata = "y"\n', r"job 2 has no name"),
        ('[[job]]\nname = "a"\ndata = "x"\n[[job]]\nname = "b"\n', r"job 2 \(b\) has no data folder"),
        ('[[job]]\nname = "a"\ndata = ""\n', r"job 1 \(a\) has no data folder"),
        ('[[job]]\nname = "a"\ndata = 5\n', r"job 1 \(a\) has no data folder"),
        (
            '[[job]]\nname = "a"\ndata = "x"\n[[job]]\nname = "b"\ndata = "y"\n[[job]]\nname = "a"\ndata = "z"\n',
            r"job 3 \(a\): the name 'a' is also job 1 \(a\)'s",
        ),
        (
            '[[job]]\nname = "Cat"\ndata = "x"\n[[job]]\nname = "cat"\ndata = "y"\n',
            r"job 2 \(cat\): .*differs from job 1 \(Cat\)'s only in upper and lower case",
        ),
        ('[[job]]\nname = "a/b"\ndata = "x"\n', r"job 1: embedding name 'a/b' contains a path separator"),
        ('[[job]]\nname = 7\ndata = "x"\n', r"job 1: embedding name must be text"),
        ("[[job]]\nname = \n", r"is not valid TOML: .*line 2"),
        ("[defaults]\nsteps = 3\n", r"has no jobs"),
        ("job = []\n", r"has no jobs"),
        ('[job]\nname = "a"\ndata = "x"\n', r"'job' must be a list of tables: write \[\[job\]\]"),
        ("job = [1, 2]\n", r"job 1 is int, not a table"),
    ],
)
def test_errors_name_the_file_and_the_job(tmp_path, text, expected):
    with pytest.raises(QueueError, match=expected) as info:
        load(tmp_path, text)
    assert str(tmp_path / "jobs.toml") in str(info.value)
    assert isinstance(info.value, TIError)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(QueueError, match=r"queue file .*nope\.toml not found"):
        load_queue(tmp_path / "nope.toml", KNOWN)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[[job]]\nname = "\xff"\n')
    with pytest.raises(QueueError, match=r"bad\.toml is not UTF-8 text"):
        load_queue(bad, KNOWN)


def test_tomli_missing_on_python_310_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tomli", None)  # makes `import tomli` fail
    with pytest.raises(QueueError, match="pip install tomli"):
        _toml_module((3, 10))
    assert _toml_module((3, 11)).__name__ == "tomllib"


# ---------------------------------------------------------------------------------------------- claims


def test_one_claim_per_run(tmp_path):
    a, b = Claims(tmp_path / "claims", "run-1"), Claims(tmp_path / "claims", "run-1")
    assert a.claim("mycat") is True
    assert b.claim("mycat") is False
    assert a.claim("mycat") is False  # holding it already is not taking it
    assert b.claim("mydog") is True
    info = json.loads((tmp_path / "claims" / "mycat.claim").read_text())
    assert info["run_id"] == "run-1" and info["pid"] == os.getpid() and info["host"] and info["time"]
    assert b.read("mycat") == info
    a.release("mycat")
    assert not (tmp_path / "claims" / "mycat.claim").exists()
    assert b.claim("mycat") is True


def test_release_leaves_other_runs_claims(tmp_path):
    Claims(tmp_path, "old").claim("a")
    Claims(tmp_path, "new").release("a")
    assert Claims(tmp_path, "x").read("a")["run_id"] == "old"


def test_claim_names_must_be_safe(tmp_path):
    with pytest.raises(InvalidNameError):
        Claims(tmp_path, "r").claim("../escape")


def test_a_stale_claim_of_another_run_is_taken_over_once(tmp_path):
    assert Claims(tmp_path, "old-run").claim("mycat")
    new1, new2 = Claims(tmp_path, "new-run"), Claims(tmp_path, "new-run")
    assert new1.claim("mycat") is True
    assert new1.read("mycat")["run_id"] == "new-run"
    assert new2.claim("mycat") is False
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # a third run takes it over again and removes the second run's takeover token
    tokens = sorted(p.name for p in tmp_path.glob("mycat.claim.takeover-*"))
    assert len(tokens) == 1
    assert Claims(tmp_path, "third-run").claim("mycat") is True
    after = sorted(p.name for p in tmp_path.glob("mycat.claim.takeover-*"))
    assert len(after) == 1 and after != tokens


def test_a_takeover_under_way_in_the_same_run_is_not_repeated(tmp_path):
    Claims(tmp_path, "old").claim("a")
    mine = Claims(tmp_path, "new")
    token = tmp_path / f"a.claim.takeover-{mine._run_hash}"
    token.touch()  # another process of run "new" won the right to take it over
    assert mine.claim("a") is False
    assert mine.read("a")["run_id"] == "old"


def test_unreadable_claims_are_being_written_until_they_are_old(tmp_path):
    claims = Claims(tmp_path, "r")
    (tmp_path / "a.claim").write_bytes(b"")  # created with O_EXCL, not written yet
    assert claims.claim("a") is False
    old = time.time() - claims.unreadable_grace - 5
    os.utime(tmp_path / "a.claim", (old, old))  # a crash mid-write long ago
    assert claims.claim("a") is True
    assert claims.read("a")["run_id"] == "r"


def _race(folder: str, run_id: str, names: list[str], barrier, results) -> None:
    claims = Claims(folder, run_id)
    barrier.wait()
    results.put([n for n in names if claims.claim(n)])


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_processes_racing_claim_every_job_exactly_once(tmp_path, stale):
    names = [f"job{i}" for i in range(60)]
    if stale:
        old = Claims(tmp_path, "crashed-run")
        assert all(old.claim(n) for n in names)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(str(tmp_path), "run-2", names, barrier, results)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    won = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    flat = [name for w in won for name in w]
    assert sorted(flat) == sorted(names)  # every job once, none twice
    assert all(Claims(tmp_path, "x").read(name)["run_id"] == "run-2" for name in names)


# ------------------------------------------------------------------------------------------ run_queue


def jobs_named(*names: str) -> list[QueueJob]:
    return [QueueJob(name, {"name": name, "data": "d"}, number=i) for i, name in enumerate(names, 1)]


class Recorder:
    """``run_job`` for tests: records the jobs it ran; ``behaviour`` maps a name to an outcome or an
    exception."""

    def __init__(self, **behaviour: JobOutcome | BaseException) -> None:
        self.behaviour = behaviour
        self.ran: list[str] = []

    def __call__(self, job: QueueJob) -> JobOutcome:
        self.ran.append(job.name)
        what = self.behaviour.get(job.name)
        if isinstance(what, BaseException):
            raise what
        return what or JobOutcome(
            "wrong name", "finished", steps=10, loss=0.1, file=f"{job.name}.safetensors"
        )


def test_finished_jobs_are_skipped_with_what_the_caller_reports(tmp_path):
    earlier = {"a": JobOutcome("a", "finished", steps=1500, loss=0.12, val_loss=0.2, file="a.safetensors")}
    earlier["c"] = JobOutcome("c", "early_stopped", steps=700, message="validation loss stopped improving")
    run = Recorder()
    logs: list[str] = []
    out = run_queue(jobs_named("a", "b", "c"), run, state=lambda j: earlier.get(j.name), log=logs.append)
    assert run.ran == ["b"]
    assert [o.status for o in out] == ["skipped", "finished", "skipped"]
    assert (out[0].steps, out[0].loss, out[0].file, out[0].seconds) == (1500, 0.12, "a.safetensors", 0.0)
    assert out[2].message == "validation loss stopped improving"
    assert out[1].name == "b" and out[1].seconds >= 0  # the name is the job's, whatever run_job said
    assert any("a: already finished, skipped" in line for line in logs)


def test_stopped_and_failed_jobs_run_again(tmp_path):
    earlier = {"a": JobOutcome("a", "stopped", steps=300), "b": JobOutcome("b", "failed")}
    run = Recorder()
    logs: list[str] = []
    out = run_queue(jobs_named("a", "b"), run, state=lambda j: earlier.get(j.name), log=logs.append)
    assert run.ran == ["a", "b"] and [o.status for o in out] == ["finished", "finished"]
    assert any("a: resuming (stopped at step 300)" in line for line in logs)


def test_a_failure_is_reported_and_the_queue_goes_on():
    run = Recorder(a=RuntimeError("CUDA out of memory"), b=TIError("no images in images/b"))
    out = run_queue(jobs_named("a", "b", "c"), run, state=lambda j: None, log=lambda s: None)
    assert run.ran == ["a", "b", "c"]
    assert [o.status for o in out] == ["failed", "failed", "finished"]
    assert out[0].message == "RuntimeError: CUDA out of memory"
    assert out[1].message == "no images in images/b"
    assert exit_code(out) == 1


def test_jobs_claimed_elsewhere_are_skipped(tmp_path):
    Claims(tmp_path, "run").claim("b")  # another process of this run
    mine = Claims(tmp_path, "run")
    run = Recorder()
    out = run_queue(jobs_named("a", "b", "c"), run, state=lambda j: None, claims=mine, log=lambda s: None)
    assert run.ran == ["a", "c"]
    assert [o.status for o in out] == ["finished", "claimed_elsewhere", "finished"]
    assert f"pid {os.getpid()}" in out[1].message
    assert mine.read("a")["run_id"] == "run"  # claims stay: no one else of the run repeats the job
    assert exit_code(out) == 0


def test_finished_jobs_are_not_claimed(tmp_path):
    claims = Claims(tmp_path, "run")
    run_queue(
        jobs_named("a"),
        Recorder(),
        state=lambda j: JobOutcome("a", "finished"),
        claims=claims,
        log=lambda s: None,
    )
    assert not (tmp_path / "a.claim").exists()


def test_ctrl_c_propagates_with_the_outcomes_so_far():
    run = Recorder(b=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt) as info:
        run_queue(jobs_named("a", "b", "c"), run, state=lambda j: None, log=lambda s: None)
    assert isinstance(info.value, QueueInterrupted)
    assert run.ran == ["a", "b"]
    outcomes = info.value.outcomes
    assert [(o.name, o.status) for o in outcomes] == [("a", "finished"), ("b", "stopped")]
    assert exit_code(outcomes) == 130


def test_a_stopped_job_ends_the_queue():
    run = Recorder(b=JobOutcome("b", "stopped", steps=40, message="stopped at step 40; saved"))
    logs: list[str] = []
    out = run_queue(jobs_named("a", "b", "c"), run, state=lambda j: None, log=logs.append)
    assert run.ran == ["a", "b"] and [o.status for o in out] == ["finished", "stopped"]
    assert any("1 job left" in line for line in logs)
    assert exit_code(out) == 130


def test_other_base_exceptions_are_not_swallowed():
    with pytest.raises(SystemExit):
        run_queue(jobs_named("a"), Recorder(a=SystemExit(3)), state=lambda j: None, log=lambda s: None)


# ------------------------------------------------------------------------------------------ the summary


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0s"), (5, "5s"), (59.6, "1m00s"), (65, "1m05s"), (3725, "1h02m05s")]
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_summary_table():
    outcomes = [
        JobOutcome("mycat", "finished", 1500, 0.123456, 0.2, "embeddings/mycat.safetensors", 65),
        JobOutcome("a-much-longer-name", "skipped", 2000, 0.1, None, "embeddings/x.safetensors"),
        JobOutcome("mydog", "failed", None, None, None, None, 3, "RuntimeError: CUDA out of memory"),
        JobOutcome("b", "claimed_elsewhere"),
        JobOutcome("nan", "early_stopped", 10, float("nan"), 0.5, "n.pt", 3725),
    ]
    text = summary_table(outcomes)
    lines = text.splitlines()
    header, rule, *rows = lines[:7]
    for column in ("job", "status", "steps", "final loss", "val loss", "file", "time"):
        assert column in header
    assert set(rule) <= {"-", " "}
    cat = rows[0].split()
    assert cat == ["mycat", "finished", "1500", "0.1235", "0.2000", "embeddings/mycat.safetensors", "1m05s"]
    assert rows[2].split() == ["mydog", "failed", "-", "-", "-", "-", "3s"]
    assert rows[3].split() == ["b", "claimed", "elsewhere", "-", "-", "-", "-", "-"]
    assert rows[1].split()[-1] == "-"  # a skipped job took no time
    assert rows[4].split()[4] == "nan" and rows[4].split()[-1] == "1h02m05s"
    # aligned: every column starts at the same place in every row
    status_at = header.index("status")
    assert all(r[status_at - 2 : status_at] == "  " and r[status_at] != " " for r in rows)
    assert all(r.rstrip().endswith(r.split()[-1]) for r in rows)
    time_end = max(len(r) for r in [header, *rows])
    assert all(len(r) == time_end for r in [header, *rows])  # time is right-aligned to one edge
    assert "mydog: RuntimeError: CUDA out of memory" in lines
    assert lines[-1] == (
        "5 jobs: 1 finished, 1 skipped, 1 failed, 1 claimed elsewhere, 1 early stopped; 1h03m13s"
    )


def test_summary_of_nothing():
    assert summary_table([]).splitlines()[-1] == "0 jobs: none; 0s"


def test_exit_code():
    ok, failed, stopped = JobOutcome("a", "finished"), JobOutcome("b", "failed"), JobOutcome("c", "stopped")
    assert exit_code([]) == 0
    assert exit_code([ok, JobOutcome("s", "skipped"), JobOutcome("e", "claimed_elsewhere")]) == 0
    assert exit_code([ok, failed]) == 1
    assert exit_code([failed, stopped]) == 130
    assert exit_code([stopped, ok]) == 0  # only the last job counts for 130

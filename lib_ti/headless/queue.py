"""A queue of training jobs read from a TOML file, run one after another (issue 17).

The file has a ``[defaults]`` table (any option of a run) and one ``[[job]]`` table per concept; a job's
options are the defaults updated by its own keys::

    [defaults]
    checkpoint = "models/sdxl.safetensors"
    steps = 1500

    [[job]]
    name = "mycat"
    data = "images/mycat"
    init_text = "a tabby cat"
    steps = 2000

This module knows nothing of models or training: :func:`run_queue` gets the work as callables. Under
``torchrun ... --parallel jobs`` every process runs the same queue and :class:`Claims` makes sure each
job is taken by one process only.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from lib_ti.errors import InvalidNameError, TIError, WriteFailed
from lib_ti.names import validate_name

logger = logging.getLogger(__name__)

#: the keys every job may have, whatever the caller's options
JOB_KEYS = ("name", "data")
_TOP_LEVEL = ("defaults", "job")

Status = Literal["finished", "early_stopped", "stopped", "failed", "skipped", "claimed_elsewhere"]
#: statuses of a job's earlier run that mean there is nothing left to do
DONE: frozenset[str] = frozenset({"finished", "early_stopped"})


class QueueError(TIError, ValueError):
    """A queue file cannot be read or breaks a rule; the message names the file and the job."""


@dataclass(frozen=True)
class QueueJob:
    """One job of a queue: ``options`` are the defaults updated by the job's keys (``name`` included)."""

    name: str
    options: dict[str, Any]
    #: the queue file's folder: relative paths in ``options`` are meant relative to it
    base_dir: Path = field(default_factory=Path)
    #: the job's position in the file, from 1
    number: int = 0

    @property
    def label(self) -> str:
        """``job 2 (mydog)``, for messages."""
        return f"job {self.number} ({self.name})"

    def path(self, value: str | os.PathLike[str]) -> Path:
        """``value`` (a path option) with ``~`` expanded, relative to the queue file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job or run: a row of the summary table (``steps``: the steps done)."""

    name: str
    status: Status
    steps: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    file: str | None = None
    seconds: float = 0.0
    message: str = ""


class QueueInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job; ``outcomes`` holds the jobs so far, the interrupted one last (``stopped``)."""

    def __init__(self, outcomes: list[JobOutcome]) -> None:
        super().__init__()
        self.outcomes = outcomes


# ---------------------------------------------------------------------------------------------- the file


def _toml_module(version: tuple[int, int] = (sys.version_info[0], sys.version_info[1])) -> ModuleType:
    """``tomllib`` (Python 3.11+) or ``tomli`` (3.10), or a :class:`QueueError` saying how to get it."""
    name = "tomllib" if version >= (3, 11) else "tomli"
    try:
        return importlib.import_module(name)
    except ImportError:
        msg = "reading TOML files on Python 3.10 needs the tomli package: pip install tomli"
        raise QueueError(msg) from None


def _unknown(key: str, known: Iterable[str], where: str, source: str) -> QueueError:
    known = sorted(known)
    near = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return QueueError(f"{source}: {where}: unknown key {key!r}{hint}; the known keys are {', '.join(known)}")


def read_toml(path: Path, what: str = "file") -> dict[str, Any]:
    """A TOML file's tables (UTF-8, a byte-order mark allowed); :class:`QueueError` naming the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        msg = f"{what} {path} not found"
        raise QueueError(msg) from None
    except OSError as e:
        msg = f"could not read the {what} {path}: {e.strerror or e}"
        raise QueueError(msg) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        msg = f"{path} is not UTF-8 text (byte {e.start})"
        raise QueueError(msg) from None
    toml = _toml_module()
    try:
        data: dict[str, Any] = toml.loads(text)
    except toml.TOMLDecodeError as e:
        msg = f"{path} is not valid TOML: {e}"
        raise QueueError(msg) from None

    return data


def load_queue(path: str | os.PathLike[str], known_keys: Collection[str]) -> list[QueueJob]:
    """The jobs of the queue file ``path``, in file order.

    ``known_keys`` are the options a job may set (a run's long command-line flags with ``_`` for ``-``);
    ``name`` and ``data`` are always allowed. Relative paths are left as written: resolve them with
    :meth:`QueueJob.path`. Every problem is a :class:`QueueError` naming the file and the job.
    """
    path = Path(path)
    data = read_toml(path, "queue file")

    for key in data:
        if key not in _TOP_LEVEL:
            near = difflib.get_close_matches(key, _TOP_LEVEL, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            msg = (
                f"{path}: unknown top-level table or key {key!r}{hint}; a queue file has a [defaults] table "
                "and [[job]] tables"
            )
            raise QueueError(msg)
    allowed = set(known_keys) | set(JOB_KEYS)

    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        msg = f"{path}: 'defaults' must be a table: write [defaults] above the options"
        raise QueueError(msg)
    if "name" in defaults:
        msg = f"{path}: [defaults]: 'name' belongs in each [[job]]; every job needs its own name"
        raise QueueError(msg)
    for key in defaults:
        if key not in allowed:
            raise _unknown(key, allowed, "[defaults]", str(path))

    entries = data.get("job", [])
    if not isinstance(entries, list):
        msg = f"{path}: 'job' must be a list of tables: write [[job]] (double brackets) above each job"
        raise QueueError(msg)
    if not entries:
        msg = f"{path} has no jobs: add a [[job]] table with name and data for each concept"
        raise QueueError(msg)

    jobs: list[QueueJob] = []
    seen: dict[str, QueueJob] = {}
    for number, entry in enumerate(entries, 1):
        where = f"job {number}"
        if not isinstance(entry, dict):
            msg = f"{path}: {where} is {type(entry).__name__}, not a table: write each job as a [[job]] table"
            raise QueueError(msg)
        if "name" not in entry:
            msg = f"{path}: {where} has no name"
            raise QueueError(msg)
        try:
            name = validate_name(entry["name"])
        except InvalidNameError as e:
            msg = f"{path}: {where}: {e}"
            raise QueueError(msg) from None
        where = f"job {number} ({name})"
        for key in entry:
            if key not in allowed:
                raise _unknown(key, allowed, where, str(path))
        options = {**defaults, **entry}
        folder = options.get("data")
        if not isinstance(folder, str) or not folder.strip():
            msg = f'{path}: {where} has no data folder: add data = "path/to/images"'
            raise QueueError(msg)
        other = seen.get(name.casefold())
        if other is not None:
            if other.name == name:
                msg = f"{path}: {where}: the name {name!r} is also {other.label}'s; each job needs its own"
            else:
                msg = (
                    f"{path}: {where}: the name {name!r} differs from {other.label}'s only in upper and lower "
                    "case; on Windows and macOS both would be the same file"
                )
            raise QueueError(msg)
        job = QueueJob(name=name, options=options, base_dir=path.parent, number=number)
        seen[name.casefold()] = job
        jobs.append(job)
    return jobs


# ------------------------------------------------------------------------------ claims between processes


class Claims:
    """Which process of a run runs which job: one ``<folder>/<name>.claim`` file per job.

    A claim file holds JSON ``{run_id, pid, host, time}``. It is made with ``O_CREAT | O_EXCL``, so of
    the processes that try at once exactly one creates it. A claim of another ``run_id`` was left by an
    earlier launch (crashed or ended) and is *stale*: it is taken over.

    Taking over must also let exactly one process of the run win, and simply renaming or deleting the
    stale file is not safe: process B may read the stale claim, then A replaces it with a fresh one,
    then B renames or deletes A's fresh claim, believing it stale, and both run the job. So the right to
    take over is itself claimed with ``O_EXCL``: the file ``<name>.claim.takeover-<hash of run_id>`` is
    the same for every process of the run and different for every run. Its creator replaces the stale
    claim atomically (``os.replace`` of a fully written temporary file, so the claim never disappears);
    everyone else of the run gets ``False``. The token stays for the rest of the run (deleting it would
    reopen the race above); the next run's takeover deletes it.

    A claim file that is empty or not JSON is being written right now (``O_EXCL`` creates it empty) if
    it is younger than :attr:`unreadable_grace` seconds, else it was left by a crash mid-write and is
    stale.

    Two launches working on the same queue at the same time are not kept apart: each sees the other's
    claims as stale. Claims separate the processes of one launch.
    """

    unreadable_grace = 30.0

    def __init__(self, folder: str | os.PathLike[str], run_id: str) -> None:
        self.folder = Path(folder)
        self.run_id = str(run_id)
        self._run_hash = hashlib.sha256(self.run_id.encode("utf-8")).hexdigest()[:16]

    def path(self, name: str) -> Path:
        """The claim file of job ``name``."""
        return self.folder / f"{validate_name(name)}.claim"

    def _content(self) -> bytes:
        info = {
            "run_id": self.run_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return (json.dumps(info) + "\n").encode("utf-8")

    def read(self, name: str) -> dict[str, Any] | None:
        """The claim of job ``name`` (``{run_id, pid, host, time}``); None if there is none or it cannot be
        read (yet)."""
        try:
            info = json.loads(self.path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def claim(self, name: str) -> bool:
        """Claim job ``name`` for this process: True if this call took it; False if a process of this run
        (this one included) holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(name)
        for _attempt in range(5):
            if self._create(path):
                return True
            info = self.read(name)
            if info is not None and info.get("run_id") == self.run_id:
                return False
            if info is None:
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile: try to create it again
                if age < self.unreadable_grace:
                    return False  # being written by the process that just created it
            return self._take_over(name, path, info)
        return False

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            try:
                os.write(fd, self._content())
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                path.unlink()
            raise WriteFailed.from_os_error(path, e) from e
        return True

    def _token_prefix(self, name: str) -> str:
        return f"{name}.claim.takeover-"

    def _take_over(self, name: str, path: Path, stale: dict[str, Any] | None) -> bool:
        token = self.folder / f"{self._token_prefix(name)}{self._run_hash}"
        try:
            os.close(os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False  # another process of this run is taking it over
        tmp = self.folder / f".{name}.claim.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(self._content())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise WriteFailed.from_os_error(path, e) from e
        self._remove_old_tokens(name)
        owner = f"run {stale.get('run_id')!r} on {stale.get('host')}" if stale else "an unreadable claim"
        logger.info("%s: took over the stale claim of %s", name, owner)
        return True

    def _remove_old_tokens(self, name: str) -> None:
        prefix = self._token_prefix(name)
        for p in self.folder.iterdir():
            rest = p.name[len(prefix) :] if p.name.startswith(prefix) else ""
            if len(rest) == 16 and rest != self._run_hash and all(c in "0123456789abcdef" for c in rest):
                with contextlib.suppress(OSError):
                    p.unlink()

    def release(self, name: str) -> None:
        """Delete this process's claim of ``name`` (and this run's takeover token); others' are left."""
        info = self.read(name)
        if info is None or (info.get("run_id"), info.get("pid"), info.get("host")) != (
            self.run_id,
            os.getpid(),
            socket.gethostname(),
        ):
            return
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / f"{self._token_prefix(name)}{self._run_hash}").unlink()


# ------------------------------------------------------------------------------------------ running it


def _failure_message(e: Exception) -> str:
    if isinstance(e, TIError):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def run_queue(
    jobs: Sequence[QueueJob],
    run_job: Callable[[QueueJob], JobOutcome],
    *,
    state: Callable[[QueueJob], JobOutcome | None],
    claims: Claims | None = None,
    log: Callable[[str], None] = logger.info,
) -> list[JobOutcome]:
    """Run ``jobs`` in order; one outcome per job.

    ``state(job)`` reports what an earlier run left: None (nothing), or an outcome whose status is
    ``finished``/``early_stopped`` (skipped: its row keeps the steps, losses and file reported) or
    ``stopped``/``failed`` (run again; resuming is ``run_job``'s business). With ``claims``, a job another
    process of the run claimed is skipped (``claimed_elsewhere``); claims are not released, so no other
    process of the run repeats a job that failed. An ``Exception`` from ``run_job`` becomes a ``failed``
    outcome and the queue goes on. A ``stopped`` outcome from ``run_job`` (the user stopped it) ends the
    queue; so does Ctrl-C inside it, raised on as :class:`QueueInterrupted` with the outcomes so far.
    """
    outcomes: list[JobOutcome] = []
    for i, job in enumerate(jobs):
        try:
            earlier = state(job)
        except Exception as e:  # an unreadable record fails this job only
            outcomes.append(JobOutcome(job.name, "failed", message=_failure_message(e)))
            log(f"{job.name}: failed: {outcomes[-1].message}")
            continue
        if earlier is not None and earlier.status in DONE:
            log(f"{job.name}: already {earlier.status.replace('_', ' ')}, skipped")
            msg = earlier.message or f"{earlier.status.replace('_', ' ')} earlier"
            outcomes.append(replace(earlier, name=job.name, status="skipped", seconds=0.0, message=msg))
            continue
        if claims is not None and not claims.claim(job.name):
            holder = claims.read(job.name) or {}
            where = f" ({holder.get('host')}, pid {holder.get('pid')})" if holder else ""
            log(f"{job.name}: claimed by another process{where}, skipped")
            outcomes.append(
                JobOutcome(job.name, "claimed_elsewhere", message=f"claimed by another process{where}")
            )
            continue
        if earlier is not None:
            at = f" at step {earlier.steps}" if earlier.steps is not None else ""
            log(f"{job.name}: resuming ({earlier.status}{at}) [{i + 1}/{len(jobs)}]")
        else:
            log(f"{job.name}: starting [{i + 1}/{len(jobs)}]")
        start = time.monotonic()
        try:
            outcome = run_job(job)
        except KeyboardInterrupt:
            outcomes.append(
                JobOutcome(
                    job.name, "stopped", seconds=time.monotonic() - start, message="interrupted (Ctrl-C)"
                )
            )
            log(f"{job.name}: interrupted; re-run the queue to resume")
            raise QueueInterrupted(outcomes) from None
        except Exception as e:
            message = _failure_message(e)
            if not isinstance(e, TIError):
                logger.error("job %s failed", job.name, exc_info=True)
            outcome = JobOutcome(job.name, "failed", message=message)
        outcome = replace(outcome, name=job.name, seconds=time.monotonic() - start)
        outcomes.append(outcome)
        tail = f": {outcome.message}" if outcome.message else ""
        log(f"{job.name}: {outcome.status.replace('_', ' ')} in {format_seconds(outcome.seconds)}{tail}")
        if outcome.status == "stopped":
            left = len(jobs) - i - 1
            log(f"queue stopped with {left} job{'s' if left != 1 else ''} left; re-run it to resume")
            break
    return outcomes


# ----------------------------------------------------------------------------------------- the summary


def format_seconds(seconds: float) -> str:
    """``5s``, ``1m05s``, ``2h03m04s``."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _loss(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.4f}"


def summary_table(outcomes: Sequence[JobOutcome]) -> str:
    """A plain-text table (job, status, steps, final loss, val loss, file, time), the messages of failed
    jobs below it and a totals line; missing values show as ``-``."""
    header = ("job", "status", "steps", "final loss", "val loss", "file", "time")
    right = {2, 3, 4, 6}
    rows = [
        (
            o.name,
            o.status.replace("_", " "),
            "-" if o.steps is None else str(o.steps),
            _loss(o.loss),
            _loss(o.val_loss),
            o.file or "-",
            "-" if o.status in ("skipped", "claimed_elsewhere") else format_seconds(o.seconds),
        )
        for o in outcomes
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        out.append("")
        out.extend(f"{o.name}: {o.message or 'failed'}" for o in failed)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    total = sum(o.seconds for o in outcomes)
    tally = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items())
    out.append("")
    out.append(
        f"{len(outcomes)} job{'s' if len(outcomes) != 1 else ''}: {tally or 'none'}; {format_seconds(total)}"
    )
    return "\n".join(out)


def exit_code(outcomes: Sequence[JobOutcome]) -> int:
    """The process's exit status: 130 (as for Ctrl-C) if the last job was stopped, which ends a queue;
    else 1 if any job failed; else 0. Skipped and claimed-elsewhere jobs count as fine."""
    if outcomes and outcomes[-1].status == "stopped":
        return 130
    return 1 if any(o.status == "failed" for o in outcomes) else 0

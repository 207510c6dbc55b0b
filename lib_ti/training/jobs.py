"""One background job at a time (training), with status for the UI and the REST API."""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lib_ti.errors import TIError

logger = logging.getLogger(__name__)


class BusyError(TIError):
    """Another job is running; ``job_id`` names it."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


#: every state of a job: waiting for the GPU lock, running, or how it ended
JobState = Literal[
    "queued", "running", "finished", "early_stopped", "stopped", "model_changed", "failed", "error"
]
#: the states of a job that has not ended
ACTIVE_STATES: tuple[JobState, ...] = ("queued", "running")


@dataclass
class JobStatus:
    id: str
    kind: str
    name: str
    state: JobState = "queued"
    step: int = 0
    total: int = 0
    loss: float | None = None
    loss_smooth: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    images_per_sec: float | None = None
    eta_seconds: float | None = None
    message: str = ""
    #: the embedding file in the embeddings folder, once saved
    file: str | None = None
    #: snapshot files in the log folder
    snapshots: list[str] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    #: L2 norm of each vector, per encoder, at the last step
    norms: dict[str, list[float]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    #: what went wrong without ending the run (a preview the host could not make)
    warnings: list[str] = field(default_factory=list)
    #: the step a resumed run continued from (None: a new run)
    resumed_from: int | None = None
    #: seconds spent in each phase: startup, caching, steps, validation, saving, previews
    timings: dict[str, float] = field(default_factory=dict)
    #: what a Prepare job did: images written, pictures skipped, duplicates, captions
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Job:
    def __init__(self, job_id: str, kind: str, name: str) -> None:
        self.status = JobStatus(job_id, kind, name)
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def id(self) -> str:
        return self.status.id

    def stop(self) -> None:
        self.stop_event.set()


class JobManager:
    """Runs at most one job; a second submission raises :class:`BusyError` at once (no queue)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.jobs: dict[str, Job] = {}
        self.current: Job | None = None

    def submit(self, kind: str, name: str, work: Callable[[Job], None], *, background: bool = True) -> Job:
        with self._lock:
            if self.current is not None and self.current.status.running:
                cur = self.current
                msg = f"busy: {cur.status.kind} of {cur.status.name!r} is running (job {cur.id})"
                raise BusyError(cur.id, msg)
            job = Job(f"{kind}-{next(self._ids)}-{int(time.time())}", kind, name)
            self.jobs[job.id] = job
            self.current = job

        def run() -> None:
            try:
                job.status.state = "running"
                work(job)
                if job.status.state == "running":
                    job.status.state = "finished"
            except TIError as e:
                job.status.state = "error"
                job.status.message = str(e)
                logger.error("%s failed: %s", job.id, e)
            except Exception as e:  # a job must never die silently
                job.status.state = "error"
                job.status.message = f"{type(e).__name__}: {e}"
                logger.error("%s crashed:\n%s", job.id, traceback.format_exc())
            finally:
                job.status.ended = time.time()

        if background:
            job.thread = threading.Thread(target=run, name=f"lib_ti-{job.id}", daemon=True)
            job.thread.start()
        else:
            run()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

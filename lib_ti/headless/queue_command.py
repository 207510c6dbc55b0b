"""``python -m lib_ti train --queue jobs.toml``: the jobs one after another, or shared between the
processes of a torchrun launch (``--parallel jobs``), or each split over them (``--parallel data``).

Where a job's option comes from, first match wins: the command line's flags, the job's table, the queue's
``[defaults]``, the ``--config`` file. Paths in the queue file are relative to the queue file.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib_ti.errors import TIError
from lib_ti.headless.distributed import Distributed, init_from_env
from lib_ti.headless.options import KNOWN_KEYS, Resolved, resolve
from lib_ti.headless.queue import (
    Claims,
    JobOutcome,
    QueueInterrupted,
    QueueJob,
    exit_code,
    load_queue,
    run_queue,
    summary_table,
)
from lib_ti.headless.run import (
    Console,
    Interrupts,
    ModelCache,
    existing_embedding,
    file_service,
    queue_state,
    setup_logging,
    train_one,
)
from lib_ti.training.resume import read_info_file

logger = logging.getLogger(__name__)

#: options that name files or folders (relative to the queue file when they come from it)
PATH_KEYS = ("checkpoint", "original_config", "data", "out", "log_dir")


def _is_path(key: str, value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    return key in PATH_KEYS or (key == "template" and value.lower().endswith(".txt"))


def job_values(job: QueueJob, config: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """A job's options: the queue's (paths made relative to the queue file) over --config, under the flags."""
    own = {k: (str(job.path(v)) if _is_path(k, v) else v) for k, v in job.options.items()}
    return {**config, **own, **flags}


def _earlier(resolved: Resolved) -> JobOutcome | None:
    name = str(resolved.train["embedding"])
    service = file_service(resolved.run)
    state = queue_state(service, name)
    found = existing_embedding(service, name)
    if state == "new" or (state == "finished" and found is None):  # a deleted result: train it again
        return None
    info = read_info_file(service.resume_file(name))
    return JobOutcome(
        name,
        "finished" if state == "finished" else "stopped",
        steps=info.step,
        file=str(found) if found is not None else None,
    )


def run_queue_command(path: Path, config: Mapping[str, Any], flags: Mapping[str, Any], world: int) -> int:
    jobs = load_queue(path, KNOWN_KEYS)
    resolved = {job.name: resolve(job_values(job, config, flags), job.label) for job in jobs}
    modes = {r.run.parallel for r in resolved.values()}
    mode = "jobs" if world > 1 and modes <= {"none", "jobs"} else ("data" if "data" in modes else "none")
    if len(modes - {"none"}) > 1:
        msg = f"{path}: every job must use the same --parallel mode"
        raise TIError(msg)
    if mode == "none":
        setup_logging(None)
        return _run(jobs, resolved, claims=None, device="", dist=None, quiet=None)
    dist = init_from_env()
    if dist is None:
        msg = f"--parallel {mode} needs several processes: launch with torchrun --nproc-per-node N -m lib_ti train ..."
        raise TIError(msg)
    try:
        setup_logging(dist.rank)
        if mode == "jobs":
            run_id = str(dist.from_main(uuid.uuid4().hex))
            claims = Claims(path.parent / f".{path.stem}.claims", run_id)
            return _run(jobs, resolved, claims=claims, device=str(dist.device), dist=None, quiet=True)
        return _run(jobs, resolved, claims=None, device=str(dist.device), dist=dist, quiet=dist.rank != 0)
    finally:
        dist.close()


def _run(
    jobs: list[QueueJob],
    resolved: Mapping[str, Resolved],
    *,
    claims: Claims | None,
    device: str,
    dist: Distributed | None,
    quiet: bool | None,
) -> int:
    """The queue in this process: ``claims`` share it between processes (jobs mode); ``dist`` splits
    each job over them (data mode); ``quiet`` None: each job's own setting."""
    models = ModelCache()
    interrupts = Interrupts()
    rank0 = dist is None or dist.main

    def run_job(job: QueueJob) -> JobOutcome:
        r = resolved[job.name]
        console = Console(r.run.quiet if quiet is None else quiet, enabled=rank0)
        return train_one(
            r,
            models=models,
            console=console,
            interrupts=interrupts,
            queue_mode=True,
            shard=dist.shard() if dist is not None else None,
            device=device,
            agree=dist.from_main if dist is not None else None,
        )

    with interrupts.installed():
        try:
            outcomes = run_queue(jobs, run_job, state=lambda job: _earlier(resolved[job.name]), claims=claims)
        except QueueInterrupted as e:
            outcomes = e.outcomes
    if rank0:
        sys.stderr.write(summary_table(outcomes) + "\n")
    return exit_code(outcomes)

"""``python -m lib_ti train``: one run, or a queue, in one process or under torchrun."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lib_ti.errors import TIError
from lib_ti.headless.distributed import init_from_env
from lib_ti.headless.options import Resolved, given_options, read_config, resolve
from lib_ti.headless.queue import JobOutcome, exit_code
from lib_ti.headless.queue_command import run_queue_command
from lib_ti.headless.run import Console, Interrupts, ModelCache, setup_logging, train_one

logger = logging.getLogger(__name__)


def _describe(outcome: JobOutcome) -> str:
    parts = [f"{outcome.name}: {outcome.status}"]
    if outcome.steps is not None:
        parts.append(f"step {outcome.steps}")
    if outcome.file:
        parts.append(outcome.file)
    return ", ".join(parts) + (f" ({outcome.message})" if outcome.message else "")


def train_command(args: argparse.Namespace) -> int:
    """Exit code: 0 done, 1 failed, 130 stopped by Ctrl-C after saving (2, bad input, comes from main)."""
    flags = given_options(args)
    config = read_config(args.config) if args.config else {}
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.queue:
        per_job = [f"--{k.replace('_', '-')}" for k in ("name", "data", "init_text") if k in flags]
        if per_job:
            msg = f"{', '.join(per_job)} with --queue would give every job the same value: set it in the jobs"
            raise TIError(msg)
        return run_queue_command(Path(args.queue), config, flags, world)
    values: dict[str, Any] = {**config, **flags}
    resolved = resolve(values, "the options")
    parallel = resolved.run.parallel
    if world > 1 and parallel == "jobs":
        msg = "--parallel jobs shares a queue between processes: give --queue FILE"
        raise TIError(msg)
    if world > 1 or parallel == "data":
        return train_data_parallel(resolved)
    setup_logging(None)
    interrupts = Interrupts()
    with interrupts.installed():
        outcome = train_one(
            resolved, models=ModelCache(), console=Console(resolved.run.quiet), interrupts=interrupts
        )
    sys.stderr.write(_describe(outcome) + "\n")
    return exit_code([outcome])


def train_data_parallel(resolved: Resolved) -> int:
    """One run, each batch split over the processes of a torchrun launch; rank 0 writes and reports."""
    dist = init_from_env()
    if dist is None:
        msg = "--parallel data needs several processes: launch with torchrun --nproc-per-node N -m lib_ti train ..."
        raise TIError(msg)
    try:
        setup_logging(dist.rank)
        interrupts = Interrupts()
        with interrupts.installed():
            outcome = train_one(
                resolved,
                models=ModelCache(),
                console=Console(resolved.run.quiet, enabled=dist.main),
                interrupts=interrupts,
                shard=dist.shard(),
                device=str(dist.device),
                agree=dist.from_main,
            )
        if dist.main:
            sys.stderr.write(_describe(outcome) + "\n")
        return exit_code([outcome])
    finally:
        dist.close()

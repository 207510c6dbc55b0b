"""One process of a data-parallel job started by ``torchrun`` (or ``accelerate launch``): the process
group from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), this process's device, and the :class:`~lib_ti.training.parallel.Shard` the trainer
takes. Only rank 0 writes files; the trainer keeps the other processes' callbacks from writing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lib_ti.training.errors import TrainingError
from lib_ti.training.parallel import DistributedShard

logger = logging.getLogger(__name__)


@dataclass
class Distributed:
    """This process of the job; :meth:`close` when done."""

    rank: int
    world: int
    local_rank: int
    #: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU
    device: torch.device
    #: ``nccl`` (CUDA) or ``gloo``
    backend: str

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and reports."""
        return self.rank == 0

    def shard(self) -> DistributedShard:
        """The trainer's view of the process group (collectives on this process's device for NCCL)."""
        return DistributedShard(self.device if self.backend == "nccl" else torch.device("cpu"))

    def barrier(self) -> None:
        """Wait until every process arrives here."""
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (any picklable object; one broadcast)."""
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Destroy the process group (nothing when it is gone already)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(backend: str | None = None, timeout: timedelta | None = None) -> Distributed | None:
    """Join the job the environment describes; None when there is none (``WORLD_SIZE`` absent or 1).

    ``backend``: None picks ``nccl`` when CUDA is available (the device ``cuda:LOCAL_RANK`` becomes
    the current one), else ``gloo`` on the CPU. A process group that exists already is used as it is.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None
    rank = _env_int("RANK", -1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world or local_rank < 0:
        msg = f"RANK {rank} and LOCAL_RANK {local_rank} do not fit WORLD_SIZE {world}: start with torchrun"
        raise TrainingError(msg)
    if not dist.is_available():
        msg = "this torch build has no torch.distributed: data-parallel training needs it"
        raise TrainingError(msg)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing and not dist.is_initialized():
        msg = f"WORLD_SIZE is {world} but {' and '.join(missing)} not set: start with torchrun"
        raise TrainingError(msg)
    cuda = torch.cuda.is_available()
    if cuda and local_rank >= torch.cuda.device_count():
        msg = f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)"
        raise TrainingError(msg)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if backend is None:
        backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized() and timeout is None:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    elif not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    logger.info("process %d of %d (local %d) on %s, %s", rank, world, local_rank, device, backend)
    return Distributed(rank, world, local_rank, device, backend)


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        msg = f"{key} must be a whole number, not {value!r}"
        raise TrainingError(msg) from None

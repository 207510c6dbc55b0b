"""Data-parallel training: which rows of a micro-batch this process trains, and the sums over processes.

The trainer takes a :class:`Shard` and never calls ``torch.distributed`` itself, so a one-process run
(no shard) pays nothing. Every process builds the same micro-batches from the same named streams and
keeps the rows :meth:`Shard.rows` gives it; the gradients and the loss are then summed over processes,
so N processes with batch B step exactly as one process with batch B (up to float rounding).

Every process must call the collectives in the same order: the trainer calls them on every process
alike, never inside a branch that only some processes take.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class Shard(ABC):
    """This process's part of a data-parallel run: its rank among ``world`` processes and the two
    collectives the trainer needs (an in-place sum and max over all processes)."""

    rank: int
    world: int
    #: where the small tensors of :meth:`sum_floats` and :meth:`any` live (CUDA for NCCL)
    device: torch.device

    def rows(self, n: int) -> list[int]:
        """The rows of an ``n``-row micro-batch this process trains: row ``i`` goes to process
        ``i % world`` (so the counts differ by at most one, the lower ranks getting more)."""
        return list(range(self.rank, n, self.world))

    @abstractmethod
    def sum_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its element-wise sum over all processes (the same bits on every one)."""

    @abstractmethod
    def max_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its element-wise maximum over all processes."""

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over all processes (float64, one collective)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self.sum_(t)
        return [float(v) for v in t.tolist()]

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on any process (one collective)."""
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.device)
        self.max_(t)
        return tuple(bool(v > 0) for v in t.tolist())


class LocalShard(Shard):
    """One process alone (rank 0 of 1): the collectives do nothing. Runs the trainer's data-parallel
    code path without ``torch.distributed``."""

    def __init__(self) -> None:
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")

    def sum_(self, tensor: torch.Tensor) -> None:
        return None

    def max_(self, tensor: torch.Tensor) -> None:
        return None


class DistributedShard(Shard):
    """A process of the initialised default ``torch.distributed`` process group (torchrun,
    ``accelerate launch``). Tensors on another device than ``device`` are reduced through a copy."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            msg = "torch.distributed has no initialised process group"
            raise RuntimeError(msg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def _reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> None:
        if tensor.device == self.device:
            dist.all_reduce(tensor, op=op)
            return
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved)

    def sum_(self, tensor: torch.Tensor) -> None:
        self._reduce(tensor, dist.ReduceOp.SUM)

    def max_(self, tensor: torch.Tensor) -> None:
        self._reduce(tensor, dist.ReduceOp.MAX)

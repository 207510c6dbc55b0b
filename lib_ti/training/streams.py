"""Named, seeded random streams: every random draw of a run comes from a stream named by what it is
for and indexed by where it is used, so a resumed run replays exactly what an uninterrupted one does.

Torch streams (:func:`stream`, a fresh ``torch.Generator``):

- ``"noise"`` (step, j): noise, noise offset and timestep of the sample at position ``j`` of step ``step``
- ``"latent_sample"`` (step, m): the latent samples of the micro-batch starting at position ``m``
- ``"validation_noise"`` (j,): the noise of validation sample ``j``

Python streams (:func:`random_stream`, a fresh ``random.Random``):

- ``"epoch_order"`` (epoch,): the data order of an epoch
- ``"batch"`` (step, m): flips, templates and tags of the micro-batch starting at position ``m``
- ``"validation_pick"`` (): which images are validation samples
- ``"validation_prompt"`` (j,): the prompt of validation sample ``j``
- ``"crop"`` (relative path,): an image's random crop window

The seeds derived from (seed, name, index) are those of earlier versions, so runs are reproducible
across versions.
"""

from __future__ import annotations

import random
from typing import Literal

import torch

TorchStream = Literal["noise", "latent_sample", "validation_noise"]
RandomStream = Literal["epoch_order", "batch", "validation_pick", "validation_prompt", "crop"]

_MASK64 = 0xFFFFFFFFFFFFFFFF


def stream(seed: int, name: TorchStream, *index: int) -> torch.Generator:
    """A CPU generator for stream ``name`` at ``index`` (see the module docstring for the indices)."""
    key: tuple[int, ...]
    match name, index:
        case "noise", (int(step), int(j)):
            key = (step, j)
        case "latent_sample", (int(step), int(m)):
            key = (step, -2, m)
        case "validation_noise", (int(j),):
            key = (-1, j)
        case _:
            msg = f"the stream {name!r} does not take the index {index}"
            raise ValueError(msg)
    return torch.Generator().manual_seed(_fnv1a(seed, *key) & 0x7FFFFFFFFFFFFFFF)


def random_stream(seed: int, name: RandomStream, *index: int | str) -> random.Random:
    """A python generator for stream ``name`` at ``index`` (see the module docstring for the indices)."""
    value: int | str
    match name, index:
        case "epoch_order", (int(epoch),):
            value = seed * 1000003 + epoch
        case "batch", (int(step), int(m)):
            value = seed * 15485863 + step * 101 + m
        case "validation_pick", ():
            value = seed * 7919 + 17
        case "validation_prompt", (int(j),):
            value = seed * 31 + j
        case "crop", (str(path),):
            value = f"{seed}:{path}"
        case _:
            msg = f"the stream {name!r} does not take the index {index}"
            raise ValueError(msg)
    return random.Random(value)


def _fnv1a(*parts: int) -> int:
    """64-bit FNV-1a over the parts (each taken modulo 2**64)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & _MASK64)) * 1099511628211) & _MASK64
    return h

"""The value sets of training options, shared by the trainer, the REST API and the Train view."""

from __future__ import annotations

from typing import Literal, get_args

LrShape = Literal["constant", "cosine", "linear"]
NormControl = Literal["soft", "hard", "off"]
LatentSampling = Literal["random", "deterministic"]
Optimizer = Literal["adamw", "adam"]
#: which of the embedding's vectors are trained: all, or one encoder's (SDXL)
TrainEncoders = Literal["all", "clip_l", "clip_g"]


def choices(literal: object) -> tuple[str, ...]:
    """The allowed values of one of the Literal types above."""
    return tuple(get_args(literal))

"""A training request: every option of a run, its type and its allowed values, declared once.

The REST API's body, the Train view's form and the trainer's arguments are all derived from
:class:`TrainRequest`. Omitted values come from :func:`lib_ti.training.recipes.resolve` (the recipe of
the loaded model's kind, then the user's ``ti_default_*`` settings).
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from lib_ti.create import MAX_SEED
from lib_ti.errors import TIError, short_repr

LrShape = Literal["constant", "cosine", "linear"]
NormControl = Literal["soft", "hard", "off"]
LatentSampling = Literal["random", "deterministic"]
Optimizer = Literal["adamw", "adam"]
#: which of the embedding's vectors are trained: all, or one encoder's (SDXL)
TrainEncoders = Literal["all", "clip_l", "clip_g"]


def choices(literal: object) -> tuple[str, ...]:
    """The allowed values of one of the Literal types above."""
    return tuple(get_args(literal))


@dataclass(frozen=True)
class TrainRequest:
    """One training run as the tab, the REST API and the command line ask for it.

    The defaults are the SD1 recipe; :func:`lib_ti.training.recipes.resolve` fills what a caller
    left out from the loaded model's recipe instead.
    """

    #: name of an embedding in the embeddings folder (made for the loaded model)
    embedding: str
    #: folder of images (captions in .txt files beside them, optional)
    dataset_dir: str
    #: a shipped or user template name, a file, or lines with [name] / [filewords]
    template: str = "subject_filewords"
    steps: int = 2000
    batch_size: int = 2
    grad_accum: int = 2
    #: a rate or a schedule like ``5e-3:100, 1e-3:1000``
    lr: str = "5e-3"
    lr_shape: LrShape = "constant"
    warmup_steps: int = 100
    norm_control: NormControl = "soft"
    #: bucket area = resolution² (SD1 512, SD2 768, SDXL 1024)
    resolution: int = 512
    buckets: bool = True
    flip: bool = True
    shuffle_tags: bool = True
    keep_tags: int = 0
    tag_dropout: float = 0.0
    repeats: int = 1
    latent_sampling: LatentSampling = "random"
    validation_every: int = 50
    snapshot_every: int = 250
    preview_every: int = 250
    #: empty: "a photo of <name>"
    preview_prompt: str = ""
    train_encoders: TrainEncoders = "all"
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    seed: int = 0
    #: continue the last stopped run of this embedding
    resume: bool = False
    cache_latents_on_disk: bool = False


#: one line per option, for the command line's --help (the tab's labels say the same in fewer words)
HELP: dict[str, str] = {
    "embedding": "name of the embedding to train (a file in the embeddings folder)",
    "dataset_dir": "folder of training images (captions in .txt files beside them, optional)",
    "template": "prompt template: a shipped or user template name, a .txt file, or lines with [name] and [filewords]",
    "steps": "optimizer steps",
    "batch_size": "images per micro-batch",
    "grad_accum": "micro-batches per optimizer step (effective batch = batch size x accumulation)",
    "lr": "learning rate, or a schedule like 5e-3:100, 1e-3:1000",
    "lr_shape": "shape of the rate between schedule points",
    "warmup_steps": "linear warmup steps (at most a tenth of the run)",
    "norm_control": "keep the vectors' norms near the vocabulary's: soft (a pull), hard (rescale) or off",
    "resolution": "bucket area = resolution squared (SD1 512, SD2 768, SDXL 1024)",
    "buckets": "aspect-ratio buckets (off: square crops)",
    "flip": "random horizontal flips",
    "shuffle_tags": "shuffle the comma-separated caption tags",
    "keep_tags": "keep the first N tags in place when shuffling",
    "tag_dropout": "drop each tag with this probability (0 to below 1)",
    "repeats": "times each image appears per epoch",
    "latent_sampling": "random: sample the VAE posterior each step; deterministic: its mean",
    "validation_every": "validation loss every N steps (0: never)",
    "snapshot_every": "save a numbered snapshot every N steps (0: never)",
    "preview_every": "make a preview image every N steps (0: never)",
    "preview_prompt": "preview prompt (empty: a photo of <name>)",
    "train_encoders": "which encoder's vectors are trained (SDXL: clip_l or clip_g alone)",
    "min_snr_gamma": "Min-SNR-gamma loss weighting (0: off)",
    "noise_offset": "noise offset",
    "seed": "seed of every random draw of the run",
    "resume": "continue the last stopped run of this embedding",
    "cache_latents_on_disk": "keep the encoded latents on disk for the next run",
}
#: the fields every request must name (they have no recipe value)
REQUIRED = ("embedding", "dataset_dir")
#: every option a recipe gives a value, in the form's order
OPTION_FIELDS = tuple(f.name for f in fields(TrainRequest) if f.name not in REQUIRED)
#: field name -> its type (int, float, bool, str, or a Literal)
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainRequest)
#: the bounds of the integer fields that have one
MINIMUM = {"steps": 1, "batch_size": 1, "grad_accum": 1, "resolution": 64, "repeats": 1}
#: the largest values: more only exhausts memory or time (a bucket side above 4096, a list of the images
#: repeated), and seeds are 63-bit
MAXIMUM = {"steps": 1_000_000, "resolution": 4096, "repeats": 1000, "seed": MAX_SEED}


def type_name(kind: Any) -> str:
    return {int: "whole number", float: "number", bool: "boolean", str: "string"}.get(kind, str(kind))


def coerce(name: str, value: Any) -> Any:
    """``value`` as the type of field ``name`` (the tab gives floats for integers); TIError if it is not one."""
    if name not in FIELD_TYPES:
        msg = f"unknown training option {name!r}; the options are: {', '.join(FIELD_TYPES)}"
        raise TIError(msg)
    return coerce_as(name, FIELD_TYPES[name], value)


def coerce_as(name: str, kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (int, float, bool, str or a Literal of strings); TIError naming ``name``."""
    allowed = choices(kind)
    try:
        if allowed:
            value = "" if value is None else str(value)
            if value not in allowed:
                msg = f"{name} must be one of {', '.join(allowed)} (got {short_repr(value)})"
                raise TIError(msg)
            return value
        if kind is bool:
            return bool(value)
        if kind is int:
            if isinstance(value, int):  # exactly, however large (a float would round it)
                return int(value)
            if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
                return int(value)
            number = float(value or 0)
            if not math.isfinite(number) or number != int(number):
                msg = f"{name} must be a whole number (got {short_repr(value)})"
                raise TIError(msg)
            return int(number)
        if kind is float:
            number = float(value or 0)
            if not math.isfinite(number):
                msg = f"{name} must be a finite number (got {short_repr(value)})"
                raise TIError(msg)
            return number
        return "" if value is None else str(value).strip()
    except (TypeError, ValueError, OverflowError) as e:
        msg = f"{name} must be a {type_name(kind)} (got {short_repr(value)})"
        raise TIError(msg) from e


def check_types(obj: Any, types: dict[str, Any]) -> None:
    """Each field of ``obj`` holds a value of its type (``types``: name -> kind); TIError naming it."""
    for name, kind in types.items():
        value = getattr(obj, name)
        if coerce_as(name, kind, value) != value:
            msg = f"{name} must be a {type_name(kind)} (got {short_repr(value)})"
            raise TIError(msg)


def check_bounds(obj: Any, minimum: Mapping[str, Any], maximum: Mapping[str, Any]) -> None:
    """Each named field of ``obj`` is within its bounds; TIError naming the first that is not."""
    for name, low in minimum.items():
        if getattr(obj, name) < low:
            msg = f"{name} must be at least {low} (got {short_repr(getattr(obj, name))})"
            raise TIError(msg)
    for name, high in maximum.items():
        if getattr(obj, name) > high:
            msg = f"{name} must be at most {high} (got {short_repr(getattr(obj, name))})"
            raise TIError(msg)


def check(req: TrainRequest) -> None:
    """The values' types, sets and bounds; raises TIError naming the field."""
    check_types(req, FIELD_TYPES)
    check_bounds(req, MINIMUM, MAXIMUM)
    for name in ("warmup_steps", "keep_tags", "validation_every", "snapshot_every", "preview_every", "seed"):
        if getattr(req, name) < 0:
            msg = f"{name} must not be negative (got {short_repr(getattr(req, name))})"
            raise TIError(msg)
    if not 0.0 <= req.tag_dropout < 1.0:
        msg = f"tag_dropout must be in [0, 1) (got {req.tag_dropout})"
        raise TIError(msg)
    problem = path_problem(req.dataset_dir)
    if problem:
        msg = f"dataset_dir {problem}"
        raise TIError(msg)


@functools.cache
def path_limits() -> tuple[int, int, str]:
    """(longest path, longest file or folder name, their unit) on this system: POSIX counts the bytes
    of the file-system encoding (Linux 4095 and 255, macOS 1023 and 255), Windows UTF-16 units."""
    if os.name == "nt":
        return 32_767, 255, "characters"
    try:
        path, name = os.pathconf("/", "PC_PATH_MAX") - 1, os.pathconf("/", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        path, name = 1023, 255
    return path, name, "bytes"


def _size(text: str, unit: str) -> int:
    if unit == "bytes":
        return len(text.encode(sys.getfilesystemencoding(), "surrogateescape"))
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def path_problem(text: str) -> str | None:
    """Why ``text`` can name no file or folder here (None: it may), as the end of a sentence: opening it
    would fail with "file name too long" or "embedded null byte"."""
    if "\x00" in text:
        return "contains a NUL character, which no path can hold"
    longest_path, longest_name, unit = path_limits()
    try:
        size = _size(text, unit)
        if size > longest_path:
            return f"is {size} {unit} long; paths here are at most {longest_path}"
        for part in re.split(r"[\\/]", text):
            size = _size(part, unit)
            if size > longest_name:
                return (
                    f"has a name of {size} {unit} ({short_repr(part)}); file and folder names here are at "
                    f"most {longest_name}"
                )
    except UnicodeEncodeError:
        return "holds characters that this system cannot use in a path"
    return None

"""The options of ``python -m lib_ti train``, declared once: the command line's flags, the ``--config``
and ``--queue`` TOML keys, and their defaults all come from here.

A run has two sets of options: :class:`RunOptions` (the checkpoint, where files go, how the frozen model
runs) and the tab's training options (:class:`~lib_ti.training.options.TrainRequest`, whose omitted
values come from the recipe of the checkpoint's kind, as in the tab). On the command line and in TOML,
a TrainRequest field keeps its name (``batch_size`` / ``--batch-size``), except that the embedding is
``name`` and the image folder ``data``.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from lib_ti.errors import TIError, short_repr
from lib_ti.headless.queue import read_toml
from lib_ti.training.options import FIELD_TYPES, HELP, OPTION_FIELDS, choices, coerce, coerce_as
from lib_ti.training.recipes import KIND_RECIPES
from lib_ti.training.resume import POINT_EVERY_STEPS

Parallel = Literal["none", "data", "jobs"]
Recipe = Literal["auto", "sd1", "sd2", "sdxl"]
Precision = Literal["fp32", "fp16", "bf16"]
Prediction = Literal["auto", "eps", "v"]
SaveFormat = Literal["safetensors", "pt"]

#: TrainRequest fields under another name here
RENAMED = {"embedding": "name", "dataset_dir": "data"}


@dataclass
class RunOptions:
    """Everything of a headless run that is not a training option."""

    checkpoint: str = ""
    original_config: str = ""
    init_text: str = ""
    vectors: int = 0
    out: str = "embeddings"
    log_dir: str = ""
    overwrite: bool = False
    format: SaveFormat = "safetensors"
    pt_copy: bool = False
    recipe: Recipe = "auto"
    device: str = ""
    precision: Precision = "fp32"
    prediction: Prediction = "auto"
    clip_skip: int = 1
    gradient_checkpointing: bool = False
    resume_every: int = POINT_EVERY_STEPS
    preview_steps: int = 20
    preview_cfg: float = 7.0
    parallel: Parallel = "none"
    quiet: bool = False


#: one line per option, for --help
RUN_HELP: dict[str, str] = {
    "checkpoint": "an A1111/Forge checkpoint (.safetensors, .ckpt) or a diffusers folder",
    "original_config": "the checkpoint's LDM .yaml (default: a .yaml beside it, else read from the tensors' shapes)",
    "init_text": "create the embedding from this text (when it does not exist yet)",
    "vectors": "vectors per token of a new embedding (0: 2)",
    "out": "the embeddings folder (your web UI's, to use the result there)",
    "log_dir": "logs, snapshots, previews and resume files (default: textual_inversion_ti beside --out, the tab's)",
    "overwrite": "re-create an existing embedding from --init-text and start afresh",
    "format": "file format of the embedding",
    "pt_copy": "also write an A1111 .pt copy into the log folder",
    "recipe": "the tab's per-model recipe of defaults (auto: the checkpoint's kind)",
    "device": "cuda, cuda:1, cpu, mps (default: the first GPU, else the CPU)",
    "precision": "dtype of the frozen model (the vectors stay fp32): fp16/bf16 on GPUs",
    "prediction": "the model's target (auto: eps; detected for SD2)",
    "clip_skip": "SD1's clip skip (1: the last layer), as the web UI's setting",
    "gradient_checkpointing": "recompute UNet activations in the backward pass",
    "resume_every": "steps between automatic resume points (0: by time only)",
    "preview_steps": "sampling steps of a preview (Euler)",
    "preview_cfg": "CFG scale of a preview",
    "parallel": "under torchrun: data (split each batch) or jobs (one queue job each)",
    "quiet": "log lines instead of a progress bar",
}

RUN_FIELDS = tuple(f.name for f in fields(RunOptions))
RUN_TYPES: dict[str, Any] = typing.get_type_hints(RunOptions)
#: the TrainRequest options as they are named here
TRAIN_KEYS: dict[str, str] = {RENAMED.get(k, k): k for k in FIELD_TYPES}
#: every key of a --config file and of a queue's [defaults] and [[job]] tables
KNOWN_KEYS = (*RUN_FIELDS, *TRAIN_KEYS)


def _recipe_note(name: str) -> str:
    """The recipes' defaults of a training option, as a --help note."""
    if name not in OPTION_FIELDS:
        return ""
    from lib_ti.training.options import TrainRequest

    base = next(f.default for f in fields(TrainRequest) if f.name == name)
    others = [f"{k.upper()} {v[name]}" for k, v in KIND_RECIPES.items() if name in v and v[name] != base]
    note = f"default: {base!r}" if isinstance(base, str) else f"default: {base}"
    return f"{note} ({', '.join(others)})" if others else note


def _add(group: Any, key: str, kind: Any, help_text: str, *, required: bool = False) -> None:
    flag = "--" + key.replace("_", "-")
    allowed = choices(kind)
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    metavar = "|".join(allowed) if allowed else {int: "N", float: "X"}.get(kind, "TEXT")
    group.add_argument(flag, dest=key, default=None, metavar=metavar, help=help_text, required=required)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of a run as a flag (default None: not given, so --config and the recipe decide)."""
    p.add_argument("--config", metavar="FILE", help="a TOML file of these options (flags override it)")
    p.add_argument("--queue", metavar="FILE", help="a TOML queue of jobs ([defaults] and [[job]] tables)")
    g = p.add_argument_group("the run")
    for f in fields(RunOptions):
        default = "" if f.default in ("", False) else f" (default: {f.default})"
        _add(g, f.name, RUN_TYPES[f.name], f"{RUN_HELP[f.name]}{default}")
    t = p.add_argument_group("training options (as in the tab; defaults from the checkpoint kind's recipe)")
    for key, name in TRAIN_KEYS.items():
        note = _recipe_note(name)
        _add(t, key, FIELD_TYPES[name], f"{HELP[name]}{'; ' + note if note else ''}")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given as flags (their names as in TOML)."""
    return {k: getattr(args, k) for k in KNOWN_KEYS if getattr(args, k, None) is not None}


def check_keys(values: Mapping[str, Any], where: str) -> None:
    unknown = [k for k in values if k not in KNOWN_KEYS]
    if unknown:
        msg = f"{where}: unknown option {unknown[0]!r}; the options are: {', '.join(KNOWN_KEYS)}"
        raise TIError(msg)


def read_config(path: str | Path) -> dict[str, Any]:
    """A --config file: a flat table of options."""
    values = read_toml(Path(path), "config file")
    check_keys(values, str(path))
    return values


@dataclass
class Resolved:
    """One run's options: the run's, and the training options given (the recipe fills the rest)."""

    run: RunOptions
    #: TrainRequest fields by their TrainRequest names (embedding, dataset_dir, steps, ...)
    train: dict[str, Any]


def resolve(values: Mapping[str, Any], where: str = "the options") -> Resolved:
    """Split and type-check ``values`` (TOML or flag names); TIError naming the first bad one."""
    check_keys(values, where)
    run: dict[str, Any] = {}
    for name in RUN_FIELDS:
        if name in values:
            value = values[name]
            kind = RUN_TYPES[name]
            if kind is bool and not isinstance(value, bool):
                msg = f"{where}: {name} must be true or false (got {short_repr(value)})"
                raise TIError(msg)
            run[name] = coerce_as(name, kind, value)
    train: dict[str, Any] = {}
    for key, value in values.items():
        if key in TRAIN_KEYS:
            name = TRAIN_KEYS[key]
            if FIELD_TYPES[name] is bool and not isinstance(value, bool):
                msg = f"{where}: {key} must be true or false (got {short_repr(value)})"
                raise TIError(msg)
            train[name] = coerce(name, value)
    opts = RunOptions(**run)
    for name in ("vectors", "resume_every", "preview_steps"):
        if getattr(opts, name) < 0:
            msg = f"{where}: {name} must not be negative"
            raise TIError(msg)
    if opts.clip_skip < 1:
        msg = f"{where}: clip_skip must be at least 1"
        raise TIError(msg)
    return Resolved(opts, train)


#: the tab's log folder in the web UI's data folder, beside its embeddings folder
LOG_FOLDER = "textual_inversion_ti"


def log_dir_for(opts: RunOptions) -> Path:
    """Where logs go: --log-dir, else ``textual_inversion_ti`` beside the embeddings folder: the tab's
    own when ``--out`` is a web UI's embeddings folder, so a run can be resumed in either (never inside
    the embeddings folder, where a web UI would load the snapshots as embeddings)."""
    if opts.log_dir:
        return Path(opts.log_dir)
    return Path(opts.out).resolve().parent / LOG_FOLDER

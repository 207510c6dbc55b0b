"""The resume file of a training run: the vectors, the optimizer state and the counters, as
safetensors bytes (tensors, plus the rest as JSON in the metadata; no pickle).

A run writes it at its automatic resume points (every :data:`POINT_EVERY_STEPS` steps or
:data:`POINT_EVERY_SECONDS`, whichever comes first), at snapshots and when it ends, so a crash loses
at most the work since the last point. :func:`read_info` reads what a file says about its run (for
the "unfinished run" notes) and :func:`check_info` refuses one that does not belong to an embedding.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lib_ti.errors import EmbeddingFormatError
from lib_ti.io.safetensors_io import load_bytes, parse_header, save_bytes
from lib_ti.training.errors import TrainingError

logger = logging.getLogger(__name__)

FORMAT = "lib_ti-resume-1"
#: the resume file of embedding ``name`` in its log folder
SUFFIX = ".resume.safetensors"
#: automatic resume points: every this many optimizer steps ...
POINT_EVERY_STEPS = 100
#: ... or after this many seconds of training, whichever comes first ...
POINT_EVERY_SECONDS = 180.0
#: ... but never so often that writing them takes more than this share of the run's time
POINT_MAX_SHARE = 0.01

#: how the run was when its resume file was written ("failed": NaN or infinite values ended it)
RunState = Literal["running", "stopped", "finished", "failed"]


@dataclass
class Counters:
    """Where a run is: what a resumed run continues from besides vectors and optimizer state."""

    step: int = 0
    loss_smooth: float | None = None
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    #: the lowest validation loss so far: (step, loss, vectors), for early stopping
    best: tuple[int, float, dict[str, torch.Tensor]] | None = None


@dataclass(frozen=True)
class ResumeInfo:
    """What a resume file says about its run, read from the header only."""

    name: str
    step: int
    steps: int
    state: RunState
    #: seconds since the epoch when the file was written
    saved_at: float
    #: ``sd1``, ``sd2``, ``sdxl`` (empty in files of older versions)
    kind: str
    #: vectors per encoder: {"clip_l": [2, 768], ...}
    shapes: dict[str, list[int]]
    #: the request the run was started with (TrainRequest fields; empty from older versions)
    settings: dict[str, Any]
    model_hash: str
    model_name: str

    @property
    def unfinished(self) -> bool:
        return self.state != "finished" and self.step < self.steps

    def to_dict(self) -> dict[str, Any]:
        """For the API: ``state`` is "interrupted" for a run cut off while it ran (a crash, a failed
        write), else "stopped" or "failed"."""
        return {
            "step": self.step,
            "steps": self.steps,
            "state": "interrupted" if self.state == "running" else self.state,
            "saved_at": self.saved_at,
            "model": self.model_name or self.model_hash,
            "settings": dict(self.settings),
        }


def dump_resume(
    *,
    name: str,
    vectors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    counters: Counters,
    args: dict[str, Any],
    model_hash: str,
    trained: list[str],
    kind: str = "",
    state: RunState = "running",
    settings: dict[str, Any] | None = None,
    model_name: str = "",
) -> bytes:
    """The resume file of a run training ``trained`` of ``vectors`` on the model ``model_hash``."""
    tensors: dict[str, torch.Tensor] = {f"vec.{k}": v.detach().cpu() for k, v in vectors.items()}
    state_dict = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in state_dict["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                tensors[f"opt.{pid}.{key}"] = val.detach().cpu()
            else:
                scalars[f"{pid}.{key}"] = float(val)
    best = None
    if counters.best is not None:
        best_step, best_loss, best_vectors = counters.best
        tensors.update({f"best.{k}": v.detach().cpu() for k, v in best_vectors.items()})
        best = [best_step, best_loss]
    meta = {
        "format": FORMAT,
        "name": name,
        "step": counters.step,
        "steps": int(args.get("steps", 0)),
        "state": state,
        "saved_at": time.time(),
        "kind": kind,
        "shapes": {k: list(v.shape) for k, v in vectors.items()},
        "args": _jsonable(args),
        "settings": _jsonable(settings or {}),
        "scalars": scalars,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state_dict["param_groups"]],
        "loss_smooth": counters.loss_smooth,
        "val_losses": counters.val_losses,
        "best": best,
        "model_hash": model_hash,
        "model_name": model_name,
        "trained": trained,
    }
    return save_bytes(tensors, {"resume": json.dumps(meta)})


def _meta(metadata: dict[str, str], label: str) -> dict[str, Any]:
    try:
        meta = json.loads(metadata["resume"])
    except (KeyError, json.JSONDecodeError):
        msg = f"{label} is not a resume file of this extension"
        raise TrainingError(msg) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        msg = f"{label} is a resume file of another version ({meta.get('format') if isinstance(meta, dict) else '?'})"
        raise TrainingError(msg)
    return meta


def read_info(data: bytes, label: str = "the resume file") -> ResumeInfo:
    """What a resume file says about its run (header only); TrainingError with the reason if it is
    truncated, corrupt or not a resume file."""
    try:
        entries, metadata = parse_header(data, label)
    except EmbeddingFormatError as e:
        raise TrainingError(str(e)) from None
    meta = _meta(metadata, label)
    try:
        shapes = meta.get("shapes") or {
            k[4:]: list(e["shape"]) for k, e in entries.items() if k.startswith("vec.")
        }
        return ResumeInfo(
            name=str(meta["name"]),
            step=int(meta["step"]),
            steps=int(meta.get("steps") or meta.get("args", {}).get("steps", 0)),
            state=meta.get("state", "stopped"),
            saved_at=float(meta.get("saved_at", 0.0)),
            kind=str(meta.get("kind", "")),
            shapes={str(k): [int(x) for x in v] for k, v in shapes.items()},
            settings=dict(meta.get("settings") or {}),
            model_hash=str(meta.get("model_hash") or ""),
            model_name=str(meta.get("model_name") or ""),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        msg = f"{label} is damaged ({type(e).__name__}: {e})"
        raise TrainingError(msg) from None


def read_info_file(path: Path) -> ResumeInfo:
    try:
        data = path.read_bytes()
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror or e}"
        raise TrainingError(msg) from None
    return read_info(data, str(path))


def check_info(
    info: ResumeInfo, *, name: str, kind: str, shapes: dict[str, list[int]], steps: int, label: str
) -> None:
    """Refuse a resume file that belongs to another embedding, model kind or vector layout, or whose
    run is already past ``steps`` (the resumed run's total)."""
    if info.name != name:
        msg = f"{label} belongs to the embedding {info.name!r}, not {name!r}"
        raise TrainingError(msg)
    if info.kind and kind and info.kind != kind:
        msg = f"{label} was made on an {info.kind.upper()} model; the loaded model is {kind.upper()}"
        raise TrainingError(msg)
    if info.shapes != shapes:
        msg = (
            f"{label} holds vectors {_shape_text(info.shapes)} but {name} has {_shape_text(shapes)} "
            "(the embedding was replaced after that run)"
        )
        raise TrainingError(msg)
    if info.step >= steps:
        msg = f"{label}: that run already reached step {info.step}; ask for more than {info.step} steps to go on"
        raise TrainingError(msg)


def _shape_text(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in sorted(shapes.items())) or "none"


def load_resume(
    data: bytes,
    *,
    vectors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    model_hash: str,
    trained: list[str],
    device: torch.device,
    label: str = "the resume file",
) -> Counters:
    """Restore ``vectors`` (in place) and ``optimizer`` from a resume file; return its counters."""
    try:
        tensors, header = load_bytes(data, label)
    except EmbeddingFormatError as e:
        raise TrainingError(str(e)) from None
    meta = _meta(header, label)
    if meta.get("trained") != trained:
        msg = f"{label} trained {meta.get('trained')}, this run trains {trained}"
        raise TrainingError(msg)
    for k, v in vectors.items():
        saved = tensors.get(f"vec.{k}")
        if saved is None or saved.shape != v.shape:
            got = "none" if saved is None else "x".join(map(str, saved.shape))
            msg = f"{label} holds {k} vectors {got}, the embedding has {'x'.join(map(str, v.shape))}"
            raise TrainingError(msg)
    if meta.get("model_hash") and model_hash and meta["model_hash"] != model_hash:
        logger.warning("resuming on a different model (%s, was %s)", model_hash, meta["model_hash"])
    with torch.no_grad():
        for k, v in vectors.items():
            v.copy_(tensors[f"vec.{k}"].to(v.device))
    state = optimizer.state_dict()
    new_state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            new_state.setdefault(int(pid), {})[name] = t.to(device)
    for key, val in meta["scalars"].items():
        pid, name = key.split(".", 1)
        new_state.setdefault(int(pid), {})[name] = torch.tensor(val)
    state["state"] = new_state
    for g, saved_group in zip(state["param_groups"], meta["param_groups"]):
        g.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_group.items()})
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        msg = f"{label}: its optimizer state does not fit this run ({e})"
        raise TrainingError(msg) from None
    best = None
    if meta.get("best"):
        best_step, best_loss = meta["best"]
        best_vectors = {k: tensors[f"best.{k}"].to(device) for k in vectors if f"best.{k}" in tensors}
        if len(best_vectors) == len(vectors):
            best = (int(best_step), float(best_loss), best_vectors)
    return Counters(
        step=int(meta["step"]),
        loss_smooth=meta.get("loss_smooth"),
        val_losses=[(int(s), float(v)) for s, v in meta.get("val_losses", [])],
        best=best,
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj

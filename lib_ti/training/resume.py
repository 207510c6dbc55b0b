"""The resume file of a training run: the vectors, the optimizer state and the counters, as
safetensors bytes (tensors, plus the rest as JSON in the metadata; no pickle)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lib_ti.io.safetensors_io import load_bytes, save_bytes
from lib_ti.training.errors import TrainingError

logger = logging.getLogger(__name__)

FORMAT = "lib_ti-resume-1"


@dataclass
class Counters:
    """Where a run is: what a resumed run continues from besides vectors and optimizer state."""

    step: int = 0
    loss_smooth: float | None = None
    val_losses: list[tuple[int, float]] = field(default_factory=list)


def dump_resume(
    *,
    name: str,
    vectors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    counters: Counters,
    args: dict[str, Any],
    model_hash: str,
    trained: list[str],
) -> bytes:
    """The resume file of a run training ``trained`` of ``vectors`` on the model ``model_hash``."""
    tensors: dict[str, torch.Tensor] = {f"vec.{k}": v.detach().cpu() for k, v in vectors.items()}
    state = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in state["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                tensors[f"opt.{pid}.{key}"] = val.detach().cpu()
            else:
                scalars[f"{pid}.{key}"] = float(val)
    meta = {
        "format": FORMAT,
        "name": name,
        "step": counters.step,
        "args": _jsonable(args),
        "scalars": scalars,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
        "loss_smooth": counters.loss_smooth,
        "val_losses": counters.val_losses,
        "model_hash": model_hash,
        "trained": trained,
    }
    return save_bytes(tensors, {"resume": json.dumps(meta)})


def load_resume(
    data: bytes,
    *,
    vectors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    model_hash: str,
    trained: list[str],
    device: torch.device,
) -> Counters:
    """Restore ``vectors`` (in place) and ``optimizer`` from a resume file; return its counters."""
    tensors, header = load_bytes(data, "resume file")
    try:
        meta = json.loads(header["resume"])
    except (KeyError, json.JSONDecodeError):
        msg = "not a resume file of this trainer"
        raise TrainingError(msg) from None
    if meta.get("trained") != trained:
        msg = f"the resume file trained {meta.get('trained')}, this run trains {trained}"
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
    for g, saved in zip(state["param_groups"], meta["param_groups"]):
        g.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    optimizer.load_state_dict(state)
    return Counters(
        step=int(meta["step"]),
        loss_smooth=meta.get("loss_smooth"),
        val_losses=[(int(s), float(v)) for s, v in meta.get("val_losses", [])],
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj

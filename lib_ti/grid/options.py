"""A grid request: every option, its type and its bounds, declared once (the REST body and the view's
form come from :class:`GridRequest`)."""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from lib_ti.create import MAX_SEED
from lib_ti.errors import TIError, short_repr
from lib_ti.names import validate_name
from lib_ti.training.options import coerce_as

#: what stands for the row's embedding in a prompt
PLACEHOLDER = "[name]"
#: more cells than this is a mistake (each is one txt2img image)
MAX_CELLS = 144
#: the longest a row or column list may be
MAX_AXIS = 24


@dataclass(frozen=True)
class GridRequest:
    """One comparison grid as the Inspect view and ``POST /ti/v1/grid`` ask for it.

    Rows: ``embeddings`` (names in the embeddings folder), then the snapshots of the training run
    ``run`` (``run_steps``: which steps; empty: all). Columns: ``checkpoints`` (the host's titles; empty:
    the loaded one) times ``cfg_scales``. Every row is repeated for each prompt and seed.
    """

    embeddings: tuple[str, ...] = ()
    #: an embedding whose training run's snapshots become rows
    run: str = ""
    run_steps: tuple[int, ...] = ()
    checkpoints: tuple[str, ...] = ()
    cfg_scales: tuple[float, ...] = (7.0,)
    #: ``[name]`` stands for the row's embedding
    prompts: tuple[str, ...] = (f"a photo of {PLACEHOLDER}",)
    negative_prompt: str = ""
    seeds: tuple[int, ...] = (1234,)
    #: sampling steps per image
    steps: int = 20
    #: image size; 0: the model's (SD1 512, SDXL 1024)
    width: int = 0
    height: int = 0
    #: the host's sampler name; "": its default
    sampler: str = ""

    @property
    def columns(self) -> list[tuple[str, float]]:
        """(checkpoint title or "" for the loaded one, CFG scale), checkpoint by checkpoint."""
        return [(c, s) for c in (self.checkpoints or ("",)) for s in self.cfg_scales]


FIELD_TYPES: dict[str, Any] = typing.get_type_hints(GridRequest)
#: the element type of each list field
ITEM_TYPES: dict[str, Any] = {
    name: typing.get_args(kind)[0] for name, kind in FIELD_TYPES.items() if typing.get_origin(kind) is tuple
}
_BOUNDS: dict[str, tuple[float, float]] = {
    "steps": (1, 150),
    "width": (0, 4096),
    "height": (0, 4096),
    "cfg_scales": (0.0, 100.0),
    "seeds": (0, MAX_SEED),
    "run_steps": (0, 10_000_000),
}


def _items(name: str, value: Any) -> tuple[Any, ...]:
    """A list field from a list, or from text: prompts one per line, other lists comma-separated."""
    if isinstance(value, str):
        sep = "\n" if name == "prompts" else ","
        value = [part.strip() for part in value.split(sep) if part.strip()]
    if not isinstance(value, Sequence) or isinstance(value, (bytes, bytearray)):
        msg = f"{name} must be a list (got {short_repr(value)})"
        raise TIError(msg)
    if len(value) > MAX_AXIS:
        msg = f"{name} lists {len(value)} values; at most {MAX_AXIS}"
        raise TIError(msg)
    kind = ITEM_TYPES[name]
    out = []
    for item in value:
        if kind is int and isinstance(item, float) and item.is_integer():
            item = int(item)
        out.append(coerce_as(name, kind, item))
    return tuple(out)


def grid_request(given: Mapping[str, Any]) -> GridRequest:
    """A checked request from the view's or the REST body's values (unknown keys refused by name)."""
    unknown = sorted(set(given) - set(FIELD_TYPES))
    if unknown:
        msg = f"unknown grid option {short_repr(unknown[0])}; the options are: {', '.join(FIELD_TYPES)}"
        raise TIError(msg)
    values: dict[str, Any] = {
        k: _items(k, v) if k in ITEM_TYPES else coerce_as(k, FIELD_TYPES[k], v)
        for k, v in given.items()
        if v is not None
    }
    req = GridRequest(**values)
    check(req)
    return req


def check(req: GridRequest) -> None:
    """Bounds and the rules between fields; TIError naming the field."""
    for name, (low, high) in _BOUNDS.items():
        value = getattr(req, name)
        for v in value if isinstance(value, tuple) else (value,):
            if not (low <= v <= high) or (isinstance(v, float) and not math.isfinite(v)):
                msg = f"{name} must be between {low:g} and {high:g} (got {short_repr(v)})"
                raise TIError(msg)
    for name in ("width", "height"):
        value = getattr(req, name)
        if value and (value < 64 or value % 8):
            msg = f"{name} must be 0 (the model's) or a multiple of 8 of at least 64 (got {value})"
            raise TIError(msg)
    for name in req.embeddings:
        validate_name(name)
    if req.run:
        validate_name(req.run)
    elif req.run_steps:
        msg = "run_steps picks snapshots of a training run: give run (the embedding that was trained)"
        raise TIError(msg)
    if not req.embeddings and not req.run:
        msg = "choose the rows: embeddings, or a training run whose snapshots to compare"
        raise TIError(msg)
    if not req.prompts:
        msg = f"give at least one prompt, with {PLACEHOLDER} where the embedding goes"
        raise TIError(msg)
    missing = [p for p in req.prompts if PLACEHOLDER not in p]
    if missing:
        msg = f"the prompt {short_repr(missing[0])} has no {PLACEHOLDER}: the embedding would not be in it"
        raise TIError(msg)
    for name in ("cfg_scales", "seeds"):
        if not getattr(req, name):
            msg = f"{name} needs at least one value"
            raise TIError(msg)
    if len(set(req.checkpoints)) != len(req.checkpoints) or any(not c.strip() for c in req.checkpoints):
        msg = "checkpoints: each checkpoint once, none empty"
        raise TIError(msg)


def defaults() -> dict[str, Any]:
    """Every field's default, as JSON-friendly values."""
    return {
        f.name: list(v) if isinstance(v := getattr(GridRequest(), f.name), tuple) else v
        for f in fields(GridRequest)
    }

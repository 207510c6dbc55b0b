"""Default training values per model kind (the recipe in docs/TRAINING.md), overridable in settings.

Where a value of a run comes from, first match wins: the request (the tab's form, the REST body),
the settings of the run that a resume continues (kept in its resume file), the user's ``ti_default_*`` settings, the recipe of the loaded model's kind, :class:`TrainRequest`'s
defaults (the SD1 recipe).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from lib_ti.errors import TIError
from lib_ti.training.options import FIELD_TYPES, OPTION_FIELDS, REQUIRED, TrainRequest, check, coerce

#: what differs from TrainRequest's defaults (the SD1 recipe: 5e-3 at effective batch 4, the
#: paper's and A1111's value); ~3e-3 at effective batch 4 for SDXL.
KIND_RECIPES: dict[str, dict[str, Any]] = {
    "sd1": {},
    "sd2": {"resolution": 768},
    "sdxl": {
        "lr": "3e-3", "steps": 1200, "batch_size": 1, "grad_accum": 4, "resolution": 1024,
        "snapshot_every": 200, "preview_every": 200, "warmup_steps": 60,
    },
}  # fmt: skip

#: vectors per token of a new embedding (the Create view), unless ``ti_default_vectors`` says otherwise
DEFAULT_VECTORS = 2

#: settings keys that override a recipe field when set (0 or empty: keep the recipe's value)
OVERRIDES = {
    "ti_default_steps": "steps",
    "ti_default_lr": "lr",
    "ti_default_batch_size": "batch_size",
    "ti_default_grad_accum": "grad_accum",
}

GetOption = Callable[[str, Any], Any]
logger = logging.getLogger(__name__)


def _kind(kind: str) -> str:
    """sdxl_refiner and unknown kinds fall back to sdxl / sd1."""
    if kind in KIND_RECIPES:
        return kind
    return "sdxl" if kind.startswith("sdxl") else "sd1"


def _setting(get_option: GetOption | None, key: str, field: str) -> Any:
    """The user's value of a ``ti_default_*`` setting, or None when unset, 0, blank or unusable."""
    value = get_option(key, None) if get_option else None
    if value in (None, "", 0):
        return None
    try:
        value = coerce(field, value)
    except TIError:
        return None
    return value if value not in ("", 0) else None


def recipe_for(kind: str, get_option: GetOption | None = None) -> dict[str, Any]:
    """Every option's value for ``kind``, with the user's settings applied (OPTION_FIELDS order)."""
    base: dict[str, Any] = {f.name: f.default for f in fields(TrainRequest) if f.name not in REQUIRED}
    base.update(KIND_RECIPES[_kind(kind)])
    for key, field in OVERRIDES.items():
        value = _setting(get_option, key, field)
        if value is not None:
            base[field] = value
    base["warmup_steps"] = _warmup(base["warmup_steps"], base["steps"])
    return {name: base[name] for name in OPTION_FIELDS}


def _warmup(recipe: int, steps: int) -> int:
    """A short run keeps at most a tenth of itself for warmup."""
    return min(recipe, steps // 10)


def default_vectors(get_option: GetOption | None = None) -> int:
    value = get_option("ti_default_vectors", None) if get_option else None
    try:
        n = int(float(value or 0))
    except (TypeError, ValueError):
        n = 0
    return n if n > 0 else DEFAULT_VECTORS


def resolve(
    given: Mapping[str, Any],
    kind: str,
    get_option: GetOption | None = None,
    base: Mapping[str, Any] | None = None,
) -> TrainRequest:
    """A complete, checked request: ``given`` values (coerced to their types) over ``base`` (the
    settings of the run a resume continues) over the recipe."""
    values = recipe_for(kind, get_option)
    for name, value in (base or {}).items():
        if name in FIELD_TYPES:
            try:
                values[name] = coerce(name, value)
            except TIError as e:
                logger.warning("ignoring the saved value of %s: %s", name, e)
    values.update({name: coerce(name, value) for name, value in given.items()})
    missing = [name for name in REQUIRED if not values.get(name)]
    if missing:
        msg = f"missing {', '.join(missing)}"
        raise TIError(msg)
    if "warmup_steps" not in given:
        values["warmup_steps"] = _warmup(values["warmup_steps"], values["steps"])
    req = TrainRequest(**values)
    check(req)
    return req

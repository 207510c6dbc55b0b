"""Default training values per model kind (the recipe in docs/TRAINING.md), overridable in settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Recipe:
    vectors: int
    lr: str
    steps: int
    batch_size: int
    grad_accum: int
    resolution: int
    template: str
    snapshot_every: int
    preview_every: int
    validation_every: int
    warmup_steps: int
    norm_control: str = "soft"
    flip: bool = True
    shuffle_tags: bool = True
    latent_sampling: str = "random"


#: 5e-3 at effective batch 4 for SD1/SD2 (the paper's and A1111's value); ~3e-3 for SDXL.
RECIPES: dict[str, Recipe] = {
    "sd1": Recipe(2, "5e-3", 2000, 2, 2, 512, "subject_filewords", 250, 250, 50, 100),
    "sd2": Recipe(2, "5e-3", 2000, 2, 2, 768, "subject_filewords", 250, 250, 50, 100),
    "sdxl": Recipe(2, "3e-3", 1200, 1, 4, 1024, "subject_filewords", 200, 200, 50, 60),
}

#: settings keys that override a recipe field when set (0 or empty: keep the recipe's value)
OVERRIDES = {
    "ti_default_steps": "steps",
    "ti_default_lr": "lr",
    "ti_default_batch_size": "batch_size",
    "ti_default_grad_accum": "grad_accum",
    "ti_default_vectors": "vectors",
}


def recipe_for(kind: str, get_option: Callable[[str, Any], Any] | None = None) -> Recipe:
    """The recipe for ``kind`` (sdxl_refiner and unknown kinds fall back to sdxl / sd1) with settings applied."""
    base = RECIPES.get(kind) or (RECIPES["sdxl"] if kind.startswith("sdxl") else RECIPES["sd1"])
    if get_option is None:
        return base
    changes: dict[str, Any] = {}
    for key, name in OVERRIDES.items():
        value = get_option(key, None)
        if value in (None, "", 0):
            continue
        try:
            changes[name] = str(value).strip() if name == "lr" else int(float(value))
        except (TypeError, ValueError):
            continue
    # a blank lr or a value that rounds to 0 keeps the recipe's value
    return replace(base, **{k: v for k, v in changes.items() if v not in ("", 0)})

"""The extension's settings (``ti_`` keys), declared once; the host adapter registers them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SECTION = ("ti", "Textual Inversion")


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    label: str
    #: "text", "number", "checkbox" or "radio"
    component: str = "text"
    choices: tuple[str, ...] = field(default_factory=tuple)
    info: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "ti_save_format",
        "safetensors",
        "File format for embeddings this extension writes",
        "radio",
        ("safetensors", "pt"),
        ".safetensors loads on every host and cannot run code; .pt is A1111's own format",
    ),
    Setting(
        "ti_preview_size",
        0,
        "Size of training previews in pixels (0: 512 for SD1, 1024 for SDXL)",
        "number",
    ),
    Setting(
        "ti_log_dir",
        "",
        "Folder for training logs and previews (empty: textual_inversion_ti in the web UI's data folder)",
    ),
)

DEFAULTS: dict[str, Any] = {s.key: s.default for s in SETTINGS}

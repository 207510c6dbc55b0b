"""The extension's settings (``ti_`` keys), declared once; the host adapter registers them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lib_ti.training.resume import POINT_EVERY_SECONDS, POINT_EVERY_STEPS

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
        "ti_inline",
        True,
        "Embedding math in prompts: <'cat'+'dog'> is a temporary embedding",
        "checkbox",
        info="the Embedding Merge extension's syntax; off when that extension is enabled",
    ),
    Setting("ti_inline_curly", True, "Also read {'…'} in prompts as embedding math", "checkbox"),
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
    Setting("ti_dataset_dir", "", "Default dataset folder in the Train tab"),
    Setting(
        "ti_templates_dir",
        "",
        "Folder of your own prompt templates (.txt, one prompt per line with [name] and [filewords])",
    ),
    Setting(
        "ti_pt_copy",
        False,
        "Also write a .pt copy of each trained embedding into its log folder",
        "checkbox",
        info="for tools that read only A1111's .pt files; the embeddings folder keeps one file per name",
    ),
    Setting(
        "ti_resume_every",
        POINT_EVERY_STEPS,
        f"Automatic resume point every N training steps (and every {POINT_EVERY_SECONDS / 60:g} minutes)",
        "number",
        info="the embedding and its resume file are saved there, so a crash loses at most the steps since; 0: by time only",
    ),
    Setting(
        "ti_preview_format",
        "png",
        "Image format of training previews",
        "radio",
        ("png", "webp", "jpg"),
        "png stores the embedding inside the image, as A1111 does",
    ),
    Setting("ti_default_vectors", 0, "Default vectors per token for new embeddings (0: recipe, 2)", "number"),
    Setting("ti_default_steps", 0, "Default training steps (0: recipe, 2000 SD1/SD2, 1200 SDXL)", "number"),
    Setting(
        "ti_default_lr", "", "Default learning rate or schedule (empty: recipe, 5e-3 SD1/SD2, 3e-3 SDXL)"
    ),
    Setting("ti_default_batch_size", 0, "Default batch size (0: recipe)", "number"),
    Setting("ti_default_grad_accum", 0, "Default gradient accumulation (0: recipe)", "number"),
)

DEFAULTS: dict[str, Any] = {s.key: s.default for s in SETTINGS}

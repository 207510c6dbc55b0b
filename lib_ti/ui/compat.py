"""Differences between gradio 3.41 (A1111, reForge, Forge Classic) and 4.x (Forge)."""

from __future__ import annotations

from typing import Any

import gradio as gr


def gradio_major() -> int:
    try:
        return int(str(gr.__version__).split(".")[0])
    except ValueError:
        return 3


def js_kwargs(code: str) -> dict[str, str]:
    """The keyword that runs JavaScript on an event: ``_js`` in 3.x, ``js`` in 4.x."""
    return {"js": code} if gradio_major() >= 4 else {"_js": code}


def file_upload_kwargs() -> dict[str, Any]:
    """``gr.File`` arguments that give the handler a path on both majors."""
    return {"type": "filepath"} if gradio_major() >= 4 else {"type": "file"}


def uploaded_path(value: Any) -> str | None:
    """The local path of an uploaded file: a str (4.x) or a tempfile wrapper with ``.name`` (3.x)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path") or value.get("name")
    return getattr(value, "name", None)

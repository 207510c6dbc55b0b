"""The extension's settings as gradio components, registered through the host adapter's ``add_option``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from lib_ti.settings import SETTINGS

#: ``Setting.component`` -> the gradio class the host's settings page shows
COMPONENTS: dict[str, Any] = {
    "text": gr.Textbox,
    "number": gr.Number,
    "checkbox": gr.Checkbox,
    "radio": gr.Radio,
}


def register(add_option: Callable[[str, Any, str, Any, dict[str, Any] | None, str], None]) -> None:
    """Call ``add_option(key, default, label, component, component_args, info)`` for every setting."""
    for s in SETTINGS:
        args = {"choices": list(s.choices)} if s.component == "radio" else None
        add_option(s.key, s.default, s.label, COMPONENTS[s.component], args, s.info)

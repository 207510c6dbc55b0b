"""Run by the web UI at start-up: installs only what the host lacks (normally nothing).

Everything this extension needs (torch, safetensors, gradio, Pillow, numpy) ships with the hosts.
"""

from __future__ import annotations

import importlib.util

REQUIRED = {
    "torch": "torch",
    "safetensors": "safetensors",
    "PIL": "Pillow",
    "numpy": "numpy",
    "gradio": "gradio",
}


def main() -> None:
    missing = [dist for mod, dist in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    try:
        import launch
    except ImportError:
        print(f"[sd-webui-ti] missing packages: {', '.join(missing)}; install them into the web UI's Python")
        return
    for dist in missing:
        launch.run_pip(f"install {dist}", f"{dist} for the Textual Inversion tab")


main()

"""Entry point the web UI imports: registers the tab and the settings, nothing else."""

from __future__ import annotations

import logging

from modules import script_callbacks

from lib_ti import __version__
from lib_ti.host import a1111
from lib_ti.host.detect import host_name
from lib_ti.ui.tab import on_ui_tabs

logger = logging.getLogger("lib_ti")

_HOST = host_name()


def _ui_tabs():
    return on_ui_tabs(a1111.host_info(_HOST))


# Positional registration only: Forge Classic's on_* take no name= keyword.
script_callbacks.on_ui_tabs(_ui_tabs)
script_callbacks.on_ui_settings(a1111.register_settings)

print(f"[-] Textual Inversion tab (lib_ti {__version__}) loaded on {_HOST}.")  # noqa: T201

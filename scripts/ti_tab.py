"""Entry point the web UI imports: registers the tab, the settings and the API routes, nothing else."""

from __future__ import annotations

from modules import script_callbacks

from lib_ti import __version__
from lib_ti.host import a1111, a1111_services
from lib_ti.host.detect import host_name
from lib_ti.ui.tab import on_ui_tabs

_HOST = host_name()


def _ui_tabs():
    return on_ui_tabs(a1111.host_info(_HOST))


def _app_started(_demo, app):
    a1111_services.add_api_routes(app)


# Positional registration only: Forge Classic's on_* take no name= keyword.
script_callbacks.on_ui_tabs(_ui_tabs)
script_callbacks.on_ui_settings(a1111.register_settings)
script_callbacks.on_app_started(_app_started)
script_callbacks.on_model_loaded(a1111.on_model_loaded)

print(f"[-] Textual Inversion tab (lib_ti {__version__}) loaded on {_HOST}.")  # noqa: T201

"""Entry point the web UI imports: registers the tab, the settings and the API routes, nothing else."""

from __future__ import annotations

from modules import script_callbacks

from lib_ti import __version__
from lib_ti.host import webui
from lib_ti.host.detect import host_name
from lib_ti.ui.tab import on_ui_tabs

_HOST = host_name()

if _HOST == "forge":
    from lib_ti.host import forge as adapter
    from lib_ti.host import forge_services as services
else:
    from lib_ti.host import a1111 as adapter
    from lib_ti.host import a1111_services as services


def _ui_tabs():
    return on_ui_tabs(adapter.host_info(_HOST))


def _app_started(_demo, app):
    services.add_api_routes(app)


# Positional registration only: Forge Classic's on_* take no name= keyword.
script_callbacks.on_ui_tabs(_ui_tabs)
script_callbacks.on_ui_settings(webui.register_settings)
script_callbacks.on_app_started(_app_started)
if _HOST != "forge":  # Forge builds new engines (which read the folder) at every model load
    script_callbacks.on_model_loaded(adapter.on_model_loaded)

print(f"[-] Textual Inversion tab (lib_ti {__version__}) loaded on {_HOST}.")  # noqa: T201

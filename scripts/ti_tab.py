"""Entry point the web UI imports, and the composition root: picks the host adapter, registers the tab,
the settings and the API routes, nothing else."""

from __future__ import annotations

import os

from modules import script_callbacks, scripts

from lib_ti import __version__
from lib_ti.host import inline
from lib_ti.host.adapter import get_service
from lib_ti.host.detect import detect_adapter
from lib_ti.ui import settings
from lib_ti.ui.api import add_routes
from lib_ti.ui.compat import gradio_major
from lib_ti.ui.tab import on_ui_tabs

ADAPTER = detect_adapter()


def _service():
    return get_service(ADAPTER)


def _ui_tabs():
    return on_ui_tabs(ADAPTER.host_info(_service, gradio_major()))


def _ui_settings():
    settings.register(ADAPTER.add_option)


def _app_started(_demo, app):
    ADAPTER.on_app_started(app)
    if getattr(app.state, "lib_ti_routes", False):  # once per app (Reload UI calls this again)
        return
    service = _service()
    add_routes(app, service, ADAPTER.api_auth())
    if os.environ.get("LIB_TI_HOST_CHECKS") == "1":  # the real-host tests' self-checks only
        ADAPTER.add_check_routes(app, service)
        inline.add_check_routes(app, _service, ADAPTER.temporary_embeddings)
    app.state.lib_ti_routes = True


# Positional registration only: Forge Classic's on_* take no name= keyword.
script_callbacks.on_ui_tabs(_ui_tabs)
script_callbacks.on_ui_settings(_ui_settings)
script_callbacks.on_app_started(_app_started)
_host_model_loaded = ADAPTER.model_loaded_hook()


def _model_loaded(sd_model):
    _service().forget_model()
    if _host_model_loaded is not None:
        _host_model_loaded(sd_model)


script_callbacks.on_model_loaded(_model_loaded)

inline.install(_service, ADAPTER.temporary_embeddings, ADAPTER.model_loaded)


class InlineExpressions(scripts.Script):
    """Carries {'…'} prompt expressions through sd-dynamic-prompts (metadata.ini orders this after it)."""

    def title(self):
        return "Textual Inversion: embedding math in prompts"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def before_process(self, p, *args):
        inline.protect_curly(p)

    def process(self, p, *args):
        inline.restore_curly(p)


print(f"[-] Textual Inversion tab (lib_ti {__version__}) loaded on {ADAPTER.label} ({ADAPTER.name}).")  # noqa: T201

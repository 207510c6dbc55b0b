"""HostServices for Forge: its lazy model load, gradient-safe weights, previews through its txt2img."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_ti.embedding import Embedding
from lib_ti.host import forge, forge_model, webui
from lib_ti.hostinfo import HostServices

logger = logging.getLogger(__name__)


def _still_loaded(m: Any) -> Callable[[], bool]:
    from modules import sd_models

    wanted = str(sd_models.model_data.forge_loading_parameters)

    def check() -> bool:
        data = sd_models.model_data
        return data.sd_model is m and str(data.forge_loading_parameters) == wanted

    return check


def _parts():
    m = forge.ensure_model()
    return forge_model.build_parts(m, _still_loaded(m))


def _freeze() -> Callable[[], None]:
    """Load the UNet and text encoders, and make their weights usable by autograd (values unchanged)."""
    m = forge.ensure_model()
    forge_model.load_for_training(m)
    count, restore = forge_model.normal_weights(forge_model.training_modules(m))
    if count:
        logger.info("replaced %d inference tensors of the model by normal tensors (same values)", count)
    return restore


def _preview(emb: Embedding, prompt: str, step: int, out_dir: Path) -> str | None:
    from lib_ti.io.formats import a1111_data

    forge.register_live(a1111_data(emb, with_metadata=False), emb.name)
    try:
        image = webui.txt2img(prompt, webui.preview_size(emb.kind))
    finally:
        forge.reload_embeddings()
        # Forge's sampling runs in inference mode and may have made inference tensors again
        m = forge.loaded_model()
        if m is not None:
            forge_model.normal_weights(forge_model.training_modules(m))
    return webui.save_preview(emb, image, step, out_dir) if image is not None else None


def host_services() -> HostServices:
    services = webui.common_services()
    services["exclusive"] = forge.exclusive
    return HostServices(
        **services,
        build_parts=_parts,
        reload_embeddings=forge.reload_embeddings,
        freeze_model=_freeze,
        preview=_preview,
        embedding_status=forge.embedding_status,
    )


_SERVICE = None


def get_service():
    """The one Service of this process."""
    global _SERVICE
    if _SERVICE is None:
        from lib_ti.service import Service

        _SERVICE = Service(host_services())
    return _SERVICE


def add_api_routes(app: Any) -> None:
    forge.remember_api(app)
    webui.add_api_routes(app, get_service(), _add_checks)


def _add_checks(app: Any) -> None:
    from lib_ti.host.forge_checks import add_check_routes

    add_check_routes(app)

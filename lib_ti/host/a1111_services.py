"""HostServices for AUTOMATIC1111: the GPU lock, progress in shared.state, hot reload, previews."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lib_ti.embedding import Embedding
from lib_ti.host import a1111, webui
from lib_ti.host.a1111_model import build_parts, frozen
from lib_ti.host.detect import training_blocked
from lib_ti.hostinfo import HostServices

logger = logging.getLogger(__name__)


def _parts():
    from modules import shared

    return build_parts(shared.sd_model)


def _freeze():
    from modules import shared

    changed = frozen(shared.sd_model)

    def restore() -> None:
        for p in changed:
            p.requires_grad_(True)

    return restore


def _release_vae():
    """On a GPU, move the VAE to the CPU while training (latents are cached); put it back after."""
    from modules import shared

    m = shared.sd_model
    vae = getattr(m, "first_stage_model", None)
    if vae is None:
        return lambda: None
    device = next(vae.parameters()).device
    if device.type == "cpu":
        return lambda: None
    vae.to("cpu")

    def restore() -> None:
        vae.to(device)

    return restore


def _preview(emb: Embedding, prompt: str, step: int, out_dir: Path) -> str | None:
    """A txt2img image through the host's own pipeline, with the current vectors registered in memory."""
    from modules import sd_hijack, shared
    from modules.textual_inversion import textual_inversion as ti

    from lib_ti.io.formats import a1111_data

    db = sd_hijack.model_hijack.embedding_db
    live = ti.create_embedding_from_data(
        a1111_data(emb, with_metadata=False), emb.name, filename=f"{emb.name}.preview"
    )
    db.register_embedding(live, shared.sd_model)
    try:
        image = webui.txt2img(prompt, webui.preview_size(emb.kind))
    finally:
        db.load_textual_inversion_embeddings(force_reload=True)
    return webui.save_preview(emb, image, step, out_dir) if image is not None else None


def host_services(host: str = "a1111") -> HostServices:
    return HostServices(
        training_blocked=lambda: training_blocked(host),
        **webui.common_services(),
        build_parts=_parts,
        reload_embeddings=a1111.reload_embeddings,
        freeze_model=_freeze,
        preview=_preview,
        embedding_status=a1111.embedding_status,
        release_image_encoder=_release_vae,
    )


_SERVICE = None


def get_service():
    """The one Service of this process (kept across the host's Reload UI, which re-runs scripts)."""
    global _SERVICE
    if _SERVICE is None:
        from lib_ti.host.detect import host_name
        from lib_ti.service import Service

        _SERVICE = Service(host_services(host_name()))
    return _SERVICE


def add_api_routes(app: Any) -> None:
    webui.add_api_routes(app, get_service(), _add_checks)


def _add_checks(app: Any) -> None:
    from lib_ti.host.a1111_checks import add_check_routes

    add_check_routes(app)

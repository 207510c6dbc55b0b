"""AUTOMATIC1111 v1.10 (and A1111-style forks): folders, the embedding database, settings."""

from __future__ import annotations

import logging
from typing import Any

from modules import sd_hijack, sd_models

from lib_ti.host import webui
from lib_ti.host.webui import embeddings_dir, get_option, register_settings
from lib_ti.hostinfo import HostInfo

logger = logging.getLogger(__name__)


def _db() -> Any:
    return sd_hijack.model_hijack.embedding_db


def embedding_status() -> dict[str, str]:
    db = _db()
    status = dict.fromkeys(getattr(db, "skipped_embeddings", {}), "skipped")
    status.update(dict.fromkeys(getattr(db, "word_embeddings", {}), "loaded"))
    return status


def reload_embeddings() -> None:
    """Re-read the embeddings folder now (the host's own check misses files overwritten in place).

    Needs a loaded model (the database tokenizes names with it); without one the host loads the
    folder itself when the model loads.
    """
    if sd_models.model_data.sd_model is None:
        logger.info("no model loaded yet; embeddings will be read when it loads")
        return
    _db().load_textual_inversion_embeddings(force_reload=True)


def host_info(name: str = "a1111") -> HostInfo:
    # Forge Classic refuses embeddings stored in images (its loader raises for .png/.webp)
    return webui.host_info(
        name, embedding_status, reload_embeddings, _service, image_embeddings=name != "classic"
    )


def _service() -> Any:
    from lib_ti.host.a1111_services import get_service

    return get_service()


def on_model_loaded(sd_model: Any) -> None:
    """Re-read the embeddings when the model's width differs from what the database was built for.

    The host forces a reload on a full load but not when it swaps in a cached model
    (``sd_checkpoints_limit`` > 1), leaving e.g. SDXL embeddings skipped (A1111 issue #13117).
    """
    db = _db()
    try:
        expected = db.get_expected_shape()
    except Exception as e:  # the host's own helper; never break a model load
        logger.warning("could not read the model's embedding width: %s", e)
        return
    if db.expected_shape != expected:
        logger.info("embedding width changed (%s -> %s); reloading embeddings", db.expected_shape, expected)
        db.load_textual_inversion_embeddings(force_reload=True)


__all__ = ["embedding_status", "embeddings_dir", "get_option", "host_info", "on_model_loaded", "register_settings",
           "reload_embeddings"]  # fmt: skip

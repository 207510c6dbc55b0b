"""The adapter for AUTOMATIC1111 v1.10, the base of its A1111-style forks' (:mod:`lib_ti.host.forks`).

They keep one embedding database (``sd_hijack.model_hijack.embedding_db``); the GPU lock, progress and
settings are :mod:`lib_ti.host.webui`'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from lib_ti.embedding import Embedding
from lib_ti.host import a1111_checks, webui
from lib_ti.host.a1111_model import build_parts, freeze
from lib_ti.hostinfo import Generation, HostServices
from lib_ti.io.formats import a1111_data

logger = logging.getLogger(__name__)


def database() -> Any:
    from modules import sd_hijack

    return sd_hijack.model_hijack.embedding_db


def loaded_model() -> Any:
    from modules import shared

    return shared.sd_model


def embedding_status() -> dict[str, str]:
    db = database()
    status = dict.fromkeys(getattr(db, "skipped_embeddings", {}), "skipped")
    status.update(dict.fromkeys(getattr(db, "word_embeddings", {}), "loaded"))
    return webui.without_temporary(status)


def reload_embeddings() -> None:
    """Re-read the embeddings folder now (the host's own check misses files overwritten in place).

    Needs a loaded model (the database tokenizes names with it); without one the host loads the
    folder itself when the model loads.
    """
    from modules import sd_models

    webui.forget_cached_conditioning()
    if sd_models.model_data.sd_model is None:
        logger.info("no model loaded yet; embeddings will be read when it loads")
        return
    database().load_textual_inversion_embeddings(force_reload=True)


def on_model_loaded(sd_model: Any) -> None:
    """Re-read the embeddings when the model's width differs from what the database was built for.

    The host forces a reload on a full load but not when it swaps in a cached model
    (``sd_checkpoints_limit`` > 1), leaving e.g. SDXL embeddings skipped (A1111 issue #13117).
    """
    db = database()
    try:
        expected = db.get_expected_shape()
    except Exception as e:  # the host's own helper; never break a model load
        logger.warning("could not read the model's embedding width: %s", e)
        return
    if db.expected_shape != expected:
        logger.info("embedding width changed (%s -> %s); reloading embeddings", db.expected_shape, expected)
        db.load_textual_inversion_embeddings(force_reload=True)


def _parts() -> Any:
    return build_parts(loaded_model())


def _freeze() -> Callable[[], None]:
    return freeze(loaded_model())


def _release_vae() -> Callable[[], None]:
    """On a GPU, move the VAE to the CPU while training (latents are cached); put it back after."""
    vae = getattr(loaded_model(), "first_stage_model", None)
    if vae is None:
        return lambda: None
    device = next(vae.parameters()).device
    if device.type == "cpu":
        return lambda: None
    vae.to("cpu")

    def restore() -> None:
        vae.to(device)

    return restore


def preview(emb: Embedding, prompt: str, step: int, out_dir: Path) -> str | None:
    """A txt2img image through the host's own pipeline, with the current vectors registered in memory."""
    db = database()
    db.register_embedding(_live(emb, emb.name), loaded_model())
    try:
        image = webui.txt2img(prompt, webui.preview_size(emb.kind))
    finally:
        db.load_textual_inversion_embeddings(force_reload=True)
    return webui.save_preview(emb, image, step, out_dir) if image is not None else None


def _live(emb: Embedding, name: str, filename: str | None = None) -> Any:
    """The host's Embedding object for one held in memory (a training preview, a prompt's expression);
    ``filename``: the file it came from, whose hash the host then writes into the infotext."""
    from modules.textual_inversion import textual_inversion as ti

    data = a1111_data(emb, with_metadata=False)
    if filename:  # the host hashes the file (the infotext's TI hashes name it)
        return ti.create_embedding_from_data(data, name, filename=filename, filepath=filename)
    return ti.create_embedding_from_data(data, name, filename=name)


@contextlib.contextmanager
def temporary_embeddings(
    embeddings: Mapping[str, Embedding], files: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Embeddings known to the database by name inside the ``with`` only (prompt expressions, a grid's
    snapshots; ``files``: name -> the file each came from, for the infotext's ``TI hashes``)."""
    db, model = database(), loaded_model()
    # an embedding of the same name in the folder is put back afterwards, not dropped
    before: dict[str, Any] = {}
    try:
        for name, emb in embeddings.items():
            before[name] = db.word_embeddings.get(name)
            db.register_embedding_by_name(_live(emb, name, (files or {}).get(name)), model, name)
        yield
    finally:
        for name, previous in before.items():
            db.register_embedding_by_name(previous, model, name)


def generate(what: Generation) -> tuple[Any, str]:
    """A grid cell through the host's txt2img, with the cell's own embeddings known by name meanwhile."""
    with temporary_embeddings(what.embeddings, what.files):
        return webui.generate(what, pin=webui.checkpoint())


def model_loaded() -> bool:
    from modules import sd_models

    return sd_models.model_data.sd_model is not None


class A1111Adapter(webui.WebUIAdapter):
    name: ClassVar[str] = "a1111"
    label: ClassVar[str] = "AUTOMATIC1111"

    def host_services(self) -> HostServices:
        return HostServices(
            **webui.common_services(),
            build_parts=_parts,
            reload_embeddings=reload_embeddings,
            label=self.label,
            freeze_model=_freeze,
            preview=preview,
            embedding_status=embedding_status,
            release_image_encoder=_release_vae,
            load_checkpoint=webui.load_checkpoint,
            generate=generate,
        )

    def add_check_routes(self, app: Any, service: Any) -> None:
        a1111_checks.add_check_routes(app, service, loaded_model, database)

    def model_loaded_hook(self) -> Callable[[Any], None] | None:
        return on_model_loaded

    temporary_embeddings = staticmethod(temporary_embeddings)
    model_loaded = staticmethod(model_loaded)

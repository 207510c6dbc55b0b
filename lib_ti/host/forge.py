"""The adapter for Forge (Forge2 backend; Forge Neo too): its embedding databases, lazy model load,
gradient-safe weights and previews through its txt2img.

Forge keeps three databases (see the research notes): one per text-processing engine (what prompts
use; rebuilt only when a checkpoint loads), the Extra Networks cards' one, and the API's one
(``/sdapi/v1/embeddings``). A write reloads all three, so the name works in the next prompt.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from lib_ti.embedding import Embedding
from lib_ti.host import forge_checks, forge_model, grad_safe, webui
from lib_ti.host.forge_model import engines
from lib_ti.hostinfo import Generation, HostServices
from lib_ti.io.bundles import FORGE_BUNDLE_NOTE
from lib_ti.io.formats import a1111_data

logger = logging.getLogger(__name__)

#: the web UI's Api object (its embedding database), found in on_app_started
_API: dict[str, Any] = {}


def loaded_model() -> Any:
    """The loaded model, or None before Forge's first (lazy) load."""
    from modules import sd_models

    m = sd_models.model_data.sd_model
    return m if m is not None and engines(m) else None


#: ``holding`` is True in the thread of our training job while it holds the host's GPU lock
GPU_LOCK = threading.local()


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """The host's GPU lock, remembering that this thread holds it (the lock is not re-entrant)."""
    with webui.exclusive():
        GPU_LOCK.holding = True
        try:
            yield
        finally:
            GPU_LOCK.holding = False


def ensure_model() -> Any:
    """The model, loading the selected checkpoint if Forge has not yet (it loads lazily).

    A load happens under the GPU lock, as Forge's own generations do it, so two loads never overlap.
    """
    from modules import sd_models

    def stale() -> bool:
        data = sd_models.model_data
        return loaded_model() is None or data.forge_hash != str(data.forge_loading_parameters)

    if not stale():
        return loaded_model()
    if getattr(GPU_LOCK, "holding", False):
        return sd_models.forge_model_reload()[0]
    with webui.exclusive():
        return sd_models.forge_model_reload()[0] if stale() else loaded_model()


def embedding_status() -> dict[str, str]:
    """What the engines of the loaded model use: ``loaded`` in any engine, else ``skipped``."""
    m = loaded_model()
    status: dict[str, str] = {}
    for eng in engines(m) if m is not None else []:
        for name in getattr(eng.embeddings, "skipped_embeddings", {}):
            status.setdefault(name, "skipped")
        for name in getattr(eng.embeddings, "word_embeddings", {}):
            status[name] = "loaded"
    return webui.without_temporary(status)


def remember_api(app: Any) -> None:
    """Find the host's Api object (it owns ``/sdapi/v1/embeddings``'s database) through its routes."""
    for route in getattr(app, "routes", []):
        owner = getattr(getattr(route, "endpoint", None), "__self__", None)
        if getattr(route, "path", "") == "/sdapi/v1/embeddings" and owner is not None:
            _API["api"] = owner
            return


def reload_embeddings() -> None:
    """Re-read the folder into every engine, the cards' database and the API's."""
    webui.forget_cached_conditioning()
    m = loaded_model()
    for eng in engines(m) if m is not None else []:
        eng.embeddings.load_textual_inversion_embeddings()
    try:
        from modules import ui_extra_networks_textual_inversion as cards

        cards.embedding_db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
    except (ImportError, AttributeError) as e:
        logger.warning("could not reload the cards' embeddings: %s", e)
    api = _API.get("api")
    if api is not None and hasattr(api, "embedding_db"):
        api.embedding_db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)


def register_live(emb: Embedding, name: str) -> list[Any]:
    """Register an embedding held in memory in the loaded model's engines (a training preview, a
    prompt's expression); returns the engines that took it (those whose width it fits)."""
    from backend.text_processing.textual_inversion import create_embedding_from_data

    m = loaded_model()
    data = a1111_data(emb, with_metadata=False)
    took = []
    for eng in engines(m) if m is not None else []:
        live = create_embedding_from_data(data, name, filename=name)
        if eng.embeddings.expected_shape in (-1, live.shape):
            eng.embeddings.register_embedding_by_name(live, name)
            took.append(eng)
    return took


@contextlib.contextmanager
def temporary_embeddings(embeddings: Mapping[str, Embedding]) -> Iterator[None]:
    """Embeddings known to the loaded model's engines by name inside the ``with`` only (prompt
    expressions, a grid's snapshots); an embedding of the same name from the folder is put back after."""
    m = loaded_model()
    before = [(eng, name, eng.embeddings.word_embeddings.get(name)) for name in embeddings
              for eng in (engines(m) if m is not None else [])]  # fmt: skip
    try:
        for name, emb in embeddings.items():
            register_live(emb, name)
        yield
    finally:
        for eng, name, previous in before:
            eng.embeddings.register_embedding_by_name(previous, name)


def model_loaded() -> bool:
    return loaded_model() is not None


def _still_loaded(m: Any) -> Callable[[], bool]:
    from modules import sd_models

    wanted = str(sd_models.model_data.forge_loading_parameters)

    def check() -> bool:
        data = sd_models.model_data
        return data.sd_model is m and str(data.forge_loading_parameters) == wanted

    return check


def _parts() -> Any:
    m = ensure_model()
    return forge_model.build_parts(m, _still_loaded(m))


def _freeze() -> Callable[[], None]:
    """Load the UNet and text encoders, and make their weights usable by autograd (values unchanged)."""
    m = ensure_model()
    forge_model.load_for_training(m)
    return grad_safe.trainable(forge_model.training_modules(m))


def _preview(emb: Embedding, prompt: str, step: int, out_dir: Path) -> str | None:
    register_live(emb, emb.name)
    try:
        image = webui.txt2img(prompt, webui.preview_size(emb.kind))
    finally:
        reload_embeddings()
        # Forge's sampling runs in inference mode and may have made inference tensors again
        m = loaded_model()
        if m is not None:
            grad_safe.normal_weights(forge_model.training_modules(m))
    return webui.save_preview(emb, image, step, out_dir) if image is not None else None


#: the loading parameters of the checkpoint a grid loaded (its cells use it, whatever the dropdown says)
_PINNED: dict[str, Any] = {}


def load_checkpoint(title: str) -> None:
    """Load a checkpoint and leave the dropdown's choice as it is (a grid loads its columns; the user's
    choice is loaded again after it); the caller holds the GPU lock."""
    from modules import sd_models, shared
    from modules_forge import main_entry

    info = webui.checkpoint_info(title)
    choice = shared.opts.data.get("sd_model_checkpoint")
    shared.opts.data["sd_model_checkpoint"] = info.title
    try:
        main_entry.refresh_model_loading_parameters()
        ensure_model()
        _PINNED["params"] = sd_models.model_data.forge_loading_parameters
    finally:
        shared.opts.data["sd_model_checkpoint"] = choice


def generate(what: Generation) -> tuple[Any, str]:
    """A grid cell through Forge's txt2img, on the checkpoint the grid loaded (a dropdown change
    meanwhile refreshes Forge's loading parameters at once), with the cell's own embeddings."""
    from modules import sd_models

    data = sd_models.model_data
    choice, pinned = data.forge_loading_parameters, _PINNED.get("params")
    if pinned is not None:
        data.forge_loading_parameters = pinned
    try:
        with temporary_embeddings(what.embeddings):
            return webui.generate(what)
    finally:
        if pinned is not None and data.forge_loading_parameters is pinned:
            data.forge_loading_parameters = choice


class ForgeAdapter(webui.WebUIAdapter):
    name: ClassVar[str] = "forge"
    label: ClassVar[str] = "Forge"

    def host_services(self) -> HostServices:
        services = webui.common_services()
        services["exclusive"] = exclusive
        return HostServices(
            **services,
            build_parts=_parts,
            reload_embeddings=reload_embeddings,
            label=self.label,
            freeze_model=_freeze,
            preview=_preview,
            embedding_status=embedding_status,
            load_checkpoint=load_checkpoint,
            generate=generate,
            bundle_note=FORGE_BUNDLE_NOTE,
        )

    def on_app_started(self, app: Any) -> None:
        remember_api(app)

    temporary_embeddings = staticmethod(temporary_embeddings)
    model_loaded = staticmethod(model_loaded)

    def add_check_routes(self, app: Any, service: Any) -> None:
        forge_checks.add_check_routes(app, service, ensure_model)

    # no model_loaded_hook: Forge builds new engines (which read the folder) at every model load


class NeoAdapter(ForgeAdapter):
    """Haoming02's Forge Neo: Forge's backend and databases (``models/embeddings`` by default)."""

    name: ClassVar[str] = "neo"
    label: ClassVar[str] = "Forge Neo"

"""The Forge adapter's host-independent pieces (the rest runs in tests/host; its gradient remedies
are in tests/test_grad_safe.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lib_ti.host.forge_model import engine_settings


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        # SD1: last layer, final norm; CLIP skip 2 -> penultimate, still normed (Forge's engine does)
        (dict(embedding_key="clip_l", clip_skip=1, minimal_clip_skip=1, final_layer_norm=True, return_pooled=False),
         (0, True, False)),
        (dict(embedding_key="clip_l", clip_skip=2, minimal_clip_skip=1, final_layer_norm=True, return_pooled=False),
         (1, True, False)),
        # SDXL: penultimate at least, no final norm; pooled only from CLIP-G
        (dict(embedding_key="clip_l", clip_skip=1, minimal_clip_skip=2, final_layer_norm=False, return_pooled=False),
         (1, False, False)),
        (dict(embedding_key="clip_g", clip_skip=3, minimal_clip_skip=2, final_layer_norm=False, return_pooled=True),
         (2, False, True)),
    ],
)  # fmt: skip
def test_engine_settings(engine, expected):
    s = engine_settings(SimpleNamespace(id_pad=0, **engine))
    assert (s.skip, s.final_norm, s.pooled) == expected
    assert s.id_pad == 0


def test_remember_api_finds_the_hosts_api_object():
    fastapi = pytest.importorskip("fastapi")
    from lib_ti.host import forge

    class Api:
        embedding_db = object()

        def get_embeddings(self):
            return {}

    api = Api()
    app = fastapi.FastAPI()
    app.add_api_route("/sdapi/v1/embeddings", api.get_embeddings, methods=["GET"])
    forge._API.clear()
    forge.ForgeAdapter().on_app_started(app)
    assert forge._API["api"] is api


def test_forge_gpu_lock_marks_the_holding_thread(monkeypatch):
    """Forge's load under the lock must not take the (non re-entrant) lock again in the same thread."""
    import threading

    from lib_ti.host import forge, webui

    lock = threading.Lock()
    monkeypatch.setattr(webui, "exclusive", lambda: lock)
    exclusive = forge.ForgeAdapter().host_services().exclusive
    assert not getattr(forge.GPU_LOCK, "holding", False)
    with exclusive():
        assert lock.locked() and forge.GPU_LOCK.holding
        seen = []
        t = threading.Thread(target=lambda: seen.append(getattr(forge.GPU_LOCK, "holding", False)))
        t.start()
        t.join()
        assert seen == [False]  # thread-local: only the training thread holds it
    assert not lock.locked() and not forge.GPU_LOCK.holding

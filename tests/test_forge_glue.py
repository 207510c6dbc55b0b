"""The Forge adapter's host-independent pieces, on real torch modules (the rest runs in tests/host).

Forge builds its weights under ``torch.inference_mode``; these tests build real inference tensors
the same way and check that training can backpropagate after :func:`normal_weights` and that
generation-time values are untouched.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lib_ti.host.forge_model import engine_settings, normal_weights


def _inference_model() -> nn.Module:
    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        model.register_buffer("scale", torch.ones(4))
        model[0].weight.copy_(torch.randn(16, 8))
    return model


def test_inference_weights_block_backward_until_replaced():
    model = _inference_model()
    assert all(p.is_inference() for p in model.parameters())
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        model(x).sum().backward()
    with torch.inference_mode():
        reference = model(x.detach()).clone()
    count, restore = normal_weights([model])
    assert count == 7  # 6 parameters and 1 buffer
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    assert not any(p.requires_grad for p in model.parameters())
    out = model(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # only the input got a gradient
    assert torch.equal(out.detach(), reference)  # same values: generation is unchanged
    restore()
    assert all(p.requires_grad for p in model.parameters())


def test_shared_tensors_stay_shared():
    with torch.inference_mode():
        table = nn.Embedding(10, 4)
    wrapper = nn.Module()
    wrapper.wrapped = table
    wrapper.weight = table.weight  # Forge's CLIPEmbeddingForTextualInversion aliases the table like this
    count, _ = normal_weights([wrapper])
    assert count == 1
    assert wrapper.weight is table.weight and not table.weight.is_inference()


def test_restore_survives_weights_turned_back_into_inference_tensors():
    model = _inference_model()
    _, restore = normal_weights([model])
    with torch.inference_mode():  # what Forge's encode does to the CLIP tables between steps
        model[1].weight.data = model[1].weight.data.to(torch.float64).float()
    restore()  # does not raise


def test_normal_model_is_left_alone():
    model = nn.Linear(3, 3)
    before = model.weight
    count, restore = normal_weights([model])
    assert count == 0 and model.weight is before
    restore()
    assert model.weight.requires_grad


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

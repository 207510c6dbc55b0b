"""Self-checks against the host's own code paths, for the real-host tests.

Registered only when the environment variable ``LIB_TI_HOST_CHECKS=1`` is set (never in normal use).
The adapter passes in the service and how to reach the model and the embedding database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lib_ti.host import checks
from lib_ti.host.a1111_model import build_parts, frozen
from lib_ti.io.formats import read_embedding


def conditioning_parity(m: Any, db: Any, prompt: str, name: str | None) -> dict[str, Any]:
    """Our conditioning for ``prompt`` against the host model ``m``'s ``get_learned_conditioning``."""
    from modules import devices

    parts = build_parts(m)
    embeddings = {}
    if name:
        emb = db.word_embeddings[name]
        vec = emb.vec if isinstance(emb.vec, dict) else {parts.prompt_encoder.keys[0]: emb.vec}
        embeddings[name] = {k: v.detach().float() for k, v in vec.items() if k in parts.prompt_encoder.keys}
    with torch.no_grad(), devices.autocast():
        host = m.get_learned_conditioning([prompt])
        ours = parts.prompt_encoder.encode([prompt], embeddings)
    out: dict[str, Any] = {"kind": parts.kind}
    if isinstance(host, dict):
        h_cross, h_pooled = host["crossattn"], host["vector"][:, :1280]
    else:
        h_cross, h_pooled = host, None
    out["shape_host"] = list(h_cross.shape)
    out["shape_ours"] = list(ours.crossattn.shape)
    if h_cross.shape == ours.crossattn.shape:
        out["max_abs_diff"] = float((h_cross.float() - ours.crossattn.float().to(h_cross.device)).abs().max())
        out["scale"] = float(h_cross.float().abs().max())
    if h_pooled is not None and ours.pooled is not None:
        out["pooled_max_abs_diff"] = float(
            (h_pooled.float() - ours.pooled.float().to(h_pooled.device)).abs().max()
        )
    return out


def gradient_check(m: Any, vectors: dict[str, torch.Tensor], prompt: str, name: str) -> dict[str, Any]:
    """One backward pass from the host model ``m``'s UNet to ``vectors``; reports where gradients went."""
    parts = build_parts(m)
    changed = frozen(m)
    try:
        out = checks.one_backward(parts, prompt, name, vectors, 64)
        out["weights_with_grad"] = sum(1 for p in m.parameters() if p.grad is not None)
    finally:
        for p in changed:
            p.requires_grad_(True)
    out["params_requires_grad_before"] = len(changed)
    return out


def add_check_routes(app: Any, service: Any, model: Callable[[], Any], db: Callable[[], Any]) -> None:
    """The parity and gradient routes over the loaded ``model()`` and the embedding database ``db()``."""

    def parity(prompt: str, name: str | None) -> dict[str, Any]:
        return conditioning_parity(model(), db(), prompt, name)

    def gradient(prompt: str, name: str) -> dict[str, Any]:
        vectors = read_embedding(service.find_embedding_file(name)).vectors
        return gradient_check(model(), vectors, prompt, name)

    checks.add_routes(app, parity, gradient)

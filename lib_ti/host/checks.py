"""What the hosts' self-check routes share (only registered with LIB_TI_HOST_CHECKS=1)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from lib_ti.parts import ModelParts


def one_backward(
    parts: ModelParts, prompt: str, name: str, vectors: dict[str, torch.Tensor], latent: int
) -> dict[str, Any]:
    """Encode ``prompt`` with the embedding ``name``, run the UNet once, backpropagate a loss; report the
    gradient each vector got and the time it took."""
    vecs = {k: v.clone().requires_grad_() for k, v in vectors.items()}
    t0 = time.perf_counter()
    c = parts.prompt_encoder.encode([prompt], {name: vecs})
    cond = {"crossattn": c.crossattn}
    if parts.kind == "sdxl":
        assert c.pooled is not None  # SDXL encoders give a pooled vector
        cond["pooled"] = c.pooled
        cond["time_ids"] = torch.tensor([[512.0, 512, 0, 0, 512, 512]])
    out = parts.denoise(torch.randn(1, 4, latent, latent), torch.tensor([500]), cond)
    out.square().mean().backward()
    grads = {k: float(v.grad.abs().sum()) if v.grad is not None else None for k, v in vecs.items()}
    return {"vector_grad_abs_sum": grads, "seconds": time.perf_counter() - t0}


def add_routes(
    app: Any, parity: Callable[[str, str | None], Any], gradient: Callable[[str, str], Any]
) -> None:
    """POST /ti/v1/_checks/parity {prompt, embedding?} and /gradient {prompt, embedding}."""

    def parity_route(body: dict) -> Any:
        return parity(str(body["prompt"]), body.get("embedding"))

    def gradient_route(body: dict) -> Any:
        return gradient(str(body["prompt"]), str(body["embedding"]))

    app.add_api_route("/ti/v1/_checks/parity", parity_route, methods=["POST"])
    app.add_api_route("/ti/v1/_checks/gradient", gradient_route, methods=["POST"])

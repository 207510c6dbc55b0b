"""Self-checks against the host's own code paths, for the real-host tests.

Registered only when the environment variable ``LIB_TI_HOST_CHECKS=1`` is set (never in normal use).
The adapter passes in the service, how to reach the model and the embedding database, and (on the
ldm_patched forks) its own ``build_parts`` and ``freeze``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lib_ti.host import checks
from lib_ti.host.a1111_model import build_parts as a1111_parts
from lib_ti.host.a1111_model import freeze as freeze_all
from lib_ti.io.formats import read_embedding
from lib_ti.parts import ModelParts

PartsFn = Callable[[Any], ModelParts]
#: freeze(model) -> restore
FreezeFn = Callable[[Any], Callable[[], None]]


def conditioning_parity(
    m: Any, db: Any, prompt: str, name: str | None, parts_fn: PartsFn = a1111_parts
) -> dict[str, Any]:
    """Our conditioning for ``prompt`` against the host model ``m``'s ``get_learned_conditioning``."""
    from modules import devices

    parts = parts_fn(m)
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
    h_cross = h_cross.clone().float()
    out["shape_host"] = list(h_cross.shape)
    out["shape_ours"] = list(ours.crossattn.shape)
    if h_cross.shape == ours.crossattn.shape:
        out["max_abs_diff"] = float((h_cross - ours.crossattn.float().to(h_cross.device)).abs().max())
        out["scale"] = float(h_cross.abs().max())
    if h_pooled is not None and ours.pooled is not None:
        out["pooled_max_abs_diff"] = float(
            (h_pooled.clone().float() - ours.pooled.float().to(h_pooled.device)).abs().max()
        )
    return out


def host_conditioning(m: Any, prompts: list[str]) -> dict[str, Any]:
    """The host's own conditioning of ``prompts`` (:func:`checks.conditioning_answer`)."""
    from modules import devices

    with torch.no_grad(), devices.autocast():
        host = m.get_learned_conditioning(prompts)
    return checks.conditioning_answer(host, m)


def gradient_check(
    m: Any, vectors: dict[str, torch.Tensor], prompt: str, name: str, parts_fn: PartsFn = a1111_parts,
    freeze: FreezeFn = freeze_all,
) -> dict[str, Any]:  # fmt: skip
    """One backward pass from the host model ``m``'s UNet to ``vectors``; reports where gradients went."""
    restore = freeze(m)
    try:
        out = checks.one_backward(parts_fn(m), prompt, name, vectors, 16)
        out["weights_with_grad"] = sum(1 for p in m.parameters() if p.grad is not None)
    finally:
        restore()
    return out


def vae_parity(m: Any, parts_fn: PartsFn, size: int = 64) -> dict[str, Any]:
    """Our image encode (posterior mean and std) against the host's own img2img encode, which samples:
    the same seed makes the same noise, so ``mean + std * noise`` must equal the host's latent."""
    from modules import sd_samplers_common

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    torch.manual_seed(1)
    host = sd_samplers_common.images_tensor_to_samples(pixels * 0.5 + 0.5, None, m).float().cpu().clone()
    dist = parts_fn(m).encode_image(pixels)
    torch.manual_seed(1)
    noise = torch.randn(dist.mean.shape)
    assert dist.std is not None
    ours = dist.mean + dist.std * noise
    return {"max_abs_diff": float((ours - host).abs().max()), "scale": float(host.abs().max()),
            "shape": list(host.shape), "mean_only_diff": float((dist.mean - host).abs().max())}  # fmt: skip


def add_check_routes(
    app: Any, service: Any, model: Callable[[], Any], db: Callable[[], Any], parts_fn: PartsFn = a1111_parts,
    freeze: FreezeFn = freeze_all,
) -> None:  # fmt: skip
    """The parity, gradient and VAE routes over the loaded ``model()`` and the embedding database ``db()``."""

    def parity(prompt: str, name: str | None) -> dict[str, Any]:
        return conditioning_parity(model(), db(), prompt, name, parts_fn)

    def gradient(prompt: str, name: str) -> dict[str, Any]:
        vectors = read_embedding(service.find_embedding_file(name)).vectors
        return gradient_check(model(), vectors, prompt, name, parts_fn, freeze)

    def vae(body: dict) -> Any:
        return vae_parity(model(), parts_fn, int(body.get("size", 64)))

    def conditioning(body: dict) -> Any:
        return host_conditioning(model(), [str(p) for p in body.get("prompts", [])])

    checks.add_routes(app, parity, gradient)
    app.add_api_route("/ti/v1/_checks/vae", vae, methods=["POST"])
    app.add_api_route("/ti/v1/_checks/conditioning", conditioning, methods=["POST"])

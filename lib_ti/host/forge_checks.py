"""Self-checks against Forge's own code paths, for the real-host tests (only with LIB_TI_HOST_CHECKS=1).

The adapter passes in the service and ``ensure_model`` (Forge loads its model lazily).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lib_ti.host import checks, grad_safe
from lib_ti.host.forge_model import (
    build_parts,
    engines,
    load_for_training,
    training_modules,
    unet_patcher,
)
from lib_ti.host.grad_safe import normal_weights
from lib_ti.io.formats import read_embedding


def _vectors(m: Any, name: str | None, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    if not name:
        return {}
    for eng in engines(m):
        emb = eng.embeddings.word_embeddings.get(name)
        if emb is not None:
            vec = emb.vec if isinstance(emb.vec, dict) else {keys[0]: emb.vec}
            return {name: {k: v.detach().float().clone() for k, v in vec.items() if k in keys}}
    msg = f"{name!r} is not loaded by the engines"
    raise KeyError(msg)


def conditioning_parity(m: Any, prompt: str, name: str | None) -> dict[str, Any]:
    """Our conditioning against Forge's ``get_learned_conditioning`` on model ``m`` for the same prompt."""
    from modules.prompt_parser import SdConditioning

    parts = build_parts(m)
    prompts = SdConditioning([prompt], width=1024, height=1024)
    host = m.get_learned_conditioning(prompts)
    with torch.no_grad():
        ours = parts.prompt_encoder.encode([prompt], _vectors(m, name, parts.prompt_encoder.keys))
    if isinstance(host, dict):
        h_cross, h_pooled = host["crossattn"], host["vector"][:, :1280]
    else:
        h_cross, h_pooled = host, None
    h_cross = h_cross.clone().float()
    out: dict[str, Any] = {
        "kind": parts.kind,
        "shape_host": list(h_cross.shape),
        "shape_ours": list(ours.crossattn.shape),
    }
    if h_cross.shape == ours.crossattn.shape:
        out["max_abs_diff"] = float((h_cross - ours.crossattn.float().to(h_cross.device)).abs().max())
        out["scale"] = float(h_cross.abs().max())
    if h_pooled is not None and ours.pooled is not None:
        out["pooled_max_abs_diff"] = float(
            (h_pooled.clone().float() - ours.pooled.float().to(h_pooled.device)).abs().max()
        )
    return out


def unet_parity(m: Any, size: int = 8) -> dict[str, Any]:
    """Our gradient-safe UNet call against Forge's own forward on model ``m``, same weights and inputs."""
    return checks.unet_parity(
        build_parts(m), host_unet(m), lambda: grad_safe.trainable(training_modules(m)), size
    )


def host_unet(m: Any) -> Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """Forge's own UNet forward on model ``m`` (loaded for it), as its sampler calls it."""
    load_for_training(m)
    net = unet_patcher(m).model.diffusion_model

    def theirs(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        y = None
        if "pooled" in cond:
            sizes = cond["time_ids"][0].tolist()
            flat = torch.cat([m.embedder(torch.Tensor([v])) for v in sizes]).flatten()
            y = torch.cat([cond["pooled"], flat[None]], dim=1)
        return net(x, t.float(), context=cond["crossattn"], y=y, control=None, transformer_options={})

    return theirs


def gradient_check(m: Any, vectors: dict[str, torch.Tensor], prompt: str, name: str) -> dict[str, Any]:
    """One backward pass from Forge's UNet on model ``m`` to ``vectors``; reports where gradients went."""
    load_for_training(m)
    parts = build_parts(m)
    count, restore = normal_weights(training_modules(m))
    try:
        out = checks.one_backward(parts, prompt, name, vectors, 8)
        out["weights_with_grad"] = sum(
            1 for mod in training_modules(m) for p in mod.parameters() if p.grad is not None
        )
    finally:
        restore()
    out["replaced"] = count
    return out


def add_check_routes(app: Any, service: Any, ensure_model: Callable[[], Any]) -> None:
    """The parity, gradient and UNet routes over the model ``ensure_model()`` loads."""

    def parity(prompt: str, name: str | None) -> dict[str, Any]:
        return conditioning_parity(ensure_model(), prompt, name)

    def gradient(prompt: str, name: str) -> dict[str, Any]:
        vectors = read_embedding(service.find_embedding_file(name)).vectors
        return gradient_check(ensure_model(), vectors, prompt, name)

    def unet(body: dict) -> Any:
        return unet_parity(ensure_model(), int(body.get("size", 8)))

    def conditioning(body: dict) -> Any:
        from modules.prompt_parser import SdConditioning

        m = ensure_model()
        prompts = [str(p) for p in body.get("prompts", [])]
        with torch.no_grad():
            host = m.get_learned_conditioning(SdConditioning(prompts, width=1024, height=1024))
        answer = checks.conditioning_answer(host, m)
        if body.get("unet"):  # the UNet's output on checks.unet_inputs, for a headless load of the file
            x, t, cond = checks.unet_inputs(build_parts(m).kind)
            with torch.inference_mode():
                out = host_unet(m)(x, t, cond).float().cpu()
            answer["unet"] = out.flatten().tolist()
        return answer

    checks.add_routes(app, parity, gradient)
    app.add_api_route("/ti/v1/_checks/unet", unet, methods=["POST"])
    app.add_api_route("/ti/v1/_checks/conditioning", conditioning, methods=["POST"])

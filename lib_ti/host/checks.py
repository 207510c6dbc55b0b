"""What the hosts' self-check routes share (only registered with LIB_TI_HOST_CHECKS=1)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import torch

from lib_ti.host import webui
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


def unet_inputs(kind: str, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Seeded UNet inputs (latent, timestep, conditioning) of a model kind, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size, size, generator=gen)
    t = torch.tensor([500])
    width = {"sdxl": 2048, "sd2": 1024}.get(kind, 768)
    cond = {"crossattn": torch.randn(1, 77, width, generator=gen)}
    if kind == "sdxl":
        cond["pooled"] = torch.randn(1, 1280, generator=gen)
        cond["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    return x, t, cond


def unet_parity(
    parts: ModelParts,
    theirs: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    freeze: Callable[[], Callable[[], None]],
    size: int = 8,
) -> dict[str, Any]:
    """Our gradient-safe UNet call (``parts.denoise``) against the host's own forward (``theirs``, run
    under inference mode as its sampler runs it), same weights and inputs; then a gradient to the context."""
    x, t, cond = unet_inputs(parts.kind, size)
    with torch.inference_mode():
        host = theirs(x, t, cond)
    host = host.clone().float()  # outside inference mode: a normal tensor
    restore = freeze()
    try:
        ours = parts.denoise(x, t, cond)
        c = cond["crossattn"].clone().requires_grad_()
        parts.denoise(x, t, dict(cond, crossattn=c)).square().mean().backward()
        assert c.grad is not None
        grad = float(c.grad.abs().sum())
    finally:
        restore()
    return {"kind": parts.kind, "max_abs_diff": float((ours.detach().float() - host).abs().max()),
            "scale": float(host.abs().max()), "context_grad_abs_sum": grad}  # fmt: skip


def live_tensors() -> dict[str, Any]:
    """The bytes and count of the CPU tensor storages Python still reaches (each storage once): after a
    model switch, what the old model left reachable."""
    import gc

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except RuntimeError:  # sparse, meta or other storages without a data pointer
                continue
            seen[storage.data_ptr()] = storage.nbytes()
    return {"bytes": sum(seen.values()), "storages": len(seen)}


def batch_txt2img(body: dict) -> dict[str, Any]:
    """One batch of ``prompts`` (one image each) through the host's own txt2img, as the UI runs it:
    the SHA-256 of each image's pixels and its infotext."""
    from modules import call_queue, processing, shared

    prompts = [str(x) for x in body["prompts"]]
    negatives = [str(x) for x in body.get("negative_prompts") or [""] * len(prompts)]
    size = int(body.get("size", 64))
    with call_queue.queue_lock:
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompts, negative_prompt=negatives, batch_size=len(prompts),
            steps=int(body.get("steps", 2)), width=size, height=size, seed=int(body.get("seed", 7)),
            cfg_scale=7, sampler_name="Euler", do_not_save_samples=True, do_not_save_grid=True,
        )  # fmt: skip
        webui.without_scripts(p)
        res = processing.process_images(p)
    return {
        "pixels": [hashlib.sha256(img.convert("RGB").tobytes()).hexdigest() for img in res.images],
        "infotexts": list(res.infotexts),
    }


def conditioning_answer(host: Any, m: Any) -> dict[str, Any]:
    """A host's conditioning (a tensor, or SDXL's dict with ``vector``) as base64 safetensors, with the
    loaded checkpoint's file: what headless training must reproduce on that file."""
    import base64

    from safetensors.torch import save

    if isinstance(host, dict):
        tensors = {"crossattn": host["crossattn"], "pooled": host["vector"][:, :1280]}
    else:
        tensors = {"crossattn": host}
    data = save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()})
    info = getattr(m, "sd_checkpoint_info", None)
    return {"file": getattr(info, "filename", ""), "tensors": base64.b64encode(data).decode("ascii")}


def add_routes(
    app: Any, parity: Callable[[str, str | None], Any], gradient: Callable[[str, str], Any]
) -> None:
    """POST /ti/v1/_checks/parity {prompt, embedding?}, /gradient {prompt, embedding} and
    /batch {prompts, negative_prompts?, seed?, steps?, size?}."""

    def parity_route(body: dict) -> Any:
        return parity(str(body["prompt"]), body.get("embedding"))

    def gradient_route(body: dict) -> Any:
        return gradient(str(body["prompt"]), str(body["embedding"]))

    app.add_api_route("/ti/v1/_checks/parity", parity_route, methods=["POST"])
    app.add_api_route("/ti/v1/_checks/gradient", gradient_route, methods=["POST"])
    app.add_api_route("/ti/v1/_checks/batch", batch_txt2img, methods=["POST"])
    app.add_api_route("/ti/v1/_checks/live_tensors", live_tensors, methods=["GET"])

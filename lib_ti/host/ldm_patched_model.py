"""ModelParts on the ldm_patched hosts (reForge, Forge Classic): A1111's model object, Forge 1's backend.

The text encoders, schedule and names come from :mod:`lib_ti.host.a1111_model` (the hosts keep A1111's
conditioning code). What differs, and how it is handled here:

- the UNet that samples is ``forge_objects.unet.model.diffusion_model`` (an ldm_patched UNetModel); on
  Classic ``apply_model`` returns None and the UNet's ``forward`` runs under ``torch.inference_mode``,
  and its transformer blocks add residuals in place. It is called directly through
  :func:`lib_ti.host.grad_safe.unet_call` (eps or v output), SDXL's ``y`` from the host's conditioner;
- weights loaded or patched under inference mode are made normal tensors (:func:`grad_safe.normal_weights`);
- the VAE is ldm_patched's: its ``encode_first_stage`` samples and scales in one step, so the posterior
  mean and std are computed from its encoder here and scaled with the model's latent format, as the
  host's own encode scales its sample.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lib_ti.host import a1111_model, grad_safe
from lib_ti.parts import LatentDist, ModelParts

logger = logging.getLogger(__name__)


def unet_patcher(m: Any) -> Any:
    """The UNet's ModelPatcher without LoRA patches (``forge_objects_original``) when the model has it."""
    objs = getattr(m, "forge_objects_original", None) or m.forge_objects
    return objs.unet


def _net(m: Any) -> nn.Module:
    return unet_patcher(m).model.diffusion_model


def block_class() -> type:
    from ldm_patched.ldm.modules import attention

    return attention.BasicTransformerBlock


def training_modules(m: Any) -> list[nn.Module]:
    """The modules a training step runs: the UNet, the text encoders, and A1111's conditioning wrappers
    around them (``cond_stage_model``; SDXL's conditioner), which hold aliases of the encoders' tensors
    (the loader sets ``embedder.text_projection`` to CLIP-G's): one replacement for each tensor, wherever
    it is held."""
    mods: list[nn.Module] = [_net(m), m.forge_objects.clip.cond_stage_model]
    mods += [
        w
        for w in (getattr(m, "cond_stage_model", None), getattr(m, "conditioner", None))
        if isinstance(w, nn.Module)
    ]
    return mods


def load_for_training(m: Any) -> None:
    """Load the unpatched UNet and the text encoders the way the host's sampler loads them."""
    from ldm_patched.modules import model_management

    model_management.load_models_gpu([unet_patcher(m), m.forge_objects.clip.patcher])


def unet_dtype(m: Any) -> torch.dtype:
    """The dtype the host's UNet computes in (its manual cast dtype, else its weights')."""
    k_model = unet_patcher(m).model
    cast = getattr(k_model, "manual_cast_dtype", None)
    return cast if cast is not None else next(_net(m).parameters()).dtype


def _denoise(
    m: Any, kind: str
) -> Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    call = grad_safe.unet_call(_net(m), block_class(), unet_dtype(m))
    vector = a1111_model.sdxl_vector(m) if kind == "sdxl" else None

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return call(x, t, cond["crossattn"], None if vector is None else vector(cond))

    return denoise


def host_unet(m: Any) -> Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    """The host's own UNet forward, unchanged (for the self-checks: what ours must equal)."""
    net = _net(m)
    dtype = unet_dtype(m)
    vector = a1111_model.sdxl_vector(m) if a1111_model.model_kind(m) == "sdxl" else None

    def forward(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        y = None if vector is None else vector(cond).to(dtype)
        return net(
            x.to(dtype),
            t.float(),
            context=cond["crossattn"].to(dtype),
            y=y,
            control=None,
            transformer_options={},
        )

    return forward


def latent_format(m: Any) -> Any:
    return unet_patcher(m).model.model_config.latent_format


def _encode_image(m: Any) -> Callable[[torch.Tensor], LatentDist]:
    vae = m.forge_objects.vae
    fsm = vae.first_stage_model
    fmt = latent_format(m)

    def encode(pixels: torch.Tensor) -> LatentDist:
        from ldm_patched.modules import model_management

        model_management.load_models_gpu([vae.patcher])
        mean, std = grad_safe.vae_posterior(fsm, pixels, vae.device, vae.vae_dtype)
        with torch.inference_mode(False):
            mean = fmt.process_in(mean).float().cpu().clone()
        return LatentDist(mean, (std * float(fmt.scale_factor)).cpu())

    return encode


def build_parts(m: Any) -> ModelParts:
    """ModelParts over the host's loaded model ``m``: A1111's encoders and schedule, the ldm_patched UNet
    and VAE."""
    parts = a1111_model.build_parts(m)
    net = _net(m)
    return dataclasses.replace(
        parts,
        denoise=_denoise(m, parts.kind),
        encode_image=_encode_image(m),
        device=next(net.parameters()).device,
        dtype=unet_dtype(m),
    )

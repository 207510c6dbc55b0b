"""ModelParts from Forge's loaded model (Forge2 backend: ``shared.sd_model`` is a ForgeDiffusionEngine).

What differs from A1111, and how it is handled here:
- the text encoders are transformers ``CLIPTextModel`` inside the text-processing engines (CLIP-G too);
  our HFClipEncoder runs over them with the engines' own settings (clip skip, final norm, pooled);
- Forge builds and loads its weights under ``torch.inference_mode`` and its transformer blocks add
  residuals in place: :mod:`lib_ti.host.grad_safe` has the remedies (shared with the ldm_patched
  hosts), applied around our own UNet calls only;
- the UNet is called directly (eps or v output), with SDXL's ``y`` built from pooled + size embeddings;
- the VAE's posterior mean and std are computed from its encoder, the latents scaled as Forge does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lib_ti.errors import TIError
from lib_ti.host import grad_safe
from lib_ti.parts import LatentDist, ModelParts
from lib_ti.text.encoders import (
    EncoderSettings,
    HFClipEncoder,
    PromptEncoder,
    PromptSettings,
    hf_tokenizer_info,
)

logger = logging.getLogger(__name__)

ENGINE_ATTRS = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


def engines(m: Any) -> list[Any]:
    """The model's text-processing engines (each holds an encoder, a tokenizer and an embedding database)."""
    found = [getattr(m, a, None) for a in ENGINE_ATTRS]
    return [e for e in found if e is not None and hasattr(e, "embeddings")]


def is_forge_model(m: Any) -> bool:
    return hasattr(m, "forge_objects") and bool(engines(m))


def model_kind(m: Any) -> str:
    keys = [getattr(e, "embedding_key", "") for e in engines(m)]
    if getattr(m, "is_sdxl", False) or keys == ["clip_l", "clip_g"]:
        if keys != ["clip_l", "clip_g"]:
            msg = (
                "this SDXL model has no CLIP-L + CLIP-G text encoders (refiner models cannot be trained yet)"
            )
            raise TIError(msg)
        return "sdxl"
    if keys == ["clip_h"] or getattr(m, "is_sd2", False):
        return "sd2"
    if keys == ["clip_l"]:
        return "sd1"
    msg = f"unsupported model for textual inversion on Forge (text encoders {keys or 'none'})"
    raise TIError(msg)


def prompt_settings() -> PromptSettings:
    from modules import shared

    emphasis = str(getattr(shared.opts, "emphasis", "Original"))
    if emphasis not in ("Original", "No norm", "Ignore", "None"):
        emphasis = "Original"
    return PromptSettings(20, emphasis)  # type: ignore[arg-type]  # Forge's engine fixes the backtrack at 20


def engine_settings(engine: Any) -> EncoderSettings:
    """The hidden state a Forge engine conditions on, as our encoder settings."""
    layer = max(int(getattr(engine, "clip_skip", 1) or 1), int(getattr(engine, "minimal_clip_skip", 1) or 1))
    key = engine.embedding_key
    pooled = bool(getattr(engine, "return_pooled", False)) and key != "clip_l"
    return EncoderSettings(
        skip=layer - 1,  # hidden_states[-layer]: that many final blocks not run, minus the last state itself
        final_norm=bool(getattr(engine, "final_layer_norm", True)),
        pooled=pooled,
        id_pad=engine.id_pad,
    )


def text_encoder(engine: Any) -> HFClipEncoder:
    """Our encoder over an engine's CLIPTextModel, computing in fp32 as the engine does (it casts its
    fp16 token and position tables to fp32 before every encode; we cast the looked-up rows instead and
    leave Forge's modules as they are)."""
    transformer = engine.text_encoder.transformer
    settings = engine_settings(engine)
    projection = None
    if settings.pooled and getattr(engine, "text_projection", False):
        projection = getattr(transformer, "text_projection", None)
    enc = HFClipEncoder(
        engine.embedding_key, transformer, hf_tokenizer_info(engine.tokenizer), settings, projection
    )
    enc.compute_dtype = torch.float32
    return enc


# ---------------------------------------------------------------------------- gradients through Forge's weights


def _block_class() -> type:
    from backend.nn import unet as forge_unet

    return forge_unet.BasicTransformerBlock


def check_unet(net: nn.Module) -> None:
    """Fail before the first step on UNet features our forward does not support."""
    if any(getattr(mod, "use_scale_shift_norm", False) for mod in net.modules()):
        msg = "this UNet uses scale-shift norms, which Forge adds in place; training it is not supported"
        raise TIError(msg)


# ---------------------------------------------------------------------------- the parts


def unet_patcher(m: Any) -> Any:
    """The UNet without LoRA patches (``forge_objects_original``) when the model has it."""
    objs = getattr(m, "forge_objects_original", None) or m.forge_objects
    return objs.unet


def load_for_training(m: Any) -> None:
    from backend import memory_management

    memory_management.load_models_gpu([unet_patcher(m), m.forge_objects.clip.patcher])


def _denoise(
    m: Any, kind: str
) -> Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]:
    k_model = unet_patcher(m).model
    net = k_model.diffusion_model
    dtype = getattr(k_model, "computation_dtype", None) or next(net.parameters()).dtype
    call = grad_safe.unet_call(net, _block_class(), dtype)
    embedder: Any = getattr(m, "embedder", None)

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        y = None
        if kind == "sdxl":
            ids = cond["time_ids"].float().cpu()
            with torch.no_grad():
                flat = torch.stack([embedder(ids[:, i]) for i in range(6)], dim=1).flatten(1)
            y = torch.cat([cond["pooled"], flat.to(cond["pooled"])], dim=1)
        return call(x, t, cond["crossattn"], y)

    return denoise


def _encode_image(m: Any) -> Callable[[torch.Tensor], LatentDist]:
    vae = m.forge_objects.vae
    fsm = vae.first_stage_model

    def encode(pixels: torch.Tensor) -> LatentDist:
        from backend import memory_management

        memory_management.load_models_gpu([vae.patcher])
        mean, std = grad_safe.vae_posterior(fsm, pixels, vae.device, vae.vae_dtype)
        shift, scale = float(getattr(fsm, "shift_factor", 0.0) or 0.0), float(fsm.scaling_factor)
        return LatentDist(((mean - shift) * scale).cpu(), (std * scale).cpu())

    return encode


def _schedule(m: Any) -> tuple[torch.Tensor, str]:
    predictor = unet_patcher(m).model.predictor
    kind = getattr(predictor, "prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        msg = f"Forge reports prediction type {kind!r}; only eps and v models can be trained"
        raise TIError(msg)
    acp = getattr(predictor, "alphas_cumprod", None)
    if acp is None:
        sigmas = predictor.sigmas.detach().float().cpu()
        acp = 1.0 / (1.0 + sigmas**2)
    return acp.detach().float().cpu().clone(), ("v" if kind == "v_prediction" else "eps")


def build_parts(m: Any, still_loaded: Callable[[], bool] = lambda: True) -> ModelParts:
    """ModelParts over Forge's loaded model ``m`` (text encoders, UNet and VAE stay Forge's own)."""
    kind = model_kind(m)
    encoders = [text_encoder(e) for e in engines(m)]
    check_unet(unet_patcher(m).model.diffusion_model)
    acp, prediction = _schedule(m)
    info = getattr(m, "sd_checkpoint_info", None)
    net = unet_patcher(m).model.diffusion_model
    return ModelParts(
        kind=kind,  # type: ignore[arg-type]
        prompt_encoder=PromptEncoder(encoders, prompt_settings()),
        denoise=_denoise(m, kind),
        encode_image=_encode_image(m),
        alphas_cumprod=acp,
        prediction=prediction,  # type: ignore[arg-type]
        model_hash=str(getattr(m, "sd_model_hash", "") or ""),
        model_name=str(getattr(info, "model_name", "") or ""),
        device=next(net.parameters()).device,
        dtype=next(net.parameters()).dtype,
        still_loaded=still_loaded,
    )


def training_modules(m: Any) -> list[nn.Module]:
    """The modules a training step runs: the UNet and the text encoders."""
    mods: list[nn.Module] = [unet_patcher(m).model.diffusion_model]
    mods += [e.text_encoder.transformer for e in engines(m)]
    return mods

"""Tiny real diffusion models for trainer tests: diffusers UNet2DConditionModel (SDXL with text-time
conditioning), the tiny real-width text encoders, and an 8x average-pool image encoder."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lib_ti.parts import LatentDist, ModelParts
from lib_ti.text.encoders import (
    EncoderSettings,
    HFClipEncoder,
    OpenClipEncoder,
    PromptEncoder,
    hf_tokenizer_info,
    open_clip_tokenizer_info,
)

from . import models

TIME_EMBED = 8  # SDXL uses 256 per number; 6 numbers + pooled 1280 -> projection input


@functools.lru_cache(maxsize=4)
def tiny_unet(kind: str, seed: int = 0, cross_gain: float = 8.0) -> nn.Module:
    """A small UNet whose output depends strongly on its conditioning (cross-attention outputs scaled)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=768 if kind == "sd1" else 2048,
    )
    if kind == "sdxl":
        kw.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=1280 + 6 * TIME_EMBED,
        )
    unet = UNet2DConditionModel(**kw).eval()
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(cross_gain)
    return unet.requires_grad_(False)


def encode_image(pixels: torch.Tensor) -> LatentDist:
    """A fixed 8x image encoder: average-pooled RGB plus their mean, 4 channels, with a small posterior std."""
    pooled = F.avg_pool2d(pixels.float(), 8)
    mean = torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)
    return LatentDist(mean, torch.full_like(mean, 0.05))


def alphas_cumprod(n: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


def prompt_encoder(kind: str) -> PromptEncoder:
    l_tok = hf_tokenizer_info(models.hf_tokenizer())
    if kind == "sd1":
        return PromptEncoder([HFClipEncoder("clip_l", models.clip_l(), l_tok, EncoderSettings())])
    g_tok = open_clip_tokenizer_info(models.open_clip_tokenizer())
    return PromptEncoder(
        [
            HFClipEncoder("clip_l", models.clip_l(), l_tok, EncoderSettings(skip=1, final_norm=False)),
            OpenClipEncoder(
                "clip_g",
                models.open_clip_tower("ti-tiny-bigG"),
                g_tok,
                EncoderSettings(skip=1, final_norm=False, pooled=True, id_pad=0),
            ),
        ]
    )


def make_parts(kind: str = "sd1", prediction: str = "eps", unet: nn.Module | None = None) -> ModelParts:
    net = unet or tiny_unet(kind)

    if kind == "sdxl":

        def denoise(x, t, cond):
            extra = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
            return net(x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs=extra).sample

    else:

        def denoise(x, t, cond):
            return net(x, t, encoder_hidden_states=cond["crossattn"]).sample

    return ModelParts(
        kind=kind,  # type: ignore[arg-type]
        prompt_encoder=prompt_encoder(kind),
        denoise=denoise,
        encode_image=encode_image,
        alphas_cumprod=alphas_cumprod(),
        prediction=prediction,  # type: ignore[arg-type]
        model_hash="tiny" + kind,
        model_name=f"tiny-{kind}",
    )

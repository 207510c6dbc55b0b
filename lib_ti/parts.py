"""The model as the trainer sees it, built by a host adapter from the loaded checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from lib_ti.text.encoders import PromptEncoder

Prediction = Literal["eps", "v"]
ModelKind = Literal["sd1", "sd2", "sdxl"]


@dataclass
class LatentDist:
    """Latents of images, already multiplied by the VAE's scale factor.

    ``std`` is the VAE posterior's standard deviation (for "random" latent sampling), or None when the
    image encoder gives a single latent.
    """

    mean: torch.Tensor
    std: torch.Tensor | None = None


#: (x_t [B, C, h, w], t [B] long, cond) -> model output [B, C, h, w]; cond holds "crossattn"
#: [B, T, D] and for SDXL "pooled" [B, 1280] and "time_ids" [B, 6] (original h, w, crop top, left,
#: target h, w). The host adapter turns pooled + time_ids into what its UNet takes.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
#: pixels [B, 3, H, W] in [-1, 1] -> scaled latents
EncodeImageFn = Callable[[torch.Tensor], LatentDist]


@dataclass
class ModelParts:
    kind: ModelKind
    prompt_encoder: PromptEncoder
    denoise: DenoiseFn
    encode_image: EncodeImageFn
    alphas_cumprod: torch.Tensor
    prediction: Prediction = "eps"
    latent_channels: int = 4
    #: pixels per latent along each side
    vae_scale: int = 8
    model_hash: str = ""
    model_name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: dtype of the frozen modules (the vectors stay float32)
    dtype: torch.dtype = torch.float32
    #: turn gradient checkpointing of the host's UNet on or off (None: not available)
    set_gradient_checkpointing: Callable[[bool], None] | None = None
    #: the host still has the same model loaded (checked every step; False stops the run after saving)
    still_loaded: Callable[[], bool] = lambda: True

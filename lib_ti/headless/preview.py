"""Preview images of a headless run: a diffusers pipeline over the same modules, with the prompt encoded by
our encoder (the embedding's current vectors spliced in), Euler, a fixed seed, saved as a PNG that carries
the embedding (as the tab's previews do)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib_ti.embedding import Embedding
from lib_ti.headless.models import Model
from lib_ti.io.atomic import atomic_write_bytes
from lib_ti.io.formats import to_png
from lib_ti.parts import ModelParts

logger = logging.getLogger(__name__)

PreviewFn = Callable[[Embedding, str, int, Path], "str | None"]


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat the last 77 rows of a conditioning until it has ``length`` tokens (A1111's padding of the
    shorter of prompt and negative prompt)."""
    while t.shape[1] < length:
        t = torch.cat([t, t[:, -77:]], dim=1)
    return t


def _scheduler(model: Model) -> object:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=len(model.alphas_cumprod),
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if model.prediction == "v" else "epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def make_preview(
    model: Model, parts: ModelParts, *, steps: int, cfg: float, size: int, seed: int, negative: str = ""
) -> PreviewFn:
    """A preview function for the service: (embedding, prompt, step, folder) -> the PNG's path."""

    @torch.no_grad()
    def preview(emb: Embedding, prompt: str, step: int, out_dir: Path) -> str | None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        dev, dtype = model.device, model.dtype
        vectors = {emb.name: {k: v.to(dev) for k, v in emb.vectors.items()}}
        cond = parts.prompt_encoder.encode([prompt], vectors)
        uncond = parts.prompt_encoder.encode([negative])
        length = max(cond.crossattn.shape[1], uncond.crossattn.shape[1])
        c, u = _pad_to(cond.crossattn, length).to(dtype), _pad_to(uncond.crossattn, length).to(dtype)
        texts = dict(model.text_models)
        vae = model.vae
        vae_device = next(vae.parameters()).device
        vae.to(dev)
        try:
            common = {
                "height": size,
                "width": size,
                "num_inference_steps": steps,
                "guidance_scale": cfg,
                "generator": torch.Generator(device="cpu").manual_seed(seed),
                "output_type": "latent",
            }
            pipe: Any
            if model.kind == "sdxl":
                if cond.pooled is None or uncond.pooled is None:
                    return None
                pipe = StableDiffusionXLPipeline(
                    vae=vae,
                    text_encoder=texts["clip_l"],
                    text_encoder_2=texts["clip_g"],
                    tokenizer=model.tokenizers[0],
                    tokenizer_2=model.tokenizers[0],
                    unet=model.unet,
                    scheduler=_scheduler(model),
                )
                pipe.set_progress_bar_config(disable=True)
                latents = pipe(
                    prompt_embeds=c,
                    negative_prompt_embeds=u,
                    pooled_prompt_embeds=cond.pooled.to(dtype),
                    negative_pooled_prompt_embeds=uncond.pooled.to(dtype),
                    **common,
                ).images
            else:
                pipe = StableDiffusionPipeline(
                    vae=vae,
                    text_encoder=next(iter(texts.values())),
                    tokenizer=model.tokenizers[0],
                    unet=model.unet,
                    scheduler=_scheduler(model),
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
                pipe.set_progress_bar_config(disable=True)
                latents = pipe(prompt_embeds=c, negative_prompt_embeds=u, **common).images
            p = next(vae.parameters())
            pixels = vae.decode(latents.to(p.dtype) / model.scaling_factor).sample
        finally:
            vae.to(vae_device)
        array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        image = Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
        png, info = to_png(emb, image)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{emb.name}-{step}.png"
        buf = io.BytesIO()
        png.save(buf, format="PNG", pnginfo=info)
        atomic_write_bytes(path, buf.getvalue())
        return str(path)

    return preview

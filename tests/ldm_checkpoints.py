"""Tiny single-file checkpoints in the web UI's (LDM/sgm) key layout, written from tiny real modules.

The UNet and VAE are tiny diffusers modules whose keys are mapped to the LDM names the web UI loads
(the inverse of diffusers' own conversion); the text encoders are the tests' tiny CLIP-L
(transformers, as A1111's SD1 and SDXL CLIP-L) and OpenCLIP towers (open_clip, as A1111's SD2 and SDXL
CLIP-G) under the web UI's prefixes. ``build(kind, folder)`` returns the file and the source modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import models

SD1_YAML = """\
model:
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      params:
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [1, 2]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_heads: 4
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 768
    first_stage_config:
      params:
        ddconfig: {double_z: true, z_channels: 4, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 1, 1, 1],
                   num_res_blocks: 1, attn_resolutions: []}
"""


def tiny_unet(kind: str, seed: int = 0) -> nn.Module:
    """SD1: 4 heads (the yaml says so); SDXL: 64-wide heads (read from the shapes), text-time 256."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if kind == "sd1":
        kw: dict[str, Any] = dict(
            block_out_channels=(32, 64), attention_head_dim=4, cross_attention_dim=768, norm_num_groups=32
        )
    elif kind == "sd2":
        kw = dict(
            block_out_channels=(32, 64), attention_head_dim=4, cross_attention_dim=1024, norm_num_groups=32
        )
    else:
        kw = dict(
            block_out_channels=(64, 128),
            attention_head_dim=(1, 2),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=1280 + 6 * 256,
            norm_num_groups=32,
        )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        **kw,
    )
    with torch.no_grad():  # random, not zero, output layers: gradients must reach the vectors
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return unet.eval().requires_grad_(False)


def tiny_vae(seed: int = 0) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )
    return vae.eval().requires_grad_(False)


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` (LDM openaimodel.UNetModel)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    out = {}
    for key, value in state.items():
        new = None
        for a, b in fixed.items():
            if key.startswith(a + "."):
                new = b + key[len(a) :]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, what, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = i * (layers + 1) + j + 1
            new = (
                f"input_blocks.{block}.0.{_resnet(rest)}"
                if what == "resnets"
                else f"input_blocks.{block}.1.{rest}"
            )
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, what, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = i * (layers + 1) + j
            new = (
                f"output_blocks.{block}.0.{_resnet(rest)}"
                if what == "resnets"
                else f"output_blocks.{block}.1.{rest}"
            )
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            block = int(m[1]) * (layers + 1) + layers
            has_attn = any(k.startswith(f"up_blocks.{m[1]}.attentions.") for k in state)
            new = f"output_blocks.{block}.{2 if has_attn else 1}.conv.{m[2]}"
        if new is None:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` (LDM AutoencoderKL)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(\w+)", key):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


@dataclass
class TinyCheckpoint:
    path: Path
    kind: str
    unet: nn.Module
    vae: nn.Module
    #: {"clip_l": transformers CLIPTextModel, "clip_g"/"clip_h": open_clip tower}
    text: dict[str, nn.Module]


def build(kind: str, folder: Path, *, yaml: bool | None = None, name: str = "") -> TinyCheckpoint:
    """A tiny ``sd1``, ``sd2`` or ``sdxl`` checkpoint file in ``folder`` (SD1 with its yaml beside it)."""
    unet, vae = tiny_unet(kind), tiny_vae()
    state = {**unet_to_ldm(unet.state_dict(), 1), **vae_to_ldm(vae.state_dict(), 4)}
    text: dict[str, nn.Module] = {}
    if kind in ("sd1", "sdxl"):
        text["clip_l"] = models.clip_l()
        prefix = "cond_stage_model.transformer." if kind == "sd1" else "conditioner.embedders.0.transformer."
        state.update({prefix + k: v for k, v in text["clip_l"].state_dict().items()})
    if kind in ("sd2", "sdxl"):
        key, arch = ("clip_g", "ti-tiny-bigG") if kind == "sdxl" else ("clip_h", "ti-tiny-H")
        text[key] = models.open_clip_tower(arch)
        prefix = "conditioner.embedders.1.model." if kind == "sdxl" else "cond_stage_model.model."
        state.update({prefix + k: v for k, v in text[key].state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name or 'tiny-' + kind}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    if yaml if yaml is not None else kind != "sdxl":
        path.with_suffix(".yaml").write_text(SD1_YAML.replace("context_dim: 768", "context_dim: 1024")
                                             if kind == "sd2" else SD1_YAML, encoding="utf-8")  # fmt: skip
    return TinyCheckpoint(path, kind, unet, vae, text)

"""Full-shape random-weight models for benches (nothing downloaded): SD1.5 and SDXL UNets from their
real diffusers configurations, CLIP-L (12 layers) and CLIP-G (32 layers) at real width and depth."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def torchvision_ops() -> None:
    from tests.conftest import define_torchvision_ops

    define_torchvision_ops()


SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def unet(kind: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**(SD15_UNET if kind == "sd15" else SDXL_UNET)).eval().requires_grad_(False)


def clip_tokenizer():
    from tests.models import hf_tokenizer

    return hf_tokenizer()


def clip_l() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def clip_g() -> torch.nn.Module:
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS["ti-bench-bigG"] = {
        "embed_dim": 1280,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32},
    }
    torch.manual_seed(2)
    m = open_clip.create_model("ti-bench-bigG", pretrained=None)
    del m.visual
    return m.eval().requires_grad_(False)


def encode_image(pixels: torch.Tensor):
    from lib_ti.parts import LatentDist

    pooled = F.avg_pool2d(pixels.float(), 8)
    return LatentDist(torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1))


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()

"""Tiny real text encoders with random weights, built without any download.

Real vocabulary (49,408 tokens, the CLIP BPE file that ships inside open_clip), real widths
(768 CLIP-L, 1024 OpenCLIP-H, 1280 CLIP-G), 3 layers (with fewer, "penultimate" tests pass trivially).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
from torch import nn

from .conftest import define_torchvision_ops

LAYERS = 3
OPEN_CLIP_CONFIGS = {
    "ti-tiny-H": {"embed_dim": 1024, "width": 1024, "heads": 16},
    "ti-tiny-bigG": {"embed_dim": 1280, "width": 1280, "heads": 20},
}


def open_clip_module():
    define_torchvision_ops()
    import open_clip

    return open_clip


def _randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    # Untrained norms (weight 1, bias 0) can make a final-norm output's mean exactly 0, and A1111's
    # "Original" emphasis then divides 0 by 0; real checkpoints never have that.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1.0 + 0.02 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=gen))


@functools.lru_cache(maxsize=1)
def tokenizer_dir() -> Path:
    """vocab.json + merges.txt for transformers' slow CLIPTokenizer, from open_clip's bundled BPE file."""
    import tempfile

    from lib_ti.headless.models import write_clip_vocabulary

    open_clip_module()
    out = Path(tempfile.mkdtemp(prefix="ti-clip-tok-"))
    vocab_file, _ = write_clip_vocabulary(out)
    assert len(json.loads(vocab_file.read_text(encoding="utf-8"))) == 49408
    return out


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    from lib_ti.headless.models import clip_tokenizer

    return clip_tokenizer(tokenizer_dir())


def open_clip_tokenizer():
    open_clip_module()
    from open_clip.tokenizer import _tokenizer

    return _tokenizer


@functools.lru_cache(maxsize=2)
def clip_l(seed: int = 0) -> nn.Module:
    """transformers CLIPTextModel: CLIP-L widths (768, 12 heads), 3 layers, real vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=LAYERS,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = CLIPTextModel(cfg).eval()
    _randomize_norms(model, torch.Generator().manual_seed(seed))
    return model.requires_grad_(False)


def _register_open_clip(name: str) -> None:
    oc = open_clip_module()
    from open_clip import factory

    c = OPEN_CLIP_CONFIGS[name]
    factory._MODEL_CONFIGS[name] = {
        "embed_dim": c["embed_dim"],
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": c["width"],
            "heads": c["heads"],
            "layers": LAYERS,
        },
    }
    del oc


@functools.lru_cache(maxsize=4)
def open_clip_tower(name: str = "ti-tiny-bigG", seed: int = 0) -> nn.Module:
    """An open_clip CLIP model (text tower; tiny vision tower removed), pretrained=None."""
    oc = open_clip_module()
    _register_open_clip(name)
    torch.manual_seed(seed)
    model = oc.create_model(name, pretrained=None, device="cpu")
    del model.visual
    model.eval()
    with torch.no_grad():
        model.text_projection.normal_(0, model.text_projection.shape[0] ** -0.5)
    _randomize_norms(model, torch.Generator().manual_seed(seed))
    return model.requires_grad_(False)


class HostLikeEmbeddingWrapper(nn.Module):
    """Wraps ``token_embedding`` the way A1111's ``EmbeddingsWithFixes`` does (``.wrapped``).

    Calling it counts a call: our encoder must never go through the host's splice.
    """

    def __init__(self, wrapped: nn.Embedding) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.wrapped(input_ids)


def wrapped_copy(model: nn.Module, kind: str) -> tuple[nn.Module, HostLikeEmbeddingWrapper]:
    """A copy of a text model whose token_embedding is wrapped like the host wraps it."""
    m = copy.deepcopy(model)
    if kind == "hf":
        w = HostLikeEmbeddingWrapper(m.text_model.embeddings.token_embedding)
        m.text_model.embeddings.token_embedding = w
    else:
        w = HostLikeEmbeddingWrapper(m.token_embedding)
        m.token_embedding = w
    return m, w

"""Shared fixtures. Tests run on the CPU with small real tensors and models; nothing is downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = Path(__file__).resolve().parent / "data"


def define_torchvision_ops() -> None:
    """Let PyPI's torchvision import beside the CPU torch (open_clip imports it).

    Its C++ operators are missing from the CPU build, so ``import torchvision`` fails with
    "operator torchvision::nms does not exist" unless the schemas exist. Registering the two schemas
    is enough for the imports; the operators are never called.
    """
    if getattr(define_torchvision_ops, "done", False):
        return
    try:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        define_torchvision_ops.lib = lib  # type: ignore[attr-defined]  # keep it alive
    except RuntimeError:
        pass  # already defined (a real torchvision build)
    define_torchvision_ops.done = True  # type: ignore[attr-defined]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# open_clip and transformers >= 4.4x import torchvision; define its operators before any test does.
define_torchvision_ops()


@pytest.fixture(scope="session")
def tokenizer():
    """The CLIP BPE tokenizer that ships inside open_clip (49408 tokens)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="session")
def tables() -> dict[str, torch.Tensor]:
    """Seeded random token-embedding tables of the real sizes (CLIP-L 49408 x 768, CLIP-G 49408 x 1280)."""
    gen = torch.Generator().manual_seed(2024)
    return {
        "clip_l": torch.randn(49408, 768, generator=gen),
        "clip_g": torch.randn(49408, 1280, generator=gen),
    }

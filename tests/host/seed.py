"""Embedding files put into the host's fresh embeddings folder before it starts."""

from __future__ import annotations

from pathlib import Path

import torch

from lib_ti.embedding import Embedding
from lib_ti.io.formats import write_embedding

SEEDED = {
    "ti-sd1.safetensors": "sd1",
    "ti-sd1-pt.pt": "sd1",
    "ti-sd1-img.png": "sd1",
    "ti-sdxl.safetensors": "sdxl",
    "ti-sdxl-img.png": "sdxl",
    "sub/ti-nested.safetensors": "sd1",
}


def seed_embeddings(folder: Path) -> None:
    g = torch.Generator().manual_seed(0)
    for rel, kind in SEEDED.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "sd1":
            vecs = {"clip_l": torch.randn(2, 768, generator=g) * 0.01}
        else:
            vecs = {
                "clip_l": torch.randn(2, 768, generator=g) * 0.01,
                "clip_g": torch.randn(2, 1280, generator=g) * 0.01,
            }
        write_embedding(Embedding(path.name.split(".")[0], vecs, step=1), path)

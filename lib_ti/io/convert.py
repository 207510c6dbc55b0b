"""Conversions between SD1 embeddings and the CLIP-L half of SDXL embeddings."""

from __future__ import annotations

from typing import Literal

import torch

from lib_ti.embedding import Embedding
from lib_ti.errors import EmbeddingFormatError


def to_sdxl_l(
    emb: Embedding, g_source: Embedding | Literal["zeros"] | None, name: str | None = None
) -> Embedding:
    """An SDXL embedding whose CLIP-L half is an SD1 embedding.

    The CLIP-G half must be given: another embedding's CLIP-G vectors, or ``"zeros"`` when asked
    for explicitly (zeros change the SDXL result; the user should know it).
    """
    if emb.kind != "sd1":
        msg = f"{emb.name} is {emb.kind}; only an SD1 (768-wide) embedding can become the CLIP-L half"
        raise EmbeddingFormatError(msg)
    if g_source is None:
        msg = "an SDXL embedding needs CLIP-G vectors too: give a CLIP-G source or ask for zeros explicitly"
        raise EmbeddingFormatError(msg)
    if isinstance(g_source, str):
        if g_source != "zeros":
            msg = f"unknown CLIP-G source {g_source!r}"
            raise EmbeddingFormatError(msg)
        g = torch.zeros(emb.num_vectors, 1280)
    else:
        if "clip_g" not in g_source.vectors:
            msg = f"{g_source.name} ({g_source.kind}) has no CLIP-G vectors"
            raise EmbeddingFormatError(msg)
        g = g_source.vectors["clip_g"]
        if g.shape[0] != emb.num_vectors:
            msg = (
                f"CLIP-G source {g_source.name} has {g.shape[0]} vectors, "
                f"{emb.name} has {emb.num_vectors}; they must match"
            )
            raise EmbeddingFormatError(msg)
    return Embedding(
        name or emb.name,
        {"clip_l": emb.vectors["clip_l"], "clip_g": g},
        step=emb.step,
        sd_checkpoint=emb.sd_checkpoint,
        sd_checkpoint_name=emb.sd_checkpoint_name,
        metadata=dict(emb.metadata),
    )


def to_sd1(emb: Embedding, name: str | None = None) -> Embedding:
    """The CLIP-L half of an SDXL embedding, as an SD1 embedding."""
    if emb.kind != "sdxl":
        msg = f"{emb.name} is {emb.kind}; only an SDXL embedding has a CLIP-L half to take"
        raise EmbeddingFormatError(msg)
    return Embedding(
        name or emb.name,
        {"clip_l": emb.vectors["clip_l"]},
        step=emb.step,
        sd_checkpoint=emb.sd_checkpoint,
        sd_checkpoint_name=emb.sd_checkpoint_name,
        metadata=dict(emb.metadata),
    )

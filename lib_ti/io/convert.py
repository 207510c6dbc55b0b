"""Conversions: SD1 and the CLIP-L half of SDXL, SD3 to SDXL (T5 dropped), SD3/Flux to SD1 (CLIP-L),
and SD3/Flux between the OneTrainer and ComfyUI key conventions."""

from __future__ import annotations

from typing import Literal

import torch

from lib_ti.embedding import KIND_LABELS, T5_KINDS, Embedding
from lib_ti.errors import EmbeddingFormatError
from lib_ti.io.formats import T5_FILE_KEYS, check_convention

#: What :func:`convert_to` makes: a kind (sd1, sdxl) or an SD3/Flux key convention.
ConvertTo = Literal["sd1", "sdxl", "onetrainer", "comfyui"]
CONVERT_TO: tuple[ConvertTo, ...] = ("sd1", "sdxl", "onetrainer", "comfyui")


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
    """The CLIP-L part of an SDXL, SD3 or Flux embedding, as an SD1 embedding."""
    if emb.kind not in ("sdxl", "sd3", "flux"):
        msg = f"{emb.name} is {emb.kind}; only an SDXL, SD3 or Flux embedding has a CLIP-L part to take"
        raise EmbeddingFormatError(msg)
    return _part(emb, ("clip_l",), name)


def to_sdxl(emb: Embedding, name: str | None = None) -> Embedding:
    """The CLIP-L and CLIP-G parts of an SD3 embedding (its T5 vectors dropped), as an SDXL embedding."""
    if emb.kind != "sd3":
        if emb.kind == "flux":
            msg = (
                f"{emb.name} is a Flux embedding: it has no CLIP-G vectors. Take its CLIP-L part (to sd1), "
                "then make that the CLIP-L half of SDXL with a CLIP-G source"
            )
        elif emb.kind == "sd1":
            msg = f"{emb.name} is SD1: an SDXL embedding needs CLIP-G vectors too (give a CLIP-G source or zeros)"
        else:
            msg = f"{emb.name} is {emb.kind}; only an SD3 embedding becomes SDXL by dropping its T5 vectors"
        raise EmbeddingFormatError(msg)
    return _part(emb, ("clip_l", "clip_g"), name)


def with_convention(emb: Embedding, convention: str, name: str | None = None) -> Embedding:
    """A copy of an SD3/Flux embedding that is written with ``convention``'s keys by default
    (``onetrainer``: ``t5``, ``comfyui``: ``t5xxl``)."""
    conv = check_convention(convention)
    if emb.kind not in T5_KINDS:
        msg = (
            f"{emb.name} is {KIND_LABELS[emb.kind]}: the OneTrainer and ComfyUI key conventions differ only "
            f"for SD3 and Flux embeddings (their T5 key, {' or '.join(T5_FILE_KEYS.values())})"
        )
        raise EmbeddingFormatError(msg)
    out = _part(emb, tuple(emb.vectors), name)
    out.convention = conv
    return out


def convert_to(emb: Embedding, target: str, name: str | None = None) -> Embedding:
    """``emb`` converted to ``target``: ``sd1``, ``sdxl`` or an SD3/Flux key convention."""
    if target == "sd1":
        return to_sd1(emb, name)
    if target == "sdxl":
        return to_sdxl(emb, name)
    if target in T5_FILE_KEYS:
        return with_convention(emb, target, name)
    msg = f"unknown conversion {target!r}: one of {', '.join(CONVERT_TO)}"
    raise EmbeddingFormatError(msg)


def _part(emb: Embedding, keys: tuple[str, ...], name: str | None) -> Embedding:
    return Embedding(
        name or emb.name,
        {k: emb.vectors[k] for k in keys},
        step=emb.step,
        sd_checkpoint=emb.sd_checkpoint,
        sd_checkpoint_name=emb.sd_checkpoint_name,
        metadata=dict(emb.metadata),
    )

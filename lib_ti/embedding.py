"""The one record type for an embedding, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lib_ti.errors import EmbeddingFormatError
from lib_ti.text.prompt import CHUNK_LENGTH

Kind = Literal["sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "flux"]
#: How SD3/Flux files name the T5 matrix: OneTrainer ``t5``, ComfyUI ``t5xxl`` (lib_ti.io.formats).
Convention = Literal["onetrainer", "comfyui"]

#: Width of each text encoder's token embeddings (``t5``: the T5-XXL encoder of SD3 and Flux).
ENCODER_WIDTHS: dict[str, int] = {"clip_l": 768, "clip_h": 1024, "clip_g": 1280, "t5": 4096}
#: The CLIP encoders; a single matrix is one of these, told apart by its width.
CLIP_ENCODERS = ("clip_l", "clip_h", "clip_g")
WIDTH_TO_ENCODER: dict[int, str] = {ENCODER_WIDTHS[k]: k for k in CLIP_ENCODERS}
KINDS: dict[frozenset[str], Kind] = {
    frozenset({"clip_l"}): "sd1",
    frozenset({"clip_h"}): "sd2",
    frozenset({"clip_l", "clip_g"}): "sdxl",
    frozenset({"clip_g"}): "sdxl_refiner",
    frozenset({"clip_l", "clip_g", "t5"}): "sd3",
    frozenset({"clip_l", "t5"}): "flux",
}
KIND_LABELS: dict[str, str] = {
    "sd1": "SD1 (CLIP-L 768)",
    "sd2": "SD2 (OpenCLIP-H 1024)",
    "sdxl": "SDXL (CLIP-L 768 + CLIP-G 1280)",
    "sdxl_refiner": "SDXL refiner (CLIP-G 1280)",
    "sd3": "SD3 / SD3.5 (CLIP-L 768 + CLIP-G 1280 + T5-XXL 4096)",
    "flux": "Flux (CLIP-L 768 + T5-XXL 4096)",
}
#: Kinds the web UIs' own embedding code uses (A1111, Forge and its forks); the tab's training and
#: merging work on these only. SD3 and Flux files can be read, converted and stored.
HOST_KINDS: frozenset[str] = frozenset({"sd1", "sd2", "sdxl", "sdxl_refiner"})
#: Kinds whose T5 part may hold a different number of vectors than the CLIP part. OneTrainer
#: (modules/modelSetup/mixin/ModelSetupEmbeddingMixin.py, _create_new_embedding) sizes each
#: encoder's vectors by that encoder's tokens of the init text when no token count is set, and T5's
#: SentencePiece splits text differently from CLIP's BPE; ComfyUI (comfy/sd1_clip.py, load_embed)
#: reads each encoder's key on its own, so either count works there.
T5_KINDS: frozenset[str] = frozenset({"sd3", "flux"})
#: A prompt chunk holds 75 tokens and the hosts never split an embedding across chunks.
MAX_VECTORS = CHUNK_LENGTH


def encoder_for_width(width: int, label: str) -> str:
    """The encoder key for a single matrix of this width (SD1 768, SD2 1024, G-only 1280)."""
    try:
        return WIDTH_TO_ENCODER[width]
    except KeyError:
        if width == ENCODER_WIDTHS["t5"]:
            msg = (
                f"{label}: a single 4096-wide (T5) matrix is an embedding for a T5-only model (PixArt, "
                "Chroma); SD3 and Flux embeddings hold CLIP vectors too"
            )
        else:
            msg = (
                f"{label}: vectors are {width} wide; embeddings are 768 (SD1), 1024 (SD2) or 768+1280 (SDXL)"
            )
        raise EmbeddingFormatError(msg) from None


def check_vectors(vectors: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """Validate per-encoder vectors; return float32 contiguous CPU copies.

    Rules: known encoder keys in a known combination, 2-D floating tensors of the encoder's width,
    1..75 vectors, the same count on every encoder (SD3/Flux: on every CLIP encoder; T5 may differ,
    see ``T5_KINDS``), finite values.
    """
    if not vectors:
        msg = f"{label}: no vectors"
        raise EmbeddingFormatError(msg)
    unknown = sorted(set(vectors) - set(ENCODER_WIDTHS))
    if unknown:
        msg = f"{label}: unknown encoder {unknown[0]!r} (expected clip_l, clip_h, clip_g or t5)"
        raise EmbeddingFormatError(msg)
    kind = KINDS.get(frozenset(vectors))
    if kind is None:
        msg = f"{label}: encoders {sorted(vectors)} do not form SD1, SD2, SDXL, SD3 or Flux"
        raise EmbeddingFormatError(msg)
    out: dict[str, torch.Tensor] = {}
    counts = set()
    for key in [k for k in ENCODER_WIDTHS if k in vectors]:
        t = vectors[key]
        if not isinstance(t, torch.Tensor):
            msg = f"{label}: {key} is a {type(t).__name__}, not a tensor"
            raise EmbeddingFormatError(msg)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            msg = f"{label}: {key} has shape {list(t.shape)}; an embedding is a 2-D [vectors, width] matrix"
            raise EmbeddingFormatError(msg)
        if not (t.is_floating_point()):
            msg = f"{label}: {key} holds {t.dtype} values, not floating point"
            raise EmbeddingFormatError(msg)
        n, width = t.shape
        if width != ENCODER_WIDTHS[key]:
            msg = f"{label}: {key} vectors are {width} wide, {key} needs {ENCODER_WIDTHS[key]}"
            raise EmbeddingFormatError(msg)
        if not 1 <= n <= MAX_VECTORS:
            msg = f"{label}: {key} has {n} vectors; an embedding needs 1 to {MAX_VECTORS}"
            raise EmbeddingFormatError(msg)
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        bad = ~torch.isfinite(t)
        if bad.any():
            row = int(bad.any(dim=1).nonzero()[0, 0])
            what = "NaN" if torch.isnan(t).any() else "infinite"
            msg = f"{label}: {key} vector {row} holds {what} values"
            raise EmbeddingFormatError(msg)
        if key != "t5":  # T5 may differ from the CLIP count (T5_KINDS)
            counts.add(n)
        out[key] = t
    if len(counts) > 1:
        sizes = ", ".join(f"{k} {v.shape[0]}" for k, v in out.items())
        msg = f"{label}: encoders have different vector counts ({sizes})"
        raise EmbeddingFormatError(msg)
    return out


@dataclass
class Embedding:
    """An embedding: per-encoder ``[N, width]`` vectors plus what the hosts record about it.

    ``vectors`` keys: ``clip_l`` (768), ``clip_h`` (1024, SD2), ``clip_g`` (1280), ``t5`` (4096,
    SD3/Flux). ``metadata`` holds any other text the file carried (training settings and the like).
    """

    name: str
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: How it was stored ("safetensors", "a1111 .pt", "png chunk", ...); informational, not compared.
    source: str = field(default="", compare=False)
    #: SD3/Flux: the key convention of the file it came from ("onetrainer": ``t5``, "comfyui":
    #: ``t5xxl``), the default when it is written again; None for other kinds and new embeddings.
    convention: Convention | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.vectors = check_vectors(self.vectors, self.name or "embedding")

    @classmethod
    def from_matrix(cls, name: str, matrix: torch.Tensor, **kwargs: object) -> Embedding:
        """An SD1/SD2 (or G-only) embedding from a single matrix; the width picks the encoder."""
        if not isinstance(matrix, torch.Tensor):
            msg = f"{name}: expected a tensor, got {type(matrix).__name__}"
            raise EmbeddingFormatError(msg)
        width = matrix.shape[-1] if matrix.dim() > 0 else 0
        return cls(name, {encoder_for_width(width, name): matrix}, **kwargs)  # type: ignore[arg-type]

    @property
    def kind(self) -> Kind:
        return KINDS[frozenset(self.vectors)]

    @property
    def num_vectors(self) -> int:
        """Vectors per token (SD3/Flux: of the CLIP part; ``vector_counts`` has T5's)."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def vector_counts(self) -> dict[str, int]:
        return {k: int(v.shape[0]) for k, v in self.vectors.items()}

    @property
    def host_shape(self) -> int:
        """The width the hosts compare with their model (``Embedding.shape``): 768, 1024, 2048, 1280
        (SD3/Flux, which the hosts do not load: the sum of every encoder's width)."""
        return sum(t.shape[1] for t in self.vectors.values())

    @property
    def matrix(self) -> torch.Tensor:
        """The single matrix of an SD1/SD2/G-only embedding."""
        if len(self.vectors) != 1:
            parts = ", ".join(self.vectors)
            msg = f"{self.name}: an embedding for {KIND_LABELS[self.kind]} has {len(self.vectors)} matrices ({parts}), not one"
            raise EmbeddingFormatError(msg)
        return next(iter(self.vectors.values()))

    def equals(self, other: Embedding) -> bool:
        """Same name, vectors (exactly), step, checkpoint fields and metadata."""
        return (
            self.name == other.name
            and self.vectors.keys() == other.vectors.keys()
            and all(torch.equal(self.vectors[k], other.vectors[k]) for k in self.vectors)
            and (self.step, self.sd_checkpoint, self.sd_checkpoint_name)
            == (other.step, other.sd_checkpoint, other.sd_checkpoint_name)
            and self.metadata == other.metadata
        )


def non_host_kind_message(emb: Embedding, what: str) -> str:
    """Why ``what`` (e.g. "training") refuses an SD3/Flux embedding, and how to convert it."""
    return (
        f"{emb.name} is an embedding for {KIND_LABELS[emb.kind]}; {what} works on SD1, SD2 and SDXL "
        "embeddings (the web UI's models). Convert it first (Inspect's Convert, or "
        f"python -m lib_ti convert FILE OUT {'--to sdxl' if emb.kind == 'sd3' else '--to-sd1'})"
    )


def refuse_non_host_kind(emb: Embedding, what: str) -> None:
    """EmbeddingFormatError when ``emb`` is not of a kind the web UIs use (SD3, Flux)."""
    if emb.kind not in HOST_KINDS:
        raise EmbeddingFormatError(non_host_kind_message(emb, what))

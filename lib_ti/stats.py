"""Numbers about embeddings: per-vector statistics and the comparison of two embeddings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lib_ti.embedding import ENCODER_WIDTHS, Embedding
from lib_ti.errors import EmbeddingFormatError


@dataclass
class VectorStats:
    index: int
    norm: float
    min: float
    max: float
    mean: float
    std: float


@dataclass
class EncoderComparison:
    encoder: str
    cosine: list[float]
    mean_abs_diff: list[float]
    mean_abs_diff_all: float


@dataclass
class Comparison:
    encoders: list[EncoderComparison]
    mean_abs_diff: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        return cls(
            [EncoderComparison(**e) for e in data["encoders"]],
            data["mean_abs_diff"],
            list(data.get("notes", [])),
        )


def vector_stats(matrix: torch.Tensor) -> list[VectorStats]:
    """L2 norm, min, max, mean and (population) standard deviation of each row."""
    m = matrix.detach().float().cpu()
    norms = m.norm(dim=1)
    return [
        VectorStats(
            index=i,
            norm=float(norms[i]),
            min=float(m[i].min()),
            max=float(m[i].max()),
            mean=float(m[i].mean()),
            std=float(m[i].std(unbiased=False)),
        )
        for i in range(m.shape[0])
    ]


def embedding_stats(emb: Embedding) -> dict[str, list[VectorStats]]:
    return {enc: vector_stats(t) for enc, t in emb.vectors.items()}


def compare(a: Embedding, b: Embedding) -> Comparison:
    """Per encoder and per vector cosine similarity and mean absolute difference.

    Embeddings of different kinds are compared on the encoders they share (SD1 and SDXL share
    CLIP-L); with none in common the comparison is refused. With different vector counts the
    leading vectors both have are compared, and a note says so.
    """
    shared = [k for k in ENCODER_WIDTHS if k in a.vectors and k in b.vectors]
    if not shared:
        msg = f"cannot compare {a.name} ({a.kind}) with {b.name} ({b.kind}): they share no text encoder"
        raise EmbeddingFormatError(msg)
    notes = []
    if a.kind != b.kind:
        notes.append(f"kinds differ ({a.kind} vs {b.kind}); compared on {', '.join(shared)} only")
    parts = []
    total_abs, total_count = 0.0, 0
    for enc in shared:
        # per encoder: an SD3/Flux T5 part may hold another count than the CLIP parts
        na, nb = a.vector_counts[enc], b.vector_counts[enc]
        n = min(na, nb)
        if na != nb:
            notes.append(f"{enc}: vector counts differ ({na} vs {nb}); compared the first {n}")
        x, y = a.vectors[enc][:n].double(), b.vectors[enc][:n].double()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=1, eps=1e-12)
        diff = (x - y).abs()
        total_abs += float(diff.sum())
        total_count += diff.numel()
        parts.append(
            EncoderComparison(
                encoder=enc,
                cosine=[float(c) for c in cos],
                mean_abs_diff=[float(d) for d in diff.mean(dim=1)],
                mean_abs_diff_all=float(diff.mean()),
            )
        )
    return Comparison(encoders=parts, mean_abs_diff=total_abs / total_count, notes=notes)

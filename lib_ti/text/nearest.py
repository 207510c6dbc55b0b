"""Nearest vocabulary tokens of embedding vectors, by cosine similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib_ti.embedding import Embedding
from lib_ti.text.vocab import Vocabulary


@dataclass
class Neighbour:
    token_id: int
    text: str
    score: float


class NearestTokens:
    """Nearest vocabulary tokens by cosine similarity, over a normalized copy of the table kept once."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        w = vocab.table_weight.detach().float()
        self.normed = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def query(self, vectors: torch.Tensor, k: int = 5) -> list[list[Neighbour]]:
        """Top-k tokens for each row of ``vectors`` ``[N, D]``."""
        q = vectors.detach().float().to(self.normed.device)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # [V, D] @ [D, N] runs several times faster on CPU than [N, D] @ [D, V]
        scores, ids = (self.normed @ q.T).T.topk(min(k, self.normed.shape[0]), dim=1)
        return [
            [Neighbour(int(i), self.vocab.decode_token(int(i)), float(s)) for s, i in zip(row_s, row_i)]
            for row_s, row_i in zip(scores, ids)
        ]


def nearest_tokens(
    emb: Embedding, indexes: dict[str, NearestTokens], k: int = 5
) -> dict[str, list[list[Neighbour]]]:
    """Per encoder the embedding shares with ``indexes``, the top-k tokens of each vector."""
    return {key: indexes[key].query(t, k) for key, t in emb.vectors.items() if key in indexes}

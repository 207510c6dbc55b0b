"""A text encoder's vocabulary: tokenizer plus token-embedding table, and token text for display."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from lib_ti.text.prompt import TokenizerInfo


class Vocabulary(Protocol):
    """What create, merge and inspect need from an encoder (``TextEncoder`` and ``TokenTable`` have it)."""

    key: str

    @property
    def table_weight(self) -> torch.Tensor: ...

    def tokenize(self, text: str) -> list[int]: ...

    def token_vectors(self, ids: Sequence[int]) -> torch.Tensor: ...

    def decode_token(self, token_id: int) -> str: ...


def bpe_to_text(bpe: str, byte_decoder: dict[str, int] | None) -> str:
    """Readable text of a BPE vocabulary entry: ``"cat</w>"`` -> ``"cat "``."""
    end = bpe.endswith("</w>")
    core = bpe[:-4] if end else bpe
    if byte_decoder and all(c in byte_decoder for c in core):
        core = bytearray(byte_decoder[c] for c in core).decode("utf-8", errors="replace")
    return core + (" " if end else "")


class TokenTable:
    """A vocabulary from a plain ``[V, D]`` table and a tokenizer (no transformer needed)."""

    def __init__(self, key: str, weight: torch.Tensor, tokenizer: TokenizerInfo) -> None:
        self.key = key
        self._weight = weight.detach()
        self.tokenizer = tokenizer

    @property
    def table_weight(self) -> torch.Tensor:
        return self._weight

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize([text])[0]

    def token_vectors(self, ids: Sequence[int]) -> torch.Tensor:
        return self._weight[torch.as_tensor(list(ids), dtype=torch.long)]

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode(token_id) if self.tokenizer.decode else str(token_id)

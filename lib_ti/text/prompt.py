"""Prompt parsing and 75-token chunking, following AUTOMATIC1111's rules (``sd_hijack_clip.tokenize_line``).

The rules, each named in the tests:

* **emphasis**: ``(text)`` multiplies by 1.1, ``[text]`` divides by 1.1, ``(text:w)`` multiplies by w;
  ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal; unclosed brackets still apply to the end; runs of
  equal weight merge.
* **BREAK**: the word ``BREAK`` (upper case, on its own) ends the current chunk.
* **chunks**: each chunk holds 75 tokens, padded with end-of-text, wrapped as start + 75 + end (77).
* **embedding never split**: an embedding that does not fit the rest of a chunk starts the next one;
  its rows are placeholders (token 0) replaced by its vectors.
* **comma backtrack**: when a chunk is full and the last comma is at most ``comma_padding_backtrack``
  (default 20) tokens back, the tokens after that comma move to the next chunk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

CHUNK_LENGTH = 75
BREAK_WEIGHT = -1.0

_ATTENTION_RE = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\ |
    \( | \[ |
    :\s*(?P<weight>[+-]?[.\d]+)\s*\) |
    \) | \] |
    [^\\()\[\]:]+ |
    :
    """,
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; ``("BREAK", -1.0)`` marks a BREAK."""
    runs: list[list[object]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] = float(run[1]) * factor  # type: ignore[arg-type]

    for m in _ATTENTION_RE.finditer(text):
        piece, weight = m.group(0), m.group("weight")
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                runs.append([piece, 1.0])
                round_open.pop()
                continue
            scale(round_open.pop(), factor)
        elif piece == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif piece == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK_RE.split(piece)):
                if i:
                    runs.append(["BREAK", BREAK_WEIGHT])
                runs.append([part, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    if not runs:
        runs = [["", 1.0]]
    merged: list[list[object]] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] = str(merged[-1][0]) + str(run[0])
        else:
            merged.append(run)
    return [(str(t), float(w)) for t, w in merged]  # type: ignore[arg-type]


@dataclass
class Chunk:
    """One 77-token window: ids (with start/end), per-token weights, and embedding splices."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    #: (offset within the 75 prompt tokens, embedding name)
    fixes: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenizerInfo:
    tokenize: Callable[[Sequence[str]], list[list[int]]]
    id_start: int
    id_end: int
    comma: int | None
    #: token id -> readable text, for display (nearest tokens)
    decode: Callable[[int], str] | None = None


class EmbeddingIndex:
    """Find embedding names in token sequences, by their token ids (longest match first), as the hosts do."""

    def __init__(
        self, names_to_vectors: Mapping[str, int], tokenize: Callable[[Sequence[str]], list[list[int]]]
    ):
        self.lengths = dict(names_to_vectors)
        self._by_first: dict[int, list[tuple[list[int], str]]] = {}
        for name in self.lengths:
            ids = tokenize([name])[0]
            if not ids:
                continue
            self._by_first.setdefault(ids[0], []).append((ids, name))
        for entries in self._by_first.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)

    def find(self, tokens: Sequence[int], pos: int) -> tuple[str | None, int]:
        for ids, name in self._by_first.get(tokens[pos], ()):
            if list(tokens[pos : pos + len(ids)]) == ids:
                return name, len(ids)
        return None, 0


def chunk_prompt(
    prompt: str,
    tok: TokenizerInfo,
    index: EmbeddingIndex | None = None,
    *,
    comma_padding_backtrack: int = 20,
    emphasis: bool = True,
) -> tuple[list[Chunk], int]:
    """Chunks of a prompt and its token count, exactly as A1111's ``tokenize_line``."""
    parsed = parse_attention(prompt) if emphasis else [(prompt, 1.0)]
    tokenized = tok.tokenize([text for text, _ in parsed])
    chunks: list[Chunk] = []
    chunk = Chunk()
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        pad = CHUNK_LENGTH - len(chunk.tokens)
        if pad > 0:
            chunk.tokens += [tok.id_end] * pad
            chunk.weights += [1.0] * pad
        chunk.tokens = [tok.id_start, *chunk.tokens, tok.id_end]
        chunk.weights = [1.0, *chunk.weights, 1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = Chunk()

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == BREAK_WEIGHT:
            next_chunk()
            continue
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == tok.comma:
                last_comma = len(chunk.tokens)
            elif (
                comma_padding_backtrack != 0
                and len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_padding_backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_weights = chunk.tokens[cut:], chunk.weights[cut:]
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                next_chunk()
                chunk.tokens, chunk.weights = moved_tokens, moved_weights
            if len(chunk.tokens) == CHUNK_LENGTH:
                next_chunk()
            name, consumed = index.find(tokens, pos) if index is not None else (None, 0)
            if name is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                pos += 1
                continue
            n = index.lengths[name]  # type: ignore[union-attr]
            if len(chunk.tokens) + n > CHUNK_LENGTH:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), name))
            chunk.tokens += [0] * n
            chunk.weights += [weight] * n
            pos += consumed
    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


def empty_chunk(tok: TokenizerInfo) -> Chunk:
    return Chunk([tok.id_start] + [tok.id_end] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))


def target_token_count(token_count: int) -> int:
    """The prompt length the host shows before one more chunk is needed (multiple of 75)."""
    return math.ceil(max(token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH

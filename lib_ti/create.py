"""Create a new embedding for the loaded model: from init text, zeros, or random."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from lib_ti.embedding import MAX_VECTORS, Embedding
from lib_ti.errors import TIError, short_repr
from lib_ti.names import validate_name
from lib_ti.text.vocab import Vocabulary

logger = logging.getLogger(__name__)

InitMode = Literal["text", "zeros", "random"]
#: Above this many vectors per token embeddings overfit and eat the 75-token prompt budget.
WARN_VECTORS = 16
#: the largest seed of ``random`` (torch takes 64 bits; 63 keep it a positive int64 everywhere)
MAX_SEED = 2**63 - 1


@dataclass
class CreateArgs:
    name: str
    num_vectors: int = 1
    init_mode: InitMode = "text"
    init_text: str = "*"
    #: seed for ``random``; None draws one
    seed: int | None = None


@dataclass
class CreateResult:
    embedding: Embedding
    warnings: list[str] = field(default_factory=list)


def init_from_text(vocab: Vocabulary, text: str, n: int) -> tuple[torch.Tensor, int]:
    """Vector i = the token embedding number ``i * len(tokens) // n`` of the text (A1111's formula).

    Returns the ``[n, D]`` vectors and the text's token count on this encoder.
    """
    ids = vocab.tokenize(text)
    if not ids:
        msg = f"the init text {text!r} has no tokens"
        raise TIError(msg)
    rows = vocab.token_vectors(ids).float()
    pick = [i * len(ids) // n for i in range(n)]
    return rows[pick].clone(), len(ids)


def vocab_norm_stats(vocab: Vocabulary) -> tuple[float, float]:
    """Mean and standard deviation of the L2 norms of the vocabulary's token embeddings."""
    norms = vocab.table_weight.float().norm(dim=1)
    return float(norms.mean()), float(norms.std())


def init_random(vocab: Vocabulary, n: int, gen: torch.Generator) -> torch.Tensor:
    """Random directions, each scaled to a norm drawn from the vocabulary's norm statistics."""
    mean, std = vocab_norm_stats(vocab)
    width = vocab.table_weight.shape[1]
    v = torch.randn(n, width, generator=gen)
    target = (mean + std * torch.randn(n, 1, generator=gen)).clamp_min(mean * 0.5)
    return v / v.norm(dim=1, keepdim=True) * target


def create_embedding(args: CreateArgs, vocabs: Mapping[str, Vocabulary]) -> CreateResult:
    """A new embedding with vectors for every encoder of the model (``vocabs``: key -> vocabulary)."""
    validate_name(args.name)
    n = args.num_vectors
    if not isinstance(n, int) or not 1 <= n <= MAX_VECTORS:
        msg = f"vectors per token must be 1 to {MAX_VECTORS}, not {short_repr(n)}"
        raise TIError(msg)
    seed = args.seed
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        msg = f"the seed must be a whole number from 0 to {MAX_SEED} (got {short_repr(seed)})"
        raise TIError(msg)
    if not vocabs:
        msg = "no text encoder to create the embedding for"
        raise TIError(msg)
    warnings = []
    if n > WARN_VECTORS:
        warnings.append(
            f"{n} vectors per token: embeddings above {WARN_VECTORS} tend to overfit, and each use takes {n} "
            "of the prompt's 75 tokens"
        )
    vectors: dict[str, torch.Tensor] = {}
    if args.init_mode == "text":
        if not args.init_text.strip():
            msg = "the init text is empty; enter some words, or choose zeros or random"
            raise TIError(msg)
        for key, vocab in vocabs.items():
            vectors[key], count = init_from_text(vocab, args.init_text, n)
            if count != n:
                warnings.append(
                    f"init text has {count} token(s) on {key} but the embedding has {n} vector(s); "
                    f"the vectors take tokens {[i * count // n for i in range(n)]}"
                )
    elif args.init_mode == "zeros":
        vectors = {key: torch.zeros(n, vocab.table_weight.shape[1]) for key, vocab in vocabs.items()}
    elif args.init_mode == "random":
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
        gen = torch.Generator().manual_seed(seed)
        vectors = {key: init_random(vocab, n, gen) for key, vocab in vocabs.items()}
    else:
        msg = f"unknown init mode {args.init_mode!r} (text, zeros or random)"
        raise TIError(msg)
    metadata: dict[str, str] = {"init_mode": args.init_mode}
    if args.init_mode == "text":
        metadata["init_text"] = args.init_text
    elif args.init_mode == "random":
        metadata["init_seed"] = str(seed)
    emb = Embedding(args.name, vectors, step=0, metadata=metadata)
    for w in warnings:
        logger.warning("%s: %s", args.name, w)
    return CreateResult(emb, list(dict.fromkeys(warnings)))

"""Latency of the model-free tools on real-size vocabulary tables (49,408 x 768 and x 1280, random weights).

    python bench/latency.py [--repeats 20]

Ends with one line: ``latency: nearest_ms=.. merge_ms=.. create_ms=..`` (medians; nearest covers both
SDXL encoders, 8 vectors, top 5) plus the speed-up of the kept normalized table over normalizing the
table on every query, measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    from tests.conftest import define_torchvision_ops

    define_torchvision_ops()
    from open_clip.tokenizer import _tokenizer

    from lib_ti.create import CreateArgs, create_embedding
    from lib_ti.embedding import Embedding
    from lib_ti.merge import MergeContext, evaluate
    from lib_ti.text.encoders import open_clip_tokenizer_info
    from lib_ti.text.nearest import NearestTokens, nearest_tokens
    from lib_ti.text.vocab import TokenTable

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = open_clip_tokenizer_info(_tokenizer)
    gen = torch.Generator().manual_seed(0)
    tables = {
        "clip_l": TokenTable("clip_l", torch.randn(49408, 768, generator=gen) * 0.015, tok),
        "clip_g": TokenTable("clip_g", torch.randn(49408, 1280, generator=gen) * 0.015, tok),
    }
    emb = Embedding(
        "q", {k: torch.randn(8, t.table_weight.shape[1], generator=gen) for k, t in tables.items()}
    )

    t = time.perf_counter()
    indexes = {k: NearestTokens(t) for k, t in tables.items()}
    build_ms = (time.perf_counter() - t) * 1000
    nearest = median_ms(lambda: nearest_tokens(emb, indexes, k=5), args.repeats)
    naive = median_ms(
        lambda: nearest_tokens(emb, {k: NearestTokens(t) for k, t in tables.items()}, k=5), args.repeats
    )

    ctx = MergeContext(
        encoders=("clip_l", "clip_g"),
        tokenize=tables["clip_l"].tokenize,
        token_vectors=lambda ids: {k: t.token_vectors(ids) for k, t in tables.items()},
        embeddings={"q": emb},
    )
    expr = "('a photo of a cat' + 'a painting of a dog') * 0.5 : 6 + avg('red', 'blue', 'q'[0:2]) - 'noise' * 0.1"
    merge = median_ms(lambda: evaluate(expr, ctx), args.repeats)
    create = median_ms(
        lambda: create_embedding(CreateArgs("bench", 4, "text", "a small orange tabby cat"), tables),
        args.repeats,
    )
    print(f"nearest index build (both encoders, once): {build_ms:.0f} ms")
    print(f"nearest with kept normalized table vs normalizing per query: {naive / nearest:.1f}x faster")
    print(f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"latency: nearest_ms={nearest:.0f} merge_ms={merge:.0f} create_ms={create:.0f}")


if __name__ == "__main__":
    main()

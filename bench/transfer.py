"""How faithfully nearest-token transfer maps CLIP-L vectors to CLIP-G (SD1 -> SDXL).

    python bench/transfer.py [--checkpoint sdxl.safetensors] [--k 8] [--mixes 64]

self_cos: mean cosine between the transferred and the true CLIP-G rows when the input is a word's
own CLIP-L rows (every token of a few dozen words; single tokens, so it must be 1.0).
mix_cos: the same for random mixes of 2 to 4 random tokens with random weights (|w| 0.1 to 1, a
quarter of them negative, as Merge's differences make) against the same mix of CLIP-G rows.
ms: median time to transfer 4 vectors CLIP-L -> CLIP-G on the real table sizes.

Tables: with ``--checkpoint`` the real CLIP-L and CLIP-G token tables of an SDXL single-file
checkpoint (only those two tensors are read); else seeded random tables of the real sizes
(49408 x 768 and 49408 x 1280). The random rows have a norm spread and a direction shared by all rows
like real token tables (assumed figures, not measured: norms about 0.39 +- 0.05 on CLIP-L and
0.55 +- 0.08 on CLIP-G, mean cosine between rows about 0.2); the real tables are the honest test.
Prints one line: ``transfer: self_cos=.. mix_cos=.. k=.. ms=.. tables=random|checkpoint``.
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

L_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
G_KEY = "conditioner.embedders.1.model.token_embedding.weight"
WORDS = (
    "a photo of a cat sitting on a wooden table next to an old lamp, watercolor painting of a "
    "mountain lake at sunset, portrait of a woman with red hair, cyberpunk city street at night in "
    "the rain, highly detailed oil painting, masterpiece, best quality, anime girl, dragon, castle"
)


def checkpoint_tables(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        missing = [k for k in (L_KEY, G_KEY) if k not in keys]
        if missing:
            sys.exit(f"{path}: not an SDXL single-file checkpoint (no {missing[0]})")
        return f.get_tensor(L_KEY).float(), f.get_tensor(G_KEY).float()


def random_table(rows: int, width: int, norm: float, spread: float, gen: torch.Generator) -> torch.Tensor:
    shared = torch.randn(width, generator=gen)
    t = torch.randn(rows, width, generator=gen)
    t = t / t.norm(dim=1, keepdim=True) + 0.5 * shared / shared.norm()
    norms = (norm + spread * torch.randn(rows, 1, generator=gen)).clamp_min(norm / 4)
    return t / t.norm(dim=1, keepdim=True) * norms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="an SDXL single-file .safetensors checkpoint")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--mixes", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from tests.conftest import define_torchvision_ops

    define_torchvision_ops()
    from open_clip.tokenizer import _tokenizer

    from lib_ti.text.transfer import DEFAULT_K, transfer_vectors

    k = args.k or DEFAULT_K
    gen = torch.Generator().manual_seed(0)
    if args.checkpoint:
        l_table, g_table = checkpoint_tables(args.checkpoint)
        which = "checkpoint"
    else:
        l_table = random_table(49408, 768, 0.39, 0.05, gen)
        g_table = random_table(49408, 1280, 0.55, 0.08, gen)
        which = "random"
    cos = torch.nn.functional.cosine_similarity

    ids = torch.tensor(sorted(set(_tokenizer.encode(WORDS))))
    own = transfer_vectors(l_table[ids], l_table, g_table, k)
    self_cos = float(cos(own.vectors.double(), g_table[ids].double(), dim=1).mean())

    mixes, truth = [], []
    for _ in range(args.mixes):
        m = int(torch.randint(2, 5, (1,), generator=gen))
        tokens = torch.randint(0, 49406, (m,), generator=gen)
        w = (0.1 + 0.9 * torch.rand(m, generator=gen)) * torch.where(
            torch.rand(m, generator=gen) < 0.25, -1.0, 1.0
        )
        mixes.append(w @ l_table[tokens])
        truth.append(w.double() @ g_table[tokens].double())
    mixed = transfer_vectors(torch.stack(mixes), l_table, g_table, k)
    mix_cos = float(cos(mixed.vectors.double(), torch.stack(truth), dim=1).mean())

    four = torch.stack(mixes[:4])
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        transfer_vectors(four, l_table, g_table, k)
        times.append((time.perf_counter() - t) * 1000)
    ms = statistics.median(times)
    print(f"transfer: self_cos={self_cos:.6f} mix_cos={mix_cos:.6f} k={k} ms={ms:.0f} tables={which}")


if __name__ == "__main__":
    main()

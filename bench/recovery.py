"""Quality without real weights: can training recover a hidden embedding?

    python bench/recovery.py [--steps 300] [--latents 16]

1. A tiny real SD1-type model (diffusers UNet with its cross-attention outputs scaled up, real-width
   CLIP-L with 3 layers) whose output depends strongly on its conditioning; the dependence is printed.
2. A hidden embedding (2 random vectors at the vocabulary's norm); training latents are sampled from
   the model conditioned on "a photo of <hidden>" (DDIM, 20 steps).
3. Training starts from a different init ("a painting of a dog") and runs our trainer.
4. On a fixed validation set (latent, noise, t): recovered = (L_init - L_learned) / (L_init - L_hidden)
   and the cosine between learned and hidden vectors; with and without norm control.

Ends with ``recovery: recovered=.. cos=.. recovered_no_norm=.. cos_no_norm=..``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_ti.create import CreateArgs, create_embedding
from lib_ti.data import Batch, Item
from lib_ti.parts import LatentDist
from lib_ti.train import TrainArgs, Trainer
from tests import conftest  # noqa: F401  (defines torchvision's operators for open_clip)
from tests import train_models as tm

NAME = "hiddenemb"
PROMPT = f"a photo of {NAME}"


class LatentDataset:
    """Latents held in memory, one prompt, one bucket (the trainer's dataset interface)."""

    def __init__(self, latents: torch.Tensor) -> None:
        h, w = latents.shape[-2:]
        self.items = [
            Item(f"latent{i}", "", (h * 8, w * 8), (h * 8, w * 8), (0, 0), LatentDist(x), None, None)
            for i, x in enumerate(latents)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def prompt(self, item: Item, rng: random.Random) -> str:
        return PROMPT

    def epoch_order(self, batch_size: int, rng: random.Random) -> list[list[int]]:
        idx = list(range(len(self.items)))
        rng.shuffle(idx)
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]

    def make_batch(self, indices: list[int], rng: random.Random, gen: torch.Generator) -> Batch:
        lat = torch.stack([self.items[i].latents.mean for i in indices])
        ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * len(indices))
        return Batch(lat, [PROMPT] * len(indices), ids, None, list(indices))


def cond(parts, vectors, n):
    c = parts.prompt_encoder.encode([PROMPT] * n, {NAME: vectors})
    return {"crossattn": c.crossattn}


@torch.no_grad()
def ddim_sample(parts, vectors, count, seed, steps=20):
    a = parts.alphas_cumprod
    ts = torch.linspace(999, 0, steps).long()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 4, 8, 8, generator=gen)
    c = cond(parts, vectors, count)
    for i, t in enumerate(ts):
        eps = parts.denoise(x, t.repeat(count), c)
        at = a[t]
        x0 = ((x - (1 - at).sqrt() * eps) / at.sqrt()).clamp(-4, 4)
        a_prev = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def val_loss(parts, vectors, val):
    x0, noise, t = val
    a = parts.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = parts.denoise(x_t, t, cond(parts, vectors, len(t)))
    return float(((out - noise) ** 2).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--lr", default="2e-2")
    args = ap.parse_args()
    torch.manual_seed(0)
    parts = tm.make_parts("sd1")
    vocabs = {e.key: e for e in parts.prompt_encoder.encoders}
    hidden = create_embedding(CreateArgs(NAME, 2, "random", seed=11), vocabs).embedding
    init = create_embedding(CreateArgs(NAME, 2, "text", "a painting of a dog"), vocabs).embedding
    t0 = time.perf_counter()
    latents = ddim_sample(parts, hidden.vectors, args.latents, seed=1)
    gen = torch.Generator().manual_seed(2)
    n_val = 64
    idx = torch.randint(0, args.latents, (n_val,), generator=gen)
    val = (
        latents[idx],
        torch.randn(n_val, 4, 8, 8, generator=gen),
        torch.randint(0, 1000, (n_val,), generator=gen),
    )
    other = create_embedding(CreateArgs(NAME, 2, "random", seed=99), vocabs).embedding
    zeros = {k: torch.zeros_like(v) for k, v in hidden.vectors.items()}
    l_hidden, l_init = val_loss(parts, hidden.vectors, val), val_loss(parts, init.vectors, val)
    print(
        f"data: {args.latents} latents sampled with the hidden embedding ({time.perf_counter() - t0:.1f} s)"
    )
    print(
        f"conditioning dependence (validation loss): hidden {l_hidden:.4f}, init text {l_init:.4f}, "
        f"other random {val_loss(parts, other.vectors, val):.4f}, zeros {val_loss(parts, zeros, val):.4f}"
    )
    results = {}
    for label, norm in (("norm", "soft"), ("no_norm", "off")):
        t0 = time.perf_counter()
        targs = TrainArgs(
            steps=args.steps, batch_size=4, lr=args.lr, validation_every=0, norm_control=norm, seed=3
        )
        res = Trainer(parts, LatentDataset(latents), init, targs).run()
        learned = res.embedding.vectors
        l_learned = val_loss(parts, learned, val)
        recovered = (l_init - l_learned) / (l_init - l_hidden)
        cos = float(
            torch.nn.functional.cosine_similarity(learned["clip_l"], hidden.vectors["clip_l"], dim=1).mean()
        )
        print(
            f"{label}: L_init {l_init:.4f} L_learned {l_learned:.4f} L_hidden {l_hidden:.4f} "
            f"recovered {recovered:.3f} cos {cos:.3f} norms {[round(x, 3) for x in learned['clip_l'].norm(dim=1).tolist()]} "
            f"(hidden {[round(x, 3) for x in hidden.vectors['clip_l'].norm(dim=1).tolist()]}) {time.perf_counter() - t0:.0f} s"
        )
        results[label] = (recovered, cos)
    r, c = results["norm"]
    rn, cn = results["no_norm"]
    print(f"recovery: recovered={r:.2f} cos={c:.2f} recovered_no_norm={rn:.2f} cos_no_norm={cn:.2f}")


if __name__ == "__main__":
    main()

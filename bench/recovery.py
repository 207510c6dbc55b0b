"""Quality without real weights: can training recover a hidden embedding?

    python bench/recovery.py [--steps 300] [--images 8]

A random UNet barely reacts to its conditioning, so the bench builds a model that does, from real parts:
``h(c)`` = a tiny real diffusers UNet (cross-attention outputs scaled up) applied to a fixed input
with the conditioning ``c`` from the real-width CLIP-L (3 layers, real vocabulary) -- a map from
prompts to latents. The denoiser is the one that has learned "the image of prompt c is h(c)":
eps(x_t, t, c) = (x_t - sqrt(a_t) h(c)) / sqrt(1 - a_t); sampling it conditioned on c gives h(c).

1. A hidden embedding (2 random vectors at the vocabulary's norm statistics); the training latents are
   h("<template> <hidden>") for 8 template prompts (what the model draws for them).
2. Training starts from a different init ("a painting of a dog") and runs our trainer (min-SNR 5,
   which bounds the eps loss of this denoiser at low noise).
3. On a fixed validation set (latent, prompt, t): recovered = (L_init - L_learned) / (L_init - L_hidden)
   (L_hidden is 0 here by construction) and the cosine between learned and hidden vectors; with and
   without norm control.

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
from lib_ti.parts import LatentDist
from lib_ti.training.dataset import Batch, Item
from lib_ti.training.trainer import TrainArgs, Trainer
from tests import conftest  # noqa: F401  (defines torchvision's operators for open_clip)
from tests import train_models as tm

NAME = "hiddenemb"
TEMPLATES = [
    "a photo of {}",
    "a close-up photo of {}",
    "a painting of {} in the snow",
    "{} on a wooden table",
    "a drawing of {}",
    "a bright photo of {} at the beach",
    "{}, studio lighting",
    "a dark photo of {}",
]
GAMMA = 5.0


class PromptLatentDataset:
    """(latent, prompt) pairs held in memory, one bucket (the trainer's dataset interface)."""

    def __init__(self, latents: torch.Tensor, prompts: list[str]) -> None:
        h, w = latents.shape[-2:]
        self.items = [
            Item(p, p, (h * 8, w * 8), (h * 8, w * 8), (0, 0), LatentDist(x), None, None)
            for x, p in zip(latents, prompts)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def prompt(self, item: Item, rng: random.Random) -> str:
        return item.filewords

    def epoch_order(self, batch_size: int, rng: random.Random) -> list[list[int]]:
        idx = list(range(len(self.items)))
        rng.shuffle(idx)
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]

    def make_batch(self, indices: list[int], rng: random.Random, gen: torch.Generator) -> Batch:
        lat = torch.stack([self.items[i].latents.mean for i in indices])
        ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * len(indices))
        return Batch(lat, [self.items[i].filewords for i in indices], ids, None, list(indices))


def make_model(parts):
    """Replace the parts' denoiser with the one that maps each prompt to its latent h(c)."""
    unet = tm.tiny_unet("sd1", seed=4, cross_gain=16.0)
    probe = torch.zeros(1, 4, 8, 8)
    t_probe = torch.tensor([500])
    alphas = parts.alphas_cumprod

    def h(crossattn):
        return unet(
            probe.expand(crossattn.shape[0], -1, -1, -1),
            t_probe.expand(crossattn.shape[0]),
            encoder_hidden_states=crossattn,
        ).sample

    def denoise(x, t, cond):
        a = alphas[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - a.sqrt() * h(cond["crossattn"])) / (1 - a).sqrt()

    parts.denoise = denoise
    return h


@torch.no_grad()
def latents_for(parts, h, vectors, prompts):
    c = parts.prompt_encoder.encode(prompts, {NAME: vectors}).crossattn
    return h(c)


@torch.no_grad()
def val_loss(parts, h, vectors, val):
    """The trainer's objective on fixed (latent, prompt, t): min(snr, 5) * |h(c) - x0|^2, mean."""
    x0, prompts, t = val
    a = parts.alphas_cumprod[t]
    snr = a / (1 - a)
    err = ((latents_for(parts, h, vectors, prompts) - x0) ** 2).mean(dim=(1, 2, 3))
    return float((torch.clamp(snr, max=GAMMA) * err).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", default="5e-3")
    args = ap.parse_args()
    torch.manual_seed(0)
    parts = tm.make_parts("sd1")
    h = make_model(parts)
    vocabs = {e.key: e for e in parts.prompt_encoder.encoders}
    hidden = create_embedding(CreateArgs(NAME, 2, "random", seed=11), vocabs).embedding
    init = create_embedding(CreateArgs(NAME, 2, "text", "a painting of a dog"), vocabs).embedding
    prompts = [t.format(NAME) for t in TEMPLATES]
    latents = latents_for(parts, h, hidden.vectors, prompts)
    gen = torch.Generator().manual_seed(2)
    val_idx = torch.arange(len(prompts)).repeat(4)
    val = (
        latents[val_idx],
        [prompts[i] for i in val_idx],
        torch.randint(0, 1000, (len(val_idx),), generator=gen),
    )
    other = create_embedding(CreateArgs(NAME, 2, "random", seed=99), vocabs).embedding
    zeros = {k: torch.zeros_like(v) for k, v in hidden.vectors.items()}
    l_hidden, l_init = val_loss(parts, h, hidden.vectors, val), val_loss(parts, h, init.vectors, val)
    spread = float(latents.std(dim=0).mean())
    print(
        f"conditioning dependence (validation loss): hidden {l_hidden:.4f}, init text {l_init:.4f}, "
        f"other random {val_loss(parts, h, other.vectors, val):.4f}, zeros {val_loss(parts, h, zeros, val):.4f}; "
        f"latent std across the 8 prompts {spread:.3f}"
    )
    results = {}
    for label, norm in (("norm", "soft"), ("no_norm", "off")):
        t0 = time.perf_counter()
        targs = TrainArgs(
            steps=args.steps,
            batch_size=4,
            lr=args.lr,
            validation_every=0,
            norm_control=norm,
            min_snr_gamma=GAMMA,
            seed=3,
        )
        res = Trainer(parts, PromptLatentDataset(latents, prompts), init, targs).run()
        learned = res.embedding.vectors
        l_learned = val_loss(parts, h, learned, val)
        recovered = (l_init - l_learned) / (l_init - l_hidden)
        cos = float(
            torch.nn.functional.cosine_similarity(learned["clip_l"], hidden.vectors["clip_l"], dim=1).mean()
        )
        print(
            f"{label}: L_init {l_init:.4f} L_learned {l_learned:.4f} L_hidden {l_hidden:.4f} "
            f"recovered {recovered:.3f} cos {cos:.3f} "
            f"norms {[round(x, 3) for x in learned['clip_l'].norm(dim=1).tolist()]} "
            f"(hidden {[round(x, 3) for x in hidden.vectors['clip_l'].norm(dim=1).tolist()]}) "
            f"{time.perf_counter() - t0:.0f} s"
        )
        results[label] = (recovered, cos)
    r, c = results["norm"]
    rn, cn = results["no_norm"]
    print(f"recovery: recovered={r:.2f} cos={c:.2f} recovered_no_norm={rn:.2f} cos_no_norm={cn:.2f}")


if __name__ == "__main__":
    main()

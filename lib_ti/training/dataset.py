"""The training data of a run: its settings, the images with their cached latents, and batches.

The trainer asks a dataset for a data order per epoch (:meth:`Dataset.epoch_order`) and for batches
(:meth:`Dataset.make_batch`); both depend only on the random generators passed in, so a resumed run
replays the same data.

SDXL size conditioning (``Batch.time_ids``): original size = the image's size before resizing (after
EXIF orientation), crop = (top, left) of the bucket window in the resized image (mirrored for a
flipped sample), target size = the bucket.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lib_ti.parts import LatentDist
from lib_ti.training.buckets import BUCKET_STEP, MAX_BUCKET, MIN_BUCKET, Size
from lib_ti.training.captions import fill_template, process_tags
from lib_ti.training.errors import DataError
from lib_ti.training.options import LatentSampling


@dataclass
class DataArgs:
    folder: str
    #: the embedding name that replaces [name]
    name: str
    #: template lines (load_template reads a file)
    templates: list[str]
    #: bucket area = resolution**2 (SD1 512, SD2 768, SDXL 1024)
    resolution: int = 512
    bucket_step: int = BUCKET_STEP
    min_bucket: int = MIN_BUCKET
    max_bucket: int = MAX_BUCKET
    #: False: every image resized and cropped to resolution x resolution
    buckets: bool = True
    flip: bool = False
    #: the alpha channel weights the loss (mean 1 per image; all ones without alpha)
    alpha_weight: bool = False
    repeats: int = 1
    shuffle_tags: bool = False
    #: with shuffle or dropout, the first K tags stay in place and are never dropped
    keep_tags: int = 0
    tag_dropout: float = 0.0
    latent_sampling: LatentSampling = "deterministic"
    caption_extension: str = ".txt"
    filename_word_regex: str = ""
    filename_join: str = " "
    cache_dir: str | None = None
    #: identifies the checkpoint and VAE in the disk cache key (no disk cache without it)
    model_hash: str = ""
    vae_batch_size: int = 4
    #: the crop window is drawn once per image (from seed and path), as latents are cached
    random_crop: bool = False
    seed: int = 0


@dataclass
class Item:
    """One image with its cached latents."""

    path: str
    filewords: str
    size: Size  # original (height, width)
    bucket: Size  # (height, width) in pixels
    crop: Size  # (top, left) in the resized image
    latents: LatentDist  # [C, h, w] on the CPU
    latents_flipped: LatentDist | None
    weight: torch.Tensor | None  # [1, h, w] loss weight
    resized: Size = (0, 0)  # (height, width) after the cover resize, before the crop

    @property
    def flipped_crop(self) -> Size:
        """(top, left) of the window in the mirrored image."""
        rw = self.resized[1] or self.bucket[1] + 2 * self.crop[1]  # unknown: assume a centred crop
        return self.crop[0], rw - self.bucket[1] - self.crop[1]

    def time_ids(self, flipped: bool = False) -> list[int]:
        """SDXL size conditioning: original height, width, crop top, left, target height, width."""
        top, left = self.flipped_crop if flipped else self.crop
        return [*self.size, top, left, *self.bucket]


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, h, w]
    prompts: list[str]
    time_ids: torch.Tensor  # [B, 6]: original h, w, crop top, left, target h, w
    weight: torch.Tensor | None  # [B, 1, h, w]
    indices: list[int]


class TrainingData(Protocol):
    """What the trainer needs from a dataset (:class:`Dataset`, or an in-memory one in a benchmark)."""

    @property
    def items(self) -> Sequence[Item]: ...

    def __len__(self) -> int: ...

    def prompt(self, item: Item, rng: random.Random) -> str: ...

    def epoch_order(self, batch_size: int, rng: random.Random) -> list[list[int]]: ...

    def make_batch(self, indices: list[int], rng: random.Random, gen: torch.Generator) -> Batch: ...


class Dataset:
    """The images of a run with their latents; builds batches and the per-epoch data order."""

    def __init__(self, items: Sequence[Item], args: DataArgs, skipped: Sequence[str] = ()) -> None:
        self.items = list(items)
        self.args = args
        self.skipped = list(skipped)
        self.templates = [t.strip() for t in args.templates if t.strip()]
        if not self.templates:
            msg = "no prompt template lines"
            raise DataError(msg)

    def __len__(self) -> int:
        return len(self.items) * self.args.repeats

    def bucket_sizes(self) -> dict[Size, int]:
        """Images per bucket (repeats not counted), sorted by bucket."""
        return dict(sorted(Counter(it.bucket for it in self.items).items()))

    def describe(self) -> str:
        buckets = ", ".join(f"{w}x{h}: {n}" for (h, w), n in self.bucket_sizes().items())
        text = f"{len(self.items)} images x {self.args.repeats} repeats; buckets (width x height) {buckets}"
        return text + (f"; {len(self.skipped)} files skipped" if self.skipped else "")

    def prompt(self, item: Item, rng: random.Random) -> str:
        """A random template line with the item's (shuffled / dropped-out) tags and the name."""
        a = self.args
        words = process_tags(
            item.filewords, rng, shuffle=a.shuffle_tags, keep=a.keep_tags, dropout=a.tag_dropout
        )
        return fill_template(rng.choice(self.templates), a.name, words)

    def epoch_order(self, batch_size: int, rng: random.Random) -> list[list[int]]:
        """One epoch: every item ``repeats`` times, in batches of one bucket each (the last batch of a
        bucket may be smaller), bucket contents and batch order shuffled."""
        if batch_size < 1:
            msg = f"batch size must be at least 1, not {batch_size}"
            raise ValueError(msg)
        by_bucket: dict[Size, list[int]] = {}
        for i, it in enumerate(self.items):
            by_bucket.setdefault(it.bucket, []).append(i)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            pool = by_bucket[bucket] * self.args.repeats
            rng.shuffle(pool)
            batches.extend(pool[k : k + batch_size] for k in range(0, len(pool), batch_size))
        rng.shuffle(batches)
        return batches

    def make_batch(self, indices: list[int], rng: random.Random, gen: torch.Generator) -> Batch:
        """Latents (flip chosen, sampled per ``latent_sampling``), prompts, SDXL time ids and loss
        weights of ``indices`` (one bucket). Deterministic given the states of ``rng`` and ``gen``."""
        if not indices:
            msg = "a batch needs at least one index"
            raise ValueError(msg)
        items = [self.items[i] for i in indices]
        if len({it.bucket for it in items}) != 1:
            msg = f"batch {indices} mixes buckets {sorted({it.bucket for it in items})}"
            raise ValueError(msg)
        sample = self.args.latent_sampling == "random"
        latents, prompts, time_ids, weights = [], [], [], []
        for it in items:
            flipped = self.args.flip and it.latents_flipped is not None and rng.random() < 0.5
            dist = it.latents_flipped if flipped and it.latents_flipped is not None else it.latents
            x = dist.mean
            if sample and dist.std is not None:
                noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=torch.float32)
                x = x + dist.std * noise.to(x.device)
            latents.append(x)
            prompts.append(self.prompt(it, rng))
            time_ids.append(it.time_ids(flipped))
            if it.weight is not None:
                weights.append(it.weight.flip(-1) if flipped else it.weight)
        weight = torch.stack(weights) if len(weights) == len(items) else None
        return Batch(
            latents=torch.stack(latents),
            prompts=prompts,
            time_ids=torch.tensor(time_ids, dtype=torch.float32),
            weight=weight,
            indices=list(indices),
        )

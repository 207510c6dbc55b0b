"""The fixed validation samples of a run: the same latents, noise, timesteps and prompts at every
validation, so the validation losses of a run (and of its resumed part) compare."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib_ti.training.dataset import TrainingData
from lib_ti.training.streams import random_stream, stream


@dataclass(frozen=True)
class ValidationSample:
    latent: torch.Tensor  # [C, h, w], the latent mean
    noise: torch.Tensor  # [C, h, w]
    t: int
    prompt: str
    time_ids: torch.Tensor  # [6], as Batch.time_ids


def validation_samples(
    data: TrainingData, count: int, seed: int, min_t: int, max_t: int
) -> list[ValidationSample]:
    """``count`` samples of random images (repeats allowed), timesteps spread evenly over min_t..max_t."""
    if count <= 0:
        return []
    pick = random_stream(seed, "validation_pick")
    indices = [pick.randrange(len(data.items)) for _ in range(count)]
    out = []
    for j, index in enumerate(indices):
        item = data.items[index]
        latent = item.latents.mean.float()
        frac = (j + 0.5) / count  # evenly spread timesteps so the figure covers the whole range
        out.append(
            ValidationSample(
                latent=latent,
                noise=torch.randn(latent.shape, generator=stream(seed, "validation_noise", j)),
                t=int(min_t + frac * (max_t - min_t)),
                prompt=data.prompt(item, random_stream(seed, "validation_prompt", j)),
                time_ids=torch.tensor(item.time_ids(), dtype=torch.float32),
            )
        )
    return out

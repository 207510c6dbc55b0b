"""Loading the training data: check the settings, scan the folder, caption and bucket every image,
encode it once per bucket batch through the model's image encoder and keep the latents (mean and std)
on the CPU, optionally also in the disk cache (:mod:`lib_ti.training.latent_cache`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lib_ti.parts import EncodeImageFn, LatentDist
from lib_ti.training.buckets import Placement, Size, bucket_set, make_buckets, nearest_bucket, place
from lib_ti.training.captions import FILEWORDS, NAME, read_caption
from lib_ti.training.dataset import DataArgs, Dataset, Item
from lib_ti.training.errors import DataError
from lib_ti.training.images import check_folder, decode_window, find_images, skip_reason
from lib_ti.training.latent_cache import CacheSlot, Encoded, LatentCache
from lib_ti.training.streams import random_stream

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
_CPU = torch.device("cpu")


@dataclass
class _Plan:
    """An image to load: its place in the dataset, its bucket window, caption and cache slot."""

    index: int
    path: str
    placement: Placement
    filewords: str
    slot: CacheSlot | None = None


def check_args(args: DataArgs, vae_scale: int = 8) -> list[str]:
    """Problems with the settings, as sentences for the user (empty: fine)."""
    problems = []
    if not args.name.strip():
        problems.append("the embedding name is empty")
    lines = [t for t in args.templates if t.strip()]
    if not lines:
        problems.append("there are no prompt template lines")
    elif not any(NAME in t for t in lines):
        problems.append(f"no prompt template line contains {NAME}")
    geometry = len(problems)
    if args.bucket_step < 1 or args.bucket_step % vae_scale:
        problems.append(f"the bucket step must be a positive multiple of {vae_scale}, not {args.bucket_step}")
    if args.resolution < max(args.bucket_step, vae_scale) or args.resolution % vae_scale:
        problems.append(f"the resolution must be a multiple of {vae_scale} of at least {args.bucket_step}")
    if args.buckets and len(problems) == geometry:
        try:
            make_buckets(args.resolution, args.bucket_step, args.min_bucket, args.max_bucket)
        except ValueError as e:
            problems.append(f"bucket sizes: {e}")
    if args.repeats < 1:
        problems.append("repeats must be at least 1")
    if args.keep_tags < 0:
        problems.append("the number of kept tags cannot be negative")
    if not 0.0 <= args.tag_dropout < 1.0:
        problems.append("tag dropout must be at least 0 and below 1")
    if args.latent_sampling not in ("deterministic", "random"):
        problems.append(f"latent sampling must be deterministic or random, not {args.latent_sampling!r}")
    if args.vae_batch_size < 1:
        problems.append("the VAE batch size must be at least 1")
    if not args.caption_extension.startswith(".") or len(args.caption_extension) < 2:
        problems.append(f"the caption extension must look like .txt, not {args.caption_extension!r}")
    if args.filename_word_regex:
        try:
            re.compile(args.filename_word_regex)
        except re.error as e:
            problems.append(f"the file-name word regex {args.filename_word_regex!r} is invalid ({e})")
    return problems


def load_dataset(
    args: DataArgs,
    encode_image: EncodeImageFn,
    *,
    device: torch.device | str = _CPU,
    dtype: torch.dtype = torch.float32,
    vae_scale: int = 8,
    progress: Progress | None = None,
) -> Dataset:
    """Scan, caption, bucket and encode the images of ``args.folder``.

    Settings, the folder and the image headers are checked before ``encode_image`` is first called.
    ``progress(done, total)`` is called after each encode batch (it may raise to cancel).
    """
    problems = check_args(args, vae_scale)
    if problems:
        raise DataError("; ".join(problems))
    folder = check_folder(args.folder)
    found, skipped = find_images(folder)
    for s in skipped:
        logger.warning("skipped %s", s)
    if not found:
        msg = (
            f"no readable images in {folder} (png, jpg or webp, sub-folders included){_list_skipped(skipped)}"
        )
        raise DataError(msg)

    buckets = bucket_set(args.resolution, args.buckets, args.bucket_step, args.min_bucket, args.max_bucket)
    word_re = re.compile(args.filename_word_regex) if args.filename_word_regex else None
    cache = None
    if args.cache_dir:
        if args.model_hash:
            cache = LatentCache(args.cache_dir, args.model_hash, args.flip, vae_scale)
        else:
            logger.warning("no model hash given: the latent disk cache is not used")
    plans: list[_Plan] = []
    for path, size in found:
        rng = random_stream(args.seed, "crop", os.path.relpath(path, folder)) if args.random_crop else None
        plan = _Plan(
            len(plans),
            path,
            place(size, nearest_bucket(size, buckets), rng),
            read_caption(path, args.caption_extension, word_re, args.filename_join),
        )
        if cache is not None:
            try:
                plan.slot = cache.slot(path, plan.placement)
            except OSError as e:
                skipped.append(f"{path}: {skip_reason(e)}")
                logger.warning("skipped %s", skipped[-1])
                continue
        plans.append(plan)
    _log_upscaled(plans)
    if not any(FILEWORDS in t for t in args.templates):
        logger.info("the templates have no %s: captions are not used", FILEWORDS)

    items: dict[int, Item] = {}
    by_bucket: dict[Size, list[_Plan]] = {}
    for plan in plans:
        by_bucket.setdefault(plan.placement.bucket, []).append(plan)
    total, done = len(plans), 0
    if progress is not None:
        progress(0, total)
    device = torch.device(device)
    for bucket in sorted(by_bucket):
        latent_size = (bucket[0] // vae_scale, bucket[1] // vae_scale)
        group = by_bucket[bucket]
        for start in range(0, len(group), args.vae_batch_size):
            chunk = group[start : start + args.vae_batch_size]
            todo: list[tuple[_Plan, np.ndarray, np.ndarray | None]] = []
            for plan in chunk:
                enc = cache.load(plan.slot, latent_size) if cache is not None else None
                if enc is not None:
                    _add_item(items, skipped, plan, enc, args)
                    continue
                try:
                    pixels, alpha = decode_window(plan.path, plan.placement, latent_size)
                except Exception as e:
                    skipped.append(f"{plan.path}: {skip_reason(e)}")
                    logger.warning("skipped %s", skipped[-1])
                    continue
                if args.alpha_weight and alpha is not None and not alpha.any():
                    skipped.append(f"{plan.path}: fully transparent (its alpha is 0 everywhere)")
                    logger.warning("skipped %s", skipped[-1])
                    continue
                todo.append((plan, pixels, alpha))
            if todo:
                for plan, enc in _encode(todo, encode_image, device, dtype, latent_size, args.flip):
                    if cache is not None:
                        cache.save(plan.slot, enc)
                    _add_item(items, skipped, plan, enc, args)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    if not items:
        msg = f"no readable images in {folder}{_list_skipped(skipped)}"
        raise DataError(msg)
    dataset = Dataset([items[i] for i in sorted(items)], args, skipped)
    logger.info(
        "training data: %s%s",
        dataset.describe(),
        f" ({cache.hits} latents from the disk cache)" if cache else "",
    )
    return dataset


def _list_skipped(skipped: list[str], n: int = 5) -> str:
    if not skipped:
        return ""
    return (
        "; skipped: " + "; ".join(skipped[:n]) + (f" and {len(skipped) - n} more" if len(skipped) > n else "")
    )


def _log_upscaled(plans: list[_Plan]) -> None:
    up = [p for p in plans if p.placement.upscale > 1.0 + 1e-6]
    if up:
        worst = max(up, key=lambda p: p.placement.upscale)
        logger.info(
            "%d images are smaller than their bucket and are upscaled (most: %s, x%.1f)",
            len(up),
            worst.path,
            worst.placement.upscale,
        )


def _encode(
    todo: list[tuple[_Plan, np.ndarray, np.ndarray | None]],
    encode_image: EncodeImageFn,
    device: torch.device,
    dtype: torch.dtype,
    latent_size: Size,
    flip: bool,
) -> list[tuple[_Plan, Encoded]]:
    pixels = torch.from_numpy(np.stack([t[1] for t in todo])).permute(0, 3, 1, 2)
    label = todo[0][0].path if len(todo) == 1 else f"{todo[0][0].path} and {len(todo) - 1} more"
    mean, std = _run_encoder(encode_image, pixels, device, dtype, latent_size, label)
    mean_f = std_f = None
    if flip:
        mean_f, std_f = _run_encoder(encode_image, pixels.flip(-1), device, dtype, latent_size, label)
    out = []
    for k, (plan, _, alpha) in enumerate(todo):
        out.append(
            (
                plan,
                Encoded(
                    mean[k].clone(),
                    None if std is None else std[k].clone(),
                    None if mean_f is None else mean_f[k].clone(),
                    None if std_f is None else std_f[k].clone(),
                    None if alpha is None else torch.from_numpy(alpha.copy())[None],
                ),
            )
        )
    return out


def _run_encoder(
    encode_image: EncodeImageFn,
    pixels: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    latent_size: Size,
    label: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 [B, 3, H, W] -> (mean, std) float32 on the CPU, checked."""
    with torch.no_grad():
        x = pixels.to(device).float().div_(127.5).sub_(1.0).to(dtype)
        dist = encode_image(x)
        mean = dist.mean.detach().float().cpu()
        std = None if dist.std is None else dist.std.detach().float().cpu()
    b = pixels.shape[0]
    if mean.dim() != 4 or mean.shape[0] != b or tuple(mean.shape[2:]) != latent_size:
        msg = (
            f"the image encoder returned latents of shape {list(mean.shape)} for {b} images of "
            f"{pixels.shape[2]}x{pixels.shape[3]} pixels; expected [{b}, C, {latent_size[0]}, {latent_size[1]}]"
        )
        raise DataError(msg)
    if std is not None:
        std = std.expand_as(mean).contiguous()
    if not torch.isfinite(mean).all() or (std is not None and not torch.isfinite(std).all()):
        msg = (
            f"the VAE produced NaN or infinite latents for {label}; the SDXL VAE needs float32 "
            "(or the fp16-fix VAE) to encode images"
        )
        raise DataError(msg)
    return mean, std


def _add_item(items: dict[int, Item], skipped: list[str], plan: _Plan, enc: Encoded, args: DataArgs) -> None:
    random_sampling = args.latent_sampling == "random"
    weight = None
    if args.alpha_weight:
        alpha = enc.alpha
        if alpha is None:
            weight = torch.ones(1, *enc.mean.shape[1:])
        else:
            m = float(alpha.mean())
            if m <= 0 or not math.isfinite(m):
                skipped.append(f"{plan.path}: fully transparent (its alpha is 0 everywhere)")
                logger.warning("skipped %s", skipped[-1])
                return
            weight = alpha / m
    pl = plan.placement
    flipped = None
    if args.flip and enc.mean_flipped is not None:
        flipped = LatentDist(enc.mean_flipped, enc.std_flipped if random_sampling else None)
    items[plan.index] = Item(
        path=plan.path,
        filewords=plan.filewords,
        size=pl.size,
        bucket=pl.bucket,
        crop=pl.crop,
        latents=LatentDist(enc.mean, enc.std if random_sampling else None),
        latents_flipped=flipped,
        weight=weight,
        resized=pl.resized,
    )

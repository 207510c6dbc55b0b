"""Training data: images, captions, prompt templates, aspect buckets and the cached latents.

:func:`load_dataset` scans a folder (sub-folders too), fits every image to an aspect bucket
(:mod:`lib_ti.training.buckets`), encodes it once per bucket batch through the model's image encoder and keeps
the latents (mean and std) on the CPU, optionally also in a disk cache. The trainer then asks the
:class:`Dataset` for a data order per epoch (:meth:`Dataset.epoch_order`) and for batches
(:meth:`Dataset.make_batch`); both depend only on the random generators passed in, so a resumed run
replays the same data.

Captions follow AUTOMATIC1111: ``[filewords]`` is the text of the image's sidecar caption file, or else
its file name with leading numbers and dashes removed, optionally reduced to the matches of a word
regex joined by a join string. Templates hold one prompt per line with ``[name]`` and ``[filewords]``.

SDXL size conditioning (``Batch.time_ids``): original size = the image's size before resizing (after
EXIF orientation), crop = (top, left) of the bucket window in the resized image (mirrored for a
flipped sample), target size = the bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lib_ti.errors import TIError
from lib_ti.io.atomic import atomic_write_bytes
from lib_ti.io.safetensors_io import load_bytes, save_bytes
from lib_ti.parts import EncodeImageFn, LatentDist
from lib_ti.training.buckets import Placement, Size, make_buckets, nearest_bucket, place
from lib_ti.training.options import LatentSampling

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
#: image types users may have in a folder that are not read (named in the skipped list)
_OTHER_IMAGE_EXTENSIONS = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jp2")
_FORMATS = {"PNG", "JPEG", "MPO", "WEBP"}
NAME = "[name]"
FILEWORDS = "[filewords]"
TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")  # A1111's re_numbers_at_start
_CACHE_VERSION = 1
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

Progress = Callable[[int, int], None]
_CPU = torch.device("cpu")


class DataError(TIError, ValueError):
    """The training data or its settings cannot be used."""


class TemplateError(DataError):
    """A prompt template file is missing or has no ``[name]``."""


@dataclass
class DataArgs:
    folder: str
    #: the embedding name that replaces [name]
    name: str
    #: template lines (load_template reads a file)
    templates: list[str]
    #: bucket area = resolution**2 (SD1 512, SD2 768, SDXL 1024)
    resolution: int = 512
    bucket_step: int = 64
    min_bucket: int = 256
    max_bucket: int = 2048
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


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, h, w]
    prompts: list[str]
    time_ids: torch.Tensor  # [B, 6]: original h, w, crop top, left, target h, w
    weight: torch.Tensor | None  # [B, 1, h, w]
    indices: list[int]


# ---------------------------------------------------------------------------- templates and captions


def load_template(path: str | os.PathLike[str]) -> list[str]:
    """The non-empty lines of a template file; at least one must contain ``[name]``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        msg = f"the prompt template file {p} does not exist"
        raise TemplateError(msg) from None
    except (OSError, UnicodeDecodeError) as e:
        msg = f"the prompt template file {p} cannot be read ({e})"
        raise TemplateError(msg) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not any(NAME in line for line in lines):
        msg = f"the prompt template file {p} has no line with {NAME}: the prompts would not contain the embedding"
        raise TemplateError(msg)
    missing = sum(NAME not in line for line in lines)
    if missing:
        logger.warning(
            "%d of the %d lines of %s have no %s; they do not train the embedding",
            missing,
            len(lines),
            p,
            NAME,
        )
    return lines


def builtin_templates() -> dict[str, Path]:
    """The template files shipped in ``templates/``, by stem (subject, style, ...)."""
    return {p.stem: p for p in sorted(TEMPLATES_DIR.glob("*.txt"))}


def filename_caption(path: str, word_regex: re.Pattern[str] | None = None, join: str = " ") -> str:
    """A1111's ``[filewords]`` from a file name: the stem without leading numbers and dashes, then
    optionally only the regex matches joined by ``join``."""
    text = _NUMBERS_AT_START.sub("", Path(path).stem)
    if word_regex is not None:
        words = word_regex.findall(text)
        text = (join or "").join(w if isinstance(w, str) else "".join(w) for w in words)
    return text


def read_caption(
    path: str, extension: str = ".txt", word_regex: re.Pattern[str] | None = None, join: str = " "
) -> str:
    """The sidecar caption ``<image stem><extension>`` if it exists, else the file-name caption."""
    p = Path(path)
    sidecar = p.with_name(p.stem + extension)
    if sidecar.is_file():
        try:
            lines = [
                line.strip()
                for line in sidecar.read_text(encoding="utf-8-sig", errors="replace").splitlines()
            ]
            return " ".join(line for line in lines if line)
        except OSError as e:
            logger.warning("caption file %s cannot be read (%s); using the file name", sidecar, e)
    return filename_caption(path, word_regex, join)


def process_tags(
    text: str, rng: random.Random, *, shuffle: bool = False, keep: int = 0, dropout: float = 0.0
) -> str:
    """Comma-separated tags with the first ``keep`` fixed and the rest dropped (each with probability
    ``dropout``) and shuffled. Returns ``text`` unchanged when neither is asked for."""
    if not shuffle and dropout <= 0:
        return text
    tags = [t.strip() for t in text.split(",")]
    tags = [t for t in tags if t]
    fixed, rest = tags[:keep], tags[keep:]
    if dropout > 0:
        rest = [t for t in rest if rng.random() >= dropout]
    if shuffle:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)


def fill_template(template: str, name: str, filewords: str) -> str:
    """Substitute ``[filewords]`` then ``[name]`` (A1111's order); tidy the commas an empty caption leaves."""
    text = template.replace(FILEWORDS, filewords)
    if not filewords.strip() and FILEWORDS in template:
        text = re.sub(r"\s+,", ",", text)
        text = re.sub(r",(\s*,)+", ",", text).strip(" ,")
    return text.replace(NAME, name)


# ---------------------------------------------------------------------------- scanning and decoding


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF: ignore it, as image viewers do
        return 1


def _probe(path: str) -> Size:
    """(height, width) as displayed (EXIF orientation applied), from the header only."""
    with Image.open(path) as im:
        if im.format not in _FORMATS:
            msg = f"unsupported image format {im.format}"
            raise ValueError(msg)
        w, h = im.size
        if _orientation(im) in (5, 6, 7, 8):
            w, h = h, w
    if w < 1 or h < 1:
        msg = f"empty image ({w}x{h})"
        raise ValueError(msg)
    return h, w


def _reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image file"
    text = str(e) or type(e).__name__
    return text if isinstance(e, ValueError) else f"unreadable ({type(e).__name__}: {text})"


def _scan(folder: str) -> tuple[list[tuple[str, Size]], list[str]]:
    found: list[tuple[str, Size]] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = str(Path(root, name))
            ext = Path(name).suffix.lower()
            if ext in _OTHER_IMAGE_EXTENSIONS:
                skipped.append(f"{path}: {ext[1:]} images are not read (use png, jpg or webp)")
            elif ext in IMAGE_EXTENSIONS:
                try:
                    found.append((path, _probe(path)))
                except Exception as e:
                    skipped.append(f"{path}: {_reason(e)}")
    found.sort(key=lambda f: f[0])
    return found, skipped


def _check_folder(folder: str) -> str:
    folder = folder.strip()
    if not folder:
        msg = "no training image folder was given"
        raise DataError(msg)
    if not Path(folder).is_dir():
        what = "is not a folder" if Path(folder).exists() else "does not exist"
        msg = f"the training image folder {folder} {what}"
        raise DataError(msg)
    return folder


def scan_images(folder: str) -> tuple[list[str], list[str]]:
    """Image files under ``folder`` (sub-folders too, hidden ones left out), sorted, whose header
    reads as png, jpeg or webp; and the skipped files as ``"path: reason"``."""
    found, skipped = _scan(_check_folder(folder))
    return [p for p, _ in found], skipped


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grey images (png opens them as mode I) scaled to 8 bits; Pillow's convert would clip them."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im).astype(np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return im


def _decode(path: str, pl: Placement, latent_size: Size) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB pixels of the bucket window [H, W, 3] uint8 and, when the image has transparency, its
    alpha averaged to latent size [h, w] float32 in [0, 1]."""
    with Image.open(path) as im:
        im.load()
        transpose = _TRANSPOSE.get(_orientation(im))
        img = im.transpose(transpose) if transpose is not None else im.copy()
    if (img.height, img.width) != pl.size:
        msg = f"size changed since the scan ({img.height}x{img.width}, was {pl.size[0]}x{pl.size[1]})"
        raise ValueError(msg)
    img = _to_8bit(img)
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        rgb, alpha = rgba.convert("RGB"), rgba.getchannel("A")
    else:
        rgb, alpha = img.convert("RGB"), None
    (rh, rw), (top, left), (bh, bw) = pl.resized, pl.crop, pl.bucket
    box = (left, top, left + bw, top + bh)

    def fit(channel: Image.Image) -> Image.Image:
        if channel.size != (rw, rh):
            channel = channel.resize((rw, rh), Image.Resampling.LANCZOS)
        return channel.crop(box)

    pixels = np.asarray(fit(rgb), dtype=np.uint8)
    weight = None
    if alpha is not None:
        small = fit(alpha).resize((latent_size[1], latent_size[0]), Image.Resampling.BOX)
        weight = np.asarray(small, dtype=np.float32) / 255.0
    return pixels, weight


# ---------------------------------------------------------------------------- disk cache


@dataclass
class _Plan:
    index: int
    path: str
    placement: Placement
    filewords: str
    cache_file: Path | None = None
    cache_key: str = ""


@dataclass
class _Encoded:
    mean: torch.Tensor
    std: torch.Tensor | None
    mean_flipped: torch.Tensor | None
    std_flipped: torch.Tensor | None
    alpha: torch.Tensor | None  # [1, h, w] in [0, 1], None: the image has no transparency


class _DiskCache:
    """One safetensors file per image, named by a hash of everything the latents depend on."""

    def __init__(self, folder: str, model_hash: str, flip: bool, vae_scale: int) -> None:
        self.folder = Path(folder)
        self.model_hash = model_hash
        self.flip = flip
        self.vae_scale = vae_scale
        self.enabled = True
        self.hits = 0

    def attach(self, plan: _Plan) -> None:
        st = Path(plan.path).stat()
        pl = plan.placement
        plan.cache_key = json.dumps(
            {
                "v": _CACHE_VERSION,
                "model": self.model_hash,
                "bucket": pl.bucket,
                "flip": self.flip,
                "path": str(Path(plan.path).absolute()),
                "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "size": pl.size,
                "resized": pl.resized,
                "crop": pl.crop,
                "vae_scale": self.vae_scale,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(plan.cache_key.encode()).hexdigest()[:24]
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(plan.path).stem)[:40]
        bh, bw = pl.bucket
        plan.cache_file = self.folder / f"{slug}-{bh}x{bw}-{digest}.safetensors"

    def load(self, plan: _Plan, latent_size: Size) -> _Encoded | None:
        if not self.enabled or plan.cache_file is None or not plan.cache_file.is_file():
            return None
        try:
            tensors, meta = load_bytes(plan.cache_file.read_bytes(), str(plan.cache_file))
            if meta.get("key") != plan.cache_key:
                msg = "made for another image or model"
                raise ValueError(msg)
            enc = _Encoded(
                tensors["mean"].float(),
                _opt(tensors, "std"),
                _opt(tensors, "mean_flipped"),
                _opt(tensors, "std_flipped"),
                _opt(tensors, "alpha"),
            )
            _check_cached(enc, latent_size, self.flip)
        except Exception as e:
            logger.warning(
                "latent cache file %s is unusable (%s); encoding the image again", plan.cache_file, e
            )
            return None
        self.hits += 1
        return enc

    def save(self, plan: _Plan, enc: _Encoded) -> None:
        if not self.enabled or plan.cache_file is None:
            return
        tensors = {"mean": enc.mean}
        for key in ("std", "mean_flipped", "std_flipped", "alpha"):
            value = getattr(enc, key)
            if value is not None:
                tensors[key] = value
        meta = {"format": "sd-webui-ti latent cache", "key": plan.cache_key}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(plan.cache_file, save_bytes(tensors, meta))
        except OSError as e:
            logger.warning("cannot write the latent cache in %s (%s); continuing without it", self.folder, e)
            self.enabled = False


def _opt(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    value = tensors.get(key)
    return None if value is None else value.float()


def _check_cached(enc: _Encoded, latent_size: Size, flip: bool) -> None:
    if enc.mean.dim() != 3 or tuple(enc.mean.shape[1:]) != latent_size:
        msg = f"latents of shape {list(enc.mean.shape)}, expected [C, {latent_size[0]}, {latent_size[1]}]"
        raise ValueError(msg)
    for key in ("std", "mean_flipped", "std_flipped"):
        value = getattr(enc, key)
        if value is not None and value.shape != enc.mean.shape:
            msg = f"{key} has shape {list(value.shape)}, not {list(enc.mean.shape)}"
            raise ValueError(msg)
    if flip and enc.mean_flipped is None:
        msg = "no flipped latents"
        raise ValueError(msg)
    if enc.alpha is not None and tuple(enc.alpha.shape) != (1, *latent_size):
        msg = f"alpha of shape {list(enc.alpha.shape)}"
        raise ValueError(msg)
    if not all(torch.isfinite(t).all() for t in (enc.mean, enc.std, enc.mean_flipped) if t is not None):
        msg = "non-finite values"
        raise ValueError(msg)


# ---------------------------------------------------------------------------- the dataset


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
            top, left = it.flipped_crop if flipped else it.crop
            time_ids.append([*it.size, top, left, *it.bucket])
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


# ---------------------------------------------------------------------------- loading


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
    folder = _check_folder(args.folder)
    found, skipped = _scan(folder)
    for s in skipped:
        logger.warning("skipped %s", s)
    if not found:
        msg = (
            f"no readable images in {folder} (png, jpg or webp, sub-folders included){_list_skipped(skipped)}"
        )
        raise DataError(msg)

    buckets = (
        make_buckets(args.resolution, args.bucket_step, args.min_bucket, args.max_bucket)
        if args.buckets
        else [(args.resolution, args.resolution)]
    )
    word_re = re.compile(args.filename_word_regex) if args.filename_word_regex else None
    cache = None
    if args.cache_dir:
        if args.model_hash:
            cache = _DiskCache(args.cache_dir, args.model_hash, args.flip, vae_scale)
        else:
            logger.warning("no model hash given: the latent disk cache is not used")
    plans = []
    for path, size in found:
        rng = random.Random(f"{args.seed}:{os.path.relpath(path, folder)}") if args.random_crop else None
        plan = _Plan(
            len(plans),
            path,
            place(size, nearest_bucket(size, buckets), rng),
            read_caption(path, args.caption_extension, word_re, args.filename_join),
        )
        if cache is not None:
            try:
                cache.attach(plan)
            except OSError as e:
                skipped.append(f"{path}: {_reason(e)}")
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
                enc = cache.load(plan, latent_size) if cache is not None else None
                if enc is not None:
                    _add_item(items, skipped, plan, enc, args)
                    continue
                try:
                    pixels, alpha = _decode(plan.path, plan.placement, latent_size)
                except Exception as e:
                    skipped.append(f"{plan.path}: {_reason(e)}")
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
                        cache.save(plan, enc)
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
) -> list[tuple[_Plan, _Encoded]]:
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
                _Encoded(
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


def _add_item(items: dict[int, Item], skipped: list[str], plan: _Plan, enc: _Encoded, args: DataArgs) -> None:
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

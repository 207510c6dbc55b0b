"""The disk latent cache: one safetensors file per image, named by a hash of everything its latents
depend on (model, bucket, flip, file path, size and modification time, crop, VAE scale)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_ti.io.atomic import atomic_write_bytes
from lib_ti.io.safetensors_io import load_bytes, save_bytes
from lib_ti.training.buckets import Placement, Size

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
_FORMAT = "sd-webui-ti latent cache"
_OPTIONAL = ("std", "mean_flipped", "std_flipped", "alpha")


@dataclass
class Encoded:
    """An image's latents as the encoder gave them (float32, CPU), before sampling settings apply."""

    mean: torch.Tensor
    std: torch.Tensor | None
    mean_flipped: torch.Tensor | None
    std_flipped: torch.Tensor | None
    alpha: torch.Tensor | None  # [1, h, w] in [0, 1], None: the image has no transparency


@dataclass(frozen=True)
class CacheSlot:
    """Where one image's latents are cached and the key the file must carry."""

    file: Path
    key: str


class LatentCache:
    """The cache folder; turns itself off (with a warning) when it cannot be written."""

    def __init__(self, folder: str, model_hash: str, flip: bool, vae_scale: int) -> None:
        self.folder = Path(folder)
        self.model_hash = model_hash
        self.flip = flip
        self.vae_scale = vae_scale
        self.enabled = True
        self.hits = 0

    def slot(self, path: str, pl: Placement) -> CacheSlot:
        """The cache file and key of the image at ``path`` placed as ``pl`` (raises OSError from stat)."""
        st = Path(path).stat()
        key = json.dumps(
            {
                "v": _CACHE_VERSION,
                "model": self.model_hash,
                "bucket": pl.bucket,
                "flip": self.flip,
                "path": str(Path(path).absolute()),
                "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "size": pl.size,
                "resized": pl.resized,
                "crop": pl.crop,
                "vae_scale": self.vae_scale,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:40]
        bh, bw = pl.bucket
        return CacheSlot(self.folder / f"{slug}-{bh}x{bw}-{digest}.safetensors", key)

    def load(self, slot: CacheSlot | None, latent_size: Size) -> Encoded | None:
        """The cached latents, or None when there are none or they are unusable (logged)."""
        if not self.enabled or slot is None or not slot.file.is_file():
            return None
        try:
            tensors, meta = load_bytes(slot.file.read_bytes(), str(slot.file))
            if meta.get("key") != slot.key:
                msg = "made for another image or model"
                raise ValueError(msg)
            enc = Encoded(
                tensors["mean"].float(),
                _opt(tensors, "std"),
                _opt(tensors, "mean_flipped"),
                _opt(tensors, "std_flipped"),
                _opt(tensors, "alpha"),
            )
            _check_cached(enc, latent_size, self.flip)
        except Exception as e:
            logger.warning("latent cache file %s is unusable (%s); encoding the image again", slot.file, e)
            return None
        self.hits += 1
        return enc

    def save(self, slot: CacheSlot | None, enc: Encoded) -> None:
        if not self.enabled or slot is None:
            return
        tensors = {"mean": enc.mean}
        for key in _OPTIONAL:
            value = getattr(enc, key)
            if value is not None:
                tensors[key] = value
        meta = {"format": _FORMAT, "key": slot.key}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(slot.file, save_bytes(tensors, meta))
        except OSError as e:
            logger.warning("cannot write the latent cache in %s (%s); continuing without it", self.folder, e)
            self.enabled = False


def _opt(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    value = tensors.get(key)
    return None if value is None else value.float()


def _check_cached(enc: Encoded, latent_size: Size, flip: bool) -> None:
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

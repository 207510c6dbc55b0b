"""Image files: scanning a folder, EXIF orientation, header probes and decoding a bucket window to arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lib_ti.training.buckets import Placement, Size
from lib_ti.training.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
#: image types users may have in a folder that are not read (named in the skipped list)
_OTHER_IMAGE_EXTENSIONS = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif", ".jxl", ".jp2")
_FORMATS = {"PNG", "JPEG", "MPO", "WEBP"}
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


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF: ignore it, as image viewers do
        return 1


def oriented(im: Image.Image) -> Image.Image:
    """A loaded copy of ``im`` as displayed: its EXIF orientation applied."""
    transpose = _TRANSPOSE.get(_orientation(im))
    return im.transpose(transpose) if transpose is not None else im.copy()


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


def skip_reason(e: Exception) -> str:
    """Why a file is skipped, for the user, from the error that reading it raised."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image file"
    text = str(e) or type(e).__name__
    return text if isinstance(e, ValueError) else f"unreadable ({type(e).__name__}: {text})"


#: the most files a training folder's walk looks at (a dataset is tens to thousands of images)
MAX_FILES = 100_000


def find_images(folder: str) -> tuple[list[tuple[str, Size]], list[str]]:
    """(path, displayed size) of the readable images under ``folder``, sorted by path, and the
    skipped files as ``"path: reason"``."""
    found: list[tuple[str, Size]] = []
    skipped: list[str] = []
    seen: set[str] = set()
    count = 0
    for root, dirs, files in os.walk(folder, followlinks=True):
        count += len(files)
        if count > MAX_FILES:
            msg = (
                f"{folder} holds more than {MAX_FILES} files (sub-folders included); "
                "choose the folder of your training images"
            )
            raise DataError(msg)
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
                    skipped.append(f"{path}: {skip_reason(e)}")
    found.sort(key=lambda f: f[0])
    return found, skipped


def check_folder(folder: str) -> str:
    """``folder`` stripped; raises :class:`DataError` unless it names an existing folder."""
    folder = folder.strip()
    if not folder:
        msg = "no training image folder was given"
        raise DataError(msg)
    try:
        is_dir, exists = Path(folder).is_dir(), Path(folder).exists()
    except (OSError, ValueError) as e:  # no permission, a name too long, a NUL
        msg = f"the training image folder {folder} cannot be used ({getattr(e, 'strerror', None) or e})"
        raise DataError(msg) from None
    if not is_dir:
        msg = f"the training image folder {folder} {'is not a folder' if exists else 'does not exist'}"
        raise DataError(msg)
    return folder


def scan_images(folder: str) -> tuple[list[str], list[str]]:
    """Image files under ``folder`` (sub-folders too, hidden ones left out), sorted, whose header
    reads as png, jpeg or webp; and the skipped files as ``"path: reason"``."""
    found, skipped = find_images(check_folder(folder))
    return [p for p, _ in found], skipped


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grey images (png opens them as mode I) scaled to 8 bits; Pillow's convert would clip them."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im).astype(np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return im


def decode_window(path: str, pl: Placement, latent_size: Size) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB pixels of the bucket window [H, W, 3] uint8 and, when the image has transparency, its
    alpha averaged to latent size [h, w] float32 in [0, 1]."""
    with Image.open(path) as im:
        im.load()
        img = oriented(im)
    if (img.height, img.width) != pl.size:
        msg = f"size changed since the scan ({img.height}x{img.width}, was {pl.size[0]}x{pl.size[1]})"
        raise ValueError(msg)
    img = to_8bit(img)
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

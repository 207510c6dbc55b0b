"""Fitting a picture to a training bucket: centre crop, focal-point crop, keep whole (pad), or tiles.

Every output is exactly a bucket's size, so the trainer never resizes a prepared image again (an
image of a bucket's size lands in that bucket and is used as it is).

The focal point (as A1111's old "auto focal point crop"): faces found by OpenCV's Haar cascade, which
every host ships, come first; without a face the point is the mean of where the edges are and of the
most detailed (highest-entropy) window.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from PIL import Image

from lib_ti.training.buckets import Size, place

logger = logging.getLogger(__name__)

CropMode = Literal["focal", "center", "pad", "tiles"]
#: an upscaler: (image, scale) -> a larger image (the host's; the size is then made exact with Lanczos)
Upscale = Callable[[Image.Image, float], Image.Image]
#: tiles: a picture more than this many times larger than its cover size is cut into tiles
TILE_FROM = 1.5
#: tiles: the picture is first brought down to this many times its cover size (never enlarged)
TILE_SCALE = 2.0
#: the side of the small copy the focal point is looked for on
_ANALYSIS_SIDE = 256
Box = tuple[int, int, int, int]  # top, left, height, width


def resize_to(img: Image.Image, size: Size, upscale: Upscale | None = None) -> Image.Image:
    """``img`` resized to ``size`` (height, width): Lanczos, after ``upscale`` when it grows."""
    h, w = size
    if (img.height, img.width) == (h, w):
        return img
    scale = max(h / img.height, w / img.width)
    if scale > 1 and upscale is not None:
        img = upscale(img, scale)
        if (img.height, img.width) == (h, w):
            return img
    return img.resize((w, h), Image.Resampling.LANCZOS)


def _window(center: float, window: int, length: int) -> int:
    """Start of a ``window`` on an axis of ``length`` centred on ``center`` as far as the edges allow."""
    return int(min(max(round(center - window / 2), 0), length - window))


class FaceFinder:
    """OpenCV's frontal-face Haar cascade, one per thread (a cascade is not safe to share); finds no
    face when OpenCV is missing."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.available: bool | None = None

    def _cascade(self) -> Any:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None and self.available is not False:
            try:
                import cv2

                cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")  # type: ignore[attr-defined]
                if cascade.empty():
                    msg = "the cascade file did not load"
                    raise OSError(msg)
                self.available = True
            except (ImportError, AttributeError, OSError) as e:
                logger.warning("no face detection (OpenCV: %s); focal crops use edges and detail only", e)
                self.available = False
                return None
            self._local.cascade = cascade
        return cascade

    def faces(self, grey: np.ndarray) -> list[Box]:
        """Faces in a grey uint8 image as (top, left, height, width), largest first."""
        cascade = self._cascade()
        if cascade is None:
            return []
        side = min(grey.shape)
        found = cascade.detectMultiScale(
            grey, scaleFactor=1.1, minNeighbors=5, minSize=(side // 12, side // 12)
        )
        boxes = [(int(y), int(x), int(h), int(w)) for x, y, w, h in found]
        return sorted(boxes, key=lambda b: -b[2] * b[3])


FACES = FaceFinder()


def _edges_point(grey: np.ndarray) -> tuple[float, float]:
    """The centroid of the strongest 5 % of the gradient magnitudes (y, x)."""
    g = grey.astype(np.float32)
    gy, gx = np.gradient(g)
    mag = np.hypot(gx, gy)
    cut = np.quantile(mag, 0.95)
    ys, xs = np.nonzero(mag >= max(cut, 1e-6))
    if len(ys) == 0:
        return grey.shape[0] / 2, grey.shape[1] / 2
    return float(ys.mean()), float(xs.mean())


def _entropy(patch: np.ndarray) -> float:
    counts = np.bincount(patch.ravel() >> 3, minlength=32).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _entropy_point(grey: np.ndarray, window: Size) -> tuple[float, float]:
    """The centre of the ``window``-sized crop with the most detail (grey-level entropy)."""
    h, w = grey.shape
    wh, ww = min(window[0], h), min(window[1], w)
    best, point = -1.0, (h / 2, w / 2)
    ys = np.linspace(0, h - wh, num=min(9, h - wh + 1)).round().astype(int)
    xs = np.linspace(0, w - ww, num=min(9, w - ww + 1)).round().astype(int)
    for y in ys:
        for x in xs:
            e = _entropy(grey[y : y + wh, x : x + ww])
            if e > best + 1e-9:
                best, point = e, (y + wh / 2, x + ww / 2)
    return point


def focal_window(img: Image.Image, window: Size, faces: FaceFinder = FACES) -> tuple[int, int]:
    """(top, left) of the ``window`` crop of ``img`` around its focal point: all faces when they fit in
    it (else the largest), without a face between the edges' centroid and the most detailed crop."""
    h, w = img.height, img.width
    wh, ww = window
    if (wh, ww) == (h, w):
        return 0, 0
    small = max(h, w) / _ANALYSIS_SIDE
    scale = small if small > 1 else 1.0
    sh, sw = max(2, round(h / scale)), max(2, round(w / scale))  # gradients need two rows and columns
    grey = np.asarray(img.convert("L").resize((sw, sh), Image.Resampling.BILINEAR), dtype=np.uint8)
    found = faces.faces(grey)
    if found:
        top = min(b[0] for b in found) * scale
        left = min(b[1] for b in found) * scale
        bottom = max(b[0] + b[2] for b in found) * scale
        right = max(b[1] + b[3] for b in found) * scale
        if bottom - top > wh or right - left > ww:
            y, x, bh, bw = (v * scale for v in found[0])
            top, left, bottom, right = y, x, y + bh, x + bw
        cy, cx = (top + bottom) / 2, (left + right) / 2
    else:
        ey, ex = _edges_point(grey)
        ny, nx = _entropy_point(grey, (max(1, round(wh / scale)), max(1, round(ww / scale))))
        cy, cx = (ey + ny) / 2 * scale, (ex + nx) / 2 * scale
    return _window(cy, wh, h), _window(cx, ww, w)


def _tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile * (1 - overlap))) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def fit(
    img: Image.Image,
    bucket: Size,
    mode: CropMode,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    overlap: float = 0.25,
    upscale: Upscale | None = None,
    faces: FaceFinder = FACES,
) -> list[Image.Image]:
    """``img`` (RGB) as one or more images of exactly ``bucket`` (height, width)."""
    bh, bw = bucket
    h, w = img.height, img.width
    if mode == "pad":
        scale = min(bh / h, bw / w)
        inner = (min(bh, max(1, round(h * scale))), min(bw, max(1, round(w * scale))))
        canvas = Image.new("RGB", (bw, bh), background)
        canvas.paste(resize_to(img, inner, upscale), ((bw - inner[1]) // 2, (bh - inner[0]) // 2))
        return [canvas]
    cover = place((h, w), bucket).resized
    if mode == "tiles" and min(h / cover[0], w / cover[1]) > TILE_FROM:
        factor = min(TILE_SCALE, h / cover[0], w / cover[1])
        size = (max(bh, round(cover[0] * factor)), max(bw, round(cover[1] * factor)))
        big = resize_to(img, size)
        return [
            big.crop((left, top, left + bw, top + bh))
            for top in _tile_starts(size[0], bh, overlap)
            for left in _tile_starts(size[1], bw, overlap)
        ]
    resized = resize_to(img, cover, upscale)
    if mode == "center":
        top, left = place((h, w), bucket).crop
    else:  # focal, and tiles for a picture too small to cut
        top, left = focal_window(resized, bucket, faces)
    return [resized.crop((left, top, left + bw, top + bh))]

"""Aspect-ratio buckets and where an image lands in its bucket.

All sizes are ``(height, width)`` in pixels.

Bucket set (kohya sd-scripts' ``make_bucket_resolutions``): the largest square of side a multiple of
``step`` that fits the area, plus for every width ``w`` from ``min_side`` to ``max_side`` in ``step``
increments the tallest height (a multiple of ``step``, at most ``max_side``) with ``w * h <= area``,
and its transpose. No bucket is larger than the area, so memory use is bounded by ``resolution**2``.
The square is always in the set, even outside ``min_side..max_side``.

An image goes to the bucket nearest in log aspect ratio (ties: the larger bucket), is resized to
cover it (aspect kept), and is cropped to it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Size = tuple[int, int]

#: the trainer's bucket geometry: sides are multiples of BUCKET_STEP between MIN_BUCKET and MAX_BUCKET
BUCKET_STEP, MIN_BUCKET, MAX_BUCKET = 64, 256, 2048


def make_buckets(
    resolution: int, step: int = BUCKET_STEP, min_side: int = MIN_BUCKET, max_side: int = MAX_BUCKET
) -> list[Size]:
    """Buckets of area at most ``resolution**2``, sorted; sides are multiples of ``step``."""
    if step < 1 or resolution < step:
        msg = f"resolution {resolution} and step {step}: need 1 <= step <= resolution"
        raise ValueError(msg)
    square = resolution // step * step
    # the square always exists: the side limits only bound the other shapes
    lo = min(-(-min_side // step) * step, square)
    hi = max(max_side // step * step, square)
    area = resolution * resolution
    out = {(square, square)}
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            out.add((h, w))
            out.add((w, h))
    return sorted(out)


def bucket_set(
    resolution: int,
    buckets: bool = True,
    step: int = BUCKET_STEP,
    min_side: int = MIN_BUCKET,
    max_side: int = MAX_BUCKET,
) -> list[Size]:
    """The sizes a training run fits its images to (the one place that decides them): the buckets of
    area ``resolution**2``, or with ``buckets`` off the one square ``resolution`` x ``resolution``."""
    return make_buckets(resolution, step, min_side, max_side) if buckets else [(resolution, resolution)]


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket closest to the image's aspect ratio (log distance); ties go to the larger bucket."""
    h, w = size
    ar = math.log(w / h)
    return min(buckets, key=lambda b: (round(abs(math.log(b[1] / b[0]) - ar), 9), -b[0] * b[1], b))


@dataclass(frozen=True)
class Placement:
    """How one image is fitted to its bucket."""

    size: Size  # original (after EXIF orientation)
    bucket: Size
    resized: Size  # after the cover resize, before the crop
    crop: Size  # (top, left) of the bucket window in the resized image

    @property
    def flipped_crop(self) -> Size:
        """(top, left) of the window in the mirrored resized image (what SDXL sees for a flipped sample)."""
        return self.crop[0], self.resized[1] - self.bucket[1] - self.crop[1]

    @property
    def upscale(self) -> float:
        return self.resized[0] / self.size[0]


def place(size: Size, bucket: Size, rng: random.Random | None = None) -> Placement:
    """Resize ``size`` to cover ``bucket`` and choose the crop: centred, or uniform when ``rng`` is given."""
    h, w = size
    bh, bw = bucket
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if rng is None:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    return Placement(size=size, bucket=bucket, resized=(rh, rw), crop=(top, left))

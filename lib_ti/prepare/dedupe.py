"""Near-duplicate pictures by perceptual hash (pHash: the signs of the low frequencies of a 32x32 DCT).

Two pictures whose 64-bit hashes differ in at most ``threshold`` bits are duplicates: a resized,
re-compressed or slightly edited copy stays within a few bits; different pictures differ in ~32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: bits two hashes may differ in and still be duplicates (of 64)
THRESHOLD = 6
#: the most two duplicates' mean colours may differ by, per channel (0-255): the hash sees only grey
#: levels, so two flat pictures of different colours would hash alike
COLOUR_TOLERANCE = 24
_N = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_matrix(_N)


def phash(img: Image.Image) -> int:
    """The 64-bit perceptual hash of ``img``."""
    grey = np.asarray(img.convert("L").resize((_N, _N), Image.Resampling.BILINEAR), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    bits = low[1:] > np.median(low[1:])  # the DC term says only how bright the picture is
    value = 0
    for b in bits:
        value = value << 1 | int(b)
    return value


def mean_colour(img: Image.Image) -> tuple[int, int, int]:
    """The picture's mean red, green and blue (0-255)."""
    r, g, b = (
        round(v) for v in np.asarray(img.convert("RGB").resize((16, 16)), dtype=np.float64).mean((0, 1))
    )
    return r, g, b


def distance(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def _close(a: tuple[int, int, int] | None, b: tuple[int, int, int] | None) -> bool:
    return a is None or b is None or max(abs(x - y) for x, y in zip(a, b)) <= COLOUR_TOLERANCE


@dataclass(frozen=True)
class DuplicateGroup:
    """Pictures that are near-duplicates of each other: ``kept`` is copied, ``dropped`` are not."""

    kept: int
    dropped: tuple[int, ...]


def find_duplicates(
    hashes: Sequence[int | None],
    sizes: Sequence[int],
    threshold: int = THRESHOLD,
    colours: Sequence[tuple[int, int, int] | None] | None = None,
) -> list[DuplicateGroup]:
    """Groups of near-duplicates among ``hashes`` (None: not hashed), whose ``colours`` (when given)
    are within :data:`COLOUR_TOLERANCE`; in each, the picture with the most pixels (``sizes``; ties:
    the first) is kept."""
    n = len(hashes)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    valid = [i for i, h in enumerate(hashes) if h is not None]
    if len(valid) > 1:
        values = np.array([hashes[i] for i in valid], dtype=np.uint64)
        table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
        for a in range(len(valid) - 1):
            x = values[a] ^ values[a + 1 :]
            bits = table[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)
            for b in np.nonzero(bits <= threshold)[0]:
                i, j = valid[a], valid[a + 1 + int(b)]
                if colours is not None and not _close(colours[i], colours[j]):
                    continue
                ra, rb = root(i), root(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in valid:
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        if len(members) > 1:
            kept = max(members, key=lambda i: (sizes[i], -i))
            out.append(DuplicateGroup(kept, tuple(i for i in members if i != kept)))
    return sorted(out, key=lambda g: g.kept)

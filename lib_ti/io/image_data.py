"""Embeddings stored in images the way AUTOMATIC1111 stores them.

Two carriers, both read and written:

* a PNG text chunk ``sd-ti-embedding``: base64 of JSON in which tensors are
  ``{"TORCHTENSOR": nested lists}``;
* border strips: the zlib-compressed JSON split into low and high nibbles, laid out as two blocks
  of RGB pixels left and right of the picture (one black column between), each nibble XOR-ed with
  the low nibble of a fixed linear congruential sequence. The high nibble of each pixel carries only
  decoration (a dot pattern), so the data survives when text chunks are stripped.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from lib_ti.errors import EmbeddingFormatError

TEXT_CHUNK = "sd-ti-embedding"
MAX_JSON_BYTES = 64 * 1024 * 1024
_BLOCK_DEPTH = 3

_lcg_cache = np.zeros(0, dtype=np.uint8)


def _lcg_mask(count: int) -> np.ndarray:
    """Low nibbles of the sequence s <- (1664525 s + 1013904223) mod 2^32, s0 = 0, each taken mod 255."""
    global _lcg_cache
    if _lcg_cache.size < count:
        out = np.empty(count, dtype=np.uint8)
        seed = 0
        for i in range(count):
            seed = (1664525 * seed + 1013904223) % 4294967296
            out[i] = seed % 255
        _lcg_cache = out
    return _lcg_cache[:count] & 0x0F


def _xor_mask(block: np.ndarray) -> np.ndarray:
    return np.bitwise_xor(block.astype(np.uint8), _lcg_mask(block.size).reshape(block.shape))


def _to_json_obj(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"TORCHTENSOR": value.detach().cpu().double().numpy().tolist()}
    if isinstance(value, dict):
        return {str(k): _to_json_obj(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json_obj(v) for v in value]
    return value


def _tensor_hook(d: dict[str, Any]) -> Any:
    if "TORCHTENSOR" in d:
        try:
            arr = np.array(d["TORCHTENSOR"], dtype=np.float64)
        except (TypeError, ValueError):
            msg = "embedded tensor is not a numeric array"
            raise EmbeddingFormatError(msg) from None
        return torch.from_numpy(arr)
    return d


def dumps(data: dict[str, Any]) -> bytes:
    """JSON bytes in A1111's tensor encoding."""
    return json.dumps(_to_json_obj(data)).encode()


def loads(raw: bytes | str, label: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw, object_hook=_tensor_hook)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        msg = f"{label}: embedded data is not valid JSON ({e})"
        raise EmbeddingFormatError(msg) from None
    except EmbeddingFormatError as e:
        msg = f"{label}: {e}"
        raise EmbeddingFormatError(msg) from None
    if not isinstance(obj, dict):
        msg = f"{label}: embedded data is not a JSON object"
        raise EmbeddingFormatError(msg)
    return obj


def read_text_chunk(image: Image.Image, label: str) -> dict[str, Any] | None:
    """The data of an ``sd-ti-embedding`` chunk, or ``None`` if the image has none."""
    raw = image.info.get(TEXT_CHUNK)
    if raw is None:
        return None
    try:
        decoded = base64.b64decode(raw, validate=False)
    except (binascii.Error, ValueError) as e:
        msg = f"{label}: the {TEXT_CHUNK} chunk is not base64 ({e})"
        raise EmbeddingFormatError(msg) from None
    return loads(decoded, label)


def _dot_pattern(height: int, width: int, shades: np.ndarray) -> np.ndarray:
    """The decorative high nibbles: a staggered grid of 6 px dots shaded from ``shades``."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    i = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            dx = 4 if row % 2 == 0 else 0
            shade = int(shades[i % len(shades)])
            i += 1
            draw.ellipse((x + dx, y, x + 6 + dx, y + 6), fill=(shade, shade, shade))
    return np.array(canvas).astype(np.uint8) & 0xF0


def _edge_shades(data: dict[str, Any]) -> np.ndarray:
    first = next((v for v in _tensors_in(data)), None)
    if first is None:
        return np.zeros(1, dtype=np.uint8)
    row = first.reshape(-1, first.shape[-1])[0][:1024].abs().double().numpy()
    peak = row.max() if row.size else 0.0
    if not peak > 0:
        return np.zeros(max(row.size, 1), dtype=np.uint8)
    return (row / peak * 255).astype(np.uint8)


def _tensors_in(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


def insert_border_data(image: Image.Image, data: dict[str, Any]) -> Image.Image:
    """Return a new RGB image: data block, black column, ``image``, black column, data block."""
    payload = np.frombuffer(zlib.compress(dumps(data), level=9), np.uint8)
    h = image.size[1]
    size = payload.size + (h - payload.size % h)
    size += h * _BLOCK_DEPTH - size % (h * _BLOCK_DEPTH)
    low = np.resize(payload & 0x0F, size).reshape((h, -1, _BLOCK_DEPTH))
    high = np.resize(payload >> 4, size).reshape((h, -1, _BLOCK_DEPTH))
    shades = _edge_shades(data)
    low = _xor_mask(low ^ _dot_pattern(low.shape[0], low.shape[1], shades))
    high = _xor_mask(high ^ _dot_pattern(high.shape[0], high.shape[1], shades[::-1]))
    im_low, im_high = Image.fromarray(low, mode="RGB"), Image.fromarray(high, mode="RGB")
    out = Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, h), (0, 0, 0))
    out.paste(im_low, (0, 0))
    out.paste(image.convert("RGB"), (im_low.size[0] + 1, 0))
    out.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return out


def _crop_black_edges(pixels: np.ndarray) -> np.ndarray:
    lit = (pixels > 0).all(axis=2)
    cols, rows = lit.any(axis=0), lit.any(axis=1)
    if not cols.any():
        return pixels[:0, :0]
    c0, c1 = cols.argmax(), len(cols) - cols[::-1].argmax()
    r0, r1 = rows.argmax(), len(rows) - rows[::-1].argmax()
    return pixels[r0:r1, c0:c1]


def read_border_data(image: Image.Image, label: str) -> dict[str, Any] | None:
    """Decode border-strip data, or ``None`` when the image carries none."""
    nibbles = _crop_black_edges(np.array(image.convert("RGB"))) & 0x0F
    if nibbles.size == 0:
        return None
    dark = np.where(nibbles.sum(axis=(0, 2)) == 0)[0]
    if dark.size < 2:
        return None
    low = _xor_mask(nibbles[:, : dark.min(), :])
    high = _xor_mask(nibbles[:, dark.max() + 1 :, :])
    if low.shape != high.shape or low.size == 0:
        return None
    raw = ((high << 4) | low).astype(np.uint8).tobytes()
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, MAX_JSON_BYTES)
    except zlib.error:
        return None
    if inflater.unconsumed_tail:
        msg = f"{label}: embedded data is larger than {MAX_JSON_BYTES} bytes"
        raise EmbeddingFormatError(msg)
    if not inflater.eof:
        return None
    return loads(text, label)


def png_with_data(
    image: Image.Image, data: dict[str, Any], extra_text: dict[str, str] | None = None
) -> tuple[Image.Image, PngImagePlugin.PngInfo]:
    """The image with border data and the PNG text chunks to save it with."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK, base64.b64encode(dumps(data)).decode("ascii"))
    for k, v in (extra_text or {}).items():
        info.add_text(k, v)
    return insert_border_data(image, data), info

"""Reading and writing ``.safetensors`` with the header checked before any tensor is built."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lib_ti.errors import EmbeddingFormatError

MAX_HEADER_BYTES = 16 * 1024 * 1024
_DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def looks_like_safetensors(data: bytes) -> bool:
    """True if ``data`` starts like a safetensors file (a length, then a JSON object)."""
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def parse_header(
    data: bytes, label: str, file_size: int | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate the header of a safetensors file; return (tensor entries, metadata).

    ``data``: the whole file, or only its first bytes (at least the header) when ``file_size`` gives
    the file's size (a LoRA's header is read without its weights)."""
    size = len(data) if file_size is None else file_size
    if len(data) < 8:
        msg = f"{label}: too short to be a safetensors file ({len(data)} bytes)"
        raise EmbeddingFormatError(msg)
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        msg = f"{label}: safetensors header claims {n} bytes, more than the {MAX_HEADER_BYTES} allowed"
        raise EmbeddingFormatError(msg)
    if n > size - 8 or n > len(data) - 8:
        msg = f"{label}: safetensors header claims {n} bytes but the file holds {size - 8} (truncated?)"
        raise EmbeddingFormatError(msg)
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"{label}: safetensors header is not valid JSON ({e})"
        raise EmbeddingFormatError(msg) from None
    if not isinstance(header, dict):
        msg = f"{label}: safetensors header is not a JSON object"
        raise EmbeddingFormatError(msg)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        msg = f"{label}: safetensors __metadata__ must map text to text"
        raise EmbeddingFormatError(msg)
    body = size - 8 - n
    for key, entry in header.items():
        _check_entry(label, key, entry, body)
    return header, metadata


def _check_entry(label: str, key: str, entry: Any, body: int) -> None:
    if not isinstance(entry, dict):
        msg = f"{label}: header entry {key!r} is not an object"
        raise EmbeddingFormatError(msg)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_SIZES:
        msg = f"{label}: tensor {key!r} has unknown dtype {dtype!r}"
        raise EmbeddingFormatError(msg)
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        msg = f"{label}: tensor {key!r} has an invalid shape {shape!r}"
        raise EmbeddingFormatError(msg)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= body
    ):
        msg = f"{label}: tensor {key!r} has data offsets {offsets!r} outside the file's {body} data bytes (truncated or damaged)"
        raise EmbeddingFormatError(msg)
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_SIZES[dtype]:
        msg = f"{label}: tensor {key!r} of shape {shape} {dtype} does not match its {offsets[1] - offsets[0]} bytes"
        raise EmbeddingFormatError(msg)


def load_bytes(data: bytes, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata from safetensors bytes, header checked first."""
    entries, metadata = parse_header(data, label)
    for key, entry in entries.items():
        if math.prod(entry["shape"]) == 0:
            msg = f"{label}: tensor {key!r} is empty (shape {entry['shape']}, 0 vectors)"
            raise EmbeddingFormatError(msg)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError type
        msg = f"{label}: safetensors could not read the file ({e})"
        raise EmbeddingFormatError(msg) from None
    return tensors, metadata


def save_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialize tensors (contiguous CPU copies) and text metadata to safetensors bytes."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return st_save(clean, metadata=dict(metadata))

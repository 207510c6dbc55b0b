"""Embeddings bundled inside LoRA files (``bundle_emb.<name>.<key>`` tensors), read from the
safetensors header and the byte ranges of their own tensors only: a 200 MB LoRA is never read whole.

Two layouts are written (both read by A1111, extensions-builtin/Lora/networks.py ``load_network``):

- ``a1111``: the format of A1111 pull request 13568, where ``<key>`` is a key of the embedding file
  itself: ``string_to_param.*`` (an A1111 ``.pt``), ``emb_params`` (a kohya ``.safetensors``),
  ``clip_l`` + ``clip_g`` (SDXL). Written by pivotal-tuning packers, e.g. deepghs/cyberharem
  ``cyberharem/publish/convert.py`` ``pack_to_bundle_lora``. kohya sd-scripts writes no bundles.
- ``onetrainer``: OneTrainer's LoRA savers (``modules/modelSaver/*/*LoRASaver.py``
  ``_get_state_dict``): ``clip_l`` (SD1 too), ``clip_g``, ``t5`` (SD3, Flux), and the output
  embeddings ``<key>_out``, which are not token embeddings and are left out here.

A1111 takes the name up to the first dot; here the key's known tail is cut off instead, so a dotted
name stays whole. Only ``.safetensors`` LoRA files are read (A1111 also unpickles ``.pt`` LoRAs).
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch

from lib_ti.embedding import (
    ENCODER_WIDTHS,
    KINDS,
    MAX_VECTORS,
    T5_KINDS,
    Convention,
    Embedding,
)
from lib_ti.errors import EmbeddingExists, EmbeddingFormatError, InvalidNameError
from lib_ti.io.formats import WRITE_SUFFIX, write_embedding
from lib_ti.io.safetensors_io import MAX_HEADER_BYTES, parse_header
from lib_ti.names import path_in_folder, validate_name

logger = logging.getLogger(__name__)

Producer = Literal["a1111", "onetrainer"]
PRODUCER_LABELS: dict[str, str] = {
    "a1111": "A1111 bundle format (the embedding file's own keys)",
    "onetrainer": "OneTrainer",
}
BUNDLE_PREFIX = "bundle_emb."
#: For the UI: Forge's Lora extension (extensions-builtin/sd_forge_lora) never reads these tensors.
FORGE_BUNDLE_NOTE = (
    "Forge does not load embeddings bundled in a LoRA file (only A1111 does), so extract them into "
    "the embeddings folder to use them there."
)
#: float dtypes a bundled tensor may have: numpy type (little-endian; BF16 as its bits) and bytes per value
_FLOATS: dict[str, tuple[str, int]] = {
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "F64": ("<f8", 8),
}
#: keys whose value was a dict in the embedding file (``string_to_param.<token>``)
_DICT_KEYS = ("string_to_param", "string_to_token")
#: encoder of each per-encoder key (``t5xxl``: ComfyUI's name, accepted for T5 too)
_ENCODER_KEYS = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5", "t5xxl": "t5"}


@dataclass(frozen=True)
class BundledInfo:
    """One embedding bundled in a LoRA file, as its header describes it."""

    name: str
    producer: Producer
    #: sd1, sd2, sdxl, sdxl_refiner, sd3 or flux; None when it cannot be read (``problem`` says why)
    kind: str | None
    #: vectors per token (SD3/Flux: of the CLIP part; ``counts`` has every encoder's)
    vectors: int
    widths: dict[str, int]
    counts: dict[str, int]
    #: the stored dtype(s), e.g. "F16"
    dtype: str
    #: this embedding's tensors in the file, and those left out (OneTrainer's output embeddings)
    tensors: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    #: why it cannot be extracted at all
    problem: str | None = None
    #: why its name cannot be a file name (it can still be extracted under another name)
    name_problem: str | None = None
    #: the tensor that holds each encoder's vectors (internal)
    keys: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (for the CLI, the UI and the REST API)."""
        out = asdict(self)
        out.pop("keys")
        out["tensors"], out["ignored"] = list(self.tensors), list(self.ignored)
        return out


@dataclass(frozen=True)
class _Header:
    entries: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    data_start: int


# --------------------------------------------------------------------------- the header


def _read_header(path: str | os.PathLike[str]) -> _Header:
    """The header of a safetensors file, checked against the file's size; reads nothing else."""
    p = Path(path)
    label = str(p)
    try:
        if p.is_dir():
            msg = f"{label} is a folder, not a LoRA file"
            raise EmbeddingFormatError(msg)
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(9)
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
                msg = f"{label} is a torch pickle, not a .safetensors file; bundled embeddings are read from .safetensors LoRA files"
                raise EmbeddingFormatError(msg)
            n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
            if n < 2 or head[8:9] != b"{":
                msg = f"{label} is not a .safetensors file (no safetensors header)"
                raise EmbeddingFormatError(msg)
            # the length is checked against MAX_HEADER_BYTES and the size before anything more is read
            raw = head if n > MAX_HEADER_BYTES or n > size - 8 else head + f.read(n - 1)
    except FileNotFoundError:
        msg = f"{label} does not exist"
        raise EmbeddingFormatError(msg) from None
    except PermissionError:
        msg = f"{label} cannot be read: permission denied"
        raise EmbeddingFormatError(msg) from None
    except OSError as e:
        msg = f"{label} cannot be read: {e.strerror or e}"
        raise EmbeddingFormatError(msg) from None
    entries, metadata = parse_header(raw, label, file_size=size)
    return _Header(entries, metadata, 8 + n)


# --------------------------------------------------------------------------- bundles in a header


def _split_key(rest: str) -> tuple[str, str]:
    """``<name>.<key>`` -> (name, key); ``string_to_param.<token>`` stays one key."""
    for dict_key in _DICT_KEYS:
        at = rest.find(f".{dict_key}.")
        if at > 0:
            return rest[:at], rest[at + 1 :]
    name, _, key = rest.rpartition(".")
    return (name, key) if name else (rest, "")


def _group(entries: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """{bundled name: {key in the embedding: tensor key in the file}}."""
    out: dict[str, dict[str, str]] = {}
    for full in entries:
        if full.startswith(BUNDLE_PREFIX):
            name, key = _split_key(full[len(BUNDLE_PREFIX) :])
            out.setdefault(name, {})[key] = full
    return out


def _describe(name: str, keys: dict[str, str], entries: Mapping[str, Any], ot_file: bool) -> BundledInfo:
    """What one bundle holds, from its header entries; ``keys``: {key in the embedding: tensor key}."""
    outs = [k for k in keys if k.endswith("_out")]
    base = [k for k in keys if k not in outs and not k.startswith("string_to_token.")]
    # which of the bundle's keys holds each encoder's vectors ("": one matrix, its width decides)
    if any(k in _ENCODER_KEYS for k in base):
        used = {_ENCODER_KEYS[k]: k for k in reversed(base) if k in _ENCODER_KEYS}  # t5 before t5xxl
    elif len(base) == 1:
        used = {"": base[0]}
    else:
        used = {}
    from_file = any(k.startswith(_DICT_KEYS) or k in ("emb_params", "emp_params") for k in base)
    onetrainer = bool(outs) or ot_file or "t5" in used.values() or list(used.values()) == ["clip_l"]
    producer: Producer = "onetrainer" if onetrainer and not from_file else "a1111"
    problem, widths, counts = _shape_problem(used, keys, entries, outs, base)
    if problem is None and "" in used:
        enc = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}.get(widths[""])
        if enc is None:
            problem = f"has vectors {widths['']} wide; embeddings are 768 (SD1), 1024 (SD2) or 1280 (CLIP-G)"
        else:
            used, widths, counts = {enc: used[""]}, {enc: widths[""]}, {enc: counts[""]}
    kind = KINDS.get(frozenset(used)) if problem is None else None
    if problem is None and kind is None:
        problem = f"holds {', '.join(sorted(used))}, which form no SD1, SD2, SDXL, SD3 or Flux embedding"
    if problem is None and len({n for e, n in counts.items() if e != "t5"}) > 1:
        problem = f"has different vector counts per encoder ({_counts(counts)})"
    return BundledInfo(
        name=name,
        producer=producer,
        kind=kind if problem is None else None,
        vectors=next((counts[e] for e in ("clip_l", "clip_h", "clip_g", "t5") if e in counts), 0),
        widths=widths,
        counts=counts,
        dtype="/".join(sorted({str(entries[full]["dtype"]) for full in keys.values()})),
        tensors=tuple(sorted(keys.values())),
        ignored=tuple(sorted(full for k, full in keys.items() if k not in used.values())),
        problem=problem,
        name_problem=_name_problem(name),
        keys={} if problem else {e: keys[k] for e, k in used.items()},
    )


def _shape_problem(
    used: dict[str, str], keys: dict[str, str], entries: Mapping[str, Any], outs: list[str], base: list[str]
) -> tuple[str | None, dict[str, int], dict[str, int]]:
    """(what is wrong, widths, counts) of the tensors a bundle's vectors come from."""
    widths: dict[str, int] = {}
    counts: dict[str, int] = {}
    if not used:
        if outs and not base:
            why = (
                f"holds only OneTrainer output embeddings ({', '.join(outs)}), which stand for the text "
                "encoder's output, not for tokens; the web UIs cannot use them"
            )
        else:
            why = (
                f"holds tensors that form no embedding ({', '.join(sorted(keys)) or 'no key after the name'})"
            )
        return why, widths, counts
    for enc, key in used.items():
        entry = entries[keys[key]]
        shape, dtype = entry["shape"], entry["dtype"]
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        bad: str | None = None
        if dtype not in _FLOATS:
            bad = f"{key} is stored as {dtype}; embeddings are F32, F16 or BF16"
        elif nbytes != math.prod(shape) * _FLOATS[dtype][1]:
            bad = f"{key} of shape {shape} {dtype} does not match its {nbytes} bytes (damaged)"
        elif len(shape) not in (1, 2):
            bad = f"{key} has shape {shape}; an embedding is a [vectors, width] matrix"
        if bad:
            return bad, widths, counts
        n, width = (1, shape[0]) if len(shape) == 1 else shape
        if enc and width != ENCODER_WIDTHS[enc]:
            return f"{key} vectors are {width} wide, {enc} needs {ENCODER_WIDTHS[enc]}", widths, counts
        if not 1 <= n <= MAX_VECTORS:
            return f"{key} has {n} vectors; an embedding needs 1 to {MAX_VECTORS}", widths, counts
        widths[enc], counts[enc] = width, n
    return None, widths, counts


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _name_problem(name: str) -> str | None:
    try:
        validate_name(name)
    except InvalidNameError as e:
        return str(e)
    return None


def _bundles(path: str | os.PathLike[str]) -> tuple[_Header, dict[str, BundledInfo]]:
    header = _read_header(path)
    ot_file = any(k.startswith("ot_") for k in header.metadata)
    groups = _group(header.entries)
    found = {name: _describe(name, groups[name], header.entries, ot_file) for name in sorted(groups)}
    if not found:
        msg = f"{path} holds no bundled embeddings (no {BUNDLE_PREFIX}* tensors)"
        raise EmbeddingFormatError(msg)
    return header, found


# --------------------------------------------------------------------------- public


def has_bundled(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a safetensors file with bundled embeddings (reads the header only)."""
    try:
        header = _read_header(path)
    except EmbeddingFormatError:
        return False
    return any(k.startswith(BUNDLE_PREFIX) for k in header.entries)


def list_bundled(path: str | os.PathLike[str]) -> list[BundledInfo]:
    """The embeddings bundled in a ``.safetensors`` LoRA file (by name), from its header alone.

    EmbeddingFormatError for a file that is not safetensors, a damaged or truncated header, tensor
    offsets beyond the end, or no bundled embeddings. A bundle that cannot be read has ``problem``
    set; one whose name cannot be a file name has ``name_problem`` set.
    """
    return list(_bundles(path)[1].values())


def read_bundled(path: str | os.PathLike[str], name: str, rename: str | None = None) -> Embedding:
    """The bundled embedding ``name``, read from its tensors' byte ranges only.

    ``rename``: the embedding's name instead of ``name`` (needed when ``name`` is no valid file name,
    e.g. OneTrainer's default ``<embedding>``). Metadata: ``source_lora`` (the file's name) and
    ``bundle_producer``.
    """
    header, found = _bundles(path)
    return _read(path, header, found, name, rename)


def _read(
    path: str | os.PathLike[str],
    header: _Header,
    found: Mapping[str, BundledInfo],
    name: str,
    rename: str | None,
) -> Embedding:
    label = str(path)
    info = found.get(name)
    if info is None:
        msg = f"{label} has no bundled embedding named {name!r} (it has: {_names(found)})"
        raise EmbeddingFormatError(msg)
    if info.problem:
        msg = f"{label}: bundled embedding {name!r} {info.problem}"
        raise EmbeddingFormatError(msg)
    new_name = rename if rename is not None else name
    try:
        validate_name(new_name)
    except InvalidNameError as e:
        hint = "; extract it under another name" if rename is None else ""
        msg = f"{label}: bundled embedding {name!r} cannot be used under the name {new_name!r}: {e}{hint}"
        raise EmbeddingFormatError(msg) from None
    vectors: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            for enc, full in info.keys.items():
                vectors[enc] = _read_tensor(f, header, full, label)
    except OSError as e:
        msg = f"{label} cannot be read: {e.strerror or e}"
        raise EmbeddingFormatError(msg) from None
    metadata = {"source_lora": Path(path).name, "bundle_producer": info.producer}
    try:
        emb = Embedding(new_name, vectors, metadata=metadata)
    except EmbeddingFormatError as e:
        msg = str(e).replace(f"{new_name}:", f"{label}: bundled embedding {name!r}:", 1)
        raise EmbeddingFormatError(msg) from None
    if emb.kind in T5_KINDS:
        emb.convention = "comfyui" if info.keys["t5"].endswith(".t5xxl") else "onetrainer"
    emb.source = f"bundled in {Path(path).name} ({PRODUCER_LABELS[info.producer]})"
    return emb


def extract_bundled(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    overwrite: bool = False,
    fmt: str = "safetensors",
    rename: Mapping[str, str] | None = None,
    convention: Convention | None = None,
) -> list[Path]:
    """Write bundled embeddings (all, or ``names``) into ``out_dir`` as ``<name><suffix>``.

    Everything is read and checked first (names, layouts, values, existing files, the format), so
    a bad input writes nothing. ``rename``: {bundled name: new name}. ``convention``: the key
    convention of SD3/Flux files (default: the producer's, OneTrainer's ``t5``).
    """
    label = str(path)
    suffix = WRITE_SUFFIX.get(fmt)
    if suffix is None:
        msg = f"unknown format {fmt!r} (one of {', '.join(WRITE_SUFFIX)})"
        raise EmbeddingFormatError(msg)
    header, found = _bundles(path)
    chosen = list(dict.fromkeys(names)) if names is not None else list(found)
    if not chosen:
        msg = "no bundled embedding chosen"
        raise EmbeddingFormatError(msg)
    rename = dict(rename or {})
    stray = sorted(set(rename) - set(chosen))
    if stray:
        msg = f"cannot rename {stray[0]!r}: it is not among the embeddings to extract"
        raise EmbeddingFormatError(msg)
    unknown = [n for n in chosen if n not in found]
    if unknown:
        msg = f"{label} has no bundled embedding named {unknown[0]!r} (it has: {_names(found)})"
        raise EmbeddingFormatError(msg)
    embeddings = [_read(path, header, found, n, rename.get(n)) for n in chosen]
    targets: dict[Path, str] = {}
    for emb in embeddings:
        if fmt != "safetensors" and emb.kind in T5_KINDS:
            msg = f"{emb.name}: SD3 and Flux embeddings are written as .safetensors only"
            raise EmbeddingFormatError(msg)
        target = path_in_folder(out_dir, emb.name, suffix)
        if target in targets:
            msg = f"{targets[target]!r} and {emb.name!r} would both be written to {target}"
            raise EmbeddingFormatError(msg)
        if target.exists() and not overwrite:
            msg = f"{target} already exists; choose another name or allow overwriting"
            raise EmbeddingExists(msg)
        targets[target] = emb.name
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = [
        write_embedding(emb, target, overwrite=overwrite, convention=convention)
        for emb, target in zip(embeddings, targets)
    ]
    logger.info("extracted %d embedding(s) from %s into %s", len(written), path, out_dir)
    return written


# --------------------------------------------------------------------------- tensors


def _read_tensor(f: BinaryIO, header: _Header, key: str, label: str) -> torch.Tensor:
    """One tensor, read from its byte range: float32, little-endian on any machine."""
    entry = header.entries[key]
    start, end = entry["data_offsets"]
    f.seek(header.data_start + start)
    buf = f.read(end - start)
    if len(buf) != end - start:
        msg = f"{label}: tensor {key!r} ends beyond the end of the file (truncated)"
        raise EmbeddingFormatError(msg)
    dtype = entry["dtype"]
    arr = np.frombuffer(buf, dtype=_FLOATS[dtype][0])
    if dtype == "BF16":  # the upper half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(arr.astype(np.float32).reshape(entry["shape"]))


def _names(found: Mapping[str, BundledInfo]) -> str:
    names = list(found)
    shown = ", ".join(repr(n) for n in names[:10])
    return shown + (f", … ({len(names)} in all)" if len(names) > 10 else "")

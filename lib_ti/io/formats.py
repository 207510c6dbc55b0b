"""Read every embedding file format the hosts and peer trainers write; write ours safely.

Read: A1111 ``.pt`` (``string_to_param``, also as a ``ParameterDict``), single-tensor dicts
(kohya ``emb_params``, OneTrainer ``emp_params``, diffusers ``{"<token>": T}``) in ``.pt``/``.bin``/
``.safetensors``, SDXL ``{"clip_l", "clip_g"}``, SD3 ``{"clip_l", "clip_g", T5}`` and Flux
``{"clip_l", T5}`` with T5 as ``t5`` (OneTrainer) or ``t5xxl`` (ComfyUI), the diffusers SDXL pair of
files, and images carrying an embedding (``sd-ti-embedding`` chunk or border strips).

Write: ``.safetensors`` (default; metadata in the header), A1111 ``.pt`` (legacy torch format, which
A1111 v1.10's safe unpickler accepts) and ``.png`` (chunk + border strips); SD3/Flux as
``.safetensors`` only, in the OneTrainer or the ComfyUI key convention. Every write is atomic.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, UnidentifiedImageError

from lib_ti.embedding import KIND_LABELS, T5_KINDS, Convention, Embedding, encoder_for_width
from lib_ti.errors import EmbeddingFormatError
from lib_ti.io import image_data, safe_pickle, safetensors_io
from lib_ti.io.atomic import atomic_write, atomic_write_bytes
from lib_ti.names import validate_name

logger = logging.getLogger(__name__)

WriteFormat = Literal["safetensors", "pt", "png"]
READ_SUFFIXES = (".safetensors", ".pt", ".bin", ".png", ".webp", ".jxl", ".avif")
#: files that hold only tensors (no image), in the order a name is looked up
TENSOR_SUFFIXES = (".safetensors", ".pt", ".bin")
#: every format this package writes, by name
WRITE_SUFFIX: dict[str, str] = {"safetensors": ".safetensors", "pt": ".pt", "png": ".png"}
#: the formats the tab, the API and training write into the embeddings folder, by setting value
SAVE_SUFFIX: dict[str, str] = {k: v for k, v in WRITE_SUFFIX.items() if k != "png"}
MAX_FILE_BYTES = 256 * 1024 * 1024
#: Header keys that map to Embedding fields; everything else is free metadata.
_FIELD_KEYS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
#: Extra key in our A1111 .pt files holding free metadata (the hosts ignore unknown keys there).
PT_METADATA_KEY = "lib_ti_metadata"
PNG_METADATA_CHUNK = "lib-ti-metadata"
_IMAGE_MAGIC = (b"\x89PNG", b"RIFF", b"\xff\x0a", b"\x00\x00\x00\x0cJXL", b"\xff\xd8")
#: The T5 matrix's key in SD3/Flux files, by convention: OneTrainer's embedding savers
#: (modules/modelSaver/stableDiffusion3/StableDiffusion3EmbeddingSaver.py, flux/FluxEmbeddingSaver.py:
#: clip_l, clip_g, t5 and the output embeddings clip_l_out, clip_g_out, t5_out) and ComfyUI's
#: tokenizers (comfy/text_encoders/sd3_clip.py and flux.py: embedding_key "t5xxl"; comfy/sd1_clip.py
#: "clip_l", comfy/sdxl_clip.py "clip_g").
T5_FILE_KEYS: dict[Convention, str] = {"onetrainer": "t5", "comfyui": "t5xxl"}
CONVENTION_LABELS: dict[str, str] = {"onetrainer": "OneTrainer keys", "comfyui": "ComfyUI keys"}
#: What a new SD3/Flux embedding is written as: ComfyUI is where these files are used.
DEFAULT_CONVENTION: Convention = "comfyui"


# --------------------------------------------------------------------------- reading


def read_file_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a whole file with user-facing errors for the usual failures."""
    p = Path(path)
    label = str(p)
    try:
        if p.is_dir():
            msg = f"{label} is a folder, not an embedding file"
            raise EmbeddingFormatError(msg)
        size = p.stat().st_size
        if size == 0:
            msg = f"{label} is empty (0 bytes)"
            raise EmbeddingFormatError(msg)
        if size > MAX_FILE_BYTES:
            msg = f"{label} is {size // 2**20} MiB; embedding files are far smaller (limit {MAX_FILE_BYTES // 2**20} MiB)"
            raise EmbeddingFormatError(msg)
        with open(p, "rb") as f:
            return f.read()
    except FileNotFoundError:
        msg = f"{label} does not exist"
        raise EmbeddingFormatError(msg) from None
    except PermissionError:
        msg = f"{label} cannot be read: permission denied"
        raise EmbeddingFormatError(msg) from None
    except IsADirectoryError:
        msg = f"{label} is a folder, not an embedding file"
        raise EmbeddingFormatError(msg) from None
    except OSError as e:
        msg = f"{label} cannot be read: {e.strerror or e}"
        raise EmbeddingFormatError(msg) from None


def read_embedding(path: str | os.PathLike[str], name: str | None = None) -> Embedding:
    """Read any supported embedding file. The name defaults to what the host would call it."""
    p = Path(path)
    data = read_file_bytes(p)
    return read_embedding_bytes(data, name or Path(p).stem, label=str(p))


def read_embedding_bytes(data: bytes, name: str, label: str = "embedding") -> Embedding:
    """Read an embedding from a file's bytes; the format is detected from the content."""
    if safetensors_io.looks_like_safetensors(data):
        tensors, header = safetensors_io.load_bytes(data, label)
        return _with_source(embedding_from_data(tensors, name, label, header=header), "safetensors")
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        obj = safe_pickle.load(data, label)
        return _with_source(embedding_from_data(obj, name, label), "torch pickle")
    if data.startswith(_IMAGE_MAGIC) or data[8:12] == b"WEBP" or data[4:12] == b"ftypavif":
        return _read_image(data, name, label)
    msg = f"{label}: not a known embedding format (safetensors, torch .pt/.bin or image)"
    raise EmbeddingFormatError(msg)


def _with_source(emb: Embedding, source: str) -> Embedding:
    emb.source = f"{source}, {CONVENTION_LABELS[emb.convention]}" if emb.convention else source
    return emb


def _read_image(data: bytes, name: str, label: str) -> Embedding:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            found = image_data.read_text_chunk(im, label)
            carrier = "image (sd-ti-embedding chunk)"
            if found is None:
                found = image_data.read_border_data(im, label)
                carrier = "image (border data)"
            extra = im.info.get(PNG_METADATA_CHUNK)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        msg = f"{label}: image cannot be decoded ({e})"
        raise EmbeddingFormatError(msg) from None
    if found is None:
        msg = f"{label}: this image carries no embedding"
        raise EmbeddingFormatError(msg)
    header = None
    if extra:
        try:
            header = {str(k): str(v) for k, v in json.loads(extra).items()}
        except (json.JSONDecodeError, AttributeError):
            header = None
    stored = found.get("name")
    emb = embedding_from_data(
        found, stored if isinstance(stored, str) and stored else name, label, header=header
    )
    emb.source = carrier
    return emb


def _param_dict_items(obj: Any) -> list[tuple[str, Any]]:
    """Items of a ``string_to_param`` value: dict, OrderedDict or (old) ``ParameterDict``."""
    if isinstance(obj, torch.nn.ParameterDict):
        params = obj.__dict__.get("_parameters")
        if params is not None:
            return list(params.items())
    if isinstance(obj, Mapping):
        return list(obj.items())
    return []


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def embedding_from_data(
    data: Any, name: str, label: str = "embedding", header: Mapping[str, str] | None = None
) -> Embedding:
    """Interpret a loaded object as an embedding, in the order the hosts use (plus peers' layouts)."""
    fields: dict[str, Any] = {}
    metadata: dict[str, str] = dict(header or {})
    convention: Convention | None = None
    for key in _FIELD_KEYS:
        if key in metadata:
            fields[key] = metadata.pop(key)
    if isinstance(data, torch.Tensor):
        vectors = {encoder_for_width(int(data.shape[-1]) if data.dim() else 0, label): data}
    elif not isinstance(data, Mapping):
        msg = f"{label}: holds a {type(data).__name__}, not an embedding"
        raise EmbeddingFormatError(msg)
    elif "string_to_param" in data:
        items = _param_dict_items(data["string_to_param"])
        if len(items) != 1:
            msg = f"{label}: string_to_param must hold exactly one term, it holds {len(items)}"
            raise EmbeddingFormatError(msg)
        tensor = items[0][1]
        if not isinstance(tensor, torch.Tensor):
            msg = f"{label}: string_to_param holds a {type(tensor).__name__}, not a tensor"
            raise EmbeddingFormatError(msg)
        vectors = {encoder_for_width(int(tensor.shape[-1]) if tensor.dim() else 0, label): tensor}
        for key in _FIELD_KEYS:
            if data.get(key) is not None:
                fields[key] = _scalar(data[key])
        extra = data.get(PT_METADATA_KEY)
        if isinstance(extra, Mapping):
            metadata.update({str(k): str(v) for k, v in extra.items()})
    else:
        vectors, convention = _tensor_dict_vectors(data, label, metadata)
        for key in _FIELD_KEYS:
            if key in data and not isinstance(data[key], torch.Tensor) and data[key] is not None:
                fields[key] = _scalar(data[key])
    step = fields.get("step")
    try:
        step = int(step) if step is not None and str(step) != "" else None
    except (TypeError, ValueError):
        metadata["step"] = str(step)
        step = None
    stored_name = fields.get("name")
    if isinstance(stored_name, str) and stored_name and stored_name != name:
        metadata.setdefault("stored_name", stored_name)

    def text(v: Any) -> str | None:
        return None if v is None else str(v)

    try:
        emb = Embedding(
            name=name,
            vectors=vectors,
            step=step,
            sd_checkpoint=text(fields.get("sd_checkpoint")),
            sd_checkpoint_name=text(fields.get("sd_checkpoint_name")),
            metadata=metadata,
        )
    except EmbeddingFormatError as e:
        msg = str(e).replace(f"{name or 'embedding'}:", f"{label}:", 1)
        raise EmbeddingFormatError(msg) from None
    if emb.kind in T5_KINDS:
        emb.convention = convention
    return emb


def _tensor_dict_vectors(
    data: Mapping[str, Any], label: str, metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], Convention | None]:
    """The vectors of a dict of tensors, and the T5 key convention when there is a T5 matrix."""
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    t5_found = [c for c, k in T5_FILE_KEYS.items() if k in tensors]
    if "clip_l" in tensors or "clip_g" in tensors or t5_found:
        vectors: dict[str, torch.Tensor] = {k: tensors[k] for k in ("clip_l", "clip_g") if k in tensors}
        convention = _t5_convention(tensors, t5_found, label)
        if convention is not None:
            vectors["t5"] = tensors[T5_FILE_KEYS[convention]]
        if not set(vectors) - {"t5"}:
            encoder_for_width(4096, label)  # raises: T5 alone is no SD3/Flux embedding
        used = {"clip_l", "clip_g"} | ({T5_FILE_KEYS[convention]} if convention else set())
        ignored = sorted(set(tensors) - used)
        if ignored:
            metadata["ignored_tensors"] = ",".join(ignored)
        return vectors, convention
    # OneTrainer writes "<key>_out" beside "<key>" for output embeddings; the input one is the embedding.
    base = [k for k in tensors if not (k.endswith("_out") and k[:-4] in tensors)]
    if len(base) != 1:
        msg = f"{label}: expected one embedding tensor (or clip_l and clip_g), found tensors: {_some_keys(tensors)}"
        if any("lora" in k.lower() for k in tensors):
            msg = f"{label}: this is a LoRA (or another model), not an embedding; its tensors: {_some_keys(tensors)}"
        raise EmbeddingFormatError(msg)
    key = base[0]
    if key == "umt5xxl":
        msg = (
            f"{label}: umt5xxl vectors are for UMT5-XXL (ComfyUI's Wan video models), not an SD1, SD2, "
            "SDXL, SD3 or Flux text encoder"
        )
        raise EmbeddingFormatError(msg)
    if len(tensors) > 1:
        metadata["ignored_tensors"] = ",".join(sorted(set(tensors) - {key}))
    if key not in ("emb_params", "emp_params"):
        metadata.setdefault("token", key)
    t = tensors[key]
    return {encoder_for_width(int(t.shape[-1]) if t.dim() else 0, label): t}, None


def _t5_convention(
    tensors: Mapping[str, torch.Tensor], found: list[Convention], label: str
) -> Convention | None:
    """Which T5 key a file uses; both only when they hold the same vectors (then ComfyUI's)."""
    if not found:
        return None
    if len(found) > 1:
        a, b = (tensors[T5_FILE_KEYS[c]] for c in found)
        if a.shape != b.shape or not torch.equal(a, b):
            msg = (
                f"{label}: holds two different T5 matrices, t5 (OneTrainer) and t5xxl (ComfyUI); "
                "keep one of them"
            )
            raise EmbeddingFormatError(msg)
        return "comfyui"
    return found[0]


def _some_keys(tensors: Mapping[str, Any], limit: int = 8) -> str:
    keys = sorted(tensors)
    if not keys:
        return "none"
    if len(keys) <= limit:
        return ", ".join(keys)
    return f"{', '.join(keys[:limit])}, … ({len(keys)} in all)"


def read_diffusers_pair(
    path_l: str | os.PathLike[str], path_g: str | os.PathLike[str], name: str | None = None
) -> Embedding:
    """An SDXL embedding from diffusers' two files (``learned_embeds`` CLIP-L, ``learned_embeds_2`` CLIP-G)."""
    first = read_embedding(path_l)
    second = read_embedding(path_g)
    parts = {**first.vectors, **second.vectors}
    if set(parts) != {"clip_l", "clip_g"} or len(first.vectors) + len(second.vectors) != 2:
        msg = (
            f"{path_l} + {path_g}: expected one 768-wide (CLIP-L) and one 1280-wide (CLIP-G) file, "
            f"got {first.kind} and {second.kind}"
        )
        raise EmbeddingFormatError(msg)
    meta = {**second.metadata, **first.metadata}
    return Embedding(name or first.name, parts, step=first.step, metadata=meta)


# --------------------------------------------------------------------------- writing


def header_metadata(emb: Embedding) -> dict[str, str]:
    """The safetensors ``__metadata__`` for an embedding: its fields plus free metadata."""
    clash = sorted(set(emb.metadata) & set(_FIELD_KEYS))
    if clash:
        msg = f"{emb.name}: metadata key {clash[0]!r} is reserved"
        raise EmbeddingFormatError(msg)
    out = {"name": emb.name}
    if emb.step is not None:
        out["step"] = str(emb.step)
    if emb.sd_checkpoint is not None:
        out["sd_checkpoint"] = emb.sd_checkpoint
    if emb.sd_checkpoint_name is not None:
        out["sd_checkpoint_name"] = emb.sd_checkpoint_name
    out.update({str(k): str(v) for k, v in emb.metadata.items()})
    return out


def check_convention(convention: str) -> Convention:
    """``convention`` if it is a known SD3/Flux key convention, else EmbeddingFormatError."""
    for known in T5_FILE_KEYS:
        if convention == known:
            return known
    msg = f"unknown key convention {convention!r}: onetrainer (t5) or comfyui (t5xxl)"
    raise EmbeddingFormatError(msg)


def file_tensors(emb: Embedding, convention: Convention | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``emb``'s ``.safetensors`` file, by key.

    SD1/SD2: ``emb_params``; SDXL: ``clip_l``, ``clip_g``; SD3/Flux: ``clip_l`` (, ``clip_g``) and the
    T5 matrix as ``t5`` (OneTrainer) or ``t5xxl`` (ComfyUI): ``convention``, else the one the
    embedding was read with, else ComfyUI's. ``convention`` is ignored for the other kinds (their
    keys are the same in both tools).
    """
    if emb.kind in T5_KINDS:
        conv = check_convention(convention or emb.convention or DEFAULT_CONVENTION)
        out = {k: v for k, v in emb.vectors.items() if k != "t5"}
        out[T5_FILE_KEYS[conv]] = emb.vectors["t5"]
        return out
    return dict(emb.vectors) if emb.kind in ("sdxl", "sdxl_refiner") else {"emb_params": emb.matrix}


def to_safetensors_bytes(emb: Embedding, convention: Convention | None = None) -> bytes:
    """The ``.safetensors`` file of ``emb`` (tensors as :func:`file_tensors`, everything else in the header)."""
    return safetensors_io.save_bytes(file_tensors(emb, convention), header_metadata(emb))


def a1111_data(emb: Embedding, *, with_metadata: bool = True) -> dict[str, Any]:
    """The dict A1111 writes for an embedding (``Embedding.save``); SDXL: only the two tensors."""
    _refuse_t5_kinds(emb, "an A1111 .pt or .png")
    if emb.kind in ("sdxl", "sdxl_refiner"):
        # A1111 calls .detach() on every value of an SDXL dict: tensors only.
        return {k: v.clone() for k, v in emb.vectors.items()}
    data: dict[str, Any] = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": emb.matrix.clone()},
        "name": emb.name,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }
    if with_metadata and emb.metadata:
        data[PT_METADATA_KEY] = {str(k): str(v) for k, v in emb.metadata.items()}
    return data


def _refuse_t5_kinds(emb: Embedding, what: str) -> None:
    if emb.kind in T5_KINDS:
        msg = (
            f"{emb.name}: an embedding for {KIND_LABELS[emb.kind]} cannot be written as {what}; "
            "write it as .safetensors"
        )
        raise EmbeddingFormatError(msg)


def to_a1111_pt_bytes(emb: Embedding) -> bytes:
    """A1111 ``.pt`` in torch's legacy (non-zip) format, which stock A1111 v1.10's checker accepts."""
    if emb.kind in ("sdxl", "sdxl_refiner") and emb.metadata:
        logger.info("%s: SDXL .pt files cannot carry metadata; only the vectors are written", emb.name)
    buf = io.BytesIO()
    torch.save(a1111_data(emb), buf, pickle_protocol=2, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def to_png(emb: Embedding, image: Image.Image | None = None) -> tuple[Image.Image, Any]:
    """An image carrying the embedding as A1111 does it (chunk + border), plus our metadata chunk."""
    if image is None:
        image = Image.new("RGB", (256, 256), (96, 96, 112))
    data = a1111_data(emb, with_metadata=False)
    extra = {PNG_METADATA_CHUNK: json.dumps(header_metadata(emb))}
    return image_data.png_with_data(image, data, extra)


def format_for_path(path: str | os.PathLike[str]) -> WriteFormat:
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".bin"):
        return "pt"
    if suffix == ".png":
        return "png"
    msg = f"{path}: cannot write {suffix or 'files without a suffix'}; use .safetensors, .pt or .png"
    raise EmbeddingFormatError(msg)


def write_embedding(
    emb: Embedding,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    image: Image.Image | None = None,
    convention: Convention | None = None,
) -> Path:
    """Write ``emb`` to ``path`` (format from the suffix) atomically; refuse to overwrite unless asked.

    ``convention``: the key convention of an SD3/Flux file (see :func:`file_tensors`); SD3/Flux
    embeddings are written as ``.safetensors`` only.
    """
    validate_name(emb.name)
    fmt = format_for_path(path)
    target = Path(path)
    if target.is_dir():
        msg = f"{target} is a folder"
        raise EmbeddingFormatError(msg)
    if fmt == "safetensors":
        data = to_safetensors_bytes(emb) if convention is None else to_safetensors_bytes(emb, convention)
        return atomic_write_bytes(target, data, overwrite=overwrite)
    _refuse_t5_kinds(emb, f"{'an A1111 .pt' if fmt == 'pt' else 'a .png'} file")
    if fmt == "pt":
        return atomic_write_bytes(target, to_a1111_pt_bytes(emb), overwrite=overwrite)
    picture, info = to_png(emb, image)
    return atomic_write(target, lambda f: picture.save(f, format="PNG", pnginfo=info), overwrite=overwrite)


def list_embedding_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Files in ``folder`` (recursively, following links like the hosts) that may hold embeddings."""
    root = Path(folder)
    if not root.is_dir():
        return []
    out = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):
        for fn in files:
            p = Path(dirpath) / fn
            if p.suffix.lower() not in READ_SUFFIXES or ".preview." in fn or fn.startswith("."):
                continue
            out.append(p)
    return sorted(out, key=lambda p: str(p).lower())


__all__ = [
    "Embedding",
    "EmbeddingFormatError",
    "list_embedding_files",
    "read_diffusers_pair",
    "read_embedding",
    "read_embedding_bytes",
    "write_embedding",
]

"""The embeddings folder as the Inspect view sees it: listing, describing, converting, saving."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lib_ti.errors import EmbeddingFormatError, TIError
from lib_ti.io.convert import convert_to, to_sd1, to_sdxl_l
from lib_ti.io.formats import (
    WRITE_SUFFIX,
    format_for_path,
    list_embedding_files,
    read_embedding,
    write_embedding,
)
from lib_ti.names import path_in_folder
from lib_ti.stats import Comparison, compare
from lib_ti.text.transfer import DEFAULT_K, to_sd1_by_tokens, to_sdxl_by_tokens

logger = logging.getLogger(__name__)

ConvertTarget = Literal[
    "same", "sd1", "sdxl_g_from_other", "sdxl_g_zeros", "sdxl_g_by_tokens", "sd1_by_tokens",
    "sdxl", "onetrainer", "comfyui",
]  # fmt: skip
#: the conversions that need the loaded model's token tables (nearest-token transfer)
BY_TOKENS: tuple[ConvertTarget, ...] = ("sdxl_g_by_tokens", "sd1_by_tokens")


@dataclass
class FileEntry:
    relpath: str
    path: Path


def list_files(folder: str | os.PathLike[str]) -> list[FileEntry]:
    """Embedding-like files under ``folder``, with paths relative to it (what the dropdown shows)."""
    root = Path(folder)
    return [FileEntry(p.relative_to(root).as_posix(), p) for p in list_embedding_files(root)]


def resolve(folder: str | os.PathLike[str], relpath: str) -> Path:
    """A path chosen in the UI, checked to be inside ``folder``."""
    if not relpath:
        msg = "no embedding selected"
        raise TIError(msg)
    root = Path(folder).resolve()
    p = (root / relpath).resolve()
    if root != p and root not in p.parents:
        msg = f"{relpath!r} is outside the embeddings folder"
        raise TIError(msg)
    return p


def compare_files(folder: str | os.PathLike[str], a: str, b: str) -> Comparison:
    return compare(read_embedding(resolve(folder, a)), read_embedding(resolve(folder, b)))


def convert_and_save(
    folder: str | os.PathLike[str],
    source: str,
    new_name: str,
    fmt: str,
    target: ConvertTarget = "same",
    other: str | None = None,
    overwrite: bool = False,
    tables: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    k: int = DEFAULT_K,
) -> Path:
    """Write ``source`` (converted as asked) into ``folder`` as ``new_name`` in format ``fmt``.

    ``tables``: the loaded model's token tables by encoder (``clip_l``, ``clip_g``), for the
    nearest-token conversions (an SDXL model must be loaded: it has both)."""
    emb = read_embedding(resolve(folder, source))
    suffix = WRITE_SUFFIX.get(fmt)
    if suffix is None:
        msg = f"unknown format {fmt!r}"
        raise TIError(msg)
    out = path_in_folder(folder, new_name, suffix)
    format_for_path(out)
    if target == "sd1":
        emb = to_sd1(emb, new_name)
    elif target == "sdxl_g_zeros":
        emb = to_sdxl_l(emb, "zeros", new_name)
    elif target == "sdxl_g_from_other":
        if not other:
            msg = "choose the embedding to take the CLIP-G half from (the comparison file)"
            raise TIError(msg)
        emb = to_sdxl_l(emb, read_embedding(resolve(folder, other)), new_name)
    elif target in ("sdxl", "onetrainer", "comfyui"):  # SD3 -> SDXL (T5 dropped); SD3/Flux key conventions
        emb = convert_to(emb, target, new_name)
    elif target in BY_TOKENS:
        found = dict(tables()) if tables is not None else {}
        if not {"clip_l", "clip_g"} <= set(found):
            msg = "nearest-token transfer needs an SDXL model loaded: its CLIP-L and CLIP-G token tables"
            raise TIError(msg)
        if target == "sdxl_g_by_tokens":
            emb = to_sdxl_by_tokens(emb, found["clip_l"], found["clip_g"], k, name=new_name)
        else:
            emb = to_sd1_by_tokens(emb, found["clip_g"], found["clip_l"], k, name=new_name)
    elif target != "same":
        msg = f"unknown conversion {target!r}"
        raise EmbeddingFormatError(msg)
    emb.name = new_name
    path = write_embedding(emb, out, overwrite=overwrite)
    logger.info("wrote %s", path)
    return path

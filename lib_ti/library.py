"""The embeddings folder as the Inspect view sees it: listing, describing, converting, saving."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lib_ti.convert import to_sd1, to_sdxl_l
from lib_ti.embedding import KIND_LABELS, Embedding
from lib_ti.errors import EmbeddingFormatError, TIError
from lib_ti.formats import format_for_path, list_embedding_files, read_embedding, write_embedding
from lib_ti.inspect import Comparison, compare, embedding_stats
from lib_ti.names import path_in_folder

logger = logging.getLogger(__name__)

ConvertTarget = Literal["same", "sd1", "sdxl_g_from_other", "sdxl_g_zeros"]
STATS_HEADERS = ["encoder", "vector", "norm", "min", "max", "mean", "std"]
COMPARE_HEADERS = ["encoder", "vector", "cosine", "mean |A-B|"]


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


def summary_markdown(emb: Embedding, relpath: str, status: dict[str, str]) -> str:
    host = status.get(emb.name)
    host_line = {
        "loaded": "loaded by the web UI: usable in prompts",
        "skipped": "skipped by the web UI (made for another model type)",
    }.get(host or "", "not in the web UI's database")
    lines = [
        f"### {emb.name}",
        f"- file: `{relpath}` ({emb.source})",
        f"- kind: **{KIND_LABELS[emb.kind]}**, {emb.num_vectors} vector(s) per token",
        f"- step: {emb.step if emb.step is not None else 'unknown'}",
        f"- status: {host_line}",
    ]
    if emb.sd_checkpoint or emb.sd_checkpoint_name:
        lines.append(f"- trained on: {emb.sd_checkpoint_name or '?'} [{emb.sd_checkpoint or '?'}]")
    return "\n".join(lines)


def stats_rows(emb: Embedding) -> list[list[object]]:
    rows: list[list[object]] = []
    for enc, stats in embedding_stats(emb).items():
        rows.extend(
            [
                enc,
                s.index,
                round(s.norm, 4),
                round(s.min, 4),
                round(s.max, 4),
                round(s.mean, 5),
                round(s.std, 5),
            ]
            for s in stats
        )
    return rows


def compare_rows(result: Comparison) -> list[list[object]]:
    rows: list[list[object]] = []
    for part in result.encoders:
        rows.extend(
            [part.encoder, i, round(c, 5), round(d, 6)]
            for i, (c, d) in enumerate(zip(part.cosine, part.mean_abs_diff))
        )
        rows.append([part.encoder, "all", "", round(part.mean_abs_diff_all, 6)])
    rows.append(["overall", "", "", round(result.mean_abs_diff, 6)])
    return rows


def compare_files(folder: str | os.PathLike[str], a: str, b: str) -> tuple[Comparison, list[list[object]]]:
    result = compare(read_embedding(resolve(folder, a)), read_embedding(resolve(folder, b)))
    return result, compare_rows(result)


def convert_and_save(
    folder: str | os.PathLike[str],
    source: str,
    new_name: str,
    fmt: str,
    target: ConvertTarget = "same",
    other: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``source`` (converted as asked) into ``folder`` as ``new_name`` in format ``fmt``."""
    emb = read_embedding(resolve(folder, source))
    suffix = {"safetensors": ".safetensors", "pt": ".pt", "png": ".png"}.get(fmt)
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
    elif target != "same":
        msg = f"unknown conversion {target!r}"
        raise EmbeddingFormatError(msg)
    emb.name = new_name
    path = write_embedding(emb, out, overwrite=overwrite)
    logger.info("wrote %s", path)
    return path

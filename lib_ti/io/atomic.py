"""Atomic file writes: a temporary file in the target folder, then ``os.replace``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from lib_ti.errors import EmbeddingExists


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, overwrite: bool = True
) -> Path:
    """Write a file through ``write(fileobj)`` so that readers see either the old or the new file.

    On any failure the temporary file is removed and an existing file at ``path`` is untouched.
    """
    target = Path(path)
    if target.is_dir():
        msg = f"{target} is a folder"
        raise IsADirectoryError(msg)
    if not overwrite and target.exists():
        msg = f"{target} already exists; choose another name or allow overwriting"
        raise EmbeddingExists(msg)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and target.exists():
            msg = f"{target} already exists; choose another name or allow overwriting"
            raise EmbeddingExists(msg)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def write(f: BinaryIO) -> None:
        f.write(data)

    return atomic_write(path, write, overwrite=overwrite)

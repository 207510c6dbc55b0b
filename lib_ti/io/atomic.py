"""Atomic file writes: a temporary file in the target folder, then ``os.replace`` (or ``os.link``
when an existing file must not be replaced)."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from lib_ti.errors import EmbeddingExists, WriteFailed


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, overwrite: bool = True
) -> Path:
    """Write a file through ``write(fileobj)`` so that readers see either the old or the new file.

    On any failure the temporary file is removed and an existing file at ``path`` is untouched; a
    failing write (disk full, read-only folder, no permission) raises :class:`WriteFailed` naming
    ``path``. Without ``overwrite``, two writers racing for one name give one file and one
    :class:`EmbeddingExists` (the final step is ``os.link``, which refuses an existing name).
    """
    target = Path(path)
    if target.is_dir():
        msg = f"{target} is a folder"
        raise IsADirectoryError(msg)
    if not overwrite and target.exists():
        raise _exists(target)
    tmp_name = ""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp_name, target)
        else:
            _link_new(tmp_name, target)
    except EmbeddingExists:
        raise
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise WriteFailed(str(target), reason, e.errno) from e
    finally:
        if tmp_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
    return target


def _link_new(tmp_name: str, target: Path) -> None:
    """Give the finished temporary file the name ``target`` only if no file has it (atomic)."""
    try:
        os.link(tmp_name, target)
    except FileExistsError:
        raise _exists(target) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # a filesystem without hard links (FAT, some network shares): check, then rename
        if target.exists():
            raise _exists(target) from None
        os.replace(tmp_name, target)


def remove_temporaries(folder: Path, name: str) -> list[Path]:
    """Remove the temporary files a killed writer left for the files ``name.*`` in ``folder``."""
    removed = []
    for p in folder.glob(f".{glob.escape(name)}.*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _exists(target: Path) -> EmbeddingExists:
    return EmbeddingExists(f"{target} already exists; choose another name or allow overwriting")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def write(f: BinaryIO) -> None:
        f.write(data)

    return atomic_write(path, write, overwrite=overwrite)

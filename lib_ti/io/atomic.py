"""Atomic file writes: a temporary file in the target folder, then ``os.replace`` (or ``os.link``
when an existing file must not be replaced)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from collections.abc import Callable, Iterable
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
            _replace(tmp_name, target)
        else:
            _link_new(tmp_name, target)
    except EmbeddingExists:
        raise
    except OSError as e:
        raise WriteFailed.from_os_error(target, e) from e
    finally:
        if tmp_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
    return target


#: Windows refuses to replace a file that another process holds open (a reader, an antivirus scan):
#: how many times, and how long apart, a replace is tried again
REPLACE_TRIES, REPLACE_PAUSE = 20, 0.1


def _replace(tmp_name: str, target: Path) -> None:
    for attempt in range(REPLACE_TRIES):
        try:
            os.replace(tmp_name, target)
            return
        except PermissionError:
            if os.name != "nt" or attempt == REPLACE_TRIES - 1:
                raise
            time.sleep(REPLACE_PAUSE)


def _link_new(tmp_name: str, target: Path) -> None:
    """Give the finished temporary file the name ``target`` only if no file has it (atomic)."""
    try:
        os.link(tmp_name, target)
    except FileExistsError:
        raise _exists(target) from None
    except OSError as e:
        if e.errno not in _NO_LINKS and not (os.name == "nt" and e.errno in (errno.EINVAL, errno.EACCES)):
            raise
        # a filesystem without hard links (FAT, some network shares): check, then rename
        if target.exists():
            raise _exists(target) from None
        os.replace(tmp_name, target)


def remove_temporaries(folder: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files (``.<file name>.<random>.tmp``) a killed writer left in ``folder``
    for the files ``names`` (None: for any file); the caller makes sure nobody is writing them now."""
    removed = []
    for p in folder.glob(".*.tmp"):
        if names is not None and not any(_temporary_of(p.name, n) for n in names):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _temporary_of(temp: str, name: str) -> bool:
    """``temp`` is a temporary file of :func:`atomic_write` for the file ``name`` (the random part
    that ``tempfile`` adds holds no dot)."""
    head = f".{name}."
    return temp.startswith(head) and temp.endswith(".tmp") and "." not in temp[len(head) : -4]


#: what ``os.link`` fails with where the file system has no hard links (Windows' FAT, exFAT and
#: many network shares give EINVAL or EACCES instead)
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def _exists(target: Path) -> EmbeddingExists:
    return EmbeddingExists(f"{target} already exists; choose another name or allow overwriting")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def write(f: BinaryIO) -> None:
        f.write(data)

    return atomic_write(path, write, overwrite=overwrite)

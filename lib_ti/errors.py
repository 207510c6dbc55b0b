"""Exceptions with messages meant for users."""

from __future__ import annotations

from typing import Any


def short_repr(value: Any) -> str:
    """``value`` for a message: its repr, shortened when long."""
    text = repr(value)
    if len(text) <= 60:
        return text
    return repr(value[:48] + "…") if isinstance(value, str) else f"{text[:50]}…"


class TIError(Exception):
    """Base class: the message is a complete sentence for the user."""


class EmbeddingFormatError(TIError, ValueError):
    """A file is not a readable embedding, or its contents are invalid."""


class UnsafeFileError(EmbeddingFormatError):
    """A pickle asks for something that is not on the allow-list; it was never executed."""


class InvalidNameError(TIError, ValueError):
    """An embedding name breaks one of the naming rules."""


class EmbeddingExists(TIError, FileExistsError):  # noqa: N818 (reads as a sentence)
    """A file of that name exists and overwriting was not asked for."""


class NotFoundError(TIError, LookupError):
    """The named thing does not exist."""


class EmbeddingNotFound(NotFoundError):  # noqa: N818
    """No embedding of that name in the embeddings folder."""


class JobNotFound(NotFoundError):  # noqa: N818
    """No job with that id."""


class WriteFailed(TIError, OSError):  # noqa: N818
    """A file could not be written (disk full, read-only folder, no permission); ``path`` names it.

    The file that was there before is untouched and no temporary file is left behind.
    """

    def __init__(self, path: str, reason: str, errno: int | None = None) -> None:
        super().__init__(f"could not write {path}: {reason}")
        self.path = path
        self.errno = errno

    @classmethod
    def from_os_error(cls, path: object, e: OSError) -> WriteFailed:
        """The failure of writing ``path`` that ``e`` reports."""
        return cls(str(path), e.strerror or str(e) or type(e).__name__, e.errno)

"""Embedding names: the rules a name must follow and safe paths built from it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lib_ti.errors import InvalidNameError

MAX_NAME_LENGTH = 100
_WINDOWS_FORBIDDEN = set('<>:"|?*')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


def validate_name(name: object) -> str:
    """Return ``name`` if it is a safe embedding name, else raise :class:`InvalidNameError`.

    The message names the rule that failed.
    """
    if not isinstance(name, str):
        msg = f"embedding name must be text, not {type(name).__name__}"
        raise InvalidNameError(msg)
    if not name:
        msg = "embedding name is empty"
        raise InvalidNameError(msg)
    if len(name) > MAX_NAME_LENGTH:
        msg = f"embedding name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
        raise InvalidNameError(msg)
    bad = [c for c in name if ord(c) < 32 or ord(c) == 127]
    if bad:
        msg = f"embedding name contains a control character ({ord(bad[0]):#04x})"
        raise InvalidNameError(msg)
    halves = [c for c in name if 0xD800 <= ord(c) <= 0xDFFF]
    if halves:
        msg = (
            f"embedding name contains half of a UTF-16 surrogate pair ({ord(halves[0]):#06x}), which is "
            "not text and cannot be a file name"
        )
        raise InvalidNameError(msg)
    if "/" in name or "\\" in name:
        msg = f"embedding name {name!r} contains a path separator ('/' or '\\')"
        raise InvalidNameError(msg)
    if ".." in name:
        msg = f"embedding name {name!r} contains '..'"
        raise InvalidNameError(msg)
    forbidden = sorted(_WINDOWS_FORBIDDEN.intersection(name))
    if forbidden:
        msg = f"embedding name {name!r} contains a character not allowed in file names: {''.join(forbidden)}"
        raise InvalidNameError(msg)
    if name != name.strip():
        msg = f"embedding name {name!r} starts or ends with white space"
        raise InvalidNameError(msg)
    if name.startswith(".") or name.endswith("."):
        msg = f"embedding name {name!r} starts or ends with '.'"
        raise InvalidNameError(msg)
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        msg = f"embedding name {name!r} is a reserved device name on Windows"
        raise InvalidNameError(msg)
    return name


def path_in_folder(folder: str | os.PathLike[str], name: str, suffix: str) -> Path:
    """Return ``folder/name+suffix`` after checking the name and that the result stays inside ``folder``."""
    validate_name(name)
    root = Path(folder).resolve()
    target = (root / f"{name}{suffix}").resolve()
    if target.parent != root:
        msg = f"embedding name {name!r} would be written outside {root}"
        raise InvalidNameError(msg)
    return target


#: the suffixes of checkpoint files, dropped from a checkpoint's label
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")
_HASH_SUFFIX = re.compile(r"\s*\[[^\[\]]*\]\s*$")


def without_hash(title: str) -> str:
    """A checkpoint title without its `` [hash]``: the hosts add it once they have hashed the file."""
    return _HASH_SUFFIX.sub("", str(title).strip())


def checkpoint_label(title: str) -> str:
    """A checkpoint title for people: ``SDXL/model.safetensors [c9e3e68f89]`` -> ``model``."""
    text = re.split(r"[\\/]", without_hash(title))[-1]
    for suffix in MODEL_SUFFIXES:
        if text.lower().endswith(suffix):
            return text[: -len(suffix)] or text
    return text

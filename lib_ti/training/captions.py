"""Captions and prompt templates, as in AUTOMATIC1111.

``[filewords]`` is the text of the image's sidecar caption file, or else its file name with leading
numbers and dashes removed, optionally reduced to the matches of a word regex joined by a join string.
Templates hold one prompt per line with ``[name]`` and ``[filewords]``.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

from lib_ti.training.errors import DataError

logger = logging.getLogger(__name__)

NAME = "[name]"
FILEWORDS = "[filewords]"
#: the template files shipped with the extension (``<repo>/templates``)
TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")  # A1111's re_numbers_at_start


class TemplateError(DataError):
    """A prompt template file is missing or has no ``[name]``."""


def load_template(path: str | os.PathLike[str]) -> list[str]:
    """The non-empty lines of a template file; at least one must contain ``[name]``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        msg = f"the prompt template file {p} does not exist"
        raise TemplateError(msg) from None
    except (OSError, UnicodeDecodeError) as e:
        msg = f"the prompt template file {p} cannot be read ({e})"
        raise TemplateError(msg) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not any(NAME in line for line in lines):
        msg = f"the prompt template file {p} has no line with {NAME}: the prompts would not contain the embedding"
        raise TemplateError(msg)
    missing = sum(NAME not in line for line in lines)
    if missing:
        logger.warning(
            "%d of the %d lines of %s have no %s; they do not train the embedding",
            missing,
            len(lines),
            p,
            NAME,
        )
    return lines


def builtin_templates() -> dict[str, Path]:
    """The template files shipped in ``templates/``, by stem (subject, style, ...)."""
    return {p.stem: p for p in sorted(TEMPLATES_DIR.glob("*.txt"))}


def filename_caption(path: str, word_regex: re.Pattern[str] | None = None, join: str = " ") -> str:
    """A1111's ``[filewords]`` from a file name: the stem without leading numbers and dashes, then
    optionally only the regex matches joined by ``join``."""
    text = _NUMBERS_AT_START.sub("", Path(path).stem)
    if word_regex is not None:
        words = word_regex.findall(text)
        text = (join or "").join(w if isinstance(w, str) else "".join(w) for w in words)
    return text


def read_caption(
    path: str, extension: str = ".txt", word_regex: re.Pattern[str] | None = None, join: str = " "
) -> str:
    """The sidecar caption ``<image stem><extension>`` if it exists, else the file-name caption."""
    p = Path(path)
    sidecar = p.with_name(p.stem + extension)
    if sidecar.is_file():
        try:
            lines = [
                line.strip()
                for line in sidecar.read_text(encoding="utf-8-sig", errors="replace").splitlines()
            ]
            return " ".join(line for line in lines if line)
        except OSError as e:
            logger.warning("caption file %s cannot be read (%s); using the file name", sidecar, e)
    return filename_caption(path, word_regex, join)


def process_tags(
    text: str, rng: random.Random, *, shuffle: bool = False, keep: int = 0, dropout: float = 0.0
) -> str:
    """Comma-separated tags with the first ``keep`` fixed and the rest dropped (each with probability
    ``dropout``) and shuffled. Returns ``text`` unchanged when neither is asked for."""
    if not shuffle and dropout <= 0:
        return text
    tags = [t.strip() for t in text.split(",")]
    tags = [t for t in tags if t]
    fixed, rest = tags[:keep], tags[keep:]
    if dropout > 0:
        rest = [t for t in rest if rng.random() >= dropout]
    if shuffle:
        rng.shuffle(rest)
    return ", ".join(fixed + rest)


def fill_template(template: str, name: str, filewords: str) -> str:
    """Substitute ``[filewords]`` then ``[name]`` (A1111's order); tidy the commas an empty caption leaves."""
    text = template.replace(FILEWORDS, filewords)
    if not filewords.strip() and FILEWORDS in template:
        text = re.sub(r"\s+,", ",", text)
        text = re.sub(r",(\s*,)+", ",", text).strip(" ,")
    return text.replace(NAME, name)

"""The caption editor's core: a training folder's captions listed, edited in bulk or one by one, and
the last change undone.

A caption is the sidecar ``<image stem>.txt`` next to an image, read as training reads it (lines
stripped and joined by spaces). A change first writes the undo record (:data:`UNDO_FILE`, hidden JSON
in the folder: every caption file it changes with its previous content), then the changed captions,
each atomically as one line of UTF-8. Only the last change is kept; it survives a restart, and a
change that fails half-way can be undone too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from lib_ti.errors import short_repr
from lib_ti.io.atomic import atomic_write_bytes
from lib_ti.prepare.errors import PrepareError
from lib_ti.training.errors import DataError
from lib_ti.training.images import check_folder, find_images

logger = logging.getLogger(__name__)

#: the undo record of the last change, in the training folder (hidden: image scans skip it)
UNDO_FILE = ".ti-captions-undo.json"
CAPTION_EXTENSION = ".txt"
_UNDO_VERSION = 1
#: one edit at a time in this process (the UI may run requests in parallel)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class CaptionEntry:
    """One image of the folder and its caption."""

    image: str  #: path relative to the folder, with forward slashes
    caption: str  #: the caption file's text as training reads it; "" when there is no file
    has_file: bool


@dataclass(frozen=True)
class EditResult:
    """What a change did: how many caption files it wrote and which (relative paths), for the user."""

    changed: int
    files: list[str]
    message: str


@dataclass(frozen=True)
class _Caption:
    image: str  # relative image path (forward slashes)
    file: str  # relative caption file path (forward slashes)
    text: str  # as training reads it
    previous: str | None  # exact file content (bytes decoded with surrogateescape); None: no file


# ---------------------------------------------------------------- tags


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of ``caption``, stripped, empty ones dropped."""
    return [t for t in (part.strip() for part in caption.split(",")) if t]


def join_tags(tags: Iterable[str]) -> str:
    """Tags as one caption, separated by ``", "``."""
    return ", ".join(tags)


def tag_frequency(entries: Iterable[CaptionEntry]) -> list[tuple[str, int]]:
    """(tag, number of captions holding it), most frequent first, then by tag."""
    counts: Counter[str] = Counter()
    for entry in entries:
        counts.update(set(split_tags(entry.caption)))
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


# ---------------------------------------------------------------- reading


def _one_line(text: str) -> str:
    """``text`` as training reads a caption file: lines stripped, empty ones dropped, joined by spaces."""
    return " ".join(s for s in (line.strip() for line in text.splitlines()) if s)


def _root(folder: str) -> Path:
    try:
        return Path(check_folder(folder))
    except DataError as e:
        raise PrepareError(str(e)) from None


def _read(path: Path) -> str | None:
    """The exact content of a caption file, or None when there is no file of that name."""
    if not path.is_file():
        return None
    try:
        return path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as e:
        msg = f"the caption file {path} cannot be read ({e.strerror or e})"
        raise PrepareError(msg) from None


def _text(previous: str | None) -> str:
    if previous is None:
        return ""
    data = previous.encode("utf-8", "surrogateescape")
    return _one_line(data.decode("utf-8-sig", errors="replace"))


def _scan(folder: str) -> tuple[Path, list[_Caption]]:
    """The folder and the caption of each of its images (as training finds them), sorted by image."""
    root = _root(folder)
    try:
        found, _skipped = find_images(str(root))
    except DataError as e:
        raise PrepareError(str(e)) from None
    captions = []
    for path, _size in found:
        image = PurePosixPath(Path(os.path.relpath(path, root)).as_posix())
        file = image.with_name(image.stem + CAPTION_EXTENSION)
        previous = _read(root / file)
        captions.append(_Caption(str(image), str(file), _text(previous), previous))
    captions.sort(key=lambda c: c.image)
    return root, captions


def _unique(captions: list[_Caption]) -> list[_Caption]:
    """One per caption file (``a.png`` and ``a.jpg`` share ``a.txt``)."""
    seen: set[str] = set()
    out = []
    for c in captions:
        if c.file not in seen:
            seen.add(c.file)
            out.append(c)
    return out


def list_captions(folder: str) -> list[CaptionEntry]:
    """Every image of the training folder (sub-folders too) with its caption, sorted by image path."""
    _, captions = _scan(folder)
    return [CaptionEntry(c.image, c.text, c.previous is not None) for c in captions]


# ---------------------------------------------------------------- writing


def _plural(n: int) -> str:
    return f"{n} caption{'' if n == 1 else 's'}"


def _changes(captions: list[_Caption], edit: Callable[[str], str]) -> list[tuple[_Caption, str]]:
    out = []
    for c in _unique(captions):
        new = _one_line(edit(c.text))
        if new != c.text:
            out.append((c, new))
    return out


def _commit(
    root: Path, changes: list[tuple[_Caption, str]], describe: Callable[[str], str], nothing: str
) -> EditResult:
    """Write the undo record, then each changed caption; ``describe("3 captions")`` is the message."""
    if not changes:
        return EditResult(0, [], nothing)
    for c, _ in changes:
        path = root / c.file
        if c.previous is None and os.path.lexists(path):
            msg = (
                f"{path} is not a caption file (a folder or a broken link has its name); rename or remove it"
            )
            raise PrepareError(msg)
    message = describe(_plural(len(changes)))
    record_path = root / UNDO_FILE
    old_record = _read_bytes(record_path)
    record = {
        "version": _UNDO_VERSION,
        "message": message,
        "files": [{"path": c.file, "previous": c.previous} for c, _ in changes],
    }
    try:
        atomic_write_bytes(record_path, json.dumps(record, ensure_ascii=True, indent=1).encode("ascii"))
    except OSError as e:
        msg = f"no caption was changed: the undo record cannot be saved ({e})"
        raise PrepareError(msg) from None
    written: list[str] = []
    for c, text in changes:
        try:
            atomic_write_bytes(root / c.file, text.encode("utf-8", "replace"))
        except OSError as e:
            if not written:  # nothing changed: the previous change stays undoable
                _put_back(record_path, old_record)
                msg = f"no caption was changed: {e}"
            else:
                msg = (
                    f"{e}; {len(written)} of {len(changes)} captions were changed before that, "
                    "Undo restores them"
                )
            logger.warning("caption edit in %s stopped: %s", root, e)
            raise PrepareError(msg) from None
        written.append(c.file)
    logger.info("%s in %s", message, root)
    return EditResult(len(written), written, message)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _put_back(path: Path, data: bytes | None) -> None:
    """Best effort: ``path`` as it was (``data``; None: no file)."""
    try:
        if data is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(path, data)
    except OSError as e:
        logger.warning("the undo record %s cannot be put back (%s)", path, e)


# ---------------------------------------------------------------- bulk operations


def _one_tag(tag: str, role: str) -> str:
    tag = _one_line(tag or "")
    if not tag:
        msg = f"no tag to {role} was given"
        raise PrepareError(msg)
    if "," in tag:
        msg = f"{short_repr(tag)} holds a comma; give one tag to {role}"
        raise PrepareError(msg)
    return tag


def replace_text(folder: str, find: str, replace: str, *, regex: bool = False) -> EditResult:
    """Replace ``find`` (plain text, or a Python regular expression) by ``replace`` in every caption."""
    if not find:
        msg = "nothing to find was given: enter the text to replace"
        raise PrepareError(msg)
    replace = replace or ""
    edit: Callable[[str], str]
    if regex:
        pattern = _compile(find, replace)

        def edit(text: str) -> str:
            try:
                return pattern.sub(replace, text)
            except (re.error, IndexError) as e:
                raise _bad_replacement(find, replace, e) from None

        kind = "the regular expression"
    else:

        def edit(text: str) -> str:
            return text.replace(find, replace)

        kind = "the text"
    with _LOCK:
        root, captions = _scan(folder)
        return _commit(
            root,
            _changes(captions, edit),
            lambda n: f"replaced {kind} {short_repr(find)} with {short_repr(replace)} in {n}",
            f"no caption changed: {kind} {short_repr(find)} is in none of them",
        )


def _compile(find: str, replace: str) -> re.Pattern[str]:
    try:
        pattern = re.compile(find)
    except re.error as e:
        msg = f"the regular expression {short_repr(find)} is not valid ({e})"
        raise PrepareError(msg) from None
    try:
        pattern.sub(replace, "")  # parses the replacement: a group it names must exist
    except (re.error, IndexError) as e:
        raise _bad_replacement(find, replace, e) from None
    return pattern


def _bad_replacement(find: str, replace: str, e: Exception) -> PrepareError:
    return PrepareError(
        f"the replacement {short_repr(replace)} does not fit the regular expression {short_repr(find)} ({e})"
    )


def remove_tag(folder: str, tag: str) -> EditResult:
    """Remove ``tag`` (an exact, case-sensitive tag) from every caption."""
    tag = _one_tag(tag, "remove")

    def edit(text: str) -> str:
        tags = split_tags(text)
        return join_tags(t for t in tags if t != tag) if tag in tags else text

    with _LOCK:
        root, captions = _scan(folder)
        return _commit(
            root,
            _changes(captions, edit),
            lambda n: f"removed the tag {short_repr(tag)} from {n}",
            f"no caption changed: none has the tag {short_repr(tag)}",
        )


def rename_tag(folder: str, old: str, new: str) -> EditResult:
    """Rename the tag ``old`` to ``new`` in every caption; a caption that has ``new`` already keeps one."""
    old, new = _one_tag(old, "rename"), _one_tag(new, "rename to")
    if old == new:
        msg = f"the tag {short_repr(old)} would be renamed to itself"
        raise PrepareError(msg)

    def edit(text: str) -> str:
        tags = split_tags(text)
        if old not in tags:
            return text
        out: list[str] = []
        for t in tags:
            t = new if t == old else t
            if t != new or new not in out:
                out.append(t)
        return join_tags(out)

    with _LOCK:
        root, captions = _scan(folder)
        return _commit(
            root,
            _changes(captions, edit),
            lambda n: f"renamed the tag {short_repr(old)} to {short_repr(new)} in {n}",
            f"no caption changed: none has the tag {short_repr(old)}",
        )


def sort_tags(folder: str) -> EditResult:
    """Sort the tags of every caption by how many captions of the folder hold them (ties keep their order)."""
    with _LOCK:
        root, captions = _scan(folder)
        unique = _unique(captions)
        counts = dict(tag_frequency(CaptionEntry(c.image, c.text, True) for c in unique))

        def edit(text: str) -> str:
            tags = split_tags(text)
            ordered = sorted(tags, key=lambda t: -counts.get(t, 0))
            return text if ordered == tags else join_tags(ordered)

        return _commit(
            root,
            _changes(unique, edit),
            lambda n: f"sorted the tags of {n} by frequency",
            "no caption changed: the tags are in order of frequency already",
        )


def add_tags(folder: str, tags: str, *, at_start: bool = True) -> EditResult:
    """Add the comma-separated ``tags`` to every caption that lacks them, at its start or end."""
    wanted = list(dict.fromkeys(split_tags(_one_line(tags or ""))))
    if not wanted:
        msg = "no tags to add were given"
        raise PrepareError(msg)

    def edit(text: str) -> str:
        have = split_tags(text)
        missing = [t for t in wanted if t not in have]
        if not missing:
            return text
        return join_tags(missing + have if at_start else have + missing)

    shown = short_repr(join_tags(wanted))
    with _LOCK:
        root, captions = _scan(folder)
        return _commit(
            root,
            _changes(captions, edit),
            lambda n: f"added {shown} at the {'start' if at_start else 'end'} of {n}",
            f"no caption changed: every caption has {shown} already",
        )


# ---------------------------------------------------------------- single edits


def _pick(root: Path, by_image: Mapping[str, _Caption], image: str) -> _Caption:
    """The caption of ``image``, which must name one of the folder's images by its relative path."""
    if not isinstance(image, str) or not image.strip():
        msg = "no image was given"
        raise PrepareError(msg)
    posix, windows = PurePosixPath(image), PureWindowsPath(image)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        msg = f"{short_repr(image)} is an absolute path; give the image's path inside the folder"
        raise PrepareError(msg)
    if ".." in posix.parts or ".." in windows.parts:
        msg = f"{short_repr(image)} leaves the folder ('..' is not allowed)"
        raise PrepareError(msg)
    name = image.replace("\\", "/") if os.sep == "\\" else image
    found = by_image.get(name) or by_image.get(PurePosixPath(name).as_posix())
    if found is None:
        msg = f"{short_repr(image)} is not an image of the training folder {root}"
        raise PrepareError(msg)
    return found


def set_captions(folder: str, captions: Mapping[str, str]) -> EditResult:
    """Set the captions of several images (``{relative image path: text}``) as one undoable change."""
    with _LOCK:
        root, found = _scan(folder)
        by_image = {c.image: c for c in found}
        wanted: dict[str, tuple[_Caption, str]] = {}
        for image, text in captions.items():
            c = _pick(root, by_image, image)
            new = _one_line(text or "")
            other = wanted.get(c.file)
            if other is not None and other[1] != new:
                msg = (
                    f"{other[0].image} and {c.image} share the caption file {c.file} "
                    "but were given different captions"
                )
                raise PrepareError(msg)
            wanted[c.file] = (c, new)
        changes = [(c, new) for c, new in wanted.values() if new != c.text]
        if len(changes) == 1:
            image = changes[0][0].image
            return _commit(
                root, changes, lambda _n: f"saved the caption of {image}", "the caption is unchanged"
            )
        return _commit(root, changes, lambda n: f"saved {n}", "no caption changed")


def set_caption(folder: str, image: str, text: str) -> EditResult:
    """Set the caption of one image (its path relative to the folder), as an undoable change."""
    return set_captions(folder, {image: text})


# ---------------------------------------------------------------- undo


def _record_path(value: Any) -> str:
    """A caption file path from the undo record, refused unless it is a ``.txt`` inside the folder."""
    if isinstance(value, str) and value:
        posix, windows = PurePosixPath(value), PureWindowsPath(value)
        inside = not (posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root)
        no_up = ".." not in posix.parts and ".." not in windows.parts
        visible = not any(p.startswith(".") for p in posix.parts)
        if inside and no_up and visible and posix.suffix == CAPTION_EXTENSION:
            return value
    msg = f"the undo record names {short_repr(value)}, which is not a caption file of the folder; nothing was undone"
    raise PrepareError(msg)


def _load_record(path: Path) -> tuple[str, list[tuple[str, str | None]]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        msg = f"nothing to undo: no caption change is recorded in {path.parent}"
        raise PrepareError(msg) from None
    except OSError as e:
        msg = f"the undo record {path} cannot be read ({e.strerror or e})"
        raise PrepareError(msg) from None
    try:
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict) or record.get("version") != _UNDO_VERSION:
            msg = "not an undo record of this version"
            raise ValueError(msg)
        files = record["files"]
        message = str(record.get("message", "the last change"))
        if not isinstance(files, list):
            msg = "no file list"
            raise ValueError(msg)
        entries: list[tuple[str, str | None]] = []
        for item in files:
            previous = item["previous"]
            if previous is not None and not isinstance(previous, str):
                msg = "a previous caption is not text"
                raise ValueError(msg)
            entries.append((_record_path(item["path"]), previous))
    except (ValueError, KeyError, TypeError) as e:
        msg = f"the undo record {path} is damaged ({e}); nothing was undone"
        raise PrepareError(msg) from None
    return message, entries


def undo(folder: str) -> EditResult:
    """Undo the last change: every caption file it changed gets its previous content back (a file it
    created is deleted). The record is removed afterwards, so a second undo has nothing to undo."""
    root = _root(folder)
    with _LOCK:
        record_path = root / UNDO_FILE
        message, entries = _load_record(record_path)
        restored: list[str] = []
        for rel, previous in entries:
            path = root / rel
            try:
                if previous is None:
                    if path.is_file() or path.is_symlink():
                        path.unlink()
                        restored.append(rel)
                    continue
                data = previous.encode("utf-8", "surrogateescape")
                current = _read_bytes(path) if path.is_file() else None
                if current != data:
                    atomic_write_bytes(path, data)
                    restored.append(rel)
            except OSError as e:
                msg = (
                    f"undo stopped at {path} ({e}); {len(restored)} caption file(s) were restored, "
                    "undo again to finish"
                )
                raise PrepareError(msg) from None
        try:
            record_path.unlink(missing_ok=True)
        except OSError as e:
            msg = f"the captions were restored but the undo record {record_path} cannot be removed ({e})"
            raise PrepareError(msg) from None
        text = f"undid the last change ({message}): restored {_plural(len(restored))}"
        logger.info("%s in %s", text, root)
        return EditResult(len(restored), restored, text)

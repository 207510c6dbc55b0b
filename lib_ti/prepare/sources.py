"""The raw pictures of a source folder: which files are read, and each one opened as an RGB image.

More formats are read here than the trainer reads (bmp, gif's first frame, tiff, avif and heic where
Pillow or the host's Pillow plugin can); the prepared folder holds only png, jpg or webp.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageColor, UnidentifiedImageError

from lib_ti.prepare.errors import PrepareError
from lib_ti.training.images import MAX_FILES, oriented, skip_reason, to_8bit

logger = logging.getLogger(__name__)

#: the extensions a source folder's pictures may have
SOURCE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif",
)  # fmt: skip
#: the smallest side a picture may have by default (smaller ones are listed and skipped)
MIN_SIZE = 64
_PLUGINS_TRIED: dict[str, bool] = {}
_PLUGINS_LOCK = threading.Lock()


def register_plugins() -> None:
    """Let Pillow read avif and heic where the host ships the plugin (pillow-avif-plugin, pillow-heif)."""
    with _PLUGINS_LOCK:
        if not _PLUGINS_TRIED:
            _register_plugins()


def _register_plugins() -> None:
    for module in ("pillow_avif", "pillow_heif"):
        try:
            mod = importlib.import_module(module)
            if module == "pillow_heif":
                mod.register_heif_opener()
            _PLUGINS_TRIED[module] = True
        except Exception:
            _PLUGINS_TRIED[module] = False


def parse_color(text: str) -> tuple[int, int, int]:
    """An RGB colour from ``#rrggbb``, ``#rgb`` or a colour name; PrepareError when it is none."""
    try:
        rgb = ImageColor.getrgb(text.strip())
    except (ValueError, AttributeError):
        msg = f"background {text!r} is not a colour (use #rrggbb or a name such as white)"
        raise PrepareError(msg) from None
    return rgb[0], rgb[1], rgb[2]


@dataclass(frozen=True)
class Source:
    """One picture of the source folder."""

    path: Path
    #: the path relative to the source folder, with forward slashes
    rel: str
    #: the caption file beside it (``<stem>.txt``), if there is one
    caption: Path | None


def find_sources(folder: Path) -> tuple[list[Source], list[str]]:
    """The pictures under ``folder`` (sub-folders too; hidden files and folders left out), sorted by
    path, and the files skipped as ``"rel: reason"`` (other files are ignored silently)."""
    found: list[Source] = []
    skipped: list[str] = []
    count = 0
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        count += len(files)
        if count > MAX_FILES:
            msg = (
                f"{folder} holds more than {MAX_FILES} files (sub-folders included); choose a smaller folder"
            )
            raise PrepareError(msg)
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = set(files)
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            if path.suffix.lower() not in SOURCE_EXTENSIONS:
                continue
            caption = f"{path.stem}.txt"
            found.append(Source(path, rel, path.with_name(caption) if caption in names else None))
    return found, skipped


def read_source_caption(src: Source) -> str:
    """The text of the picture's own caption file (lines joined by spaces), "" without one."""
    if src.caption is None:
        return ""
    try:
        text = src.caption.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        logger.warning("caption file %s cannot be read (%s)", src.caption, e)
        return ""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _why_unreadable(path: Path, e: Exception) -> str:
    ext = path.suffix.lower()
    if isinstance(e, UnidentifiedImageError) and ext in (".avif", ".heic", ".heif"):
        plugin = "pillow-avif-plugin" if ext == ".avif" else "pillow-heif"
        return f"{ext[1:]} cannot be read by this Pillow (install {plugin}, or convert it to png)"
    if isinstance(e, Image.DecompressionBombError):
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return f"too large to open safely (Pillow's limit is {limit} pixels, about {int(limit**0.5)} x {int(limit**0.5)})"
    if isinstance(e, OSError) and not isinstance(
        e, FileNotFoundError | PermissionError | UnidentifiedImageError
    ):
        return f"damaged or cut short ({e})"
    return skip_reason(e)


def open_picture(path: Path, background: tuple[int, int, int], min_size: int = MIN_SIZE) -> Image.Image:
    """The picture as displayed, RGB: EXIF orientation applied, a gif's first frame, 16-bit grey scaled,
    transparency flattened on ``background``. ValueError with the reason when it cannot be used."""
    register_plugins()
    try:
        with Image.open(path) as im:  # Pillow refuses a decompression bomb here
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            img = oriented(im)
    except Exception as e:
        raise ValueError(_why_unreadable(path, e)) from e
    if min(img.size) < min_size:
        msg = f"too small ({img.width}x{img.height}; the smallest side must be at least {min_size} px)"
        raise ValueError(msg)
    return flatten(to_8bit(img), background)


def flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """``img`` as RGB, its transparency (alpha, a palette's transparent index) laid on ``background``."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "PA", "La") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img.convert("RGB"), mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")

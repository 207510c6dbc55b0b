"""Drawing a labelled grid and writing it as a PNG that carries every cell's infotext."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from lib_ti.io.atomic import atomic_write

#: the PNG text chunk with the grid's rows, columns and every cell's infotext (JSON)
GRID_CHUNK = "ti-grid"
MARGIN = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
EMPTY = (200, 200, 204)


@dataclass
class Cell:
    """One image of the grid, or why there is none (``note``)."""

    row: int
    column: int
    image: Image.Image | None = None
    infotext: str = ""
    note: str = ""


@dataclass
class GridPicture:
    """What a grid shows: labels and cells (row-major, ``None`` where nothing was made)."""

    rows: list[str]
    columns: list[str]
    cells: dict[tuple[int, int], Cell] = field(default_factory=dict)
    title: str = ""


def font(size: int) -> Any:
    """A scalable font where Pillow has one (10.1+ or DejaVu on the system), else its bitmap font."""
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 (A1111 ships 9.5)
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, fnt: Any) -> tuple[int, int]:
    box = draw.multiline_textbbox((0, 0), text, font=fnt)
    return box[2] - box[0], box[3] - box[1]


def _wrap(text: str, width_px: int, size: int) -> str:
    chars = max(8, int(width_px / (size * 0.55)))
    return "\n".join(textwrap.wrap(text, chars, max_lines=4, placeholder="…")) or " "


def cell_size(picture: GridPicture) -> tuple[int, int]:
    sizes = [c.image.size for c in picture.cells.values() if c.image is not None]
    return sizes[0] if sizes else (256, 256)


def draw(picture: GridPicture) -> Image.Image:
    """The grid: column labels on top, row labels on the left, a grey box with its note for a missing cell."""
    cw, ch = cell_size(picture)
    size = max(12, min(cw, ch) // 14)
    fnt = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_text = [_wrap(t, cw - 2 * MARGIN, size) for t in picture.columns]
    label_w = max(cw // 2, 160)
    row_text = [_wrap(t, label_w - 2 * MARGIN, size) for t in picture.rows]
    top = max(_text_size(probe, t, fnt)[1] for t in col_text) + 2 * MARGIN
    image = Image.new("RGB", (label_w + cw * len(picture.columns), top + ch * len(picture.rows)), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for c, text in enumerate(col_text):
        w, _ = _text_size(pen, text, fnt)
        pen.multiline_text(
            (label_w + c * cw + (cw - w) // 2, MARGIN), text, fill=INK, font=fnt, align="center"
        )
    for r, text in enumerate(row_text):
        _, h = _text_size(pen, text, fnt)
        pen.multiline_text((MARGIN, top + r * ch + (ch - h) // 2), text, fill=INK, font=fnt)
    for (r, c), cell in picture.cells.items():
        x, y = label_w + c * cw, top + r * ch
        if cell.image is not None:
            img = cell.image.convert("RGB")
            if img.size != (cw, ch):
                img = img.resize((cw, ch), Image.LANCZOS)
            image.paste(img, (x, y))
        else:
            pen.rectangle((x + 1, y + 1, x + cw - 2, y + ch - 2), fill=EMPTY)
            note = _wrap(cell.note or "not made", cw - 4 * MARGIN, size)
            pen.multiline_text((x + 2 * MARGIN, y + 2 * MARGIN), note, fill=INK, font=fnt)
    for r in range(len(picture.rows)):  # empty cells of rows never reached
        for c in range(len(picture.columns)):
            if (r, c) not in picture.cells:
                x, y = label_w + c * cw, top + r * ch
                pen.rectangle((x + 1, y + 1, x + cw - 2, y + ch - 2), fill=EMPTY)
    return image


def grid_metadata(picture: GridPicture) -> dict[str, Any]:
    """The grid's labels and every cell's infotext or note (the ``ti-grid`` chunk)."""
    cells = [
        {k: v for k, v in asdict(cell).items() if k != "image"} for _, cell in sorted(picture.cells.items())
    ]
    return {"title": picture.title, "rows": picture.rows, "columns": picture.columns, "cells": cells}


def write(picture: GridPicture, path: str | Path) -> Path:
    """Draw and write the grid atomically; ``parameters`` holds the first image's infotext (as the
    host's own grids do), ``ti-grid`` all of them."""
    image = draw(picture)
    info = PngImagePlugin.PngInfo()
    meta = grid_metadata(picture)
    first = next((c["infotext"] for c in meta["cells"] if c["infotext"]), "")
    if first:
        info.add_text("parameters", first)
    info.add_text(GRID_CHUNK, json.dumps(meta, ensure_ascii=False))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda f: image.save(f, format="PNG", pnginfo=info), overwrite=True)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``ti-grid`` chunk of a grid PNG."""
    with Image.open(path) as im:
        return dict(json.loads(im.info[GRID_CHUNK]))

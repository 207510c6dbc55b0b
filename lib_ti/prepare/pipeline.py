"""A Prepare run: the source folder's pictures read, de-duplicated, fitted to the trainer's buckets,
written to the output folder, and captioned.

Reading, fitting and writing run in a thread pool (Pillow releases the GIL while it decodes, resizes
and encodes); the host's upscaler and the captioner run under the host's GPU lock, one call at a time.
Nothing in the source folder is ever written; a stopped run keeps every image it wrote, with its caption.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from lib_ti.io.atomic import atomic_write_bytes
from lib_ti.prepare.crop import Upscale, fit
from lib_ti.prepare.dedupe import find_duplicates, mean_colour, phash
from lib_ti.prepare.errors import PrepareError
from lib_ti.prepare.options import PrepareRequest
from lib_ti.prepare.sources import (
    Source,
    find_sources,
    open_picture,
    parse_color,
    read_source_caption,
    register_plugins,
)
from lib_ti.training.buckets import Size, bucket_set, nearest_bucket
from lib_ti.training.captions import filename_caption

logger = logging.getLogger(__name__)

#: captions an image: a batch of RGB images -> one caption each
Captioner = Callable[[list[Image.Image]], list[str]]
#: the report written into the output folder (hidden: the trainer and the caption editor skip it)
REPORT_FILE = ".ti-prepare.json"
#: images captioned per captioner call
CAPTION_BATCH = 8
_SAVE_ARGS: dict[str, dict[str, Any]] = {
    "png": {"format": "PNG", "compress_level": 4},
    "jpg": {"format": "JPEG", "quality": 95, "subsampling": 0},
    "webp": {"format": "WEBP", "quality": 95, "method": 4},
}


def workers() -> int:
    """Threads for reading, resizing and encoding: one per core, at most 4. Pillow releases the GIL
    while it works, and the threads hold no lock the web UI needs, so a generation meanwhile shares
    the cores and completes (tests/host/test_prepare_host.py)."""
    return max(1, min(4, os.cpu_count() or 2))


@dataclass
class PrepareHooks:
    """What a run needs from outside: progress, stop, the host's upscaler, the captioner, the GPU lock."""

    #: (done, total, text)
    progress: Callable[[int, int, str], None] = lambda done, total, text: None
    should_stop: Callable[[], bool] = lambda: False
    upscale: Upscale | None = None
    caption: Captioner | None = None
    #: the host's GPU lock, held around each upscaler and captioner call
    exclusive: Callable[[], AbstractContextManager[Any]] = nullcontext


@dataclass
class PrepareReport:
    """What a run did; also saved as ``.ti-prepare.json`` in the output folder."""

    source_dir: str
    output_dir: str
    resolution: int
    #: images written (paths relative to the output folder)
    written: list[str] = field(default_factory=list)
    #: "source file: reason" for every picture not used
    skipped: list[str] = field(default_factory=list)
    #: near-duplicate groups: {"kept": source, "duplicates": [sources], "copied": bool}
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    #: caption files written
    captions: int = 0
    #: images per bucket, as "widthxheight": count
    buckets: dict[str, int] = field(default_factory=dict)
    stopped: bool = False
    #: why the captioner stopped captioning (the images and the other captions are written)
    caption_error: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        text = f"{len(self.written)} image(s) and {self.captions} caption(s) written to {self.output_dir}"
        if self.skipped:
            text += f"; {len(self.skipped)} picture(s) skipped"
        dropped = sum(len(g["duplicates"]) for g in self.duplicates if not g["copied"])
        if dropped:
            text += f"; {dropped} near-duplicate(s) left out"
        if self.caption_error:
            text += f"; captioning stopped: {self.caption_error}"
        return text + (" (stopped)" if self.stopped else "")


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or inside it: by name, and by file identity for the parts that exist (a
    case-insensitive disk, a link)."""
    if a == b or b in a.parents:
        return True
    if not b.exists():
        return False
    for p in (a, *a.parents):
        try:
            if p.exists() and p.samefile(b):
                return True
        except OSError:
            continue
    return False


def check_folders(req: PrepareRequest) -> tuple[Path, Path]:
    """The source and output folders, resolved; PrepareError unless the source is a folder and the
    output is a new or empty folder (or ``overwrite``) apart from the source."""
    src = Path(req.source_dir.strip()).expanduser()
    out = Path(req.output_dir.strip()).expanduser()
    try:
        if not src.is_dir():
            msg = f"the source folder {src} {'is not a folder' if src.exists() else 'does not exist'}"
            raise PrepareError(msg)
        src_real, out_real = src.resolve(), out.resolve()
        if _inside(out_real, src_real) or _inside(src_real, out_real):
            msg = (
                f"the output folder {out} and the source folder {src} overlap; choose an output folder "
                "outside the source (the source is never written)"
            )
            raise PrepareError(msg)
        if out.exists() and not out.is_dir():
            msg = f"the output folder {out} is a file"
            raise PrepareError(msg)
        if out.is_dir() and not req.overwrite and any(not p.name.startswith(".") for p in out.iterdir()):
            msg = f"the output folder {out} already holds files; choose a new folder or allow overwriting"
            raise PrepareError(msg)
    except OSError as e:
        msg = f"the folders cannot be used ({e.strerror or e})"
        raise PrepareError(msg) from None
    return src, out


def compose_caption(existing: str, new: str, prefix: str, mode: str) -> str:
    """The caption to write: ``new`` (the captioner's) with ``existing`` (the picture's own) by ``mode``
    ("append": existing then the new tags it lacks; "overwrite": new, else existing; "keep": existing,
    else new), ``prefix`` first unless it is there already."""
    existing, new, prefix = existing.strip(), new.strip(), prefix.strip()
    if mode == "overwrite":
        text = new or existing
    elif mode == "keep":
        text = existing or new
    else:
        have = {t.strip() for t in existing.split(",")}
        extra = [t.strip() for t in new.split(",") if t.strip() and t.strip() not in have]
        text = ", ".join(x for x in (existing, ", ".join(extra)) if x)
    if prefix and not (text == prefix or text.startswith((f"{prefix},", f"{prefix} "))):
        text = f"{prefix}, {text}" if text else prefix
    return text


@dataclass(frozen=True)
class _Output:
    """One image written: its file, its source's own caption, the image whose captioner text it takes
    (itself; for a mirrored copy, its original), and its source's file-name caption."""

    rel: str
    caption: str
    own: str
    file_words: str


class _Steps:
    """The run's progress: ``done`` of ``total`` steps (reading, writing, captioning)."""

    def __init__(self, hooks: PrepareHooks, total: int) -> None:
        self.hooks, self.total, self.done = hooks, total, 0

    def tick(self, text: str) -> None:
        self.done += 1
        self.hooks.progress(self.done, self.total, text)


@dataclass
class _Survey:
    size: Size | None = None  # (height, width) as displayed
    hash: int | None = None
    colour: tuple[int, int, int] | None = None
    reason: str = ""


def _survey(src: Source, req: PrepareRequest, background: tuple[int, int, int]) -> _Survey:
    try:
        img = open_picture(src.path, background, req.min_size)
        if not req.dedupe:
            return _Survey((img.height, img.width))
        return _Survey((img.height, img.width), phash(img), mean_colour(img))
    except ValueError as e:
        return _Survey(reason=str(e))
    except Exception as e:  # one picture must not end the run
        return _Survey(reason=f"could not be read ({type(e).__name__}: {e})")


def _bounded(
    pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any]
) -> Generator[Any, None, None]:
    """``pool.map(fn, items)`` in order with at most two batches of work in flight (memory, stop);
    closing it (the caller stops early) cancels the work not started."""
    window = 2 * getattr(pool, "_max_workers", 4)
    pending: list[Future[Any]] = []
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
    finally:
        for f in pending:
            f.cancel()


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **_SAVE_ARGS[fmt])
    return buf.getvalue()


class _Names:
    """Output names: the source's relative path without its suffix, then ``-2``, ``-3``... until none
    of the names it needs (with its ``-tile``/``-flip`` suffixes) is taken; all of them are reserved."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def take(self, rel: str, suffixes: list[str]) -> str:
        stem = rel.rsplit(".", 1)[0]
        name, n = stem, 1
        while any(f"{name}{s}".lower() in self.used for s in suffixes):
            n += 1
            name = f"{stem}-{n}"
        self.used.update(f"{name}{s}".lower() for s in suffixes)
        return name


def run_prepare(req: PrepareRequest, hooks: PrepareHooks | None = None) -> PrepareReport:
    """Prepare ``req.source_dir`` into ``req.output_dir`` (``req.resolution`` decided, not 0)."""
    hooks = hooks or PrepareHooks()
    if req.resolution < 64:
        msg = "the resolution is not decided (0 means the loaded model's)"
        raise PrepareError(msg)
    t0 = time.perf_counter()
    src_dir, out_dir = check_folders(req)
    background = parse_color(req.background)
    report = PrepareReport(str(src_dir), str(out_dir), req.resolution)
    sources, report.skipped = find_sources(src_dir)
    if not sources:
        msg = f"no pictures in {src_dir} (png, jpg, webp, bmp, gif, tiff, avif; sub-folders included)"
        raise PrepareError(msg)
    buckets = bucket_set(req.resolution, req.buckets)
    register_plugins()  # once, before the threads
    src_real = src_dir.resolve()
    # read and write every picture, and caption it (the count is made exact once duplicates are known)
    steps = _Steps(hooks, (3 if hooks.caption is not None else 2) * len(sources))

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot make the output folder {out_dir} ({e.strerror or e})"
        raise PrepareError(msg) from None

    upscale = hooks.upscale
    if upscale is not None:
        host_upscale = upscale

        def upscale_locked(img: Image.Image, scale: float) -> Image.Image:
            with hooks.exclusive():
                return host_upscale(img, scale)

        upscale = upscale_locked

    def make(src: Source) -> tuple[list[tuple[str, bytes, str]], str, Size | None]:
        """The encoded images of one source (name suffix, file bytes, "WxH") and its reason when it is
        skipped; decoding, fitting and encoding all happen here, in a worker thread. Never raises: a
        picture that fails in any way (an upscaler out of memory included) is skipped with the reason."""
        if hooks.should_stop():
            return [], "not prepared (stopped)", None
        try:
            img = open_picture(src.path, background, req.min_size)
            bucket = nearest_bucket((img.height, img.width), buckets)
            pieces = fit(
                img, bucket, req.crop, background=background, overlap=req.tile_overlap, upscale=upscale
            )
            named = [(f"-tile{i + 1}" if len(pieces) > 1 else "", p) for i, p in enumerate(pieces)]
            if req.flip_copies:
                named += [(f"{s}-flip", p.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for s, p in named]
            return [(s, _encode(p, req.image_format), f"{p.width}x{p.height}") for s, p in named], "", bucket
        except ValueError as e:
            return [], str(e), None
        except Exception as e:  # one picture must not end the run
            logger.warning("%s could not be prepared", src.path, exc_info=True)
            return [], f"could not be prepared ({type(e).__name__}: {e})", None

    # (output file relative to out_dir, the source's caption, the image the captioner sees for it, the
    # source's file-name caption) of every image written; a flipped copy takes its original's caption
    outputs: list[_Output] = []
    with ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="lib_ti-prepare") as pool:
        surveys: list[_Survey] = []
        reading = _bounded(pool, lambda s: _survey(s, req, background), sources)
        for src, survey in zip(sources, reading):
            surveys.append(survey)
            if survey.reason:
                report.skipped.append(f"{src.rel}: {survey.reason}")
            steps.tick(f"reading {src.rel}")
            if hooks.should_stop():
                report.stopped = True
                reading.close()
                break
        dropped: set[int] = set()
        if req.dedupe and not report.stopped:
            groups = find_duplicates(
                [s.hash for s in surveys], [s.size[0] * s.size[1] if s.size else 0 for s in surveys],
                req.dedupe_threshold, [s.colour for s in surveys],
            )  # fmt: skip
            for g in groups:
                report.duplicates.append(
                    {
                        "kept": sources[g.kept].rel,
                        "duplicates": [sources[i].rel for i in g.dropped],
                        "copied": req.keep_duplicates,
                    }
                )
                if not req.keep_duplicates:
                    dropped.update(g.dropped)
        todo = (
            []
            if report.stopped
            else [s for i, s in enumerate(sources) if not surveys[i].reason and i not in dropped]
        )
        steps.done = 2 * len(sources) - len(todo)
        if hooks.caption is not None:
            steps.total = 2 * len(sources) + len(todo)
        names = _Names()
        ext = "jpg" if req.image_format == "jpg" else req.image_format
        writing = _bounded(pool, make, todo)
        for src, (named, reason, bucket) in zip(todo, writing):
            if reason:
                report.skipped.append(f"{src.rel}: {reason}")
                steps.tick(f"skipped {src.rel}")
                continue
            stem = names.take(src.rel, [suffix for suffix, _, _ in named])
            caption = read_source_caption(src)
            for suffix, data, key in named:
                rel = f"{stem}{suffix}.{ext}"
                target = out_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if _inside(target.resolve(), src_real):  # a link in the output folder into the source
                    msg = (
                        f"{target} leads into the source folder {src_dir} (a link); nothing is written there"
                    )
                    raise PrepareError(msg)
                atomic_write_bytes(target, data, overwrite=True)
                report.written.append(rel)
                own = f"{stem}{suffix.removesuffix('-flip')}.{ext}"
                outputs.append(_Output(rel, caption, own, filename_caption(str(src.path))))
                report.buckets[key] = report.buckets.get(key, 0) + 1
            steps.tick(f"wrote {stem} ({bucket[1]}x{bucket[0]})" if bucket else f"wrote {stem}")
            if hooks.should_stop():
                report.stopped = True
                writing.close()
                break
    report.captions = _write_captions(req, out_dir, outputs, hooks, report, steps)
    report.seconds = round(time.perf_counter() - t0, 3)
    _save_report(out_dir, report)
    return report


def _write_captions(
    req: PrepareRequest,
    out_dir: Path,
    outputs: list[_Output],
    hooks: PrepareHooks,
    report: PrepareReport,
    steps: _Steps,
) -> int:
    """Caption every written image (a flipped copy takes its original's caption); returns the count."""
    new: dict[str, str] = {}
    caption = hooks.caption
    if caption is not None and not report.stopped:
        todo = [o.rel for o in outputs if o.rel == o.own]
        steps.total = steps.done + len(todo)
        for start in range(0, len(todo), CAPTION_BATCH):
            batch = todo[start : start + CAPTION_BATCH]
            images = []
            for rel in batch:
                with Image.open(out_dir / rel) as im:
                    images.append(im.convert("RGB"))
            try:
                with hooks.exclusive():
                    texts = caption(images)
            except PrepareError as e:  # the images stay, captioned from what there is
                report.caption_error = str(e)
                break
            for rel, text in zip(batch, texts):
                new[rel] = text
                steps.tick(f"captioned {rel}")
            if hooks.should_stop():
                report.stopped = True
                break
    written = 0
    for o in outputs:
        text = compose_caption(o.caption, new.get(o.own, ""), req.caption_prefix, req.caption_mode)
        # every image gets its .txt (no stale one from an earlier run stays; without one the trainer
        # would caption it by its output name, tile and flip suffixes included): the source's file
        # name when there is nothing else, as the trainer would read it
        text = text or o.file_words
        target = (out_dir / o.rel).with_suffix(".txt")
        atomic_write_bytes(target, (text + "\n").encode("utf-8"), overwrite=True)
        written += 1
    return written


def _save_report(out_dir: Path, report: PrepareReport) -> None:
    try:
        data = json.dumps(asdict(report), indent=1, ensure_ascii=False).encode("utf-8")
        atomic_write_bytes(out_dir / REPORT_FILE, data, overwrite=True)
    except OSError as e:  # the images are what matters; the report is also in the job's status
        logger.warning("could not write the report %s: %s", out_dir / REPORT_FILE, e)

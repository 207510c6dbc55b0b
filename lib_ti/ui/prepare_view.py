"""The Prepare view: a folder of raw pictures -> a training folder, and the caption editor.

The form is :class:`~lib_ti.prepare.options.PrepareRequest`'s fields (one component per field, checked
at build time); the work is :class:`~lib_ti.prepare.jobs.PrepareService`'s.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import gradio as gr

from lib_ti.errors import TIError
from lib_ti.hostinfo import HostInfo
from lib_ti.prepare.jobs import CAPTIONER_LABELS
from lib_ti.prepare.options import FIELD_TYPES, PrepareRequest
from lib_ti.prepare.tagger import WD_MODELS
from lib_ti.training.options import choices
from lib_ti.ui.common import error_html, find_job, follow, get_service, ok_html, warn_html
from lib_ti.ui.compat import js_kwargs

logger = logging.getLogger(__name__)

#: the most thumbnails the caption editor shows (the table lists every image)
MAX_THUMBNAILS = 120
FIELDS = [f.name for f in fields(PrepareRequest)]
DEFAULTS = PrepareRequest("", "")
LANCZOS = "Lanczos (built in)"
TABLE_HEADERS = ["image", "caption"]


def _text(label: str, elem: str, **kw: Any) -> Callable[[Any], Any]:
    return lambda value, **extra: gr.Textbox(value=value, label=label, elem_id=f"ti_prepare_{elem}", **kw)


def _check(label: str, elem: str) -> Callable[[Any], Any]:
    return lambda value, **extra: gr.Checkbox(value=value, label=label, elem_id=f"ti_prepare_{elem}")


def _slider(label: str, elem: str, lo: float, hi: float, step: float) -> Callable[[Any], Any]:
    return lambda value, **extra: gr.Slider(
        lo, hi, value=value, step=step, label=label, elem_id=f"ti_prepare_{elem}"
    )


def _radio(label: str, elem: str) -> Callable[[Any], Any]:
    name = elem
    return lambda value, **extra: gr.Radio(
        list(choices(FIELD_TYPES[name])), value=value, label=label, elem_id=f"ti_prepare_{elem}"
    )


def _dropdown(label: str, elem: str) -> Callable[[Any], Any]:
    return lambda value, **extra: gr.Dropdown(
        extra.get("choices", [value]), value=value, label=label, elem_id=f"ti_prepare_{elem}"
    )


COMPONENTS: dict[str, Callable[..., Any]] = {
    "source_dir": _text("Source folder (raw pictures; never changed)", "source_dir"),
    "output_dir": _text("Output folder (the training set; new or empty)", "output_dir"),
    "overwrite": _check("Write into a folder that holds files", "overwrite"),
    "resolution": _slider(
        "Resolution (0: the loaded model's: SD1 512, SD2 768, SDXL 1024)", "resolution", 0, 2048, 64
    ),
    "buckets": _check("Aspect-ratio buckets (as the trainer makes them)", "buckets"),
    "crop": _radio("Crop", "crop"),
    "background": _text("Background (transparency, padding)", "background"),
    "tile_overlap": _slider("Tile overlap", "tile_overlap", 0.0, 0.9, 0.05),
    "flip_copies": _check("Add mirrored copies", "flip_copies"),
    "upscaler": _dropdown("Upscaler for small pictures", "upscaler"),
    "min_size": _slider("Skip pictures smaller than (px)", "min_size", 1, 1024, 1),
    "dedupe": _check("Find near-duplicates", "dedupe"),
    "dedupe_threshold": _slider("Duplicate distance (bits of 64)", "dedupe_threshold", 0, 32, 1),
    "keep_duplicates": _check("Copy duplicates too", "keep_duplicates"),
    "image_format": _radio("Image format", "image_format"),
    "captioner": _dropdown("Captioner", "captioner"),
    "caption_prefix": _text("Caption prefix ([name] is the embedding's name in training)", "caption_prefix"),
    "caption_mode": _radio("Pictures' own captions", "caption_mode"),
    "tagger_model": _dropdown("WD tagger model", "tagger_model"),
    "general_threshold": _slider("General tags threshold", "general_threshold", 0.0, 1.0, 0.01),
    "character_threshold": _slider("Character tags threshold", "character_threshold", 0.0, 1.0, 0.01),
    "drop_tags": _text("Tags to leave out (comma-separated)", "drop_tags"),
    "underscores_to_spaces": _check("_ to spaces", "underscores_to_spaces"),
    "escape_brackets": _check("Escape brackets", "escape_brackets"),
    "max_tags": _slider("Most tags per caption (0: all)", "max_tags", 0, 100, 1),
    "include_rating": _check("Add the rating tag", "include_rating"),
}
MAIN_ROWS = (
    ("source_dir",),
    ("output_dir",),
    ("overwrite", "buckets"),
    ("resolution",),
    ("crop", "image_format"),
)
PICTURE_ROWS = (
    ("background", "tile_overlap"),
    ("upscaler", "min_size"),
    ("flip_copies",),
    ("dedupe", "keep_duplicates"),
    ("dedupe_threshold",),
)
CAPTION_ROWS = (("captioner",), ("caption_prefix", "caption_mode"))
TAGGER_ROWS = (
    ("tagger_model",),
    ("general_threshold", "character_threshold"),
    ("drop_tags", "max_tags"),
    ("underscores_to_spaces", "escape_brackets", "include_rating"),
)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def status_markdown(st: Any) -> str:
    """A Prepare job's state."""
    if st is None:
        return "No Prepare job yet."
    head = {
        "queued": "⏳ waiting",
        "running": "▶ preparing",
        "finished": "✔ done",
        "stopped": "■ stopped (what was written is kept)",
        "failed": "✖ failed",
        "error": "✖ error",
    }.get(st.state, st.state)
    lines = [f"**{head}**: `{st.name}` (job `{st.id}`)"]
    if st.total:
        line = f"{st.step}/{st.total}"
        if st.running and st.eta_seconds is not None:
            line += f" · ETA {_eta(st.eta_seconds)}"
        lines.append(line)
    if st.message:
        lines.append(html.escape(st.message))
    return "\n\n".join(lines)


def report_markdown(report: dict[str, Any]) -> str:
    """The buckets, skipped pictures and duplicates of a finished run."""
    if not report:
        return ""
    lines = []
    if report.get("buckets"):
        lines.append(
            "**Images per size** (width x height): "
            + ", ".join(f"{k}: {v}" for k, v in report["buckets"].items())
        )
    if report.get("skipped"):
        lines.append(f"**Skipped** ({len(report['skipped'])}):")
        lines += [f"- `{html.escape(s)}`" for s in report["skipped"][:50]]
    if report.get("duplicates"):
        lines.append(f"**Near-duplicates** ({len(report['duplicates'])} group(s)):")
        for g in report["duplicates"][:50]:
            verb = "copied too" if g["copied"] else "left out"
            lines.append(
                f"- kept `{html.escape(g['kept'])}`; {verb}: "
                + ", ".join(f"`{html.escape(d)}`" for d in g["duplicates"])
            )
    return "\n".join(lines)


class PrepareHandlers:
    def __init__(self, host: HostInfo) -> None:
        self.host = host
        self.components: dict[str, Any] = {}

    def _prep(self) -> Any:
        return get_service(self.host).prepare

    def captioners(self) -> tuple[list[str], str]:
        try:
            prep = self._prep()
            return prep.captioners(), prep.captioner_note()
        except TIError:
            return ["none"], ""

    def upscalers(self) -> list[str]:
        try:
            return [LANCZOS, *self._prep().upscalers()]
        except TIError:
            return [LANCZOS]

    def refresh(self) -> tuple[Any, Any, str]:
        names, note = self.captioners()
        return (
            gr.update(choices=names),
            gr.update(choices=self.upscalers()),
            warn_html(note) if note else "",
        )

    def values(self, *values: Any) -> dict[str, Any]:
        given = dict(zip(FIELDS, values))
        if given.get("upscaler") == LANCZOS:
            given["upscaler"] = ""
        return {k: v for k, v in given.items() if v is not None}

    def start(self, task_id: str, *values: Any) -> tuple[str, str]:
        try:
            service = get_service(self.host)
            job = service.prepare.start(self.values(*values), service.loaded_kind, task_id=task_id or "")
        except TIError as e:
            return "", error_html(e)
        return job.id, status_markdown(job.status)

    def _job(self, job_id: str) -> Any:
        return find_job(self.host, job_id, "prepare")

    def snapshot(self, job_id: str) -> tuple[str, str]:
        job = self._job(job_id)
        st = job.status if job else None
        return status_markdown(st), report_markdown(st.report if st else {})

    def watch(self, job_id: str) -> Iterator[tuple[Any, Any]]:
        if not job_id:
            yield gr.update(), gr.update()
            return
        yield from follow(self._job(job_id), lambda: self.snapshot(job_id))

    def stop(self, job_id: str) -> str:
        job = self._job(job_id)
        if job is None or not job.status.running:
            return "No Prepare job is running."
        job.stop()
        return "Stopping; every image written so far is kept with its caption."

    # ------------------------------------------------------------------ caption editor
    def load(self, folder: str) -> tuple[list[tuple[str, str]], list[list[str]], list[list[Any]], str]:
        try:
            got = self._prep().captions((folder or "").strip())
        except TIError as e:
            return [], [], [], error_html(e)
        return self._lists(got, f"{len(got['images'])} image(s), {len(got['tags'])} distinct tag(s)")

    def _lists(
        self, got: dict[str, Any], message: str
    ) -> tuple[list[tuple[str, str]], list[list[str]], list[list[Any]], str]:
        root = got["folder"]
        images = got["images"]
        gallery = [(f"{root}/{i['image']}", i["caption"][:120]) for i in images[:MAX_THUMBNAILS]]
        table = [[i["image"], i["caption"]] for i in images]
        tags = [[t, n] for t, n in got["tags"]]
        note = (
            message
            if len(images) <= MAX_THUMBNAILS
            else f"{message} (the first {MAX_THUMBNAILS} shown as thumbnails)"
        )
        return gallery, table, tags, ok_html(note)

    def edit(self, folder: str, op: str, **args: Any) -> tuple[Any, Any, Any, str]:
        try:
            got = self._prep().edit_captions((folder or "").strip(), op, **args)
        except TIError as e:
            return gr.update(), gr.update(), gr.update(), error_html(e)
        return self._lists(got, got["message"])

    def undo(self, folder: str) -> tuple[Any, Any, Any, str]:
        return self.edit(folder, "undo")

    def replace(self, folder: str, find: str, replace: str, regex: bool) -> tuple[Any, Any, Any, str]:
        return self.edit(folder, "replace", find=find or "", replace=replace or "", regex=bool(regex))

    def remove_tag(self, folder: str, tag: str) -> tuple[Any, Any, Any, str]:
        return self.edit(folder, "remove_tag", tag=tag or "")

    def rename_tag(self, folder: str, tag: str, new_tag: str) -> tuple[Any, Any, Any, str]:
        return self.edit(folder, "rename_tag", tag=tag or "", new_tag=new_tag or "")

    def add_tags(self, folder: str, tags: str, at_start: bool) -> tuple[Any, Any, Any, str]:
        return self.edit(folder, "add_tags", tags=tags or "", at_start=bool(at_start))

    def sort_tags(self, folder: str) -> tuple[Any, Any, Any, str]:
        return self.edit(folder, "sort_tags")

    @staticmethod
    def output_folder(output_dir: str) -> str:
        """The output folder as typed, for the caption editor and the Train view."""
        return (output_dir or "").strip()

    def save_table(self, folder: str, table: Any) -> tuple[Any, Any, Any, str]:
        """Save the rows whose caption changed in the table."""
        rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
        try:
            current = {
                i["image"]: i["caption"] for i in self._prep().captions((folder or "").strip())["images"]
            }
        except TIError as e:
            return gr.update(), gr.update(), gr.update(), error_html(e)
        changed = {
            str(r[0]): str(r[1] or "")
            for r in rows
            if len(r) >= 2 and r[0] in current and str(r[1] or "").strip() != current[r[0]]
        }
        if not changed:
            return gr.update(), gr.update(), gr.update(), warn_html("no caption in the table changed")
        return self.edit(folder, "set", captions=changed)


def _rows(rows: tuple[tuple[str, ...], ...], made: dict[str, Any], extra: dict[str, Any]) -> None:
    for row in rows:
        with gr.Row():
            for name in row:
                value = getattr(DEFAULTS, name)
                if name == "upscaler" and not value:
                    value = LANCZOS
                made[name] = COMPONENTS[name](value, **extra.get(name, {}))


def build(host: HostInfo, train_dataset: Any = None) -> PrepareHandlers:
    """The Prepare view; ``train_dataset`` (the Train view's folder box) receives "Use for training"."""
    h = PrepareHandlers(host)
    captioners, note = h.captioners()
    extra = {
        "captioner": {"choices": captioners},
        "upscaler": {"choices": h.upscalers()},
        "tagger_model": {"choices": list(WD_MODELS)},
    }
    made: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=3):
            _rows(MAIN_ROWS, made, extra)
            with gr.Accordion("Pictures", open=False, elem_id="ti_prepare_pictures"):
                _rows(PICTURE_ROWS, made, extra)
            with gr.Accordion("Captions", open=True, elem_id="ti_prepare_captions"):
                captioner_note = gr.HTML(warn_html(note) if note else "", elem_id="ti_prepare_captioner_note")
                gr.Markdown(
                    "\n".join(f"- **{k}**: {v}" for k, v in CAPTIONER_LABELS.items()),
                    elem_id="ti_prepare_captioner_help",
                )
                _rows(CAPTION_ROWS, made, extra)
                with gr.Accordion("WD tagger", open=False, elem_id="ti_prepare_tagger"):
                    _rows(TAGGER_ROWS, made, extra)
            with gr.Row():
                start = gr.Button("Prepare", variant="primary", elem_id="ti_prepare_start")
                stop = gr.Button("Stop", elem_id="ti_prepare_stop")
                refresh = gr.Button("🔄", elem_id="ti_prepare_refresh", elem_classes=["tool", "ti-tool"])
                use = gr.Button("Use this folder for training", elem_id="ti_prepare_use")
        with gr.Column(scale=2):
            gr.HTML("<div id='ti_prepare_progress_anchor'></div>", elem_id="ti_prepare_progress")
            status = gr.Markdown("No Prepare job yet.", elem_id="ti_prepare_status")
            report = gr.Markdown(elem_id="ti_prepare_report")
    with gr.Accordion("Caption editor", open=True, elem_id="ti_captions"):
        with gr.Row():
            folder = gr.Textbox(label="Training folder", elem_id="ti_captions_folder", scale=4)
            load = gr.Button("Load", elem_id="ti_captions_load", scale=1)
            undo = gr.Button("Undo the last change", elem_id="ti_captions_undo", scale=1)
        message = gr.HTML(elem_id="ti_captions_message")
        with gr.Row():
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", elem_id="ti_captions_gallery", columns=6, height=320)
                table = gr.Dataframe(
                    headers=TABLE_HEADERS, datatype=["str", "str"], type="array", interactive=True, col_count=(2, "fixed"),
                    label="Captions (edit a cell, then Save)", elem_id="ti_captions_table", wrap=True,
                )  # fmt: skip
                save = gr.Button("Save the table's edits", elem_id="ti_captions_save")
            with gr.Column(scale=2):
                tags = gr.Dataframe(
                    headers=["tag", "images"], datatype=["str", "number"], type="array", interactive=False, col_count=(2, "fixed"),
                    label="Tags by frequency", elem_id="ti_captions_tags",
                )  # fmt: skip
                with gr.Row():
                    find = gr.Textbox(label="Find", elem_id="ti_captions_find")
                    replace = gr.Textbox(label="Replace with", elem_id="ti_captions_replace")
                with gr.Row():
                    regex = gr.Checkbox(label="Regular expression", elem_id="ti_captions_regex")
                    do_replace = gr.Button("Replace in all captions", elem_id="ti_captions_do_replace")
                with gr.Row():
                    tag = gr.Textbox(label="Tag", elem_id="ti_captions_tag")
                    new_tag = gr.Textbox(label="New name", elem_id="ti_captions_new_tag")
                with gr.Row():
                    remove = gr.Button("Remove tag everywhere", elem_id="ti_captions_remove")
                    rename = gr.Button("Rename tag everywhere", elem_id="ti_captions_rename")
                with gr.Row():
                    add = gr.Textbox(label="Tags to add", elem_id="ti_captions_add_tags")
                    at_start = gr.Checkbox(True, label="At the start", elem_id="ti_captions_at_start")
                with gr.Row():
                    do_add = gr.Button("Add to every caption", elem_id="ti_captions_do_add")
                    sort = gr.Button("Sort tags by frequency", elem_id="ti_captions_sort")
    task_id = gr.Textbox(visible=False, elem_id="ti_prepare_task")
    job_id = gr.Textbox(visible=False, elem_id="ti_prepare_job")

    missing = set(FIELDS) ^ set(made)
    if missing:
        msg = f"the Prepare form and PrepareRequest disagree on {sorted(missing)}"
        raise RuntimeError(msg)
    h.components = made
    form = [made[f] for f in FIELDS]
    lists = [gallery, table, tags, message]
    out_dir = made["output_dir"]

    start.click(
        h.start, inputs=[task_id, *form], outputs=[job_id, status], **js_kwargs("tiPrepareStart")
    ).then(h.watch, inputs=[job_id], outputs=[status, report]).then(
        h.output_folder, inputs=[out_dir], outputs=[folder]
    ).then(h.load, inputs=[folder], outputs=lists)
    stop.click(h.stop, inputs=[job_id], outputs=[status])
    refresh.click(h.refresh, outputs=[made["captioner"], made["upscaler"], captioner_note])
    if train_dataset is not None:
        use.click(h.output_folder, inputs=[out_dir], outputs=[train_dataset]).then(
            fn=None, **js_kwargs("tiShowTrain")
        )
    load.click(h.load, inputs=[folder], outputs=lists)
    folder.submit(h.load, inputs=[folder], outputs=lists)
    save.click(h.save_table, inputs=[folder, table], outputs=lists)
    undo.click(h.undo, inputs=[folder], outputs=lists)
    do_replace.click(h.replace, inputs=[folder, find, replace, regex], outputs=lists)
    remove.click(h.remove_tag, inputs=[folder, tag], outputs=lists)
    rename.click(h.rename_tag, inputs=[folder, tag, new_tag], outputs=lists)
    do_add.click(h.add_tags, inputs=[folder, add, at_start], outputs=lists)
    sort.click(h.sort_tags, inputs=[folder], outputs=lists)
    return h

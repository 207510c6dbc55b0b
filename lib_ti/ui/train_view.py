"""The Train view: a form that becomes a TrainRequest, and live status of the running job."""

from __future__ import annotations

import html
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from lib_ti.errors import TIError
from lib_ti.hostinfo import HostInfo
from lib_ti.training.options import (
    FIELD_TYPES,
    OPTION_FIELDS,
    LatentSampling,
    LrShape,
    NormControl,
    TrainEncoders,
    TrainRequest,
    choices,
    coerce,
)
from lib_ti.training.recipes import recipe_for
from lib_ti.training.schedule import LearningRateSchedule, ScheduleArgs
from lib_ti.ui.common import error_html, get_service, model_error, ok_html
from lib_ti.ui.compat import js_kwargs
from lib_ti.ui.plots import line_plot, smooth

logger = logging.getLogger(__name__)

#: seconds between live updates while a job runs
POLL_SECONDS = 1.0
_STEP_IN_NAME = re.compile(r"-(\d+)\.(png|webp|jpg)$")


def _number(label: str, elem: str, whole: bool = True) -> Callable[[Any], Any]:
    return lambda v: gr.Number(v, label=label, precision=0 if whole else None, elem_id=f"ti_train_{elem}")


def _check(label: str, elem: str) -> Callable[[Any], Any]:
    return lambda v: gr.Checkbox(v, label=label, elem_id=f"ti_train_{elem}")


def _radio(values: Any, label: str, elem: str) -> Callable[[Any], Any]:
    return lambda v: gr.Radio(list(choices(values)), value=v, label=label, elem_id=f"ti_train_{elem}")


#: The form: one component per TrainRequest field, made from the field's value.
COMPONENTS: dict[str, Callable[..., Any]] = {
    "embedding": lambda v: gr.Dropdown(label="Embedding (made for the loaded model)", choices=[], elem_id="ti_train_embedding"),
    "dataset_dir": lambda v: gr.Textbox(v, label="Dataset folder", elem_id="ti_train_dataset",
                                        placeholder="/path/to/images (captions in .txt beside them, optional)"),
    #: the choices (shipped and user templates) are filled in by build()
    "template": lambda v, templates=(): gr.Dropdown(
        list(templates), value=v if v in templates else None, label="Prompt template", elem_id="ti_train_template"
    ),
    "resolution": _number("Resolution (bucket area)", "resolution"),
    "buckets": _check("Aspect-ratio buckets", "buckets"),
    "batch_size": _number("Batch size", "batch"),
    "grad_accum": _number("Gradient accumulation", "accum"),
    "steps": _number("Steps", "steps"),
    "lr": lambda v: gr.Textbox(v, label="Learning rate (a rate, or a schedule like 5e-3:100, 1e-3:1000)",
                               elem_id="ti_train_lr"),
    "snapshot_every": _number("Snapshot every N steps", "snapshot"),
    "preview_every": _number("Preview every N steps", "preview_every"),
    "validation_every": _number("Validation every N steps", "validation"),
    "preview_prompt": lambda v: gr.Textbox(v, label="Preview prompt (empty: a photo of <name>)",
                                           elem_id="ti_train_preview_prompt"),
    "norm_control": _radio(NormControl, "Norm control", "norm"),
    "lr_shape": _radio(LrShape, "Learning-rate shape", "lr_shape"),
    "warmup_steps": _number("Warmup steps", "warmup"),
    "flip": _check("Random horizontal flip", "flip"),
    "shuffle_tags": _check("Shuffle caption tags", "shuffle"),
    "keep_tags": _number("Keep first N tags", "keep_tags"),
    "tag_dropout": lambda v: gr.Slider(0, 0.5, value=v, step=0.01, label="Tag dropout", elem_id="ti_train_dropout"),
    "repeats": _number("Repeats per epoch", "repeats"),
    "latent_sampling": _radio(LatentSampling, "Latent sampling", "latent"),
    "train_encoders": _radio(TrainEncoders, "Train vectors of", "encoders"),
    "min_snr_gamma": _number("Min-SNR gamma (0: off)", "min_snr", whole=False),
    "noise_offset": _number("Noise offset", "noise_offset", whole=False),
    "seed": _number("Seed", "seed"),
    "resume": _check("Resume the unfinished run of this embedding (with this form's settings)", "resume"),
    "cache_latents_on_disk": _check("Cache latents on disk", "cache_disk"),
}  # fmt: skip
#: where each field sits: rows of the main column, then rows of the Advanced accordion
MAIN_ROWS = (("dataset_dir",), ("template",), ("resolution", "buckets"), ("batch_size", "grad_accum", "steps"),
             ("lr",), ("snapshot_every", "preview_every", "validation_every"), ("preview_prompt",),
             ("norm_control",))  # fmt: skip
ADVANCED_ROWS = (("lr_shape", "warmup_steps"), ("flip", "shuffle_tags", "keep_tags", "tag_dropout"),
                 ("repeats", "latent_sampling", "train_encoders"), ("min_snr_gamma", "noise_offset", "seed"),
                 ("resume", "cache_latents_on_disk"))  # fmt: skip
#: the form's fields in the order of the Train button's inputs (after the task id)
FIELDS = tuple(FIELD_TYPES)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def status_markdown(st: Any) -> str:
    """One job's state as the Train view shows it."""
    if st is None:
        return "No training job yet."
    head = {
        "queued": "⏳ waiting for the GPU (a generation is running)",
        "running": "▶ training",
        "finished": "✔ finished",
        "early_stopped": "✔ stopped early (validation loss stopped improving)",
        "stopped": "■ stopped, saved",
        "model_changed": "■ stopped: the checkpoint changed (saved)",
        "failed": "✖ failed",
        "error": "✖ error",
    }.get(st.state, st.state)
    lines = [f"**{head}**: `{st.name}` (job `{st.id}`)"]
    if st.total:
        parts = [f"step **{st.step}/{st.total}**"]
        if st.loss_smooth is not None:
            parts.append(f"loss {st.loss_smooth:.4f}")
        if st.val_loss is not None:
            parts.append(f"validation {st.val_loss:.4f}")
        if st.lr is not None:
            parts.append(f"lr {st.lr:.3g}")
        if st.images_per_sec:
            parts.append(f"{st.images_per_sec:.2f} img/s")
        if st.running and st.eta_seconds is not None:
            parts.append(f"ETA {_eta(st.eta_seconds)}")
        lines.append(" · ".join(parts))
    if st.norms:
        lines.append(
            "norms: "
            + "; ".join(f"{k} {', '.join(f'{v:.3f}' for v in vals)}" for k, vals in st.norms.items())
        )
    if st.message:
        lines.append(html.escape(st.message))
    lines += [f"⚠ {html.escape(w)}" for w in getattr(st, "warnings", [])[-3:]]
    if st.file and not st.running:
        lines.append(f"saved: `{Path(st.file).name}`")
    return "\n\n".join(lines)


def _ago(seconds: float) -> str:
    s = max(int(seconds), 0)
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago" if s < 172800 else f"{s // 86400} days ago"


def unfinished_markdown(name: str, run: dict[str, Any] | None, now: float | None = None) -> str:
    """The note about ``name``'s unfinished run (stopped, or cut off when the web UI died); empty without one."""
    if not run:
        return ""
    if "error" in run:
        return (
            f"⚠ **{html.escape(name)}** has a resume file that cannot be used: {html.escape(run['error'])}. "
            "Train without *Resume* to start a new run (it replaces that file)."
        )
    if run["state"] == "training":
        return f"▶ **{html.escape(name)}** is being trained now (job `{html.escape(str(run.get('job')))}`)."
    how = {
        "interrupted": "cut off (the web UI stopped, or a file could not be written)",
        "failed": "failed (NaN or infinite values)",
    }.get(run["state"], "stopped")
    when = _ago((now or time.time()) - float(run.get("saved_at") or 0))
    cfg = run.get("settings") or {}
    keys = ("lr", "batch_size", "grad_accum", "resolution", "dataset_dir")
    settings = ", ".join(f"{k} `{html.escape(str(cfg[k]))}`" for k in keys if k in cfg)
    model = f" on `{html.escape(str(run['model']))}`" if run.get("model") else ""
    then = (
        "To go on from there, lower the learning rate in the form and train with *Resume* ticked."
        if run["state"] == "failed"
        else "**Resume** continues it with those settings."
    )
    return (
        f"⏸ **Unfinished run of {html.escape(name)}**: {how} at step **{run['step']}/{run['steps']}**, "
        f"saved {when}{model}. Settings: {settings}. {then}"
    )


#: the states of an unfinished run that the Resume button continues as it was
RESUMABLE = ("interrupted", "stopped")


def loss_plot(st: Any) -> str:
    if st is None or not st.losses:
        return line_plot({}, "loss")
    steps = [s for s, _ in st.losses]
    values = [v for _, v in st.losses]
    series = {"loss (smoothed)": list(zip(steps, smooth(values)))}
    if st.val_losses:
        series["validation loss"] = list(st.val_losses)
    return line_plot(series, "loss")


def gallery(st: Any) -> list[tuple[str, str]]:
    if st is None:
        return []
    out = []
    for p in st.previews:
        m = _STEP_IN_NAME.search(p)
        out.append((p, f"step {m.group(1)}" if m else Path(p).name))
    return out


class TrainHandlers:
    def __init__(self, host: HostInfo) -> None:
        self.host = host
        #: the form's components by TrainRequest field (set by build)
        self.components: dict[str, Any] = {}

    def _service(self) -> Any:
        return get_service(self.host)

    # ------------------------------------------------------------------ form helpers
    def refresh(self, current: str | None, form_kind: str) -> tuple[Any, ...]:
        """The embeddings made for the loaded model; when the model's kind is not the one the form's
        values are for, its recipe too (so the tab trains what the REST API would by default)."""
        try:
            service = self._service()
            kind = service.loaded_kind()
            names = service.list_embeddings(kind)
        except Exception as e:
            return (gr.update(), model_error(e), gr.update(), *[gr.update()] * len(OPTION_FIELDS))
        value = current if current in names else (names[0] if names else None)
        note = f"Loaded model: **{kind.upper()}**; {len(names)} embedding(s) made for it."
        if not names:
            note += " Create one in the Create tab first."
        if kind == form_kind:
            return (gr.update(choices=names, value=value), note, kind, *[gr.update()] * len(OPTION_FIELDS))
        note += f" The form now holds the {kind.upper()} recipe."
        recipe = recipe_for(kind, self.host.get_option)
        return (gr.update(choices=names, value=value), note, kind, *[recipe[f] for f in OPTION_FIELDS])

    def apply_recipe(self) -> tuple[Any, ...]:
        """The recipe of the loaded model's kind, for every option of the form; then the form's kind."""
        try:
            kind = self._service().loaded_kind()
        except Exception as e:
            return (*[gr.update()] * len(OPTION_FIELDS), gr.update(), model_error(e))
        recipe = recipe_for(kind, self.host.get_option)
        return (*[recipe[f] for f in OPTION_FIELDS], kind, ok_html(f"recipe for {kind.upper()} applied"))

    @staticmethod
    def check_lr(lr: str, shape: str, warmup: float, steps: float) -> str:
        try:
            args = ScheduleArgs(lr or "", coerce("lr_shape", shape), coerce("warmup_steps", warmup))
            sched = LearningRateSchedule(args, coerce("steps", steps) or 1)
        except TIError as e:
            return error_html(e)
        return ok_html(sched.describe())

    def template_preview(self, template: str, dataset: str, embedding: str | None) -> str:
        if not (dataset or "").strip():
            return "Choose a dataset folder to see the prompts its images get."
        try:
            rows = self._service().template_prompts(template, dataset.strip(), embedding or "[name]")
        except (TIError, OSError) as e:
            return error_html(e)
        if not rows:
            return error_html(f"no images in {dataset}")
        lines = ["| image | a prompt it gets |", "|---|---|"]
        lines += [f"| `{html.escape(f)}` | {html.escape(p)} |" for f, p in rows]
        return "\n".join(lines)

    def unfinished(self, embedding: str | None) -> tuple[str, Any]:
        """The note about the embedding's unfinished run, and the Resume button shown when there is one."""
        run = None
        if embedding:
            try:
                run = self._service().unfinished_runs().get(embedding)
            except (TIError, OSError) as e:
                logger.warning("could not list unfinished runs: %s", e)
        usable = bool(run) and (run or {}).get("state") in RESUMABLE
        return unfinished_markdown(embedding or "", run), gr.update(visible=usable)

    def resume(self, task_id: str, embedding: str | None) -> tuple[str, str]:
        """Continue the embedding's unfinished run with the settings it had (its resume file's)."""
        if not embedding:
            return "", error_html("choose an embedding first")
        try:
            job = self._service().start_training(
                {"embedding": embedding, "resume": True}, task_id=task_id or ""
            )
        except (TIError, ValueError) as e:
            return "", error_html(e)
        except Exception as e:
            return "", model_error(e)
        return job.id, status_markdown(job.status)

    def templates(self) -> list[str]:
        try:
            return list(self._service().templates())
        except TIError:
            return []

    # ------------------------------------------------------------------ the job
    def request(self, *values: Any) -> TrainRequest:
        """A TrainRequest from the form's values (in FIELDS order)."""
        if len(values) != len(FIELDS):
            msg = f"expected {len(FIELDS)} form values, got {len(values)}"
            raise TIError(msg)
        return TrainRequest(**{key: coerce(key, value) for key, value in zip(FIELDS, values)})

    def start(self, task_id: str, *values: Any) -> tuple[str, str]:
        """Start a job; returns (job id, status). The job runs on; ``watch`` follows it."""
        try:
            job = self._service().start_training(self.request(*values), task_id=task_id or "")
        except (TIError, ValueError) as e:  # BusyError is a TIError; "Show the running job" follows that one
            return "", error_html(e)
        except Exception as e:
            return "", model_error(e)
        return job.id, status_markdown(job.status)

    def _job(self, job_id: str) -> Any:
        try:
            jobs = self._service().jobs
        except TIError:
            return None
        job = jobs.get(job_id) if job_id else None
        return job or jobs.current

    def snapshot(self, job_id: str) -> tuple[str, str, list[tuple[str, str]]]:
        job = self._job(job_id)
        st = job.status if job else None
        return status_markdown(st), loss_plot(st), gallery(st)

    def watch(self, job_id: str) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
        """Yield the status, loss plot and previews every second until the job ends."""
        if not job_id:  # the start failed: keep its message
            yield gr.update(), gr.update(), gr.update()
            return
        job = self._job(job_id)
        while job is not None and job.status.running:
            yield self.snapshot(job.id)
            time.sleep(POLL_SECONDS)
        yield self.snapshot(job.id if job else job_id)

    def stop(self, job_id: str) -> str:
        job = self._job(job_id)
        if job is None or not job.status.running:
            return "No training is running."
        job.stop()
        return f"Stopping `{job.status.name}` after the current step; the vectors so far are saved."

    def current(self) -> str:
        """The id of the running (or last) job, so a reloaded page can follow it again."""
        job = self._job("")
        return job.id if job else ""


def _rows(
    rows: tuple[tuple[str, ...], ...],
    values: dict[str, Any],
    made: dict[str, Any],
    after: Any,
    templates: list[str],
) -> None:
    for row in rows:
        with gr.Row():
            for name in row:
                kw = {"templates": templates} if name == "template" else {}
                made[name] = COMPONENTS[name](values[name], **kw)
        for name in row:
            after(name)


def build(host: HostInfo, shown: Any = None) -> TrainHandlers:
    """The Train view; ``shown`` (its tab) refreshes it when selected, like the 🔄 button."""
    h = TrainHandlers(host)
    values: dict[str, Any] = {
        "embedding": None,
        "dataset_dir": str(host.get_option("ti_dataset_dir", "") or ""),
    }
    values.update(recipe_for("sd1", host.get_option))
    templates = h.templates()
    made: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    def after(name: str) -> None:
        if name == "template":
            with gr.Accordion("Prompts the images get", open=False, elem_id="ti_train_prompts_box"):
                extra["prompts"] = gr.Markdown(elem_id="ti_train_prompts")
        elif name == "lr":
            extra["lr_note"] = gr.HTML(elem_id="ti_train_lr_note")

    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                made["embedding"] = COMPONENTS["embedding"](None)
                refresh = gr.Button("🔄", elem_id="ti_train_refresh", elem_classes=["tool", "ti-tool"])
            model_note = gr.Markdown(elem_id="ti_train_model_note")
            with gr.Row():
                unfinished = gr.Markdown(elem_id="ti_train_unfinished")
                resume = gr.Button(
                    "Resume", visible=False, elem_id="ti_train_resume_run", variant="secondary"
                )
            _rows(MAIN_ROWS, values, made, after, templates)
            with gr.Accordion("Advanced", open=False, elem_id="ti_train_advanced"):
                _rows(ADVANCED_ROWS, values, made, after, templates)
                recipe = gr.Button("Recipe for the loaded model", elem_id="ti_train_recipe")
                recipe_note = gr.HTML(elem_id="ti_train_recipe_note")
            with gr.Row():
                train = gr.Button("Train", variant="primary", elem_id="ti_train_start")
                stop = gr.Button("Stop", elem_id="ti_train_stop")
                follow = gr.Button("Show the running job", elem_id="ti_train_follow")
        with gr.Column(scale=2):
            gr.HTML("<div id='ti_train_progress_anchor'></div>", elem_id="ti_train_progress")
            status = gr.Markdown("No training job yet.", elem_id="ti_train_status")
            plot = gr.HTML(loss_plot(None), elem_id="ti_train_plot")
            previews = gr.Gallery(label="Previews", elem_id="ti_train_previews", columns=4)
    task_id = gr.Textbox(visible=False, elem_id="ti_train_task")
    job_id = gr.Textbox(visible=False, elem_id="ti_train_job")
    #: the model kind whose recipe the form holds
    form_kind = gr.Textbox("sd1", visible=False, elem_id="ti_train_kind")

    missing = set(FIELDS) ^ set(made)
    if missing:
        msg = f"the Train form and TrainRequest disagree on {sorted(missing)}"
        raise RuntimeError(msg)
    h.components = made
    form = [made[f] for f in FIELDS]
    options = [made[f] for f in OPTION_FIELDS]
    live = [status, plot, previews]
    lr, lr_shape, warmup, steps = (made[f] for f in ("lr", "lr_shape", "warmup_steps", "steps"))
    template, dataset, embedding = (made[f] for f in ("template", "dataset_dir", "embedding"))

    # the embeddings for the loaded model, and its recipe when the form holds another kind's
    for show in (refresh.click, *([shown.select] if shown is not None else [])):
        show(
            h.refresh, inputs=[embedding, form_kind], outputs=[embedding, model_note, form_kind, *options]
        ).then(h.unfinished, inputs=[embedding], outputs=[unfinished, resume])
    for box in (lr, lr_shape, warmup, steps):
        box.change(h.check_lr, inputs=[lr, lr_shape, warmup, steps], outputs=[extra["lr_note"]])
    for box in (template, dataset, embedding):
        box.change(h.template_preview, inputs=[template, dataset, embedding], outputs=[extra["prompts"]])
    recipe.click(h.apply_recipe, outputs=[*options, form_kind, recipe_note])
    embedding.change(h.unfinished, inputs=[embedding], outputs=[unfinished, resume])
    resume.click(
        h.resume, inputs=[task_id, embedding], outputs=[job_id, status], **js_kwargs("tiTrainStart")
    ).then(h.watch, inputs=[job_id], outputs=live).then(
        h.unfinished, inputs=[embedding], outputs=[unfinished, resume]
    ).then(fn=None, **js_kwargs("tiRefreshCards"))
    train.click(h.start, inputs=[task_id, *form], outputs=[job_id, status], **js_kwargs("tiTrainStart")).then(
        h.watch, inputs=[job_id], outputs=live
    ).then(h.unfinished, inputs=[embedding], outputs=[unfinished, resume]).then(
        fn=None, **js_kwargs("tiRefreshCards")
    )
    stop.click(h.stop, inputs=[job_id], outputs=[status])
    follow.click(h.current, outputs=[job_id]).then(h.watch, inputs=[job_id], outputs=live)
    return h

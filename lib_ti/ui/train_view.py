"""The Train view: a form that becomes a TrainRequest, and live status of the running job."""

from __future__ import annotations

import html
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from lib_ti.errors import TIError
from lib_ti.hostinfo import HostInfo
from lib_ti.training.recipes import Recipe, recipe_for
from lib_ti.training.schedule import LearningRateSchedule, ScheduleArgs, ScheduleError
from lib_ti.ui.common import error_html, get_service, model_error, ok_html
from lib_ti.ui.compat import js_kwargs
from lib_ti.ui.plots import line_plot, smooth

logger = logging.getLogger(__name__)

#: seconds between live updates while a job runs
POLL_SECONDS = 1.0
NORM_CONTROL = ["soft", "hard", "off"]
LR_SHAPES = ["constant", "cosine", "linear"]
LATENT_SAMPLING = ["random", "deterministic"]
ENCODERS = ["all", "clip_l", "clip_g"]
_STEP_IN_NAME = re.compile(r"-(\d+)\.(png|webp|jpg)$")

#: the form's fields in the order of the Train button's inputs (after the task id)
FIELDS = (
    "embedding", "dataset", "template", "resolution", "buckets", "batch_size", "grad_accum", "lr", "steps",
    "snapshot_every", "preview_every", "validation_every", "preview_prompt", "norm_control", "lr_shape",
    "warmup_steps", "flip", "shuffle_tags", "keep_tags", "tag_dropout", "repeats", "latent_sampling",
    "min_snr_gamma", "noise_offset", "seed", "resume", "cache_latents_on_disk", "train_encoders",
)  # fmt: skip
INTS = {"resolution", "batch_size", "grad_accum", "steps", "snapshot_every", "preview_every",
        "validation_every", "warmup_steps", "keep_tags", "repeats", "seed"}  # fmt: skip
FLOATS = {"tag_dropout", "min_snr_gamma", "noise_offset"}


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
    if st.files and not st.running:
        lines.append(f"saved: `{Path(st.files[-1]).name}`")
    return "\n\n".join(lines)


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

    def _service(self) -> Any:
        return get_service(self.host)

    # ------------------------------------------------------------------ form helpers
    def refresh(self, current: str | None) -> tuple[Any, str]:
        try:
            service = self._service()
            kind = service.loaded_kind()
            names = service.list_embeddings(kind)
        except Exception as e:
            return gr.update(), model_error(e)
        value = current if current in names else (names[0] if names else None)
        note = f"Loaded model: **{kind.upper()}**; {len(names)} embedding(s) made for it."
        if not names:
            note += " Create one in the Create tab first."
        return gr.update(choices=names, value=value), note

    def apply_recipe(self) -> tuple[Any, ...]:
        """Recipe values for the loaded model's kind: lr, steps, batch, accum, resolution, warmup, intervals."""
        try:
            kind = self._service().loaded_kind()
        except Exception as e:
            r = recipe_for("sd1", self.host.get_option)
            return (*self._recipe_values(r), model_error(e))
        r = recipe_for(kind, self.host.get_option)
        return (*self._recipe_values(r), ok_html(f"recipe for {kind.upper()} applied"))

    @staticmethod
    def _recipe_values(r: Recipe) -> tuple[Any, ...]:
        return (r.lr, r.steps, r.batch_size, r.grad_accum, r.resolution, r.warmup_steps,
                r.snapshot_every, r.preview_every, r.validation_every)  # fmt: skip

    @staticmethod
    def check_lr(lr: str, shape: str, warmup: float, steps: float) -> str:
        try:
            sched = LearningRateSchedule(ScheduleArgs(lr or "", shape, int(warmup or 0)), int(steps or 1))  # type: ignore[arg-type]
        except ScheduleError as e:
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

    def templates(self) -> list[str]:
        try:
            return list(self._service().templates())
        except TIError:
            return []

    # ------------------------------------------------------------------ the job
    def request(self, task_id: str, *values: Any) -> Any:
        """A TrainRequest from the form's values (in FIELDS order)."""
        from lib_ti.service import TrainRequest

        if len(values) != len(FIELDS):
            msg = f"expected {len(FIELDS)} form values, got {len(values)}"
            raise TIError(msg)
        kw: dict[str, Any] = {}
        for key, value in zip(FIELDS, values):
            if key in INTS:
                value = int(value or 0)
            elif key in FLOATS:
                value = float(value or 0)
            kw[key] = value
        kw["dataset"] = (kw["dataset"] or "").strip()
        kw["embedding"] = kw["embedding"] or ""
        enc = kw.pop("train_encoders")
        kw["train_encoders"] = None if enc in (None, "", "all") else [enc]
        kw["resolution"] = kw["resolution"] or None
        return TrainRequest(task_id=task_id or "", **kw)

    def start(self, task_id: str, *values: Any) -> tuple[str, str]:
        """Start a job; returns (job id, status). The job runs on; ``watch`` follows it."""
        try:
            job = self._service().start_training(self.request(task_id, *values))
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


def build(host: HostInfo) -> TrainHandlers:
    h = TrainHandlers(host)
    r = recipe_for("sd1", host.get_option)
    templates = h.templates()
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                embedding = gr.Dropdown(
                    label="Embedding (made for the loaded model)", choices=[], elem_id="ti_train_embedding"
                )
                refresh = gr.Button("🔄", elem_id="ti_train_refresh", elem_classes=["tool", "ti-tool"])
            model_note = gr.Markdown(elem_id="ti_train_model_note")
            dataset = gr.Textbox(
                label="Dataset folder", value=str(host.get_option("ti_dataset_dir", "") or ""),
                placeholder="/path/to/images (captions in .txt beside them, optional)", elem_id="ti_train_dataset",
            )  # fmt: skip
            template = gr.Dropdown(
                label="Prompt template", choices=templates, value=r.template if r.template in templates else None,
                elem_id="ti_train_template",
            )  # fmt: skip
            with gr.Accordion("Prompts the images get", open=False, elem_id="ti_train_prompts_box"):
                prompts = gr.Markdown(elem_id="ti_train_prompts")
            with gr.Row():
                resolution = gr.Number(
                    r.resolution, label="Resolution (bucket area)", precision=0, elem_id="ti_train_resolution"
                )
                buckets = gr.Checkbox(True, label="Aspect-ratio buckets", elem_id="ti_train_buckets")
            with gr.Row():
                batch_size = gr.Number(
                    r.batch_size, label="Batch size", precision=0, elem_id="ti_train_batch"
                )
                grad_accum = gr.Number(
                    r.grad_accum, label="Gradient accumulation", precision=0, elem_id="ti_train_accum"
                )
                steps = gr.Number(r.steps, label="Steps", precision=0, elem_id="ti_train_steps")
            lr = gr.Textbox(
                r.lr,
                label="Learning rate (a rate, or a schedule like 5e-3:100, 1e-3:1000)",
                elem_id="ti_train_lr",
            )
            lr_note = gr.HTML(elem_id="ti_train_lr_note")
            with gr.Row():
                snapshot_every = gr.Number(
                    r.snapshot_every, label="Snapshot every N steps", precision=0, elem_id="ti_train_snapshot"
                )
                preview_every = gr.Number(
                    r.preview_every,
                    label="Preview every N steps",
                    precision=0,
                    elem_id="ti_train_preview_every",
                )
                validation_every = gr.Number(
                    r.validation_every,
                    label="Validation every N steps",
                    precision=0,
                    elem_id="ti_train_validation",
                )
            preview_prompt = gr.Textbox(
                label="Preview prompt (empty: a photo of <name>)", elem_id="ti_train_preview_prompt"
            )
            norm_control = gr.Radio(
                NORM_CONTROL, value=r.norm_control, label="Norm control", elem_id="ti_train_norm"
            )
            with gr.Accordion("Advanced", open=False, elem_id="ti_train_advanced"):
                with gr.Row():
                    lr_shape = gr.Radio(
                        LR_SHAPES, value="constant", label="Learning-rate shape", elem_id="ti_train_lr_shape"
                    )
                    warmup = gr.Number(
                        r.warmup_steps, label="Warmup steps", precision=0, elem_id="ti_train_warmup"
                    )
                with gr.Row():
                    flip = gr.Checkbox(r.flip, label="Random horizontal flip", elem_id="ti_train_flip")
                    shuffle_tags = gr.Checkbox(
                        r.shuffle_tags, label="Shuffle caption tags", elem_id="ti_train_shuffle"
                    )
                    keep_tags = gr.Number(
                        0, label="Keep first N tags", precision=0, elem_id="ti_train_keep_tags"
                    )
                    tag_dropout = gr.Slider(
                        0, 0.5, value=0.0, step=0.01, label="Tag dropout", elem_id="ti_train_dropout"
                    )
                with gr.Row():
                    repeats = gr.Number(1, label="Repeats per epoch", precision=0, elem_id="ti_train_repeats")
                    latent_sampling = gr.Radio(
                        LATENT_SAMPLING,
                        value=r.latent_sampling,
                        label="Latent sampling",
                        elem_id="ti_train_latent",
                    )
                    train_encoders = gr.Radio(
                        ENCODERS, value="all", label="Train vectors of", elem_id="ti_train_encoders"
                    )
                with gr.Row():
                    min_snr = gr.Number(0.0, label="Min-SNR gamma (0: off)", elem_id="ti_train_min_snr")
                    noise_offset = gr.Number(0.0, label="Noise offset", elem_id="ti_train_noise_offset")
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="ti_train_seed")
                with gr.Row():
                    resume = gr.Checkbox(
                        False,
                        label="Resume the last stopped run of this embedding",
                        elem_id="ti_train_resume",
                    )
                    cache_disk = gr.Checkbox(
                        False, label="Cache latents on disk", elem_id="ti_train_cache_disk"
                    )
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

    form = [embedding, dataset, template, resolution, buckets, batch_size, grad_accum, lr, steps,
            snapshot_every, preview_every, validation_every, preview_prompt, norm_control, lr_shape,
            warmup, flip, shuffle_tags, keep_tags, tag_dropout, repeats, latent_sampling,
            min_snr, noise_offset, seed, resume, cache_disk, train_encoders]  # fmt: skip
    assert len(form) == len(FIELDS)
    live = [status, plot, previews]

    refresh.click(h.refresh, inputs=[embedding], outputs=[embedding, model_note])
    for box in (lr, lr_shape, warmup, steps):
        box.change(h.check_lr, inputs=[lr, lr_shape, warmup, steps], outputs=[lr_note])
    for box in (template, dataset, embedding):
        box.change(h.template_preview, inputs=[template, dataset, embedding], outputs=[prompts])
    recipe.click(
        h.apply_recipe,
        outputs=[lr, steps, batch_size, grad_accum, resolution, warmup, snapshot_every, preview_every,
                 validation_every, recipe_note],
    )  # fmt: skip
    train.click(h.start, inputs=[task_id, *form], outputs=[job_id, status], **js_kwargs("tiTrainStart")).then(
        h.watch, inputs=[job_id], outputs=live
    ).then(fn=None, **js_kwargs("tiRefreshCards"))
    stop.click(h.stop, inputs=[job_id], outputs=[status])
    follow.click(h.current, outputs=[job_id]).then(h.watch, inputs=[job_id], outputs=live)
    return h

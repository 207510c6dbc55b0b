"""The comparison grid, in the Inspect view: embeddings (or one run's snapshots) against checkpoints and
CFG scales, through the host's txt2img. The work is :class:`~lib_ti.grid.jobs.GridService`'s."""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator
from typing import Any

import gradio as gr

from lib_ti.errors import TIError
from lib_ti.grid.options import GridRequest
from lib_ti.hostinfo import HostInfo
from lib_ti.ui.common import error_html, find_job, follow, get_service
from lib_ti.ui.compat import js_kwargs

logger = logging.getLogger(__name__)

DEFAULTS = GridRequest()
#: the form's fields, in the order the handlers take them
FIELDS = ("embeddings", "run", "run_steps", "checkpoints", "cfg_scales", "prompts", "negative_prompt", "seeds",
          "steps", "width", "height")  # fmt: skip


def status_markdown(st: Any) -> str:
    if st is None:
        return "No grid yet."
    head = {"queued": "⏳ waiting for the GPU", "running": "▶ rendering", "finished": "✔ done",
            "stopped": "■ stopped (the cells made are in the grid)", "error": "✖ error"}.get(st.state, st.state)  # fmt: skip
    lines = [f"**{head}**: `{html.escape(st.name)}` (job `{st.id}`)"]
    if st.total:
        line = f"{st.step}/{st.total} images"
        if st.running and st.eta_seconds is not None:
            m, s = divmod(int(st.eta_seconds), 60)
            line += f" · ETA {m}:{s:02d}"
        lines.append(line)
    if st.message:
        lines.append(html.escape(st.message))
    for note in st.report.get("notes", []):
        lines.append(f"- {html.escape(note)}")
    return "\n\n".join(lines)


class GridHandlers:
    def __init__(self, host: HostInfo) -> None:
        self.host = host

    def _service(self) -> Any:
        return get_service(self.host)

    def choices(self) -> tuple[list[str], list[str], str]:
        """Embedding names, the host's checkpoints and the loaded one."""
        try:
            service = self._service()
            opts = service.grid.options()
            return service.list_embeddings(), list(opts["checkpoints"]), str(opts["loaded"])
        except TIError:
            return [], [], ""

    def refresh(self) -> tuple[Any, Any]:
        names, ckpts, loaded = self.choices()
        return gr.update(choices=names), gr.update(choices=ckpts, value=[loaded] if loaded in ckpts else [])

    def start(self, task_id: str, *values: Any) -> tuple[str, str]:
        given = {k: v for k, v in zip(FIELDS, values) if v not in (None, "")}
        for name in ("embeddings", "checkpoints"):
            given[name] = list(given.get(name) or [])
        try:
            job = self._service().grid.start(given, task_id=task_id or "")
        except TIError as e:
            return "", error_html(e)
        return job.id, status_markdown(job.status)

    def _job(self, job_id: str) -> Any:
        return find_job(self.host, job_id, "grid")

    def snapshot(self, job_id: str) -> tuple[str, Any]:
        job = self._job(job_id)
        st = job.status if job else None
        image = st.file if st is not None and not st.running and st.file else None
        return status_markdown(st), image

    def watch(self, job_id: str) -> Iterator[tuple[Any, Any]]:
        yield from follow(self._job(job_id), lambda: self.snapshot(job_id))

    def stop(self, job_id: str) -> str:
        job = self._job(job_id)
        if job is None or not job.status.running:
            return "No grid is being made."
        job.stop()
        return "Stopping after this image; the grid keeps the cells made."


def build(host: HostInfo) -> GridHandlers:
    """The grid's form, inside the Inspect view's Blocks context."""
    h = GridHandlers(host)
    names, ckpts, loaded = h.choices()
    gr.Markdown(
        "Rows: embeddings, or the snapshots of one training run. Columns: checkpoints (and CFG scales). "
        "Each image goes through the web UI's own txt2img, queued like any generation; the checkpoint "
        "loaded now is loaded again at the end.",
        elem_id="ti_grid_help",
    )
    with gr.Row():
        embeddings = gr.Dropdown(
            choices=names, multiselect=True, label="Embeddings (rows)", elem_id="ti_grid_embeddings"
        )
        refresh = gr.Button("🔄", elem_id="ti_grid_refresh", elem_classes=["tool", "ti-tool"])
    with gr.Row():
        run = gr.Textbox(
            label="…or the snapshots of the run of", placeholder="embedding name", elem_id="ti_grid_run"
        )
        run_steps = gr.Textbox(
            label="Steps (empty: every snapshot)", placeholder="500, 1000", elem_id="ti_grid_run_steps"
        )
    checkpoints = gr.CheckboxGroup(
        choices=ckpts,
        value=[loaded] if loaded in ckpts else [],
        label="Checkpoints (columns)",
        elem_id="ti_grid_checkpoints",
    )
    with gr.Row():
        cfg = gr.Textbox(
            ", ".join(f"{c:g}" for c in DEFAULTS.cfg_scales), label="CFG scales", elem_id="ti_grid_cfg"
        )
        seeds = gr.Textbox(", ".join(map(str, DEFAULTS.seeds)), label="Seeds", elem_id="ti_grid_seeds")
        steps = gr.Number(DEFAULTS.steps, label="Sampling steps", precision=0, elem_id="ti_grid_steps")
        width = gr.Number(
            DEFAULTS.width, label="Width (0: the model's)", precision=0, elem_id="ti_grid_width"
        )
        height = gr.Number(
            DEFAULTS.height, label="Height (0: the model's)", precision=0, elem_id="ti_grid_height"
        )
    prompts = gr.Textbox(
        "\n".join(DEFAULTS.prompts),
        lines=2,
        label="Prompts, one per line ([name] is the row's embedding)",
        elem_id="ti_grid_prompts",
    )
    negative = gr.Textbox(DEFAULTS.negative_prompt, label="Negative prompt", elem_id="ti_grid_negative")
    with gr.Row():
        start = gr.Button("Make grid", variant="primary", elem_id="ti_grid_start")
        stop = gr.Button("Stop", elem_id="ti_grid_stop")
    gr.HTML("<div></div>", elem_id="ti_grid_progress")
    status = gr.Markdown("No grid yet.", elem_id="ti_grid_status")
    image = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="ti_grid_image")
    task_id = gr.Textbox(visible=False, elem_id="ti_grid_task")
    job_id = gr.Textbox(visible=False, elem_id="ti_grid_job")
    form = [embeddings, run, run_steps, checkpoints, cfg, prompts, negative, seeds, steps, width, height]
    start.click(h.start, inputs=[task_id, *form], outputs=[job_id, status], **js_kwargs("tiGridStart")).then(
        h.watch, inputs=[job_id], outputs=[status, image]
    )
    stop.click(h.stop, inputs=[job_id], outputs=[status])
    refresh.click(h.refresh, outputs=[embeddings, checkpoints])
    return h

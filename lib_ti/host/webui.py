"""What every A1111-family host shares (A1111, Forge, reForge, Forge Classic): folders, settings,
the GPU lock, the progress bar and the Interrupt button. Only ``modules.shared``, ``modules.progress``
and ``modules.call_queue`` are used; they are the same in all of them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lib_ti.settings import SECTION, SETTINGS

logger = logging.getLogger(__name__)


def embeddings_dir() -> str:
    from modules import shared

    return str(shared.cmd_opts.embeddings_dir)


def get_option(key: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, key, default)


def log_dir() -> str:
    from modules import shared

    configured = getattr(shared.cmd_opts, "ti_log_dir", None) or getattr(shared.opts, "ti_log_dir", "")
    return str(configured or Path(shared.data_path) / "textual_inversion_ti")


def save_format() -> str:
    fmt = str(get_option("ti_save_format", "safetensors"))
    return fmt if fmt in ("safetensors", "pt") else "safetensors"


def register_settings() -> None:
    import gradio as gr
    from modules import shared

    components = {"text": gr.Textbox, "number": gr.Number, "checkbox": gr.Checkbox, "radio": gr.Radio}
    for s in SETTINGS:
        args = {"choices": list(s.choices)} if s.component == "radio" else None
        info = shared.OptionInfo(s.default, s.label, components[s.component], args, section=SECTION)
        if s.info:
            info = info.info(s.info)
        shared.opts.add_option(s.key, info)


# ---------------------------------------------------------------------------- progress and the GPU lock

_TOTAL = {"steps": 0}


def progress_queued(task_id: str) -> None:
    from modules import progress

    progress.add_task_to_queue(task_id)


def progress_begin(title: str, total: int, task_id: str) -> None:
    """Training shows in the host's progress bar (``/internal/progress``) and ``/sdapi/v1/progress``."""
    from modules import progress, shared

    shared.state.begin(job="ti-train")
    _TOTAL["steps"] = total
    shared.state.job_count = 1
    shared.state.sampling_steps = total
    shared.state.textinfo = title
    if task_id:
        progress.start_task(task_id)


def progress_update(step: int, text: str) -> None:
    from modules import shared

    # a preview in between runs the host's sampler, which sets its own counts: put ours back
    shared.state.job_count, shared.state.job_no = 1, 0
    shared.state.sampling_steps = _TOTAL["steps"]
    shared.state.sampling_step = step
    shared.state.textinfo = text


def progress_end(task_id: str) -> None:
    from modules import progress, shared

    shared.state.end()
    if task_id:
        progress.finish_task(task_id)


def interrupted() -> bool:
    from modules import shared

    return bool(shared.state.interrupted)


def exclusive() -> Any:
    from modules import call_queue

    return call_queue.queue_lock


def preview_size(kind: str) -> int:
    try:
        size = int(float(get_option("ti_preview_size", 0) or 0))
    except (TypeError, ValueError):
        size = 0
    return size if size >= 64 else (1024 if kind.startswith("sdxl") else 512)


def txt2img(prompt: str, size: int) -> Any:
    """One image through the host's own txt2img processing, with a fixed seed."""
    from modules import processing, shared

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, steps=20, width=size, height=size, seed=1234, cfg_scale=7,
        do_not_save_samples=True, do_not_save_grid=True,
    )  # fmt: skip
    p.do_not_reload_embeddings = True
    res = processing.process_images(p)
    return res.images[0] if res.images else None


def save_preview(emb: Any, image: Any, step: int, out_dir: Path) -> str:
    """Write a preview: PNG with the embedding inside (as A1111 stores it), or webp / jpg (setting)."""
    from lib_ti.io.formats import to_png

    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = str(get_option("ti_preview_format", "png") or "png")
    if fmt not in ("webp", "jpg"):
        image, info = to_png(emb, image)
        path = out_dir / f"{emb.name}-{step}.png"
        image.save(path, pnginfo=info)
    else:
        path = out_dir / f"{emb.name}-{step}.{fmt}"
        image.convert("RGB").save(path, quality=90)
    return str(path)


def common_services() -> dict[str, Any]:
    """The HostServices fields that are the same on every A1111-family host."""
    return {
        "embeddings_dir": embeddings_dir,
        "log_dir": log_dir,
        "exclusive": exclusive,
        "progress_begin": progress_begin,
        "progress_update": progress_update,
        "progress_end": progress_end,
        "progress_queued": progress_queued,
        "interrupted": interrupted,
        "save_format": save_format,
        "get_option": get_option,
    }


def host_info(name: str, embedding_status: Any, reload_embeddings: Any, service: Any, **extra: Any) -> Any:
    """The HostInfo the tab is built with."""
    import gradio as gr

    from lib_ti.hostinfo import HostInfo

    return HostInfo(
        name=name,
        embeddings_dir=embeddings_dir,
        embedding_status=embedding_status,
        reload_embeddings=reload_embeddings,
        get_option=get_option,
        gradio_major=int(gr.__version__.split(".")[0]),
        service=service,
        extra=dict(extra),
    )


def add_api_routes(app: Any, service: Any, add_checks: Any) -> None:
    """Our /ti/v1 routes with the host's --api-auth, once per app; ``add_checks(app)`` adds the
    self-check routes when LIB_TI_HOST_CHECKS=1 (real-host tests only)."""
    import os

    from modules import shared

    from lib_ti.ui.api import add_routes

    if getattr(app.state, "lib_ti_routes", False):
        return
    add_routes(app, service, getattr(shared.cmd_opts, "api_auth", None))
    if os.environ.get("LIB_TI_HOST_CHECKS") == "1":
        add_checks(app)
    app.state.lib_ti_routes = True

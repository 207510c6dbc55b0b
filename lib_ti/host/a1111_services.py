"""HostServices for AUTOMATIC1111: the GPU lock, progress in shared.state, hot reload, previews."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lib_ti.embedding import Embedding
from lib_ti.host import a1111
from lib_ti.host.a1111_model import build_parts, frozen
from lib_ti.service import HostServices

logger = logging.getLogger(__name__)


def log_dir() -> str:
    from modules import shared

    configured = getattr(shared.cmd_opts, "ti_log_dir", None) or getattr(shared.opts, "ti_log_dir", "")
    return str(configured or Path(shared.data_path) / "textual_inversion_ti")


def _parts():
    from modules import shared

    return build_parts(shared.sd_model)


def _freeze():
    from modules import shared

    changed = frozen(shared.sd_model)

    def restore() -> None:
        for p in changed:
            p.requires_grad_(True)

    return restore


def _release_vae():
    """On a GPU, move the VAE to the CPU while training (latents are cached); put it back after."""
    from modules import shared

    m = shared.sd_model
    vae = getattr(m, "first_stage_model", None)
    if vae is None:
        return lambda: None
    device = next(vae.parameters()).device
    if device.type == "cpu":
        return lambda: None
    vae.to("cpu")

    def restore() -> None:
        vae.to(device)

    return restore


_TOTAL = {"steps": 0}


def _queued(task_id: str) -> None:
    from modules import progress

    progress.add_task_to_queue(task_id)


def _begin(title: str, total: int, task_id: str) -> None:
    """Training shows in the host's progress bar (``/internal/progress``) and ``/sdapi/v1/progress``."""
    from modules import progress, shared

    shared.state.begin(job="ti-train")
    _TOTAL["steps"] = total
    shared.state.job_count = 1
    shared.state.sampling_steps = total
    shared.state.textinfo = title
    if task_id:
        progress.start_task(task_id)


def _update(step: int, text: str) -> None:
    from modules import shared

    # a preview in between runs the host's sampler, which sets its own counts: put ours back
    shared.state.job_count, shared.state.job_no = 1, 0
    shared.state.sampling_steps = _TOTAL["steps"]
    shared.state.sampling_step = step
    shared.state.textinfo = text


def _end(task_id: str) -> None:
    from modules import progress, shared

    shared.state.end()
    if task_id:
        progress.finish_task(task_id)


def _interrupted() -> bool:
    from modules import shared

    return bool(shared.state.interrupted)


def _exclusive() -> Any:
    from modules import call_queue

    return call_queue.queue_lock


def _preview(emb: Embedding, prompt: str, step: int, out_dir: Path) -> str | None:
    """A txt2img image through the host's own pipeline, with the current vectors registered in memory."""
    from modules import processing, sd_hijack, shared
    from modules.textual_inversion import textual_inversion as ti

    from lib_ti.formats import a1111_data, to_png

    db = sd_hijack.model_hijack.embedding_db
    try:
        size = int(float(getattr(shared.opts, "ti_preview_size", 0) or 0))
    except (TypeError, ValueError):
        size = 0
    if size < 64:
        size = 1024 if emb.kind == "sdxl" else 512
    data = a1111_data(emb, with_metadata=False)
    live = ti.create_embedding_from_data(data, emb.name, filename=f"{emb.name}.preview")
    db.register_embedding(live, shared.sd_model)
    try:
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, steps=20, width=size, height=size, seed=1234, cfg_scale=7,
            do_not_save_samples=True, do_not_save_grid=True,
        )  # fmt: skip
        p.do_not_reload_embeddings = True
        res = processing.process_images(p)
    finally:
        db.load_textual_inversion_embeddings(force_reload=True)
    if not res.images:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = str(getattr(shared.opts, "ti_preview_format", "png") or "png")
    if fmt not in ("webp", "jpg"):
        image, info = to_png(emb, res.images[0])  # the embedding inside the image, as A1111 stores it
        path = out_dir / f"{emb.name}-{step}.png"
        image.save(path, pnginfo=info)
    else:
        path = out_dir / f"{emb.name}-{step}.{fmt}"
        res.images[0].convert("RGB").save(path, quality=90)
    return str(path)


def host_services() -> HostServices:
    def save_format() -> str:
        fmt = str(a1111.get_option("ti_save_format", "safetensors"))
        return fmt if fmt in ("safetensors", "pt") else "safetensors"

    return HostServices(
        embeddings_dir=a1111.embeddings_dir,
        log_dir=log_dir,
        build_parts=_parts,
        reload_embeddings=a1111.reload_embeddings,
        exclusive=_exclusive,
        freeze_model=_freeze,
        progress_begin=_begin,
        progress_update=_update,
        progress_end=_end,
        interrupted=_interrupted,
        preview=_preview,
        save_format=save_format,
        embedding_status=a1111.embedding_status,
        release_image_encoder=_release_vae,
        get_option=a1111.get_option,
        progress_queued=_queued,
    )


_SERVICE = None


def get_service():
    """The one Service of this process (kept across the host's Reload UI, which re-runs scripts)."""
    global _SERVICE
    if _SERVICE is None:
        from lib_ti.service import Service

        _SERVICE = Service(host_services())
    return _SERVICE


def add_api_routes(app: Any) -> None:
    from modules import shared

    from lib_ti.ui.api import add_routes

    if getattr(app.state, "lib_ti_routes", False):
        return
    add_routes(app, get_service(), getattr(shared.cmd_opts, "api_auth", None))
    if os.environ.get("LIB_TI_HOST_CHECKS") == "1":
        from lib_ti.host.a1111_checks import add_check_routes

        add_check_routes(app)
    app.state.lib_ti_routes = True

"""What every A1111-family host shares (A1111, Forge, reForge, Forge Classic): folders, settings,
the GPU lock, the progress bar, the Interrupt button, and :class:`WebUIAdapter`, the adapters' base.

The web UI's ``modules`` are imported inside the functions, so importing any adapter never touches the
host (detection imports them all).
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from lib_ti.errors import TIError
from lib_ti.host.prepare_host import prepare_services
from lib_ti.hostinfo import Generation, HostInfo, HostServices
from lib_ti.inline.plan import TEMP_PREFIX
from lib_ti.io.formats import to_png
from lib_ti.settings import SECTION

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


def without_temporary(status: dict[str, str]) -> dict[str, str]:
    """A database's ``{name: status}`` without the names prompt expressions hold during an encode."""
    return {k: v for k, v in status.items() if not k.startswith(TEMP_PREFIX)}


def save_format() -> str:
    fmt = str(get_option("ti_save_format", "safetensors"))
    return fmt if fmt in ("safetensors", "pt") else "safetensors"


# ---------------------------------------------------------------------------- progress and the GPU lock

_TOTAL = {"steps": 0}
#: the host job our progress_begin started ("": none); a Prepare run does not hold the GPU lock, so a
#: generation meanwhile takes the host's job state over, and our updates, Interrupt and end leave it alone
_OURS = {"job": ""}
#: the host job name of our jobs (what ``/sdapi/v1/progress`` shows as ``state.job``)
JOB_NAME = "ti-train"


def _ours() -> bool:
    from modules import shared

    return bool(_OURS["job"]) and getattr(shared.state, "job", None) == _OURS["job"]


def progress_queued(task_id: str) -> None:
    from modules import progress

    progress.add_task_to_queue(task_id)


def progress_begin(title: str, total: int, task_id: str) -> None:
    """Training shows in the host's progress bar (``/internal/progress``) and ``/sdapi/v1/progress``."""
    from modules import progress, shared

    shared.state.begin(job=JOB_NAME)
    _OURS["job"] = shared.state.job
    _TOTAL["steps"] = total
    shared.state.job_count = 1
    shared.state.sampling_steps = total
    shared.state.textinfo = title
    if task_id:
        progress.start_task(task_id)


def progress_total(total: int) -> None:
    from modules import shared

    _TOTAL["steps"] = total
    if _ours():
        shared.state.sampling_steps = total


def progress_update(step: int, text: str) -> None:
    from modules import shared

    if not _ours():
        return
    # a preview in between runs the host's sampler, which sets its own counts: put ours back
    shared.state.job_count, shared.state.job_no = 1, 0
    shared.state.sampling_steps = _TOTAL["steps"]
    shared.state.sampling_step = step
    shared.state.textinfo = text


def progress_end(task_id: str) -> None:
    from modules import progress, shared

    if _ours():
        shared.state.end()
    _OURS["job"] = ""
    if task_id:
        progress.finish_task(task_id)


def interrupted() -> bool:
    """The host's Interrupt button, pressed for our job (not for a generation during a Prepare run)."""
    from modules import shared

    return _ours() and bool(shared.state.interrupted)


def exclusive() -> Any:
    from modules import call_queue

    return call_queue.queue_lock


def preview_size(kind: str) -> int:
    try:
        size = int(float(get_option("ti_preview_size", 0) or 0))
    except (TypeError, ValueError):
        size = 0
    return size if size >= 64 else (1024 if kind.startswith("sdxl") else 512)


def forget_cached_conditioning() -> None:
    """Empty the host's prompt-conditioning caches (class-level, kept across generations).

    They are keyed by the prompt text and settings, not by the embeddings: after an embedding file is
    written, the same prompt would otherwise reuse the old vectors' conditioning. Cleared in place, so
    every processing object that holds a cache list sees it empty (Forge Neo's lists have three slots).
    """
    from modules import processing

    for cls, attrs in (
        (processing.StableDiffusionProcessing, ("cached_c", "cached_uc")),
        (getattr(processing, "StableDiffusionProcessingTxt2Img", None), ("cached_hr_c", "cached_hr_uc")),
    ):
        for attr in attrs:
            cache = getattr(cls, attr, None)
            if isinstance(cache, list):
                cache[:] = [None] * len(cache)


def without_scripts(p: Any) -> None:
    """Run ``p`` with no extension scripts: an empty runner (reForge's processing needs one; A1111
    takes None and an empty runner alike)."""
    from modules import scripts

    p.scripts, p.script_args = scripts.ScriptRunner(), []


def txt2img(prompt: str, size: int) -> Any:
    """One image through the host's own txt2img processing, with a fixed seed."""
    from modules import processing, shared

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=prompt, steps=20, width=size, height=size, seed=1234, cfg_scale=7,
        do_not_save_samples=True, do_not_save_grid=True,
    )  # fmt: skip
    p.do_not_reload_embeddings = True
    without_scripts(p)
    res = processing.process_images(p)
    return res.images[0] if res.images else None


def generate(what: Generation, pin: str = "") -> tuple[Any, str]:
    """One image through the host's own txt2img (a grid cell): (image or None, its infotext).

    ``pin``: the checkpoint title the image must use. ``process_images`` loads the dropdown's choice,
    which a user may change meanwhile (the option changes at once, its load waits for the GPU lock): the
    choice is set to ``pin`` for the image and put back after, unless the user changed it meanwhile
    (the host's own ``override_settings`` would put back a stale value over that change)."""
    from modules import processing, shared

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model, prompt=what.prompt, negative_prompt=what.negative_prompt, steps=what.steps,
        width=what.width, height=what.height, seed=what.seed, cfg_scale=what.cfg_scale,
        do_not_save_samples=True, do_not_save_grid=True,
    )  # fmt: skip
    if what.sampler:
        p.sampler_name = what.sampler
    # embeddings registered for this image only must survive; the folder was read at the model's load
    p.do_not_reload_embeddings = True
    without_scripts(p)
    forget_cached_conditioning()
    choice = shared.opts.data.get("sd_model_checkpoint")
    if pin:
        shared.opts.data["sd_model_checkpoint"] = pin
    try:
        res = processing.process_images(p)
    finally:
        if pin and shared.opts.data.get("sd_model_checkpoint") == pin:
            shared.opts.data["sd_model_checkpoint"] = choice
    image = res.images[0] if res.images else None
    infotexts = getattr(res, "infotexts", None) or [getattr(res, "info", "")]
    return image, str(infotexts[0] or "")


def checkpoints() -> list[str]:
    """The host's checkpoints by title (``name.safetensors [hash]``), as its dropdown lists them."""
    from modules import sd_models

    return [info.title for info in sd_models.checkpoints_list.values()]


def checkpoint() -> str:
    """The title of the checkpoint that is loaded (else the one selected)."""
    from modules import sd_models

    info = getattr(sd_models.model_data.sd_model, "sd_checkpoint_info", None)
    title = getattr(info, "title", None)
    return str(title) if title else selected_checkpoint()


def selected_checkpoint() -> str:
    """The title of the checkpoint the web UI's dropdown shows."""
    from modules import sd_models, shared

    value = str(shared.opts.sd_model_checkpoint or "")
    found = sd_models.get_closet_checkpoint_match(value) if value else None
    return str(found.title) if found is not None else value


def checkpoint_info(title: str) -> Any:
    from modules import sd_models

    info = sd_models.get_closet_checkpoint_match(title)
    if info is None:
        msg = f"checkpoint {title!r} is not one of this web UI's"
        raise TIError(msg)
    return info


def load_checkpoint(title: str) -> None:
    """Load a checkpoint (A1111, reForge, Forge Classic) and leave the dropdown's choice as it is (a grid
    loads its columns; the user's choice is loaded again after it); the caller holds the GPU lock."""
    from modules import sd_models

    info = checkpoint_info(title)
    keep_choice = getattr(sd_models, "SkipWritingToConfig", None)
    with keep_choice() if keep_choice is not None else contextlib.nullcontext():
        sd_models.reload_model_weights(info=info)


def lora_dir() -> str:
    """The web UI's LoRA folder (``--lora-dir``, else ``models/Lora``)."""
    from modules import paths, shared

    return str(getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora")


def progress_jobs(count: int) -> None:
    """The host's progress bar counts ``count`` images (each txt2img call ends one with ``nextjob``)."""
    from modules import shared

    if _ours():
        shared.state.job_count, shared.state.job_no = count, 0


def save_preview(emb: Any, image: Any, step: int, out_dir: Path) -> str:
    """Write a preview: PNG with the embedding inside (as A1111 stores it), or webp / jpg (setting)."""
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
        "progress_total": progress_total,
        "progress_jobs": progress_jobs,
        "checkpoints": checkpoints,
        "checkpoint": checkpoint,
        "selected_checkpoint": selected_checkpoint,
        "lora_dir": lora_dir,
        **prepare_services(),
        "interrupted": interrupted,
        "save_format": save_format,
        "get_option": get_option,
    }


class WebUIAdapter(ABC):
    """The :class:`~lib_ti.host.adapter.HostAdapter` parts every A1111-family host shares."""

    name: ClassVar[str]
    #: the host's name for people ("Forge Neo")
    label: ClassVar[str]
    #: facts for the UI (``HostInfo.extra``)
    info_extra: ClassVar[dict[str, Any]] = {}

    @abstractmethod
    def host_services(self) -> HostServices: ...

    @abstractmethod
    def add_check_routes(self, app: Any, service: Any) -> None: ...

    def host_info(self, service: Callable[[], Any] | None, gradio_major: int) -> HostInfo:
        return HostInfo.from_services(
            self.name, self.host_services(), service=service, gradio_major=gradio_major, extra=self.info_extra
        )

    def add_option(
        self,
        key: str,
        default: Any,
        label: str,
        component: Any,
        component_args: dict[str, Any] | None,
        info: str = "",
    ) -> None:
        from modules import shared

        option = shared.OptionInfo(default, label, component, component_args, section=SECTION)
        if info:
            option = option.info(info)
        shared.opts.add_option(key, option)

    def api_auth(self) -> str | None:
        from modules import shared

        return getattr(shared.cmd_opts, "api_auth", None)

    def on_app_started(self, app: Any) -> None:
        return None

    def model_loaded_hook(self) -> Callable[[Any], None] | None:
        return None

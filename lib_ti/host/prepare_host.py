"""What the Prepare view uses of an A1111-family host: its models folder, its upscalers and its
interrogators (BLIP and DeepBooru where the host still has them: A1111, Forge, reForge; Forge Neo and
Forge Classic removed them).

The web UI's ``modules`` are imported inside the functions (detection imports every adapter).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: our captioner name -> the host module that provides it
INTERROGATORS = {"blip": "modules.interrogate", "deepbooru": "modules.deepbooru"}
#: the host's upscalers that do nothing, or that we do ourselves (Lanczos is our default)
_NOT_UPSCALERS = {"None", "Lanczos"}


def models_dir() -> str:
    from modules import paths

    return str(paths.models_path)


def upscaler_names() -> list[str]:
    """The host's upscalers by name (read at each call: hosts rebuild the list)."""
    from modules import shared

    return [u.name for u in getattr(shared, "sd_upscalers", []) or [] if u.name not in _NOT_UPSCALERS]


def upscale(img: Any, name: str, scale: float) -> Any:
    """``img`` enlarged ``scale`` times by the host's upscaler ``name`` (its size is made exact later)."""
    from modules import shared

    for u in getattr(shared, "sd_upscalers", []) or []:
        if u.name == name:
            return u.scaler.upscale(img, scale, u.data_path)
    msg = f"the upscaler {name!r} is not among this web UI's upscalers"
    raise LookupError(msg)


def interrogator_names() -> list[str]:
    """The captioners the host has: "blip" (its BLIP interrogator), "deepbooru"."""
    found = []
    for name, module in INTERROGATORS.items():
        try:
            importlib.import_module(module)
        except Exception:
            continue
        if name == "blip":
            from modules import shared

            if getattr(shared, "interrogator", None) is None:
                continue
        found.append(name)
    return found


def interrogate(name: str, images: list[Any]) -> list[str]:
    """Captions of ``images`` by the host's interrogator ``name``.

    BLIP gives its caption only (``generate_caption``: the host's ``interrogate`` adds CLIP's artist and
    medium guesses and restarts the host's job state, which would wipe the progress of our job).
    """
    if name == "deepbooru":
        from modules import deepbooru

        deepbooru.model.start()
        try:  # no "(tag:0.98)" in training captions, whatever the web UI's ranks setting says
            return [str(deepbooru.model.tag_multi(img, force_disable_ranks=True)) for img in images]
        finally:
            deepbooru.model.stop()
    if name == "blip":
        from modules import shared

        ii = shared.interrogator
        _load_blip(ii)
        try:
            return [str(ii.generate_caption(img.convert("RGB"))) for img in images]
        finally:
            ii.unload()
    msg = f"unknown interrogator {name!r}"
    raise LookupError(msg)


def _load_blip(ii: Any) -> None:
    """BLIP alone, as the host's ``interrogate`` loads it (CLIP, which only its artist guesses need, is
    a download and memory the caption does not use); A1111's model offloading first. Hosts whose
    interrogator loads differently (Forge's memory manager) use their own ``load``."""
    from modules import devices, shared

    if (
        not hasattr(ii, "load_blip_model")
        or hasattr(ii, "load_device")
        or not hasattr(devices, "device_interrogate")
    ):
        ii.load()
        return
    try:
        from modules import lowvram

        lowvram.send_everything_to_cpu()
    except (ImportError, AttributeError):
        pass
    devices.torch_gc()
    if ii.blip_model is None:
        ii.blip_model = ii.load_blip_model()
        if not shared.cmd_opts.no_half and not getattr(ii, "running_on_cpu", False):
            ii.blip_model = ii.blip_model.half()
    ii.blip_model = ii.blip_model.to(devices.device_interrogate)
    ii.dtype = next(ii.blip_model.parameters()).dtype


def prepare_services() -> dict[str, Any]:
    """The HostServices fields of the Prepare view."""
    return {
        "models_dir": models_dir,
        "upscalers": upscaler_names,
        "upscale": upscale,
        "interrogators": interrogator_names,
        "interrogate": interrogate,
    }

"""Which host is running, decided in one place.

- ``forge``: lllyasviel's Forge (Forge2 backend; also Forge Neo): ``backend.text_processing`` exists;
  the Forge adapter is used (per-engine embedding databases, inference-mode weights).
- ``reforge`` (Panchovix) and ``classic`` (Haoming02's Forge Classic): ``modules_forge`` without that
  backend. They keep A1111's ``sd_hijack.model_hijack.embedding_db``, so the A1111 adapter is used;
  their text encoders are ldm_patched modules (see :mod:`lib_ti.host.a1111_model`). Classic's
  ``script_callbacks.on_*`` take no ``name=`` keyword (its older API), which tells the two apart.
- ``a1111``: everything else.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Literal

logger = logging.getLogger(__name__)

HostName = Literal["a1111", "forge", "reforge", "classic"]

LABELS = {"a1111": "AUTOMATIC1111", "forge": "Forge", "reforge": "reForge", "classic": "Forge Classic"}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or not a package
        return False


def _callbacks_take_name() -> bool:
    try:
        from modules import script_callbacks
    except ImportError:
        return True
    return "name" in inspect.signature(script_callbacks.on_ui_tabs).parameters


def host_name() -> HostName:
    if _exists("modules_forge"):
        if _exists("backend.text_processing"):
            return "forge"
        return "reforge" if _callbacks_take_name() else "classic"
    return "a1111"


def is_a1111_style(name: str) -> bool:
    """Hosts with A1111's single embedding database (``sd_hijack.model_hijack.embedding_db``)."""
    return name in ("a1111", "reforge", "classic")


#: hosts where the A1111 adapter reads and writes embeddings but cannot train (not yet verified)
NO_TRAINING = {
    "reforge": "reForge",
    "classic": "Forge Classic",
}


def training_blocked(host: str) -> str | None:
    label = NO_TRAINING.get(host)
    if label is None:
        return None
    return (
        f"training is not available on {label} yet: its sampling leaves the model's weights as inference "
        "tensors, its VAE encode returns no distribution, and no test host was available to verify the "
        "adapter there. Create, merge and inspect work here; train on AUTOMATIC1111 or Forge."
    )

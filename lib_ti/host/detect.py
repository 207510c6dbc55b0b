"""Which host is running, and its adapter, decided in one place.

- ``forge``: lllyasviel's Forge (Forge2 backend): ``backend.text_processing`` exists; the Forge adapter
  is used (per-engine embedding databases, inference-mode weights).
- ``neo``: Haoming02's Forge Neo, the same backend; its ``modules_forge/forge_version.py`` says
  ``version = "neo"``. The Forge adapter, under Neo's name.
- ``reforge`` (Panchovix) and ``classic`` (Haoming02's Forge Classic): ``modules_forge`` without that
  backend. They keep A1111's ``sd_hijack.model_hijack.embedding_db`` and sample with Forge 1's
  ldm_patched backend: :mod:`lib_ti.host.forks` (A1111's adapter with that backend's model parts). Classic's
  ``script_callbacks.on_*`` take no ``name=`` keyword (its older API), which tells the two apart.
- ``a1111``: everything else.

A new host is one adapter module plus its lines here (:func:`host_name` and :data:`ADAPTERS`).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Literal

from lib_ti.host.a1111 import A1111Adapter
from lib_ti.host.adapter import HostAdapter
from lib_ti.host.forge import ForgeAdapter, NeoAdapter
from lib_ti.host.forks import ClassicAdapter, ReForgeAdapter

logger = logging.getLogger(__name__)

HostName = Literal["a1111", "forge", "neo", "reforge", "classic"]


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


def _forge_version() -> str:
    """``modules_forge.forge_version.version`` ("neo" on Forge Neo, "classic" on Forge Classic), or ""."""
    try:
        from modules_forge import forge_version
    except ImportError:
        return ""
    return str(getattr(forge_version, "version", ""))


def host_name() -> HostName:
    if _exists("modules_forge"):
        if _exists("backend.text_processing"):
            return "neo" if _forge_version() == "neo" else "forge"
        return "reforge" if _callbacks_take_name() else "classic"
    return "a1111"


#: each host's adapter
ADAPTERS: dict[str, type[HostAdapter]] = {
    "a1111": A1111Adapter,
    "forge": ForgeAdapter,
    "neo": NeoAdapter,
    "reforge": ReForgeAdapter,
    "classic": ClassicAdapter,
}


def detect_adapter() -> HostAdapter:
    """The adapter of the running host."""
    return ADAPTERS[host_name()]()


def is_a1111_style(name: str) -> bool:
    """Hosts with A1111's single embedding database (``sd_hijack.model_hijack.embedding_db``)."""
    return issubclass(ADAPTERS[name], A1111Adapter)

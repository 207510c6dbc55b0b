"""What the UI needs from the host, as plain callables (built by ``lib_ti.host``; faked in tests)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _no_status() -> dict[str, str]:
    return {}


def _no_reload() -> None:
    return None


def _default_option(key: str, default: Any) -> Any:
    return default


@dataclass
class HostInfo:
    """The host seen by the UI: no gradio, no ``modules`` imports needed to build one."""

    name: str
    embeddings_dir: Callable[[], str]
    #: ``{embedding name: "loaded" | "skipped"}`` from the host's database (empty if unknown).
    embedding_status: Callable[[], dict[str, str]] = _no_status
    #: Make the host re-read its embeddings folder (hot reload after a write).
    reload_embeddings: Callable[[], None] = _no_reload
    get_option: Callable[[str, Any], Any] = _default_option
    gradio_major: int = 3
    #: the :class:`lib_ti.service.Service` for create, merge and train (None: those tabs explain why)
    service: Callable[[], Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

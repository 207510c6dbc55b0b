"""What ``scripts/ti_tab.py`` needs from a host, and the one :class:`~lib_ti.service.Service` per process."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from lib_ti.embedding import Embedding
from lib_ti.hostinfo import HostInfo, HostServices
from lib_ti.service import Service


@runtime_checkable
class HostAdapter(Protocol):
    """One per host (``lib_ti.host.a1111``, ``lib_ti.host.forge``); chosen by :mod:`lib_ti.host.detect`.

    Imports neither gradio nor ``lib_ti.ui``: the UI side passes in what it needs (component classes,
    the gradio major version, the service getter).
    """

    @property
    def name(self) -> str:
        """The host's name as detected: "a1111", "forge", "neo", "reforge", "classic"."""
        ...

    @property
    def label(self) -> str:
        """The host's name for people: "AUTOMATIC1111", "Forge", "Forge Neo", "reForge", "Forge Classic"."""
        ...

    def host_services(self) -> HostServices:
        """The host as the :class:`Service` sees it."""
        ...

    def host_info(self, service: Callable[[], Any] | None, gradio_major: int) -> HostInfo:
        """The host as the tab sees it; ``service`` returns the Service (None: the tab has none)."""
        ...

    def add_option(
        self,
        key: str,
        default: Any,
        label: str,
        component: Any,
        component_args: dict[str, Any] | None,
        info: str,
    ) -> None:
        """Register one setting (``component``: the gradio class the UI side chose)."""
        ...

    def api_auth(self) -> str | None:
        """The host's ``--api-auth`` (``user:pass,user2:pass2``), or None."""
        ...

    def on_app_started(self, app: Any) -> None:
        """Called with the FastAPI app at every app start (also after Reload UI), before our routes."""
        ...

    def add_check_routes(self, app: Any, service: Service) -> None:
        """The self-check routes of the real-host tests (only with ``LIB_TI_HOST_CHECKS=1``)."""
        ...

    def model_loaded_hook(self) -> Callable[[Any], None] | None:
        """A ``script_callbacks.on_model_loaded`` callback, or None when the host needs none."""
        ...

    def temporary_embeddings(self, embeddings: Mapping[str, Embedding]) -> AbstractContextManager[None]:
        """A context in which the host's prompt encoding knows ``embeddings`` by name, and only there
        (prompt expressions, :mod:`lib_ti.host.inline`)."""
        ...

    def model_loaded(self) -> bool:
        """Whether a model is loaded now (without loading one)."""
        ...


_SERVICE: dict[str, Service] = {}


def get_service(adapter: HostAdapter) -> Service:
    """The one Service of this process, built from ``adapter`` on first use.

    Kept across the host's Reload UI, which re-runs ``scripts/ti_tab.py`` (a running job keeps going).
    """
    if "service" not in _SERVICE:
        _SERVICE["service"] = Service(adapter.host_services())
    return _SERVICE["service"]

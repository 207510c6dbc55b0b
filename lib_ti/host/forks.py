"""The adapters of AUTOMATIC1111's ldm_patched forks: Panchovix's reForge and Haoming02's Forge Classic.

They keep A1111's embedding database, settings, progress and txt2img (so the A1111 adapter's), and
sample with Forge 1's ldm_patched backend: training goes through :mod:`lib_ti.host.ldm_patched_model`
(the backend's UNet and VAE, with :mod:`lib_ti.host.grad_safe`'s remedies for its inference tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from lib_ti.embedding import Embedding
from lib_ti.host import a1111, a1111_checks, checks, grad_safe
from lib_ti.host import ldm_patched_model as lpm
from lib_ti.hostinfo import HostServices


def _parts() -> Any:
    return lpm.build_parts(a1111.loaded_model())


def freeze(m: Any) -> Callable[[], None]:
    """Load the UNet and text encoders, make their weights usable by autograd (values unchanged) and
    turn their ``requires_grad`` off; returns the function that turns it back on."""
    lpm.load_for_training(m)
    return grad_safe.trainable(lpm.training_modules(m))


def _freeze() -> Callable[[], None]:
    return freeze(a1111.loaded_model())


def _preview(emb: Embedding, prompt: str, step: int, out_dir: Path) -> str | None:
    try:
        return a1111.preview(emb, prompt, step, out_dir)
    finally:
        # the host's sampling runs in inference mode and may have patched weights there
        grad_safe.normal_weights(lpm.training_modules(a1111.loaded_model()))


class LdmPatchedAdapter(a1111.A1111Adapter):
    """A1111's adapter with the ldm_patched backend's model parts."""

    def host_services(self) -> HostServices:
        return dataclasses.replace(
            super().host_services(),
            label=self.label,
            build_parts=_parts,
            freeze_model=_freeze,
            preview=_preview,
            # the backend's memory manager places the VAE; moving it behind its back would confuse it
            release_image_encoder=lambda: lambda: None,
        )

    def add_check_routes(self, app: Any, service: Any) -> None:
        a1111_checks.add_check_routes(
            app, service, a1111.loaded_model, a1111.database, parts_fn=lpm.build_parts, freeze=freeze
        )

        def unet(body: dict) -> Any:
            m = a1111.loaded_model()
            return checks.unet_parity(
                lpm.build_parts(m), lpm.host_unet(m), lambda: freeze(m), int(body.get("size", 8))
            )

        app.add_api_route("/ti/v1/_checks/unet", unet, methods=["POST"])


class ReForgeAdapter(LdmPatchedAdapter):
    """Panchovix's reForge."""

    name: ClassVar[str] = "reforge"
    label: ClassVar[str] = "reForge"


class ClassicAdapter(LdmPatchedAdapter):
    """Haoming02's Forge Classic; its loader refuses embeddings stored in images."""

    name: ClassVar[str] = "classic"
    label: ClassVar[str] = "Forge Classic"
    info_extra: ClassVar[dict[str, Any]] = {"image_embeddings": False}

"""The host as plain callables, built by a ``lib_ti.host`` adapter (faked in tests).

:class:`HostServices` is what the service needs; :class:`HostInfo` is the UI's smaller view. The fields
they share come from one HostServices (:meth:`HostInfo.from_services`), so an adapter writes them once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lib_ti.embedding import Embedding
    from lib_ti.parts import ModelParts


@dataclass
class Generation:
    """One txt2img image as the host makes it (a comparison-grid cell)."""

    prompt: str
    negative_prompt: str
    seed: int
    cfg_scale: float
    steps: int
    width: int
    height: int
    #: the host's sampler name ("": its default)
    sampler: str = ""
    #: embeddings the host knows by these names for this image only (a run's snapshots)
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    #: the files those came from (their hashes go into the infotext where the host records them)
    files: dict[str, str] = field(default_factory=dict)


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

    @classmethod
    def from_services(
        cls,
        name: str,
        services: HostServices,
        *,
        service: Callable[[], Any] | None = None,
        gradio_major: int = 3,
        extra: dict[str, Any] | None = None,
    ) -> HostInfo:
        """The UI's view of the host that ``services`` describes."""
        return cls(
            name=name,
            embeddings_dir=services.embeddings_dir,
            embedding_status=services.embedding_status,
            reload_embeddings=services.reload_embeddings,
            get_option=services.get_option,
            gradio_major=gradio_major,
            service=service,
            extra=dict(extra or {}),
        )


@dataclass
class HostServices:
    """The host as the service sees it."""

    embeddings_dir: Callable[[], str]
    log_dir: Callable[[], str]
    #: ModelParts of the loaded model (built at each use; never kept across a model load)
    build_parts: Callable[[], ModelParts]
    #: hot reload after any write to the embeddings folder
    reload_embeddings: Callable[[], None]
    #: the host's GPU lock (no generation overlaps a training run)
    exclusive: Callable[[], AbstractContextManager[Any]] = nullcontext
    #: freeze the model's weights for training; returns a function that restores them
    freeze_model: Callable[[], Callable[[], None]] = lambda: lambda: None
    #: host progress: begin(job title, total steps), update(step, text), end()
    progress_begin: Callable[[str, int, str], None] = lambda title, total, task_id: None
    progress_update: Callable[[int, str], None] = lambda step, text: None
    progress_end: Callable[[str], None] = lambda task_id: None
    #: the host's own Interrupt button
    interrupted: Callable[[], bool] = lambda: False
    #: make a preview image with the host's sampler: (embedding, prompt, step, out_dir) -> file
    preview: Callable[[Embedding, str, int, Path], str | None] | None = None
    save_format: Callable[[], str] = lambda: "safetensors"
    #: move the image encoder (VAE) off the GPU once latents are cached; returns a function that restores it
    release_image_encoder: Callable[[], Callable[[], None]] = lambda: lambda: None
    #: {embedding name: "loaded" | "skipped"} from the host's database
    embedding_status: Callable[[], dict[str, str]] = dict
    #: the host's settings (``ti_`` keys): (key, default) -> value
    get_option: Callable[[str, Any], Any] = lambda key, default: default
    #: why this host cannot train (None: it can); checked before a job starts
    training_blocked: Callable[[], str | None] = lambda: None
    #: a UI task id is waiting for the GPU lock (the host's progress bar shows it as queued)
    progress_queued: Callable[[str], None] = lambda task_id: None
    #: the job's total steps changed (Prepare learns its total as it goes)
    progress_total: Callable[[int], None] = lambda total: None
    #: the host's name for people ("Forge Neo"), in messages
    label: str = "this web UI"
    #: the host's models folder (Prepare keeps the tagger's model files in ``<models>/ti-taggers``)
    models_dir: Callable[[], str] = lambda: ""
    #: the host's upscalers by name, and one of them run: (image, name, scale) -> a larger image
    upscalers: Callable[[], list[str]] = list
    upscale: Callable[[Any, str, float], Any] | None = None
    #: the host's interrogators ("blip", "deepbooru"), and one run on a batch: (name, images) -> captions
    interrogators: Callable[[], list[str]] = list
    interrogate: Callable[[str, list[Any]], list[str]] | None = None
    #: the host's LoRA folder, and what to say about embeddings bundled in LoRA files ("": it loads them)
    lora_dir: Callable[[], str] = lambda: ""
    bundle_note: str = ""
    #: the host's checkpoints (titles), the loaded one's title, and a load of one (under the GPU lock)
    checkpoints: Callable[[], list[str]] = list
    checkpoint: Callable[[], str] = lambda: ""
    #: the checkpoint the web UI's dropdown shows (Forge loads it on first use; "": the loaded one)
    selected_checkpoint: Callable[[], str] = lambda: ""
    load_checkpoint: Callable[[str], None] | None = None
    #: one image through the host's own txt2img: (what) -> (image, infotext); None where there is none
    generate: Callable[[Generation], tuple[Any, str]] | None = None
    #: the host's progress bar counts this many images for the job (a grid's cells)
    progress_jobs: Callable[[int], None] = lambda count: None
    #: this process's part of a data-parallel run (``lib_ti.training.parallel.Shard``; None: one process)
    shard: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

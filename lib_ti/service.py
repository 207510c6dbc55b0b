"""What the tab and the REST API do (create, merge, train), over a host given as plain callables.

No gradio and no host imports: ``lib_ti.host.*`` builds a :class:`HostServices`; tests use real
tiny models through the same interface.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_ti.create import CreateArgs, create_embedding
from lib_ti.embedding import Embedding
from lib_ti.errors import TIError
from lib_ti.hostinfo import HostServices
from lib_ti.io.formats import read_embedding, write_embedding
from lib_ti.merge import MergeContext, merge_to_embedding
from lib_ti.names import path_in_folder, validate_name
from lib_ti.parts import ModelParts
from lib_ti.training.data import DataArgs, builtin_templates, load_dataset, load_template
from lib_ti.training.jobs import Job, JobManager
from lib_ti.training.trainer import Progress, TrainArgs, TrainCallbacks, Trainer

logger = logging.getLogger(__name__)

DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
SUFFIX = {"safetensors": ".safetensors", "pt": ".pt"}


@dataclass
class TrainRequest:
    embedding: str
    dataset: str = ""
    template: str = "subject_filewords"
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: str = "5e-3"
    lr_shape: str = "constant"
    warmup_steps: int = 0
    norm_control: str = "soft"
    resolution: int | None = None
    buckets: bool = True
    flip: bool = False
    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    repeats: int = 1
    latent_sampling: str = "deterministic"
    validation_every: int = 50
    snapshot_every: int = 0
    preview_every: int = 0
    preview_prompt: str = ""
    train_encoders: list[str] | None = None
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    seed: int = 0
    resume: bool = False
    cache_latents_on_disk: bool = False
    #: the web UI's progress-bar task id (set by the tab; empty from the REST API)
    task_id: str = ""
    # other names accepted for the same settings (REST clients):
    dataset_dir: str = ""
    learning_rate: str = ""
    save_every: int = 0
    #: training size: resolution = sqrt(width * height) rounded to 64 (buckets keep that area)
    width: int = 0
    height: int = 0

    def normalized(self) -> TrainRequest:
        """The request with the other names folded into the main ones."""
        from dataclasses import replace

        res = self.resolution
        if self.width and self.height and not res:
            res = max(64, round((self.width * self.height) ** 0.5 / 64) * 64)
        return replace(
            self,
            dataset=self.dataset or self.dataset_dir,
            lr=self.learning_rate or self.lr,
            snapshot_every=self.snapshot_every or self.save_every,
            resolution=res,
        )


def _nothing() -> None:
    return None


class Service:
    def __init__(self, host: HostServices) -> None:
        self.host = host
        self.jobs = JobManager()

    # ------------------------------------------------------------------ files
    def folder(self) -> Path:
        return Path(self.host.embeddings_dir())

    def find_embedding_file(self, name: str) -> Path:
        validate_name(name)
        for suffix in (".safetensors", ".pt", ".bin", ".png", ".webp"):
            p = self.folder() / f"{name}{suffix}"
            if p.is_file():
                return p
        for p in sorted(self.folder().rglob(f"{name}.*")):
            if p.is_file() and ".preview." not in p.name and p.suffix in (".safetensors", ".pt", ".bin"):
                return p
        msg = f"no embedding named {name!r} in {self.folder()}"
        raise TIError(msg)

    def write(self, emb: Embedding, *, overwrite: bool, fmt: str | None = None) -> Path:
        fmt = fmt or self.host.save_format()
        if fmt not in SUFFIX:
            msg = f"unknown format {fmt!r} (safetensors or pt)"
            raise TIError(msg)
        path = path_in_folder(self.folder(), emb.name, SUFFIX[fmt])
        others = [
            p for p in path.parent.glob(f"{emb.name}.*") if p != path and p.suffix in (".safetensors", ".pt")
        ]
        if others and not overwrite:
            msg = f"an embedding named {emb.name!r} already exists ({others[0].name}); allow overwriting or pick another name"
            raise FileExistsError(msg)
        self.folder().mkdir(parents=True, exist_ok=True)
        out = write_embedding(emb, path, overwrite=overwrite)
        self._write_sidecar(emb, out)
        self.host.reload_embeddings()
        return out

    @staticmethod
    def _write_sidecar(emb: Embedding, path: Path) -> None:
        import json

        from lib_ti.io.atomic import atomic_write_bytes

        version = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl_refiner": "SDXL"}[emb.kind]
        desc = emb.metadata.get("init_text") or emb.metadata.get("merge_expression") or ""
        data = {"description": f"{emb.num_vectors} vector(s); {desc}".strip("; "), "sd version": version}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(data, indent=2).encode())

    def nearest(self, emb: Embedding, k: int = 5) -> dict[str, list[list[dict[str, Any]]]]:
        """Top-k vocabulary tokens of each vector on the loaded model's encoders."""
        from dataclasses import asdict

        from lib_ti.text.nearest import NearestTokens, nearest_tokens

        parts = self.host.build_parts()
        key = (parts.model_hash, tuple(parts.prompt_encoder.keys))
        cache = self.host.extra.setdefault("nearest", {})
        if key not in cache:
            cache.clear()
            cache[key] = {e.key: NearestTokens(e) for e in parts.prompt_encoder.encoders}
        found = nearest_tokens(emb, cache[key], k)
        return {enc: [[asdict(n) for n in row] for row in rows] for enc, rows in found.items()}

    # ------------------------------------------------------------------ what the tab shows
    def loaded_kind(self) -> str:
        """The loaded model's kind: sd1, sd2 or sdxl."""
        return self.host.build_parts().kind

    def token_counts(self, text: str) -> dict[str, int]:
        """How many tokens ``text`` is on each of the loaded model's encoders."""
        parts = self.host.build_parts()
        return {e.key: len(e.tokenize(text)) for e in parts.prompt_encoder.encoders}

    def list_embeddings(self, kind: str | None = None) -> list[str]:
        """Names of the readable embeddings in the folder (only those of ``kind`` when given)."""
        from lib_ti.io.formats import list_embedding_files

        names: dict[str, None] = {}
        for p in list_embedding_files(self.folder()):
            try:
                emb = read_embedding(p)
            except TIError:
                continue
            if kind is None or emb.kind == kind or (kind == "sdxl" and emb.kind == "sdxl_refiner"):
                names.setdefault(emb.name)
        return sorted(names, key=str.lower)

    def preview_merge(self, expression: str, name: str = "preview") -> Embedding:
        """What :meth:`merge` would write, without writing it."""
        parts = self.host.build_parts()
        return merge_to_embedding(expression, self.merge_context(parts), name)

    def template_prompts(
        self, template: str, dataset: str, name: str, count: int = 6
    ) -> list[tuple[str, str]]:
        """(image file, a prompt it would get) for the first ``count`` images of ``dataset``."""
        import random

        from lib_ti.training.data import fill_template, read_caption, scan_images

        lines = self._templates(template)
        images, _ = scan_images(dataset)
        rng = random.Random(0)
        return [
            (Path(img).name, fill_template(rng.choice(lines), name or "[name]", read_caption(img)))
            for img in images[:count]
        ]

    # ------------------------------------------------------------------ create / merge
    def vocabularies(self, parts: ModelParts) -> dict[str, Any]:
        return {e.key: e for e in parts.prompt_encoder.encoders}

    def create(
        self, args: CreateArgs, *, overwrite: bool = False, fmt: str | None = None
    ) -> tuple[Path, list[str]]:
        # Reads token tables only: no GPU lock, so it works while a training run holds it.
        parts = self.host.build_parts()
        result = create_embedding(args, self.vocabularies(parts))
        path = self.write(result.embedding, overwrite=overwrite, fmt=fmt)
        return path, result.warnings

    def merge_context(self, parts: ModelParts) -> MergeContext:
        encs = parts.prompt_encoder.encoders
        embeddings: dict[str, Embedding] = {}
        for p in sorted(self.folder().rglob("*")):
            if p.suffix in (".safetensors", ".pt", ".bin") and p.is_file():
                try:
                    e = read_embedding(p)
                except TIError:
                    continue
                embeddings.setdefault(e.name, e)
        return MergeContext(
            encoders=tuple(e.key for e in encs),
            tokenize=encs[0].tokenize,
            token_vectors=lambda ids: {e.key: e.token_vectors(ids) for e in encs},
            embeddings=embeddings,
            pad_id=0 if parts.kind == "sd2" else 49407,
        )

    def merge(self, expression: str, name: str, *, overwrite: bool = False, fmt: str | None = None) -> Path:
        parts = self.host.build_parts()
        emb = merge_to_embedding(expression, self.merge_context(parts), name)
        return self.write(emb, overwrite=overwrite, fmt=fmt)

    def _card_preview(self, name: str, image: Path) -> None:
        """The newest preview as ``<name>.preview.<png|webp|jpg>`` beside the embedding (the Extra Networks card)."""
        from lib_ti.io.atomic import atomic_write_bytes

        try:
            suffix = image.suffix.lower() if image.suffix.lower() in (".png", ".webp", ".jpg") else ".png"
            target = path_in_folder(self.folder(), name, ".preview" + suffix)
            atomic_write_bytes(target, image.read_bytes())
        except (OSError, TIError) as e:
            logger.warning("could not write the card preview for %s: %s", name, e)

    # ------------------------------------------------------------------ train
    def check_training(self, req: TrainRequest) -> TrainRequest:
        """Everything that can be checked before a job starts; raises TIError with the reason."""
        from lib_ti.training.data import scan_images
        from lib_ti.training.schedule import LearningRateSchedule, ScheduleArgs

        req = req.normalized()
        blocked = self.host.training_blocked()
        if blocked:
            raise TIError(blocked)
        validate_name(req.embedding)
        if not req.dataset or not Path(req.dataset).is_dir():
            msg = f"dataset folder {req.dataset!r} does not exist"
            raise TIError(msg)
        self.find_embedding_file(req.embedding)
        images, _ = scan_images(req.dataset)
        if not images:
            msg = f"no images (png, jpg, jpeg, webp) in {req.dataset}"
            raise TIError(msg)
        if req.steps < 1:
            msg = "steps must be at least 1"
            raise TIError(msg)
        LearningRateSchedule(ScheduleArgs(req.lr, req.lr_shape, req.warmup_steps), req.steps)  # type: ignore[arg-type]
        self._templates(req.template)
        return req

    def start_training(self, req: TrainRequest, *, background: bool = True) -> Job:
        """Start a training job; raises BusyError at once if one is running, TIError for a bad request."""
        req = self.check_training(req)
        return self.jobs.submit(
            "train", req.embedding, lambda job: self._train(job, req), background=background
        )

    def templates(self) -> dict[str, Path]:
        """Template files by name: the shipped ones, then the user's folder (setting ``ti_templates_dir``)."""
        found = dict(builtin_templates())
        user = str(self.host.get_option("ti_templates_dir", "") or "").strip()
        if user and Path(user).is_dir():
            found.update({p.stem: p for p in sorted(Path(user).glob("*.txt")) if p.stem not in found})
        return found

    def _templates(self, template: str) -> list[str]:
        shipped = self.templates()
        if template in shipped:
            return load_template(shipped[template])
        if Path(template).is_file():
            return load_template(template)
        if "[name]" in template:
            return [line for line in template.splitlines() if line.strip()]
        msg = f"unknown template {template!r}: one of {', '.join(sorted(shipped))}, a file, or lines with [name]"
        raise TIError(msg)

    def _train(self, job: Job, req: TrainRequest) -> None:
        st = job.status
        src = self.find_embedding_file(req.embedding)
        start = read_embedding(src)
        log_dir = Path(self.host.log_dir()) / req.embedding
        log_dir.mkdir(parents=True, exist_ok=True)
        resume_path = log_dir / f"{req.embedding}.resume.safetensors"
        if req.task_id:
            self.host.progress_queued(req.task_id)
        with self.host.exclusive():
            self.host.progress_begin(f"Training {req.embedding}", req.steps, req.task_id)
            restore = self.host.freeze_model()
            restore_vae: Callable[[], None] = _nothing
            try:
                parts = self.host.build_parts()
                st.message = "caching latents"
                data = load_dataset(
                    DataArgs(
                        req.dataset,
                        req.embedding,
                        self._templates(req.template),
                        resolution=req.resolution or DEFAULT_RESOLUTION[parts.kind],
                        buckets=req.buckets,
                        flip=req.flip,
                        repeats=req.repeats,
                        shuffle_tags=req.shuffle_tags,
                        keep_tags=req.keep_tags,
                        tag_dropout=req.tag_dropout,
                        latent_sampling=req.latent_sampling,  # type: ignore[arg-type]
                        cache_dir=str(log_dir / "latents") if req.cache_latents_on_disk else None,
                        model_hash=parts.model_hash,
                        seed=req.seed,
                    ),
                    parts.encode_image,
                    device=parts.device,
                    dtype=parts.dtype,
                    progress=lambda done, total: setattr(st, "message", f"caching latents {done}/{total}"),
                )
                restore_vae = self.host.release_image_encoder()
                args = TrainArgs(
                    steps=req.steps, batch_size=req.batch_size, grad_accum=req.grad_accum, lr=req.lr,
                    lr_shape=req.lr_shape,  # type: ignore[arg-type]
                    warmup_steps=req.warmup_steps, norm_control=req.norm_control,  # type: ignore[arg-type]
                    validation_every=req.validation_every, snapshot_every=req.snapshot_every,
                    preview_every=req.preview_every if self.host.preview else 0,
                    train_encoders=tuple(req.train_encoders) if req.train_encoders else None,
                    min_snr_gamma=req.min_snr_gamma, noise_offset=req.noise_offset, seed=req.seed,
                    log_dir=str(log_dir),
                )  # fmt: skip
                resume = resume_path.read_bytes() if req.resume and resume_path.exists() else None
                trainer = Trainer(
                    parts, data, start, args, self._callbacks(job, req, log_dir, resume_path), resume
                )
                st.total = req.steps
                st.step = trainer.step
                st.message = f"training on {len(data.items)} image(s): {data.describe()}"
                result = trainer.run()
                st.state = result.status
                st.message = result.message
                st.val_losses = list(result.val_losses)
            finally:
                restore_vae()
                restore()
                self.host.progress_end(req.task_id)

    def _callbacks(self, job: Job, req: TrainRequest, log_dir: Path, resume_path: Path) -> TrainCallbacks:
        st = job.status
        fmt = self.host.save_format()

        def save(emb: Embedding, reason: str) -> None:
            if reason == "snapshot":
                p = write_embedding(emb, log_dir / f"{emb.name}-{emb.step}{SUFFIX[fmt]}", overwrite=True)
            else:
                p = self.write(emb, overwrite=True, fmt=fmt)
                if self.host.get_option("ti_pt_copy", False) and fmt != "pt":
                    write_embedding(emb, log_dir / f"{emb.name}.pt", overwrite=True)
            st.files.append(str(p))

        def save_resume(data: bytes) -> None:
            from lib_ti.io.atomic import atomic_write_bytes

            atomic_write_bytes(resume_path, data)

        def progress(p: Progress) -> None:
            st.step, st.loss, st.loss_smooth, st.lr = p.step, p.loss, p.loss_smooth, p.lr
            st.images_per_sec, st.eta_seconds = p.images_per_sec, p.eta_seconds
            st.norms = {k: [round(float(x), 4) for x in v] for k, v in p.norms.items()}
            st.losses.append((p.step, p.loss))
            if p.val_loss is not None:
                st.val_loss = p.val_loss
                st.val_losses.append((p.step, p.val_loss))
            text = f"step {p.step}/{p.total} loss {p.loss_smooth:.4f} lr {p.lr:.2g}"
            if st.val_loss is not None:
                text += f" val {st.val_loss:.4f}"
            self.host.progress_update(p.step, text)

        def preview(emb: Embedding, step: int) -> None:
            if self.host.preview is None:
                return
            prompt = req.preview_prompt or f"a photo of {emb.name}"
            out = self.host.preview(emb, prompt, step, log_dir / "previews")
            if out:
                st.previews.append(out)
                self._card_preview(emb.name, Path(out))

        return TrainCallbacks(
            save=save,
            progress=progress,
            preview=preview,
            should_stop=lambda: job.stop_event.is_set() or self.host.interrupted(),
            save_resume=save_resume,
        )

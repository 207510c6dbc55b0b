"""What the tab, the REST API and the command line do (create, merge, train), over a host given as
plain callables.

No gradio and no host imports: ``lib_ti.host.*`` builds a :class:`HostServices`; tests use real
tiny models through the same interface.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from lib_ti.create import CreateArgs, create_embedding
from lib_ti.embedding import Embedding
from lib_ti.errors import EmbeddingExists, EmbeddingNotFound, TIError, WriteFailed, short_repr
from lib_ti.grid.jobs import GridService
from lib_ti.hostinfo import HostServices
from lib_ti.inline.plan import InlineEvaluator
from lib_ti.io.atomic import atomic_write_bytes, remove_temporaries
from lib_ti.io.bundles import has_bundled, list_bundled, read_bundled
from lib_ti.io.formats import (
    SAVE_SUFFIX,
    TENSOR_SUFFIXES,
    list_embedding_files,
    read_embedding,
    write_embedding,
)
from lib_ti.merge import MergeContext, merge_to_embedding
from lib_ti.names import path_in_folder, validate_name
from lib_ti.parts import ModelParts
from lib_ti.prepare.jobs import PrepareService
from lib_ti.remake import recipe_of, remake, remake_name
from lib_ti.text.nearest import NearestTokens, nearest_tokens
from lib_ti.training.captions import builtin_templates, fill_template, load_template, read_caption
from lib_ti.training.dataset import DataArgs
from lib_ti.training.errors import TrainingError
from lib_ti.training.images import check_folder, scan_images
from lib_ti.training.jobs import BusyError, Job, JobManager
from lib_ti.training.loading import load_dataset
from lib_ti.training.options import TrainRequest, check
from lib_ti.training.recipes import resolve
from lib_ti.training.resume import POINT_EVERY_STEPS, ResumeInfo, check_info, read_info_file
from lib_ti.training.resume import SUFFIX as RESUME_SUFFIX
from lib_ti.training.schedule import LearningRateSchedule, ScheduleArgs
from lib_ti.training.trainer import Progress, TrainArgs, TrainCallbacks, Trainer

logger = logging.getLogger(__name__)

#: a file's identity for the caches: (path, mtime in ns, size)
FileKey = tuple[str, int, int]


def _shared_fields(req: TrainRequest, target: type, **converted: Any) -> dict[str, Any]:
    """The request's values for the fields of ``target`` (TrainArgs, DataArgs) that have the same name,
    and ``converted`` ones."""
    names = {f.name for f in fields(target)} & {f.name for f in fields(TrainRequest)}
    return {**{name: getattr(req, name) for name in names}, **converted}


def _nothing() -> None:
    return None


class _StoppedWhileCaching(Exception):  # noqa: N818 (not an error: a stop request)
    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"{done}/{total}")
        self.done, self.total = done, total


def _read_resume(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror or e}"
        raise TrainingError(msg) from None


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name too long for the system, a NUL
        return False


def _cannot_resume(why: object) -> str:
    return (
        f'cannot resume: {why}; untick Resume (or send "resume": false) to start a new run from the '
        "embedding's current vectors"
    )


class Service:
    def __init__(self, host: HostServices) -> None:
        self.host = host
        self.jobs = JobManager()
        #: file -> its embedding (None: unreadable), so unchanged files are read once
        self._read_cache: dict[FileKey, Embedding | None] = {}
        #: whether each LoRA file (path, mtime, size) holds bundled embeddings
        self._bundle_cache: dict[FileKey, bool] = {}
        #: (model hash, encoder keys, files) -> the merge context over them
        self._merge_cache: tuple[tuple[Any, ...], MergeContext] | None = None
        self._nearest_cache: tuple[tuple[Any, ...], dict[str, NearestTokens]] | None = None
        #: results of expressions written in prompts (``<'cat'+'dog'>``), per merge context
        self.inline = InlineEvaluator()
        #: one writer at a time in the embeddings folder (the name check and the write are one step)
        self._write_lock = threading.Lock()
        #: Prepare jobs and caption edits, under the same job manager (never beside a training run)
        self.prepare = PrepareService(host, self.jobs)
        #: comparison grids through the host's txt2img, under the same job manager
        self.grid = GridService(host, self.jobs, self.find_embedding_file)

    # ------------------------------------------------------------------ files
    def folder(self) -> Path:
        return Path(self.host.embeddings_dir())

    def find_embedding_file(self, name: str) -> Path:
        validate_name(name)
        for suffix in (*TENSOR_SUFFIXES, ".png", ".webp"):
            p = self.folder() / f"{name}{suffix}"
            if p.is_file():
                return p
        for p in sorted(self.folder().rglob(f"{glob.escape(name)}.*")):
            if p.is_file() and ".preview." not in p.name and p.suffix in TENSOR_SUFFIXES:
                return p
        msg = f"no embedding named {name!r} in {self.folder()}"
        raise EmbeddingNotFound(msg)

    def _folder_embeddings(self) -> list[tuple[Path, Embedding]]:
        """The readable embeddings of the folder (sub-folders too), each file read once while unchanged."""
        found: list[tuple[Path, Embedding]] = []
        seen: dict[FileKey, Embedding | None] = {}
        for path in list_embedding_files(self.folder()):
            try:
                st = path.stat()
            except OSError:
                continue
            key = (str(path), st.st_mtime_ns, st.st_size)
            if key in self._read_cache:
                emb = self._read_cache[key]
            else:
                try:
                    emb = read_embedding(path)
                except TIError as e:
                    logger.debug("skipping %s: %s", path, e)
                    emb = None
            seen[key] = emb
            if emb is not None:
                found.append((path, emb))
        self._read_cache = seen
        return found

    def write(
        self, emb: Embedding, *, overwrite: bool, fmt: str | None = None, job: Job | None = None
    ) -> Path:
        """Write ``emb`` into the embeddings folder and reload the host's embeddings.

        One writer at a time: the name checks and the write are one step, so two creates of one name
        give one file and one EmbeddingExists. Only the training ``job`` of a name may write it while
        it runs (a create or merge gets EmbeddingExists, a 409). A create or merge that replaces an
        embedding removes the resume file of its runs: those vectors are gone.
        """
        fmt = fmt or self.host.save_format()
        if fmt not in SAVE_SUFFIX:
            msg = f"unknown format {fmt!r} (one of {', '.join(SAVE_SUFFIX)})"
            raise TIError(msg)
        path = path_in_folder(self.folder(), emb.name, SAVE_SUFFIX[fmt])
        with self._write_lock:
            if job is None:
                self._refuse_if_training(emb.name)
            existing = self._existing(emb.name)
            if existing and not overwrite:
                msg = f"an embedding named {emb.name!r} already exists ({existing[0].name}); allow overwriting or pick another name"
                raise EmbeddingExists(msg)
            try:
                self.folder().mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise WriteFailed.from_os_error(self.folder(), e) from e
            out = write_embedding(emb, path, overwrite=overwrite)
            self._write_sidecar(emb, out)
            if job is None and existing:
                self._forget_runs(emb.name)
            self.host.reload_embeddings()
        return out

    def _existing(self, name: str) -> list[Path]:
        """The files in the embeddings folder the host would load as ``name`` (any suffix we write)."""
        folder = path_in_folder(self.folder(), name, ".safetensors").parent
        return [p for p in sorted(folder.glob(f"{glob.escape(name)}.*"))
                if p.suffix in SAVE_SUFFIX.values() and p.stem == name]  # fmt: skip

    def _refuse_if_grid(self) -> None:
        """Reading the loaded model while a grid switches checkpoints would read whichever is loaded."""
        job = self.jobs.current
        if job is not None and job.status.running and job.status.kind == "grid":
            msg = f"busy: a comparison grid is switching checkpoints (job {job.id}); try again when it has finished"
            raise BusyError(job.id, msg)

    def _forget_runs(self, name: str) -> None:
        """Remove the resume file of ``name``'s runs (its embedding was replaced, or a new run starts)."""
        path = self.resume_file(name)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            logger.warning("could not remove %s: %s", path, e)

    def _training_job(self) -> Job | None:
        """The training job that is queued or running, if any."""
        job = self.jobs.current
        return job if job is not None and job.status.running and job.status.kind == "train" else None

    def _refuse_if_training(self, name: str) -> None:
        """A create or merge must not replace the file a running job is training (409)."""
        job = self._training_job()
        if job is not None and job.status.name == name:
            msg = f"{name!r} is being trained (job {job.id}); stop the run or pick another name"
            raise EmbeddingExists(msg)

    @staticmethod
    def _write_sidecar(emb: Embedding, path: Path) -> None:
        # the Extra Networks card's version; the web UIs know no SD3 or Flux embeddings
        version = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl_refiner": "SDXL"}.get(
            emb.kind, "Unknown"
        )
        desc = emb.metadata.get("init_text") or emb.metadata.get("merge_expression") or ""
        data = {"description": f"{emb.num_vectors} vector(s); {desc}".strip("; "), "sd version": version}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(data, indent=2).encode())

    def nearest(self, emb: Embedding, k: int = 5) -> dict[str, list[list[dict[str, Any]]]]:
        """Top-k vocabulary tokens of each vector on the loaded model's encoders."""
        parts = self.host.build_parts()
        key = (parts.model_hash, tuple(parts.prompt_encoder.keys))
        if self._nearest_cache is None or self._nearest_cache[0] != key:
            self._nearest_cache = (key, {e.key: NearestTokens(e) for e in parts.prompt_encoder.encoders})
        found = nearest_tokens(emb, self._nearest_cache[1], k)
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
        names: dict[str, None] = {}
        for _, emb in self._folder_embeddings():
            if kind is None or emb.kind == kind or (kind == "sdxl" and emb.kind == "sdxl_refiner"):
                names.setdefault(emb.name)
        return sorted(names, key=str.lower)

    def preview_merge(self, expression: str, name: str = "preview") -> Embedding:
        """What :meth:`merge` would write, without writing it."""
        self._refuse_if_grid()
        return merge_to_embedding(expression, self.merge_context(self.host.build_parts()), name)

    def evaluate(self, expression: str, nearest: int = 3) -> dict[str, Any]:
        """An expression's result without saving it: kind, vector count, norms and nearest tokens
        (the Merge view's preview and ``POST /ti/v1/evaluate``)."""
        emb = self.preview_merge(expression)
        norms = {k: [round(float(x), 4) for x in v.float().norm(dim=1)] for k, v in emb.vectors.items()}
        return {
            "kind": emb.kind,
            "vectors": emb.num_vectors,
            "norms": norms,
            "nearest": self.nearest(emb, nearest) if nearest > 0 else {},
        }

    def inline_context(self) -> MergeContext:
        """The merge context prompt expressions are evaluated on (the loaded model must be loaded)."""
        return self.merge_context(self.host.build_parts())

    def template_prompts(
        self, template: str, dataset: str, name: str, count: int = 6
    ) -> list[tuple[str, str]]:
        """(image file, a prompt it would get) for the first ``count`` images of ``dataset``."""
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
        self._refuse_if_grid()
        parts = self.host.build_parts()
        result = create_embedding(args, self.vocabularies(parts))
        path = self.write(result.embedding, overwrite=overwrite, fmt=fmt)
        return path, result.warnings

    def token_tables(self) -> dict[str, Any]:
        """The loaded model's token-embedding tables by encoder (``clip_l``, ``clip_g``, ``clip_h``)."""
        self._refuse_if_grid()
        parts = self.host.build_parts()
        return {e.key: e.table_weight for e in parts.prompt_encoder.encoders}

    def remake(self, name: str, *, overwrite: bool = False, fmt: str | None = None) -> dict[str, Any]:
        """Re-make an embedding made from text or by merge for the loaded checkpoint, saved as
        ``<name>-<checkpoint>``; the table of differences against the original. RemakeError for a
        trained one (the comparison grid is the way to see it on each checkpoint)."""
        emb = read_embedding(self.find_embedding_file(name), name)
        recipe_of(emb)  # refuse before the model is touched
        self._refuse_if_grid()
        parts = self.host.build_parts()
        title = self.host.checkpoint() or parts.model_hash or ""
        new_name = remake_name(name, title)
        result = remake(
            emb, self.vocabularies(parts), self.merge_context(parts), new_name, checkpoint=title or None
        )
        path = self.write(result.embedding, overwrite=overwrite, fmt=fmt)
        return {
            "name": new_name,
            "file": str(path),
            "recipe": result.recipe,
            "delta": result.delta.to_dict() if result.delta is not None else None,
            "warnings": result.warnings,
        }

    # ------------------------------------------------------------------ embeddings bundled in LoRA files
    def lora_file(self, file: str) -> Path:
        """A LoRA file in the web UI's LoRA folder, given relative to it (or as a path inside it); a path
        that leaves the folder is refused (the CLI reads any file)."""
        root = Path(os.path.normpath(Path(self.host.lora_dir() or ".").absolute()))
        given = Path(file).expanduser()
        # normpath, not resolve: ".." is refused, a linked folder inside is followed (as the web UIs do)
        p = Path(os.path.normpath(given if given.is_absolute() else root / given))
        if not p.is_relative_to(root):
            msg = f"{short_repr(file)} is not in the web UI's LoRA folder ({root})"
            raise TIError(msg)
        return p

    def lora_files(self) -> list[str]:
        """The LoRA files (relative to the web UI's LoRA folder, linked folders followed as the web UIs
        do) that hold embeddings; only headers are read, and each file once while it is unchanged."""
        root = Path(self.host.lora_dir() or "")
        if not root.is_dir():
            return []
        found, seen = [], {}
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for fn in files:
                if not fn.lower().endswith(".safetensors"):
                    continue
                p = Path(dirpath) / fn
                try:
                    st = p.stat()
                    key = (str(p), st.st_mtime_ns, st.st_size)
                    holds = self._bundle_cache.get(key)
                    if holds is None:
                        holds = has_bundled(p)
                except (TIError, OSError) as e:  # a broken LoRA file is not ours to report here
                    logger.debug("%s: %s", p, e)
                    continue
                seen[key] = holds
                if holds:
                    found.append(p.relative_to(root).as_posix())
        self._bundle_cache = seen
        return sorted(found, key=str.lower)

    def bundles(self, file: str) -> dict[str, Any]:
        """The embeddings bundled in a LoRA file, from its header."""
        path = self.lora_file(file)
        return {"file": str(path), "embeddings": [b.to_dict() for b in list_bundled(path)],
                "note": self.host.bundle_note}  # fmt: skip

    def extract(
        self,
        file: str,
        names: list[str] | None = None,
        *,
        rename: dict[str, str] | None = None,
        overwrite: bool = False,
        fmt: str | None = None,
    ) -> list[Path]:
        """Write bundled embeddings into the embeddings folder as standalone files, with the checks and
        the card sidecar of every other write; every one is read and checked before any is written."""
        path = self.lora_file(file)
        rename = dict(rename or {})
        chosen = list(dict.fromkeys(names)) if names else [b.name for b in list_bundled(path)]
        stray = sorted(set(rename) - set(chosen))
        if stray:
            msg = f"cannot rename {stray[0]!r}: it is not among the embeddings to extract"
            raise TIError(msg)
        embs = [read_bundled(path, n, rename.get(n)) for n in chosen]
        targets = [e.name for e in embs]
        if len(set(targets)) != len(targets):
            msg = f"two embeddings would both be called {next(t for t in targets if targets.count(t) > 1)!r}"
            raise TIError(msg)
        for emb in embs:
            self._refuse_if_training(emb.name)
            if not overwrite and self._existing(emb.name):
                msg = f"an embedding named {emb.name!r} already exists ({self._existing(emb.name)[0].name}); allow overwriting or pick another name"
                raise EmbeddingExists(msg)
        return [self.write(emb, overwrite=overwrite, fmt=fmt) for emb in embs]

    def forget_model(self) -> None:
        """Drop everything that holds the loaded model's encoders (nearest-token tables, the merge
        context, prompt-expression results): called when the host loads another model, so the old
        one's text encoders can be freed (on SDXL about 2 GB, measured) instead of waiting for next use."""
        self._nearest_cache = None
        self._merge_cache = None
        self.inline.forget()

    def merge_context(self, parts: ModelParts) -> MergeContext:
        """The merge language's view of the loaded model and the folder; kept while neither changes."""
        found = [emb for path, emb in self._folder_embeddings() if path.suffix in TENSOR_SUFFIXES]
        encs = parts.prompt_encoder.encoders
        # the read cache keeps one object per unchanged file, so their ids name the folder's state
        key = (parts.model_hash, encs[0].table_weight.data_ptr(), tuple(e.key for e in encs),
               tuple(id(e) for e in found))  # fmt: skip
        if self._merge_cache is not None and self._merge_cache[0] == key:
            return self._merge_cache[1]
        embeddings: dict[str, Embedding] = {}
        for emb in found:
            embeddings.setdefault(emb.name, emb)
        first = encs[0]
        ctx = MergeContext(
            encoders=tuple(e.key for e in encs),
            tokenize=first.tokenize,
            token_vectors=lambda ids: {e.key: e.token_vectors(ids) for e in encs},
            embeddings=embeddings,
            bos_id=first.tokenizer.id_start,
            eos_id=first.tokenizer.id_end,
            pad_id=first.pad_id,
            pad_ids={e.key: e.pad_id for e in encs},
        )
        self._merge_cache = (key, ctx)
        return ctx

    def merge(self, expression: str, name: str, *, overwrite: bool = False, fmt: str | None = None) -> Path:
        self._refuse_if_grid()
        parts = self.host.build_parts()
        emb = merge_to_embedding(expression, self.merge_context(parts), name)
        return self.write(emb, overwrite=overwrite, fmt=fmt)

    def _card_preview(self, name: str, image: Path) -> None:
        """The newest preview as ``<name>.preview.<png|webp|jpg>`` beside the embedding (the Extra Networks card)."""
        try:
            suffix = image.suffix.lower() if image.suffix.lower() in (".png", ".webp", ".jpg") else ".png"
            target = path_in_folder(self.folder(), name, ".preview" + suffix)
            atomic_write_bytes(target, image.read_bytes())
        except (OSError, TIError) as e:
            logger.warning("could not write the card preview for %s: %s", name, e)

    # ------------------------------------------------------------------ train
    def train_request(self, given: Mapping[str, Any] | TrainRequest, *, kind: str = "") -> TrainRequest:
        """A complete request: a TrainRequest as it is; a mapping over the recipe of ``kind`` (default: the
        loaded model's) and the user's ``ti_default_*`` settings (the order is in docs/TRAINING.md)."""
        blocked = self.host.training_blocked()
        if blocked:
            raise TIError(blocked)
        if isinstance(given, TrainRequest):
            check(given)
            return given
        base = None
        if given.get("resume") and isinstance(given.get("embedding"), str):
            why: object = f"{given['embedding']} has no unfinished run"
            try:
                info = self._resume_info(given["embedding"])
            except TIError as e:  # with a dataset_dir given, check_training says why
                info, why = None, e
            if info is None and not given.get("dataset_dir"):
                raise TIError(_cannot_resume(why))
            base = info.settings if info is not None else None
        return resolve(given, kind or self.loaded_kind(), self.host.get_option, base)

    # ------------------------------------------------------------------ resume files
    def resume_file(self, name: str) -> Path:
        """Where the resume file of ``name``'s runs is (it may not exist)."""
        validate_name(name)
        return Path(self.host.log_dir()) / name / f"{name}{RESUME_SUFFIX}"

    def _resume_info(self, name: str) -> ResumeInfo | None:
        """The resume file's account of ``name``'s last run, None without one; TIError if it is unreadable."""
        path = self.resume_file(name)
        return read_info_file(path) if path.is_file() else None

    def unfinished_runs(self) -> dict[str, dict[str, Any]]:
        """Embeddings with a run that did not reach its last step (stopped, failed, or cut off by a
        crash or a failed write): {name: {step, steps, state, saved_at, model, settings, file}}, or
        {name: {error, file}} for a resume file that cannot be read. The run being trained right now
        has state "training" and its ``job``."""
        out: dict[str, dict[str, Any]] = {}
        live = self._training_job()
        root = Path(self.host.log_dir())
        if not root.is_dir():
            return out
        for path in sorted(root.glob(f"*/*{RESUME_SUFFIX}")):
            name = path.name[: -len(RESUME_SUFFIX)]
            if path.parent.name != name:
                continue
            try:
                info = read_info_file(path)
            except TIError as e:
                out[name] = {"error": str(e), "file": str(path)}
                continue
            if live is not None and live.status.name == name:
                out[name] = {**info.to_dict(), "state": "training", "job": live.id, "file": str(path)}
            elif info.unfinished:
                out[name] = {**info.to_dict(), "file": str(path)}
        return out

    def _check_resume(self, req: TrainRequest) -> None:
        """A resume needs a readable resume file of this embedding, its model kind and vector layout;
        TIError with the reason and how to start afresh instead."""
        label = f"the resume file of {req.embedding}"
        try:
            info = self._resume_info(req.embedding)
            if info is None:
                msg = f"{req.embedding} has no unfinished run"
                raise TIError(msg)
            emb = read_embedding(self.find_embedding_file(req.embedding))
            shapes = {k: list(v.shape) for k, v in emb.vectors.items()}
            check_info(
                info, name=req.embedding, kind=self.loaded_kind(), shapes=shapes, steps=req.steps, label=label
            )
        except TIError as e:
            raise TIError(_cannot_resume(e)) from None

    def check_training(self, given: Mapping[str, Any] | TrainRequest) -> TrainRequest:
        """Everything that can be checked before a job starts; raises TIError with the reason."""
        req = self.train_request(given)
        validate_name(req.embedding)
        check_folder(req.dataset_dir)
        self.find_embedding_file(req.embedding)
        if req.resume:
            self._check_resume(req)
        self.check_run(req)
        return req

    def check_run(self, req: TrainRequest) -> None:
        """What a request needs besides its embedding (the folder and its images, the encoders, the
        schedule, the template); raises TIError with the reason. Checked before a new embedding is made."""
        check_folder(req.dataset_dir)
        if req.train_encoders != "all":
            keys = self.host.build_parts().prompt_encoder.keys
            if req.train_encoders not in keys:
                msg = f"train_encoders {req.train_encoders!r}: the loaded model's encoders are {', '.join(keys)}"
                raise TIError(msg)
        images, _ = scan_images(req.dataset_dir)
        if not images:
            msg = f"no images (png, jpg, jpeg, webp) in {req.dataset_dir}"
            raise TIError(msg)
        LearningRateSchedule(ScheduleArgs(req.lr, req.lr_shape, req.warmup_steps), req.steps)
        self._templates(req.template)

    def start_training(
        self, given: Mapping[str, Any] | TrainRequest, *, task_id: str = "", background: bool = True
    ) -> Job:
        """Start a training job; raises BusyError at once if one is running, TIError for a bad request.

        ``task_id``: the web UI's progress-bar task (the tab sets it; empty from the REST API).
        """
        req = self.check_training(given)
        return self.jobs.submit(
            "train", req.embedding, lambda job: self._train(job, req, task_id), background=background
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
        if "[name]" in template:
            return [line for line in template.splitlines() if line.strip()]
        if template.lower().endswith(".txt") and _is_file(template):
            return load_template(template)
        msg = f"unknown template {short_repr(template)}: one of {', '.join(sorted(shipped))}, a .txt file, or lines with [name]"
        raise TIError(msg)

    def _train(self, job: Job, req: TrainRequest, task_id: str) -> None:
        st = job.status
        timings = st.timings
        resume_path = self.resume_file(req.embedding)
        log_dir = resume_path.parent
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteFailed.from_os_error(log_dir, e) from e
        writer = self.host.shard is None or self.host.shard.rank == 0  # one writer in a data-parallel run
        with self._write_lock:  # no create or merge half-way through these files
            start = read_embedding(self.find_embedding_file(req.embedding))
            own = [f"{req.embedding}{s}" for s in (*SAVE_SUFFIX.values(), ".json")]
            removed = remove_temporaries(self.folder(), own) + remove_temporaries(log_dir) if writer else []
            if not req.resume and writer:
                self._forget_runs(req.embedding)  # a new run: the last one's resume file is obsolete
        for p in removed:
            logger.info("removed %s (a write cut short by a crash)", p)
        st.total = req.steps
        if task_id:
            self.host.progress_queued(task_id)
        with self.host.exclusive():
            t0 = time.perf_counter()
            self.host.progress_begin(f"Training {req.embedding}", req.steps, task_id)
            restore = self.host.freeze_model()
            restore_vae: Callable[[], None] = _nothing

            def caching_progress(done: int, total: int) -> None:
                if job.stop_event.is_set() or self.host.interrupted():
                    raise _StoppedWhileCaching(done, total)
                st.message = f"caching latents {done}/{total}"

            try:
                parts = self.host.build_parts()
                timings["startup"] = time.perf_counter() - t0
                st.message = "caching latents"
                t0 = time.perf_counter()
                data = load_dataset(
                    DataArgs(
                        **_shared_fields(
                            req,
                            DataArgs,
                            folder=req.dataset_dir,
                            name=req.embedding,
                            templates=self._templates(req.template),
                            cache_dir=str(log_dir / "latents") if req.cache_latents_on_disk else None,
                            model_hash=parts.model_hash,
                        )
                    ),
                    parts.encode_image,
                    device=parts.device,
                    dtype=parts.dtype,
                    progress=caching_progress,
                )
                restore_vae = self.host.release_image_encoder()
                timings["caching"] = time.perf_counter() - t0
                args = TrainArgs(
                    **_shared_fields(
                        req,
                        TrainArgs,
                        train_encoders=None if req.train_encoders == "all" else (req.train_encoders,),
                        log_dir=str(log_dir),
                    )
                )
                args.point_every = self._point_every()
                args.gradient_checkpointing = bool(self.host.get_option("ti_gradient_checkpointing", False))
                if self.host.preview is None:
                    args.preview_every = 0
                resume = _read_resume(resume_path) if req.resume else None
                trainer = Trainer(  # in a data-parallel run, the trainer calls back on rank 0 only
                    parts,
                    data,
                    start,
                    args,
                    self._callbacks(job, req, log_dir, resume_path),
                    resume,
                    settings=asdict(req),
                    shard=self.host.shard,
                )
                st.step = trainer.step
                st.resumed_from = trainer.step if req.resume else None
                st.message = f"training on {len(data.items)} image(s): {data.describe()}"
                result = trainer.run()
                st.state = result.status
                st.message = result.message
                st.val_losses = list(result.val_losses)
                timings.update(result.timings)
            except _StoppedWhileCaching as e:
                st.state = "stopped"
                st.message = (
                    f"stopped while caching latents ({e.done}/{e.total}); nothing was trained or written"
                )
            finally:
                restore_vae()
                restore()
                self.host.progress_end(task_id)

    def _point_every(self) -> int:
        """Steps between automatic resume points: the setting ``ti_resume_every`` (0: by time only)."""
        value = self.host.get_option("ti_resume_every", POINT_EVERY_STEPS)
        try:
            steps = int(float(value))
        except (TypeError, ValueError):
            steps = -1
        return steps if steps >= 0 else POINT_EVERY_STEPS

    def _callbacks(self, job: Job, req: TrainRequest, log_dir: Path, resume_path: Path) -> TrainCallbacks:
        st = job.status
        fmt = self.host.save_format()

        def save(emb: Embedding, reason: str) -> None:
            if reason == "snapshot":
                p = write_embedding(emb, log_dir / f"{emb.name}-{emb.step}{SAVE_SUFFIX[fmt]}", overwrite=True)
                st.snapshots.append(str(p))
                return
            p = self.write(emb, overwrite=True, fmt=fmt, job=job)
            if reason != "point" and self.host.get_option("ti_pt_copy", False) and fmt != "pt":
                write_embedding(emb, log_dir / f"{emb.name}.pt", overwrite=True)
            st.file = str(p)

        def save_resume(data: bytes) -> None:
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
            try:
                out = self.host.preview(emb, prompt, step, log_dir / "previews")
            except Exception as e:  # the host's sampler: a preview is not worth the run
                logger.exception("preview at step %d failed; training goes on", step)
                st.warnings.append(f"preview at step {step} failed: {type(e).__name__}: {e}")
                return
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

"""One headless training run through the same :class:`~lib_ti.service.Service` as the tab.

The checkpoint's modules stand in for the web UI: :func:`host_services` gives the service the
embeddings folder (``--out``), the log folder, the model parts, previews through a diffusers pipeline, a
terminal progress bar and Ctrl-C as the Interrupt button. So a run here writes the same files as the
tab's (the embedding with its metadata, snapshots, the CSV log, the resume file, previews) and resumes
from either.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from lib_ti.create import CreateArgs
from lib_ti.errors import EmbeddingNotFound, TIError
from lib_ti.headless.models import LoadOptions, Model, build_parts, load_model, release_vae
from lib_ti.headless.options import Resolved, RunOptions, log_dir_for
from lib_ti.headless.preview import make_preview
from lib_ti.headless.queue import JobOutcome
from lib_ti.hostinfo import HostServices
from lib_ti.io.formats import read_embedding
from lib_ti.parts import ModelParts
from lib_ti.service import Service
from lib_ti.training.recipes import default_vectors
from lib_ti.training.resume import read_info_file

logger = logging.getLogger(__name__)

#: the training job's end states that a run's outcome keeps (any other is "failed")
KEPT_STATES = ("finished", "early_stopped", "stopped")


class Interrupts:
    """Ctrl-C: the first asks the run to save and stop; a second aborts at once."""

    def __init__(self) -> None:
        self.count = 0

    @property
    def requested(self) -> bool:
        return self.count > 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        sys.stderr.write("\nstopping: saving first (Ctrl-C again aborts without saving)\n")
        sys.stderr.flush()

    @contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """SIGINT (and SIGTERM, which torchrun and job schedulers send) handled while the block runs."""
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class Console:
    """The progress bar (tqdm when installed and not ``--quiet``), else a log line every 5 %."""

    def __init__(self, quiet: bool, enabled: bool = True) -> None:
        self.quiet = quiet
        self.enabled = enabled
        self.bar: Any = None
        self.total = 0
        self.title = ""
        self._last = 0

    def begin(self, title: str, total: int, task_id: str = "") -> None:
        self.title, self.total, self._last = title, total, 0
        if not self.enabled or self.quiet:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.quiet = True
            return
        self.bar = tqdm(total=total, desc=title, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text.split(" ", 2)[-1] if text.startswith("step ") else text)
            return
        every = max(1, self.total // 20)
        if step - self._last >= every or step == self.total:
            self._last = step
            logger.info("%s: %s", self.title, text)

    def end(self, task_id: str = "") -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ModelCache:
    """The last loaded model, reused by the next job of a queue on the same checkpoint and settings."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.model: Model | None = None
        self.parts: ModelParts | None = None

    def get(self, opts: RunOptions, device: str = "") -> tuple[Model, ModelParts]:
        load = LoadOptions(
            original_config=opts.original_config or None,
            device=device or opts.device,
            precision=opts.precision,
            prediction="" if opts.prediction == "auto" else opts.prediction,
            clip_skip=opts.clip_skip,
        )
        key = (str(Path(opts.checkpoint).resolve()), *asdict(load).values())
        if key != self.key or self.model is None or self.parts is None:
            self.model = self.parts = None  # free the last one first
            started = time.perf_counter()
            logger.info("loading %s", opts.checkpoint)
            self.model = load_model(opts.checkpoint, load)
            self.parts = build_parts(self.model)
            self.key = key
            logger.info(
                "loaded %s (%s, %s-prediction, hash %s) in %.1f s on %s",
                self.model.model_name,
                self.model.kind,
                self.model.prediction,
                self.model.model_hash or "-",
                time.perf_counter() - started,
                self.model.device,
            )
        return self.model, self.parts


def host_services(
    model: Model,
    parts: ModelParts,
    opts: RunOptions,
    *,
    console: Console,
    interrupts: Interrupts,
    shard: Any = None,
) -> HostServices:
    """The checkpoint as the service's host (its previews are set once the request is known)."""
    settings = {
        "ti_pt_copy": opts.pt_copy,
        "ti_resume_every": opts.resume_every,
        "ti_gradient_checkpointing": opts.gradient_checkpointing,
    }
    log_dir = log_dir_for(opts)
    return HostServices(
        embeddings_dir=lambda: str(Path(opts.out)),
        log_dir=lambda: str(log_dir),
        build_parts=lambda: parts,
        reload_embeddings=lambda: None,
        progress_begin=console.begin,
        progress_update=console.update,
        progress_end=console.end,
        interrupted=lambda: interrupts.requested,
        save_format=lambda: opts.format,
        release_image_encoder=lambda: release_vae(model),
        get_option=lambda key, default: settings.get(key, default),
        label="the command line",
        shard=shard,
    )


def setup_logging(rank: int | None) -> None:
    """Log lines on stderr (prefixed with the rank under torchrun); the libraries' chatter off."""
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=logging.INFO, format=f"{prefix}%(message)s", stream=sys.stderr, force=True)
    for noisy in ("diffusers", "transformers", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _no_model() -> ModelParts:
    msg = "no model is loaded"
    raise TIError(msg)


def file_service(opts: RunOptions) -> Service:
    """A service over the run's folders only (no model): to read what earlier runs left."""
    log_dir = log_dir_for(opts)
    return Service(
        HostServices(
            embeddings_dir=lambda: str(Path(opts.out)),
            log_dir=lambda: str(log_dir),
            build_parts=_no_model,
            reload_embeddings=lambda: None,
        )
    )


def existing_embedding(service: Service, name: str) -> Path | None:
    """The file of embedding ``name`` in the service's embeddings folder, or None."""
    try:
        return service.find_embedding_file(name)
    except EmbeddingNotFound:
        return None


def prepare_embedding(service: Service, name: str, opts: RunOptions, resume: bool) -> str:
    """Make sure ``name`` exists for the run: create it from ``--init-text`` when it does not (or
    ``--overwrite``); what was done, for the log."""
    found = existing_embedding(service, name)
    if resume:
        return f"resuming {name}"
    if found is not None and not opts.overwrite:
        if opts.init_text:
            msg = (
                f"{found} already exists: add --resume to continue its stopped run, --overwrite to make it "
                "again from --init-text, or leave out --init-text to train further from its vectors"
            )
            raise TIError(msg)
        return f"training {found.name} further from its vectors"
    if not opts.init_text:
        msg = f"there is no embedding {name!r} in {opts.out}: give --init-text to create it"
        raise TIError(msg)
    vectors = opts.vectors or default_vectors()
    path, warnings = service.create(
        CreateArgs(name, vectors, "text", opts.init_text), overwrite=found is not None, fmt=opts.format
    )
    del warnings  # create logged them
    return f"created {path.name} from {opts.init_text!r} ({vectors} vectors)"


def queue_state(service: Service, name: str) -> str:
    """A queue job's state from its files: "finished", "stopped" (a run to resume) or "new"."""
    path = service.resume_file(name)
    if path.is_file():
        try:
            info = read_info_file(path)
        except TIError as e:
            logger.warning("%s: %s; the job starts again", name, e)
            return "new"
        return "stopped" if info.unfinished else "finished"
    return "new"


def _plan(
    service: Service,
    name: str,
    given: dict[str, Any],
    opts: RunOptions,
    kind: str,
    queue_mode: bool,
    interrupts: Interrupts,
) -> dict[str, Any]:
    """What to do with the job, decided once (rank 0): {"resume": bool}, {"skip": why, "file": f},
    {"stopped": True} or {"error": message}; the embedding exists when it says resume or train."""
    try:
        if queue_mode:
            state = queue_state(service, name)
            found = existing_embedding(service, name)
            if state == "finished" and found is not None:
                return {"skip": "finished earlier", "file": str(found)}
            given = {**given, "resume": state == "stopped"}
            if state != "stopped" and found is not None:
                opts = _replace(opts, overwrite=_made_and_untrained(found, opts))
        req = service.train_request(given, kind=kind)
        service.check_run(req)  # before an embedding is made for it
        if interrupts.requested:
            return {"stopped": True}
        logger.info("%s", prepare_embedding(service, name, opts, req.resume))
        return {"resume": req.resume}
    except TIError as e:
        return {"error": str(e)}


def _made_and_untrained(found: Path, opts: RunOptions) -> bool:
    """Whether a queue may make ``found`` again from its init text: only a file Create made that no run
    ever trained (a run of this queue cut off before its first resume point). Anything else is refused
    with the reason when the job has an init text, and trained further from its vectors when not."""
    emb = read_embedding(found)
    if not opts.init_text:
        return False
    if emb.step == 0 and "init_mode" in emb.metadata:
        return True
    msg = (
        f"{found} exists and no run of this queue made it: leave out init_text to train it further from its "
        "vectors, or move the file away"
    )
    raise TIError(msg)


def train_one(
    resolved: Resolved,
    *,
    models: ModelCache,
    console: Console,
    interrupts: Interrupts,
    queue_mode: bool = False,
    shard: Any = None,
    device: str = "",
    agree: Callable[[dict[str, Any] | None], dict[str, Any]] | None = None,
) -> JobOutcome:
    """Load (or reuse) the model, make the embedding if needed, and train it to the end.

    ``queue_mode``: a finished job is skipped, a stopped one resumed, a new one (re-)created.
    ``agree``: under ``--parallel data``, gives every rank rank 0's plan for the job (made once the
    embedding exists), so that all start it, skip it or fail it together.
    """
    opts, given = resolved.run, dict(resolved.train)
    name = str(given.get("embedding") or "")
    started = time.perf_counter()
    if not name:
        msg = "give the embedding's name (--name)"
        raise TIError(msg)
    if not opts.checkpoint:
        msg = "give the model: --checkpoint FILE (a .safetensors or .ckpt checkpoint, or a diffusers folder)"
        raise TIError(msg)
    if not given.get("dataset_dir"):
        msg = "give the training images: --data FOLDER"
        raise TIError(msg)
    stopped = JobOutcome(name, "stopped", message="stopped before training started")
    if interrupts.requested:
        return stopped
    model, parts = models.get(opts, device)
    if interrupts.requested:
        return stopped
    kind = model.kind if opts.recipe == "auto" else opts.recipe
    first = shard is None or getattr(shard, "rank", 0) == 0
    service = Service(host_services(model, parts, opts, console=console, interrupts=interrupts, shard=shard))
    plan = _plan(service, name, given, opts, kind, queue_mode, interrupts) if first else None
    if agree is not None:
        plan = agree(plan)  # rank 0's plan, on every rank: they start, skip or fail this job together
    assert plan is not None
    if plan.get("error"):
        raise TIError(plan["error"])
    if plan.get("skip"):
        return JobOutcome(name, "skipped", message=plan["skip"], file=plan.get("file"))
    if plan.get("stopped"):
        return stopped
    given["resume"] = plan["resume"]
    req = service.train_request(given, kind=kind)
    if opts.preview_steps > 0:  # the run's seed, at its resolution
        service.host.preview = make_preview(
            model, parts, steps=opts.preview_steps, cfg=opts.preview_cfg, size=req.resolution, seed=req.seed
        )
    job = service.start_training(req, background=False)
    st = job.status
    if shard is not None and st.state == "error":  # a crash on this rank only: the others cannot go on
        logger.error("%s: %s; ending this launch", name, st.message)
        raise SystemExit(1)
    outcome = JobOutcome(
        name,
        st.state if st.state in KEPT_STATES else "failed",  # type: ignore[arg-type]
        steps=st.step,
        loss=st.loss_smooth,
        val_loss=st.val_loss,
        file=st.file,
        seconds=time.perf_counter() - started,
        message=st.message,
    )
    if first and st.file:
        emb = read_embedding(st.file)
        logger.info("%s: %s (step %s) -> %s", name, st.message, emb.step, st.file)
    return outcome


def _replace(opts: RunOptions, **changes: Any) -> RunOptions:
    return RunOptions(**{**asdict(opts), **changes})

"""The training loop: optimize only an embedding's vectors against a frozen model.

Knows nothing of any host: it gets a :class:`~lib_ti.parts.ModelParts`, a dataset and callbacks.

Determinism without saved RNG state: every random draw comes from a named stream
(:mod:`lib_ti.training.streams`) indexed by where it is used: the data order of epoch ``e``, and the
noise, timestep and latent sample of the sample at position ``j`` of optimizer step ``s``. A run stopped
at step k and resumed therefore replays exactly what an uninterrupted run does, and batch 4 equals
batch 2 x accumulation 2 on the same samples.

Data parallel (a :class:`~lib_ti.training.parallel.Shard`): every process builds the same micro-batches
and trains the rows the shard gives it; gradients and loss are summed over processes before each
optimizer step, so N processes with batch B give the vectors of one process with batch B (up to float
rounding), and a resume file written under N processes resumes under any number.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from lib_ti import __version__
from lib_ti.embedding import HOST_KINDS, Embedding, non_host_kind_message
from lib_ti.errors import WriteFailed
from lib_ti.io.atomic import atomic_write_bytes
from lib_ti.parts import ModelParts
from lib_ti.training.dataset import Batch, TrainingData
from lib_ti.training.errors import TrainingError
from lib_ti.training.options import LrShape, NormControl, Optimizer
from lib_ti.training.parallel import Shard
from lib_ti.training.resume import (
    POINT_EVERY_SECONDS,
    POINT_EVERY_STEPS,
    POINT_MAX_SHARE,
    Counters,
    RunState,
    dump_resume,
    load_resume,
)
from lib_ti.training.schedule import LearningRateSchedule, ScheduleArgs
from lib_ti.training.streams import random_stream, stream
from lib_ti.training.validation import ValidationSample, validation_samples

logger = logging.getLogger(__name__)

Status = Literal["finished", "stopped", "early_stopped", "failed", "model_changed"]
#: the parts of a run that TrainResult.timings measures (seconds)
TIMED = ("steps", "validation", "saving", "points", "previews")
#: the run state that the resume file written for each reason of a save records
_RESUME_STATE: dict[str, RunState] = {
    "point": "running", "snapshot": "running", "stopped": "stopped", "final": "finished", "failed": "failed",
}  # fmt: skip
_NO_GRADIENT = "no gradient reached the embedding vectors (the model's text path is not differentiable)"


@dataclass
class TrainArgs:
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: str = "5e-3"
    lr_shape: LrShape = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    optimizer: Optimizer = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    #: encoders whose vectors are trained (None: all of the embedding's)
    train_encoders: tuple[str, ...] | None = None
    min_t: int = 0
    max_t: int | None = None
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    norm_control: NormControl = "soft"
    #: per-step pull toward the target norm for "soft" (0..1)
    norm_strength: float = 0.05
    #: target L2 norm per encoder; None: the median norm of the vocabulary
    norm_target: dict[str, float] | None = None
    validation_every: int = 50
    validation_size: int = 4
    #: stop when the validation loss has not improved for this many validations (0: never)
    early_stop_patience: int = 0
    snapshot_every: int = 0
    #: automatic resume points (the embedding file and the resume file): every N steps ...
    point_every: int = POINT_EVERY_STEPS
    #: ... or after this many seconds, whichever first (0 and 0: none)
    point_seconds: float = POINT_EVERY_SECONDS
    preview_every: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False
    #: autocast the frozen model on CUDA (bf16/fp16 per the model's dtype)
    autocast: bool = True
    log_dir: str | None = None


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    loss_smooth: float
    lr: float
    norms: dict[str, list[float]]
    #: the images of whole steps (those of every process of a data-parallel run) per second
    images_per_sec: float
    eta_seconds: float
    val_loss: float | None = None
    epoch: int = 0


@dataclass
class TrainCallbacks:
    #: (embedding, reason) -> where it was written; reasons: "point" (an automatic resume point),
    #: "snapshot", "final", "stopped", "failed"
    save: Callable[[Embedding, str], Any] | None = None
    progress: Callable[[Progress], None] | None = None
    preview: Callable[[Embedding, int], None] | None = None
    #: polled before every micro-step (in a data-parallel run: before every step, on every process);
    #: True ends the run after saving
    should_stop: Callable[[], bool] | None = None
    #: resume state (bytes) to keep; None: not kept
    save_resume: Callable[[bytes], None] | None = None


@dataclass
class _Points:
    """When the last automatic resume point was written and what it cost."""

    step: int
    at: float = field(default_factory=time.perf_counter)
    cost: float = 0.0


@dataclass
class TrainResult:
    status: Status
    embedding: Embedding
    step: int
    message: str
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    #: seconds spent in the parts named in TIMED ("steps": the optimizer steps only)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Best:
    """The vectors of the lowest validation loss so far."""

    loss: float
    vectors: dict[str, torch.Tensor]
    step: int


class _RunEnded(Exception):  # noqa: N818 (not an error: how a helper ends the run with a result)
    def __init__(self, result: TrainResult) -> None:
        super().__init__(result.message)
        self.result = result


@dataclass
class _Pace:
    """Images per second and the time left, from the start of this run (or of its resumed part)."""

    start_step: int
    started: float = field(default_factory=time.perf_counter)
    images: int = 0

    def rate_and_eta(self, step: int, total: int) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.started
        rate = self.images / elapsed if elapsed > 0 else 0.0
        per_step = elapsed / max(step - self.start_step, 1)
        return rate, per_step * (total - step)


class Trainer:
    """One training run. Create, then :meth:`run`."""

    def __init__(
        self,
        parts: ModelParts,
        dataset: TrainingData,
        embedding: Embedding,
        args: TrainArgs,
        callbacks: TrainCallbacks | None = None,
        resume: bytes | None = None,
        settings: dict[str, Any] | None = None,
        *,
        shard: Shard | None = None,
    ) -> None:
        """``settings``: the request the run was started with, kept in the resume file.

        ``shard``: this process's part of a data-parallel run. Every process gets the same arguments;
        only rank 0 writes (the others keep only ``should_stop`` of ``callbacks`` and no CSV log).
        """
        self.parts = parts
        self.settings = dict(settings or {})
        self.data = dataset
        self.args = args
        self.shard = shard
        self.cb = callbacks or TrainCallbacks()
        if shard is not None and shard.rank != 0:
            self.cb = TrainCallbacks(should_stop=self.cb.should_stop)
        #: a file rank 0 of a data-parallel run could not write; ends the run at the next step boundary
        self._write_failure: WriteFailed | None = None
        self.name = embedding.name
        self.base = embedding
        self._check_args()
        if embedding.kind not in HOST_KINDS:
            raise TrainingError(non_host_kind_message(embedding, "training"))
        keys = set(parts.prompt_encoder.keys)
        if set(embedding.vectors) != keys:
            msg = (
                f"{embedding.name} has vectors for {sorted(embedding.vectors)} but the loaded model needs "
                f"{sorted(keys)}: it was made for another model type"
            )
            raise TrainingError(msg)
        trained = set(args.train_encoders or embedding.vectors)
        if not trained <= keys:
            msg = f"cannot train {sorted(trained - keys)}: the model has {sorted(keys)}"
            raise TrainingError(msg)
        self.trained = [k for k in parts.prompt_encoder.keys if k in trained]
        if shard is not None and shard.world > args.batch_size:
            logger.warning(
                "%s: batch size %d over %d processes: %d of them train nothing",
                embedding.name, args.batch_size, shard.world, shard.world - args.batch_size,
            )  # fmt: skip
        self.vectors = {k: v.detach().float().clone().to(parts.device) for k, v in embedding.vectors.items()}
        for k in self.trained:
            self.vectors[k].requires_grad_(True)
        params = [self.vectors[k] for k in self.trained]
        opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=1.0, betas=args.betas, weight_decay=args.weight_decay)
        self.schedule = LearningRateSchedule(
            ScheduleArgs(args.lr, args.lr_shape, args.warmup_steps, args.min_lr_ratio), args.steps
        )
        self.max_t = args.max_t if args.max_t is not None else len(parts.alphas_cumprod) - 1
        self.alphas = parts.alphas_cumprod.detach().float().to(parts.device)
        self.norm_targets = args.norm_target or self._vocab_norms()
        self.step = 0
        self.epoch = 0
        self._epoch_at: tuple[int, int, list[list[int]]] | None = None  # (epoch, its first step, groups)
        self.loss_smooth: float | None = None
        self.val_losses: list[tuple[int, float]] = []
        self.losses: list[float] = []
        self.best: _Best | None = None
        self.timings = dict.fromkeys(TIMED, 0.0)
        self._validation = validation_samples(
            dataset,
            args.validation_size if args.validation_every > 0 else 0,
            args.seed,
            args.min_t,
            self.max_t,
        )
        if resume is not None:
            self._load_resume(resume)
        #: the step of the last resume file written (or resumed from)
        self._resume_step = self.step

    # ------------------------------------------------------------------ setup
    def _check_args(self) -> None:
        a = self.args
        problems = []
        if a.steps < 1:
            problems.append("steps must be at least 1")
        if a.batch_size < 1 or a.grad_accum < 1:
            problems.append("batch size and gradient accumulation must be at least 1")
        if not 0 <= a.min_t < len(self.parts.alphas_cumprod):
            problems.append(f"min timestep must be 0..{len(self.parts.alphas_cumprod) - 1}")
        if a.max_t is not None and not a.min_t <= a.max_t < len(self.parts.alphas_cumprod):
            problems.append(f"max timestep must be {a.min_t}..{len(self.parts.alphas_cumprod) - 1}")
        if a.norm_control not in ("off", "soft", "hard"):
            problems.append("norm control must be off, soft or hard")
        if len(self.data) == 0:
            problems.append("the dataset is empty")
        if problems:
            raise TrainingError("; ".join(problems))

    def _vocab_norms(self) -> dict[str, float]:
        out = {}
        for enc in self.parts.prompt_encoder.encoders:
            w = enc.table_weight.float()
            out[enc.key] = float(w.norm(dim=1).median())
        return out

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to ``args.steps``; a stop request, a model change, early stop or NaN ends it sooner."""
        pace = _Pace(self.step)
        #: the last automatic resume point (the run's start counts as one)
        self._points = _Points(self.step)
        try:
            with self._gradient_checkpointing(), self._open_log() as log:
                return self._loop(log, pace)
        except WriteFailed as e:
            if self._resume_step:
                kept = f"the last good files are kept and resuming continues from step {self._resume_step}"
            else:
                kept = "nothing of this run was saved; the embedding file is as it was"
            msg = f"{e}; training stopped at step {self.step}; {kept}"
            logger.error("%s: %s", self.name, msg)
            return self._result("failed", msg)

    def _loop(self, log: _CsvLog, pace: _Pace) -> TrainResult:
        """The steps, from the current one to the last, and the final save."""
        try:
            if self.step == 0 and self._validation:
                self._validate()
            while self.step < self.args.steps:
                self._end_if_interrupted()
                with self._timed("steps"):
                    group = self._group(self.step)
                    backup = self._copy_vectors()
                    loss = self._backward(group, backup)
                    lr = self._optimizer_step(backup)
                self.step += 1
                pace.images += len(group)
                self._track_loss(loss)
                val_loss = self._validate_when_due()
                with self._write_failure_deferred():
                    self._report(log, pace, loss, lr, val_loss)
                    self._snapshot_and_preview_when_due()
                    self._point_when_due()
            if self.shard is not None:
                self._end_together(last=True)
            self._save("final")
            return self._result("finished", f"finished {self.step} steps")
        except _RunEnded as end:
            return end.result

    def _backward(self, group: list[int], backup: dict[str, torch.Tensor]) -> float:
        """Accumulate the gradients of one optimizer step over its micro-batches; the summed loss."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.shard is not None:
            return self._backward_shard(self.shard, group, backup)
        step_loss = 0.0
        for m in range(0, len(group), self.args.batch_size):
            if m:
                self._end_if_stop_requested()
            positions = list(range(m, min(m + self.args.batch_size, len(group))))
            loss = self._micro_batch_loss(group, positions) / len(group)
            if not torch.isfinite(loss):
                raise self._fail(backup, "the loss became NaN or infinite")
            loss.backward()
            step_loss += float(loss.detach())
        return step_loss

    def _backward_shard(self, shard: Shard, group: list[int], backup: dict[str, torch.Tensor]) -> float:
        """:meth:`_backward` of one process of a data-parallel run: its rows of every micro-batch, then
        the gradients and the loss summed over processes (one collective). A non-finite loss ends this
        process's part of the step; whether the step failed is decided by all processes together."""
        size = self.args.batch_size
        step_loss, bad, trained_rows = 0.0, False, False
        for m in range(0, len(group), size):
            positions = list(range(m, min(m + size, len(group))))
            rows = shard.rows(len(positions))
            if not rows:
                continue
            loss = self._micro_batch_loss(group, positions, rows) / len(group)
            if not torch.isfinite(loss):
                bad = True
                break
            loss.backward()
            step_loss += float(loss.detach())
            trained_rows = True
        params = [self.vectors[k] for k in self.trained]
        missing = trained_rows and any(p.grad is None for p in params)
        flat = [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).double() for p in params]
        flags = torch.tensor(
            [step_loss, float(bad), float(missing)], dtype=torch.float64, device=flat[0].device
        )
        buffer = torch.cat([*flat, flags])
        shard.sum_(buffer)
        *grads, totals = buffer.split([*(p.numel() for p in params), 3])
        for p, g in zip(params, grads):
            p.grad = g.view_as(p).to(p.dtype)
        step_loss, bad_on_any, missing_on_any = totals.tolist()
        if bad_on_any:
            raise self._fail(backup, "the loss became NaN or infinite")
        if missing_on_any:
            raise TrainingError(_NO_GRADIENT)
        return float(step_loss)

    def _micro_batch_loss(
        self, group: list[int], positions: list[int], rows: list[int] | None = None
    ) -> torch.Tensor:
        """Summed loss of the samples at ``positions`` of the step's group: latents (cached, sampled),
        noise and timesteps, then :meth:`_loss`. ``rows``: only these rows of the micro-batch (a
        process's share in a data-parallel run; the batch is built whole, as its streams need)."""
        seed, m = self.args.seed, positions[0]
        batch = self.data.make_batch(
            [group[j] for j in positions],
            random_stream(seed, "batch", self.step, m),
            stream(seed, "latent_sample", self.step, m),
        )
        if rows is not None:
            batch = _rows_of(batch, rows)
            positions = [positions[i] for i in rows]
        noise, t = self._sample_noise(self.step, positions, batch.latents.shape[1:])
        return self._loss(batch.latents, noise, t, batch.prompts, batch.time_ids, batch.weight).sum()

    def _optimizer_step(self, backup: dict[str, torch.Tensor]) -> float:
        """Check and clip the gradients, set the learning rate, step, apply norm control; the lr."""
        params = [self.vectors[k] for k in self.trained]
        grads = [v.grad for v in params if v.grad is not None]
        if len(grads) < len(params):
            raise TrainingError(_NO_GRADIENT)
        if not all(torch.isfinite(g).all() for g in grads):
            raise self._fail(backup, "a gradient became NaN or infinite")
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip)
        lr = self.schedule(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self._norm_control()
        if not all(torch.isfinite(v).all() for v in params):
            raise self._fail(backup, "the vectors became NaN or infinite")
        return lr

    def _track_loss(self, loss: float) -> None:
        self.losses.append(loss)
        self.loss_smooth = loss if self.loss_smooth is None else 0.95 * self.loss_smooth + 0.05 * loss

    def _validate_when_due(self) -> float | None:
        """The validation loss at validation steps (and the last step), else None; may end the run."""
        a = self.args
        if a.validation_every <= 0 or (self.step % a.validation_every and self.step != a.steps):
            return None
        val_loss = self._validate()
        if self._early_stop() and self.best is not None:
            best = self.best
            self._save("final", best.vectors, best.step)
            msg = f"validation loss stopped improving; kept step {best.step} (loss {best.loss:.5f})"
            raise _RunEnded(self._result("early_stopped", msg))
        return val_loss

    def _report(self, log: _CsvLog, pace: _Pace, loss: float, lr: float, val_loss: float | None) -> None:
        rate, eta = pace.rate_and_eta(self.step, self.args.steps)
        smooth = loss if self.loss_smooth is None else self.loss_smooth
        prog = Progress(
            self.step, self.args.steps, loss, smooth, lr, self.norms(), rate, eta, val_loss, self.epoch
        )
        log.write(prog)
        if self.cb.progress:
            self.cb.progress(prog)

    def _snapshot_and_preview_when_due(self) -> None:
        a = self.args
        if a.snapshot_every > 0 and self.step % a.snapshot_every == 0 and self.step < a.steps:
            self._save("snapshot")
        if a.preview_every > 0 and self.step % a.preview_every == 0 and self.cb.preview:
            with self._timed("previews"):
                self.cb.preview(self.current_embedding(), self.step)

    def _point_when_due(self) -> None:
        """An automatic resume point: the embedding file and the resume file, every ``point_every``
        steps or ``point_seconds`` seconds, but never more often than keeps their cost under
        :data:`POINT_MAX_SHARE` of the time (a slow disk or host reload spaces them out)."""
        a, pt = self.args, self._points
        if self.step >= a.steps or (a.point_every <= 0 and a.point_seconds <= 0):
            return
        since = time.perf_counter() - pt.at
        due = (a.point_every > 0 and self.step - pt.step >= a.point_every) or (
            a.point_seconds > 0 and since >= a.point_seconds
        )
        if not due or since < pt.cost / POINT_MAX_SHARE:
            return
        start = time.perf_counter()
        self._save("point", part="points")
        end = time.perf_counter()
        self._points = _Points(self.step, end, end - start)

    # ------------------------------------------------------------------ ending a run
    def _end_if_interrupted(self) -> None:
        """Save and end the run on a stop request or when the host unloaded the model."""
        if self.shard is not None:
            self._end_together()
            return
        self._end_if_stop_requested()
        if not self.parts.still_loaded():
            self._save("stopped")
            msg = f"checkpoint change requested; training stopped at step {self.step}, saved"
            raise _RunEnded(self._result("model_changed", msg))

    def _end_if_stop_requested(self) -> None:
        if self.cb.should_stop and self.cb.should_stop():
            self._save("stopped")
            raise _RunEnded(self._result("stopped", f"stopped at step {self.step}; saved"))

    def _end_together(self, last: bool = False) -> None:
        """:meth:`_end_if_interrupted` of a data-parallel run, at a step boundary: every process ends at
        the same step (one collective) when any one was asked to stop, lost its model or (rank 0)
        could not write a file. ``last``: after the last step, only for a failed write."""
        assert self.shard is not None
        stop = not last and bool(self.cb.should_stop and self.cb.should_stop())
        unloaded = not last and not self.parts.still_loaded()
        failed, stop, unloaded = self.shard.any(self._write_failure is not None, stop, unloaded)
        if failed:
            if self._write_failure is not None:
                raise self._write_failure
            msg = f"another process could not write its files; training stopped at step {self.step}"
            raise _RunEnded(self._result("failed", msg))
        if stop:
            self._save("stopped")
            raise _RunEnded(self._result("stopped", f"stopped at step {self.step}; saved"))
        if unloaded:
            self._save("stopped")
            msg = f"checkpoint change requested; training stopped at step {self.step}, saved"
            raise _RunEnded(self._result("model_changed", msg))

    def _fail(self, backup: dict[str, torch.Tensor], why: str) -> _RunEnded:
        """Restore the vectors of the last good step, save them, and end the run as failed."""
        with torch.no_grad():
            for k, v in self.vectors.items():
                v.copy_(backup[k])
        self.optimizer.zero_grad(set_to_none=True)
        self._save("failed")
        msg = f"{why} at step {self.step + 1}; stopped and kept the vectors of step {self.step}"
        logger.error("%s: %s", self.name, msg)
        return _RunEnded(self._result("failed", msg))

    def _result(self, status: Status, message: str) -> TrainResult:
        return TrainResult(
            status,
            self.current_embedding(),
            self.step,
            message,
            list(self.val_losses),
            list(self.losses),
            dict(self.timings),
        )

    # ------------------------------------------------------------------ run helpers
    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Add the seconds of the block to ``timings[part]`` (not when it ends the run)."""
        start = time.perf_counter()
        yield
        self.timings[part] += time.perf_counter() - start

    @contextmanager
    def _gradient_checkpointing(self) -> Iterator[None]:
        switch = self.parts.set_gradient_checkpointing if self.args.gradient_checkpointing else None
        if switch is None:
            yield
            return
        switch(True)
        try:
            yield
        finally:
            switch(False)

    @contextmanager
    def _write_failure_deferred(self) -> Iterator[None]:
        """In a data-parallel run, a file rank 0 cannot write is kept for :meth:`_end_together`
        (raising it here would leave the other processes waiting in a collective)."""
        if self.shard is None:
            yield
            return
        try:
            yield
        except WriteFailed as e:
            self._write_failure = e

    def _open_log(self) -> _CsvLog:
        path = self._log_path()
        if self.shard is None:
            return _CsvLog(path, self.trained, self.step)
        try:
            return _CsvLog(path, self.trained, self.step)
        except WriteFailed as e:
            self._write_failure = e
            return _CsvLog(None, self.trained)

    def _log_path(self) -> Path | None:
        """The CSV log (none on the processes other than rank 0 of a data-parallel run)."""
        if not self.args.log_dir or (self.shard is not None and self.shard.rank != 0):
            return None
        return Path(self.args.log_dir) / f"{self.name}.csv"

    def _copy_vectors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.vectors.items()}

    def _save(
        self,
        reason: str,
        vectors: dict[str, torch.Tensor] | None = None,
        step: int | None = None,
        resume: bool = True,
        part: str = "saving",
    ) -> None:
        """Save the embedding (and the resume file) for ``reason``; the time counts to ``part``.

        While the run goes on (points, snapshots) the resume file is written first, so it is never
        behind the embedding; when the run ends, the embedding is written first, so the resume file
        says "finished" or "stopped" only once the embedding holds that step (if the embedding's
        write fails, the last point's resume file still continues the run). The resume file always
        holds the run's current vectors (an early stop saves the best ones as the embedding).
        """
        state = _RESUME_STATE[reason]
        write_resume = resume and self.cb.save_resume is not None
        with self._timed(part):
            if write_resume and state == "running":
                self._save_resume(state)
            if self.cb.save is not None:
                self.cb.save(self.current_embedding(vectors, step), reason)
            if write_resume and state != "running":
                self._save_resume(state)

    def _save_resume(self, state: RunState) -> None:
        assert self.cb.save_resume is not None
        self.cb.save_resume(self.resume_bytes(state))
        self._resume_step = self.step

    # ------------------------------------------------------------------ data order
    def _epoch_groups(self, epoch: int) -> list[list[int]]:
        eff = self.args.batch_size * self.args.grad_accum
        return self.data.epoch_order(eff, random_stream(self.args.seed, "epoch_order", epoch))

    def _group(self, step: int) -> list[int]:
        """Item indices of optimizer step ``step`` (one effective batch from one bucket).

        Steps only move forward within a run, so the current epoch (its number, first step and
        groups) is kept; a resumed run replays the epochs before its step once.
        """
        if self._epoch_at is None or step < self._epoch_at[1]:
            self._epoch_at = (0, 0, self._epoch_groups(0))
        epoch, first, groups = self._epoch_at
        while step >= first + len(groups):
            epoch, first = epoch + 1, first + len(groups)
            groups = self._epoch_groups(epoch)
        self._epoch_at = (epoch, first, groups)
        self.epoch = epoch
        return list(groups[step - first])

    # ------------------------------------------------------------------ loss
    def _sample_noise(
        self, step: int, positions: Sequence[int], shape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the noise offset) and a timestep per sample, from the sample's own stream."""
        noises, ts = [], []
        for j in positions:
            gen = stream(self.args.seed, "noise", step, j)
            n = torch.randn(tuple(shape), generator=gen)
            if self.args.noise_offset:
                n = n + self.args.noise_offset * torch.randn((shape[0], 1, 1), generator=gen)
            noises.append(n)
            ts.append(int(torch.randint(self.args.min_t, self.max_t + 1, (1,), generator=gen)))
        return torch.stack(noises), torch.tensor(ts, dtype=torch.long)

    def _loss(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        prompts: Sequence[str],
        time_ids: torch.Tensor,
        weight: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-sample loss [B]: add noise, encode the prompts, predict, compare with the target."""
        p = self.parts
        x0 = latents.to(p.device, torch.float32)
        noise = noise.to(p.device, torch.float32)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = self._cond(prompts, time_ids)
        pred = self._predict(x_t, t, cond)
        target = noise if p.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        err = (pred - target) ** 2
        if weight is not None:
            err = err * weight.to(err.device, err.dtype)
        per = err.mean(dim=(1, 2, 3))
        if self.args.min_snr_gamma > 0:
            per = per * self._min_snr_weight(a)
        return per

    def _cond(self, prompts: Sequence[str], time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The UNet conditioning of ``prompts`` with the current vectors (and SDXL's pooled and time ids)."""
        c = self.parts.prompt_encoder.encode(list(prompts), {self.name: self.vectors})
        cond = {"crossattn": c.crossattn}
        if self.parts.kind == "sdxl":
            if c.pooled is None:
                msg = "the SDXL text encoders gave no pooled vector"
                raise TrainingError(msg)
            cond["pooled"] = c.pooled
            cond["time_ids"] = time_ids.to(device=self.parts.device, dtype=c.pooled.dtype)
        return cond

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen model's prediction (eps or v), float32; autocast on CUDA when asked."""
        p = self.parts
        use_autocast = (
            self.args.autocast and p.device.type == "cuda" and p.dtype in (torch.float16, torch.bfloat16)
        )
        with torch.autocast(p.device.type, dtype=p.dtype, enabled=use_autocast):
            out = p.denoise(x_t.to(p.dtype), t.to(p.device), cond)
        return out.float()

    def _min_snr_weight(self, a: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weight per sample, for the eps or v target."""
        snr = (a / (1 - a)).view(-1)
        gamma = self.args.min_snr_gamma
        return torch.clamp(snr, max=gamma) / (snr if self.parts.prediction == "eps" else snr + 1)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """The mean loss of the validation samples (in a data-parallel run each process computes its
        share and the sum is taken over processes, so every process gets the same value)."""
        if not self._validation:
            return None
        samples = self._validation
        if self.shard is not None:
            samples = samples[self.shard.rank :: self.shard.world]
        # one forward per latent size (a bucket) rather than per sample
        groups: dict[tuple[int, ...], list[ValidationSample]] = {}
        for v in samples:
            groups.setdefault(tuple(v.latent.shape), []).append(v)
        total = 0.0
        for group in groups.values():
            per = self._loss(
                torch.stack([v.latent for v in group]),
                torch.stack([v.noise for v in group]),
                torch.tensor([v.t for v in group]),
                [v.prompt for v in group],
                torch.stack([v.time_ids for v in group]),
                None,
            )
            total += float(per.sum())
        if self.shard is not None:
            (total,) = self.shard.sum_floats([total])
        return total / len(self._validation)

    def _validate(self) -> float | None:
        """Record the validation loss of the current vectors and keep them if they are the best."""
        with self._timed("validation"):
            val_loss = self.validation_loss()
            if val_loss is None:
                return None
            self.val_losses.append((self.step, val_loss))
            if self.best is None or val_loss < self.best.loss:
                self.best = _Best(val_loss, self._copy_vectors(), self.step)
        return val_loss

    def _early_stop(self) -> bool:
        patience = self.args.early_stop_patience
        if patience <= 0 or self.best is None or len(self.val_losses) <= patience:
            return False
        since = [s for s, _ in self.val_losses if s > self.best.step]
        return len(since) >= patience

    # ------------------------------------------------------------------ vectors
    def current_embedding(
        self, vectors: dict[str, torch.Tensor] | None = None, step: int | None = None
    ) -> Embedding:
        vecs = {k: v.detach().float().cpu().clone() for k, v in (vectors or self.vectors).items()}
        meta = dict(self.base.metadata)
        meta.update(
            {
                "trainer": f"lib_ti {__version__}",
                "lr": self.args.lr,
                "lr_shape": self.args.lr_shape,
                "steps": str(self.args.steps),
                "batch_size": str(self.args.batch_size),
                "grad_accum": str(self.args.grad_accum),
                "norm_control": self.args.norm_control,
                "seed": str(self.args.seed),
                "trained_encoders": ",".join(self.trained),
            }
        )
        if self.val_losses:
            meta["val_loss"] = f"{self.val_losses[-1][1]:.6f}"
        return Embedding(
            self.name,
            vecs,
            step=self.step if step is None else step,
            sd_checkpoint=self.parts.model_hash or self.base.sd_checkpoint,
            sd_checkpoint_name=self.parts.model_name or self.base.sd_checkpoint_name,
            metadata=meta,
        )

    @torch.no_grad()
    def _norm_control(self) -> None:
        mode = self.args.norm_control
        if mode == "off":
            return
        for k in self.trained:
            v = self.vectors[k]
            norms = v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            target = self.norm_targets.get(k)
            if target is None:
                continue
            if mode == "hard":
                v.mul_(target / norms)
            else:
                v.mul_(1 + self.args.norm_strength * (target / norms - 1))

    def norms(self) -> dict[str, list[float]]:
        return {k: [float(x) for x in v.detach().norm(dim=1)] for k, v in self.vectors.items()}

    # ------------------------------------------------------------------ resume
    def resume_bytes(self, state: RunState = "running") -> bytes:
        """Vectors, optimizer state and counters; safetensors (no pickle)."""
        best = None if self.best is None else (self.best.step, self.best.loss, self.best.vectors)
        return dump_resume(
            name=self.name,
            vectors=self.vectors,
            optimizer=self.optimizer,
            counters=Counters(self.step, self.loss_smooth, self.val_losses, best),
            args=asdict(self.args),
            model_hash=self.parts.model_hash,
            trained=self.trained,
            kind=self.parts.kind,
            state=state,
            settings=self.settings,
            model_name=self.parts.model_name,
        )

    def _load_resume(self, data: bytes) -> None:
        counters = load_resume(
            data,
            vectors=self.vectors,
            optimizer=self.optimizer,
            model_hash=self.parts.model_hash,
            trained=self.trained,
            device=self.parts.device,
        )
        self.step, self.loss_smooth, self.val_losses = (
            counters.step,
            counters.loss_smooth,
            counters.val_losses,
        )
        if counters.best is not None:
            step, loss, vectors = counters.best
            self.best = _Best(loss, vectors, step)


class _CsvLog:
    """The per-step CSV log (appended to; a no-op without a path)."""

    def __init__(self, path: Path | None, keys: Sequence[str], resumed_at: int = 0) -> None:
        """``resumed_at``: a resumed run's first step - 1; rows after it (logged by the run before
        a crash, after its last resume point) are dropped so the log reads as one run."""
        self.keys = list(keys)
        self.file = None
        self.path = path
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if resumed_at and path.exists():
                    _drop_rows_after(path, resumed_at)
                new = not path.exists()
                self.file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
            except OSError as e:
                raise WriteFailed.from_os_error(path, e) from e
            self.writer = csv.writer(self.file)
            if new:
                self.writer.writerow(
                    [
                        "step",
                        "loss",
                        "loss_smooth",
                        "lr",
                        "val_loss",
                        *[f"norm_{k}" for k in self.keys],
                        "images_per_sec",
                        "time",
                    ]
                )

    def __enter__(self) -> _CsvLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def write(self, p: Progress) -> None:
        try:
            self._write(p)
        except OSError as e:
            raise WriteFailed.from_os_error(self.path, e) from e

    def _write(self, p: Progress) -> None:
        if self.file is None:
            return
        norms = [f"{sum(p.norms[k]) / len(p.norms[k]):.5f}" for k in self.keys]
        val = "" if p.val_loss is None else f"{p.val_loss:.6f}"
        self.writer.writerow(
            [
                p.step,
                f"{p.loss:.6f}",
                f"{p.loss_smooth:.6f}",
                f"{p.lr:.3g}",
                val,
                *norms,
                f"{p.images_per_sec:.3f}",
                f"{time.time():.0f}",
            ]
        )
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _rows_of(batch: Batch, rows: list[int]) -> Batch:
    """The rows ``rows`` of ``batch``."""
    if rows == list(range(len(batch.prompts))):
        return batch
    return Batch(
        latents=batch.latents[rows],
        prompts=[batch.prompts[i] for i in rows],
        time_ids=batch.time_ids[rows],
        weight=None if batch.weight is None else batch.weight[rows],
        indices=[batch.indices[i] for i in rows],
    )


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the header and the rows of steps up to ``step`` of a CSV log (rewritten atomically)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        logger.warning("%s cannot be read (%s); the resumed run appends to it as it is", path, e)
        return
    kept = [r for i, r in enumerate(rows) if i == 0 or not r or not r[0].isdigit() or int(r[0]) <= step]
    if len(kept) == len(rows):
        return
    out = io.StringIO()
    csv.writer(out).writerows(kept)
    atomic_write_bytes(path, out.getvalue().encode("utf-8"))

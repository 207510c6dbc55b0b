"""The training loop: optimize only an embedding's vectors against a frozen model.

Knows nothing of any host: it gets a :class:`~lib_ti.parts.ModelParts`, a dataset and callbacks.

Determinism without saved RNG state: the data order of epoch ``e`` comes from a generator seeded with
(seed, e); the noise, timestep and latent sample of the sample at position ``j`` of optimizer step
``s`` from (seed, s, j). A run stopped at step k and resumed therefore replays exactly what an
uninterrupted run does, and batch 4 equals batch 2 x accumulation 2 on the same samples.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lib_ti import __version__
from lib_ti.embedding import Embedding
from lib_ti.errors import TIError
from lib_ti.io.safetensors_io import load_bytes, save_bytes
from lib_ti.parts import ModelParts
from lib_ti.training.options import LrShape, NormControl, Optimizer
from lib_ti.training.schedule import LearningRateSchedule, ScheduleArgs

logger = logging.getLogger(__name__)

Status = Literal["finished", "stopped", "early_stopped", "failed", "model_changed"]


class TrainingError(TIError):
    """Training cannot start or continue (the message says why and what was saved)."""


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
    images_per_sec: float
    eta_seconds: float
    val_loss: float | None = None
    epoch: int = 0


@dataclass
class TrainCallbacks:
    #: (embedding, reason) -> where it was written; reasons: "snapshot", "final", "stopped", "failed", "best"
    save: Callable[[Embedding, str], Any] | None = None
    progress: Callable[[Progress], None] | None = None
    preview: Callable[[Embedding, int], None] | None = None
    #: polled before every micro-step; True ends the run after saving
    should_stop: Callable[[], bool] | None = None
    #: resume state (bytes) to keep; None: not kept
    save_resume: Callable[[bytes], None] | None = None


@dataclass
class TrainResult:
    status: Status
    embedding: Embedding
    step: int
    message: str
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _seeded(*parts: int) -> torch.Generator:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


class Trainer:
    """One training run. Create, then :meth:`run`."""

    def __init__(
        self,
        parts: ModelParts,
        dataset: Any,
        embedding: Embedding,
        args: TrainArgs,
        callbacks: TrainCallbacks | None = None,
        resume: bytes | None = None,
    ) -> None:
        self.parts = parts
        self.data = dataset
        self.args = args
        self.cb = callbacks or TrainCallbacks()
        self.name = embedding.name
        self.base = embedding
        self._check_args()
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
        self.loss_smooth: float | None = None
        self.val_losses: list[tuple[int, float]] = []
        self.losses: list[float] = []
        self.best: tuple[float, dict[str, torch.Tensor], int] | None = None
        self._validation = self._make_validation_set()
        if resume is not None:
            self._load_resume(resume)

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

    def _make_validation_set(self) -> list[dict[str, Any]]:
        a = self.args
        n_items = len(self.data.items)
        if a.validation_every <= 0 or a.validation_size <= 0:
            return []
        rng = random.Random(a.seed * 7919 + 17)
        picks = [rng.randrange(n_items) for _ in range(a.validation_size)]
        out = []
        for j, idx in enumerate(picks):
            item = self.data.items[idx]
            gen = _seeded(a.seed, -1, j)
            latent = item.latents.mean.float()
            # evenly spread timesteps so the figure covers the whole range
            frac = (j + 0.5) / a.validation_size
            t = int(a.min_t + frac * (self.max_t - a.min_t))
            out.append(
                {
                    "latent": latent,
                    "noise": torch.randn(latent.shape, generator=gen),
                    "t": t,
                    "prompt": self.data.prompt(item, random.Random(a.seed * 31 + j)),
                    "time_ids": self._time_ids(item),
                }
            )
        return out

    @staticmethod
    def _time_ids(item: Any) -> torch.Tensor:
        (oh, ow), (ct, cl), (th, tw) = item.size, item.crop, item.bucket
        return torch.tensor([oh, ow, ct, cl, th, tw], dtype=torch.float32)

    # ------------------------------------------------------------------ data order
    def _epoch_groups(self, epoch: int) -> list[list[int]]:
        eff = self.args.batch_size * self.args.grad_accum
        return self.data.epoch_order(eff, random.Random(self.args.seed * 1000003 + epoch))

    def _group(self, step: int) -> list[int]:
        """Item indices of optimizer step ``step`` (one effective batch from one bucket).

        Steps only move forward within a run, so the current epoch (its number, first step and
        groups) is kept; a resumed run replays the epochs before its step once.
        """
        if getattr(self, "_epoch_at", None) is None or step < self._epoch_at[1]:
            self._epoch_at = (0, 0, self._epoch_groups(0))
        epoch, first, groups = self._epoch_at
        while step >= first + len(groups):
            epoch, first = epoch + 1, first + len(groups)
            groups = self._epoch_groups(epoch)
        self._epoch_at = (epoch, first, groups)
        self.epoch = epoch
        return list(groups[step - first])

    # ------------------------------------------------------------------ loss
    def _embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        return {self.name: self.vectors}

    def _cond(self, prompts: Sequence[str], time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.parts.prompt_encoder.encode(list(prompts), self._embeddings())
        cond = {"crossattn": c.crossattn}
        if self.parts.kind == "sdxl":
            if c.pooled is None:
                msg = "the SDXL text encoders gave no pooled vector"
                raise TrainingError(msg)
            cond["pooled"] = c.pooled
            cond["time_ids"] = time_ids.to(device=self.parts.device, dtype=c.pooled.dtype)
        return cond

    def _loss(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        prompts: Sequence[str],
        time_ids: torch.Tensor,
        weight: torch.Tensor | None,
    ) -> torch.Tensor:
        """Per-sample loss [B]."""
        p = self.parts
        x0 = latents.to(p.device, torch.float32)
        noise = noise.to(p.device, torch.float32)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = self._cond(prompts, time_ids)
        use_autocast = (
            self.args.autocast and p.device.type == "cuda" and p.dtype in (torch.float16, torch.bfloat16)
        )
        with torch.autocast(p.device.type, dtype=p.dtype, enabled=use_autocast):
            out = p.denoise(x_t.to(p.dtype), t.to(p.device), cond)
        out = out.float()
        target = noise if p.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        err = (out - target) ** 2
        if weight is not None:
            err = err * weight.to(err.device, err.dtype)
        per = err.mean(dim=(1, 2, 3))
        if self.args.min_snr_gamma > 0:
            snr = (a / (1 - a)).view(-1)
            w = torch.clamp(snr, max=self.args.min_snr_gamma) / (snr if p.prediction == "eps" else snr + 1)
            per = per * w
        return per

    def _sample_noise(
        self, step: int, positions: Sequence[int], shape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noises, ts = [], []
        for j in positions:
            gen = _seeded(self.args.seed, step, j)
            n = torch.randn(tuple(shape), generator=gen)
            if self.args.noise_offset:
                n = n + self.args.noise_offset * torch.randn((shape[0], 1, 1), generator=gen)
            noises.append(n)
            ts.append(int(torch.randint(self.args.min_t, self.max_t + 1, (1,), generator=gen)))
        return torch.stack(noises), torch.tensor(ts, dtype=torch.long)

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        if not self._validation:
            return None
        total = 0.0
        for v in self._validation:
            per = self._loss(
                v["latent"][None],
                v["noise"][None],
                torch.tensor([v["t"]]),
                [v["prompt"]],
                v["time_ids"][None],
                None,
            )
            total += float(per.sum())
        return total / len(self._validation)

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
    def resume_bytes(self) -> bytes:
        """Vectors, optimizer state and counters; safetensors (no pickle)."""
        tensors: dict[str, torch.Tensor] = {f"vec.{k}": v.detach().cpu() for k, v in self.vectors.items()}
        state = self.optimizer.state_dict()
        scalars: dict[str, Any] = {}
        for pid, st in state["state"].items():
            for key, val in st.items():
                if isinstance(val, torch.Tensor) and val.dim() > 0:
                    tensors[f"opt.{pid}.{key}"] = val.detach().cpu()
                else:
                    scalars[f"{pid}.{key}"] = float(val)
        meta = {
            "format": "lib_ti-resume-1",
            "name": self.name,
            "step": self.step,
            "args": _jsonable(asdict(self.args)),
            "scalars": scalars,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
            "loss_smooth": self.loss_smooth,
            "val_losses": self.val_losses,
            "model_hash": self.parts.model_hash,
            "trained": self.trained,
        }
        return save_bytes(tensors, {"resume": json.dumps(meta)})

    def _load_resume(self, data: bytes) -> None:
        tensors, header = load_bytes(data, "resume file")
        try:
            meta = json.loads(header["resume"])
        except (KeyError, json.JSONDecodeError):
            msg = "not a resume file of this trainer"
            raise TrainingError(msg) from None
        if meta.get("trained") != self.trained:
            msg = f"the resume file trained {meta.get('trained')}, this run trains {self.trained}"
            raise TrainingError(msg)
        if meta.get("model_hash") and self.parts.model_hash and meta["model_hash"] != self.parts.model_hash:
            logger.warning(
                "resuming on a different model (%s, was %s)", self.parts.model_hash, meta["model_hash"]
            )
        with torch.no_grad():
            for k, v in self.vectors.items():
                v.copy_(tensors[f"vec.{k}"].to(v.device))
        state = self.optimizer.state_dict()
        new_state: dict[int, dict[str, Any]] = {}
        for key, t in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                new_state.setdefault(int(pid), {})[name] = t.to(self.parts.device)
        for key, val in meta["scalars"].items():
            pid, name = key.split(".", 1)
            new_state.setdefault(int(pid), {})[name] = torch.tensor(val)
        state["state"] = new_state
        for g, saved in zip(state["param_groups"], meta["param_groups"]):
            g.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        self.optimizer.load_state_dict(state)
        self.step = int(meta["step"])
        self.loss_smooth = meta.get("loss_smooth")
        self.val_losses = [tuple(x) for x in meta.get("val_losses", [])]  # type: ignore[misc]

    # ------------------------------------------------------------------ run
    def _save(
        self,
        reason: str,
        vectors: dict[str, torch.Tensor] | None = None,
        step: int | None = None,
        resume: bool = True,
    ) -> None:
        if self.cb.save is not None:
            self.cb.save(self.current_embedding(vectors, step), reason)
        if resume and self.cb.save_resume is not None and vectors is None:
            self.cb.save_resume(self.resume_bytes())

    def _stop_requested(self) -> bool:
        return bool(self.cb.should_stop and self.cb.should_stop())

    def run(self) -> TrainResult:
        a, p = self.args, self.parts
        if a.gradient_checkpointing and p.set_gradient_checkpointing:
            p.set_gradient_checkpointing(True)
        log = _CsvLog(Path(a.log_dir) / f"{self.name}.csv" if a.log_dir else None, self.trained)
        start_time, start_step, seen = time.perf_counter(), self.step, 0
        try:
            if self.step == 0 and self._validation:
                self._record_validation()
            while self.step < a.steps:
                if self._stop_requested():
                    self._save("stopped")
                    return self._result("stopped", f"stopped at step {self.step}; saved")
                if not p.still_loaded():
                    self._save("stopped")
                    return self._result(
                        "model_changed",
                        f"checkpoint change requested; training stopped at step {self.step}, saved",
                    )
                group = self._group(self.step)
                backup = {k: v.detach().clone() for k, v in self.vectors.items()}
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for m in range(0, len(group), a.batch_size):
                    if m and self._stop_requested():
                        self._save("stopped")
                        return self._result("stopped", f"stopped at step {self.step}; saved")
                    positions = list(range(m, min(m + a.batch_size, len(group))))
                    indices = [group[j] for j in positions]
                    batch = self.data.make_batch(
                        indices,
                        random.Random(a.seed * 15485863 + self.step * 101 + m),
                        _seeded(a.seed, self.step, -2, m),
                    )
                    noise, t = self._sample_noise(self.step, positions, batch.latents.shape[1:])
                    per = self._loss(batch.latents, noise, t, batch.prompts, batch.time_ids, batch.weight)
                    loss = per.sum() / len(group)
                    if not torch.isfinite(loss):
                        return self._fail(backup, "the loss became NaN or infinite")
                    loss.backward()
                    step_loss += float(loss.detach())
                    seen += len(indices)
                grads = [self.vectors[k].grad for k in self.trained]
                if any(g is None for g in grads):
                    msg = "no gradient reached the embedding vectors (the model's text path is not differentiable)"
                    raise TrainingError(msg)
                if not all(torch.isfinite(g).all() for g in grads):  # type: ignore[union-attr]
                    return self._fail(backup, "a gradient became NaN or infinite")
                if a.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([self.vectors[k] for k in self.trained], a.grad_clip)
                lr = self.schedule(self.step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                self.optimizer.step()
                self._norm_control()
                if not all(torch.isfinite(self.vectors[k]).all() for k in self.trained):
                    return self._fail(backup, "the vectors became NaN or infinite")
                self.step += 1
                self.losses.append(step_loss)
                self.loss_smooth = (
                    step_loss if self.loss_smooth is None else 0.95 * self.loss_smooth + 0.05 * step_loss
                )
                val = None
                if a.validation_every > 0 and (self.step % a.validation_every == 0 or self.step == a.steps):
                    val = self._record_validation()
                    if self._early_stop():
                        best_loss, best_vecs, best_step = self.best  # type: ignore[misc]
                        self._save("final", best_vecs, best_step)
                        return self._result(
                            "early_stopped",
                            f"validation loss stopped improving; kept step {best_step} (loss {best_loss:.5f})",
                        )
                elapsed = time.perf_counter() - start_time
                rate = seen / elapsed if elapsed > 0 else 0.0
                per_step = elapsed / max(self.step - start_step, 1)
                prog = Progress(
                    self.step,
                    a.steps,
                    step_loss,
                    self.loss_smooth,
                    lr,
                    self.norms(),
                    rate,
                    per_step * (a.steps - self.step),
                    val,
                    getattr(self, "epoch", 0),
                )
                log.write(prog)
                if self.cb.progress:
                    self.cb.progress(prog)
                if a.snapshot_every > 0 and self.step % a.snapshot_every == 0 and self.step < a.steps:
                    self._save("snapshot")
                if a.preview_every > 0 and self.step % a.preview_every == 0 and self.cb.preview:
                    self.cb.preview(self.current_embedding(), self.step)
            self._save("final")
            return self._result("finished", f"finished {self.step} steps")
        finally:
            log.close()
            if a.gradient_checkpointing and p.set_gradient_checkpointing:
                p.set_gradient_checkpointing(False)

    def _record_validation(self) -> float | None:
        val = self.validation_loss()
        if val is None:
            return None
        self.val_losses.append((self.step, val))
        if self.best is None or val < self.best[0]:
            self.best = (val, {k: v.detach().clone() for k, v in self.vectors.items()}, self.step)
        return val

    def _early_stop(self) -> bool:
        patience = self.args.early_stop_patience
        if patience <= 0 or self.best is None or len(self.val_losses) <= patience:
            return False
        best_step = self.best[2]
        since = [s for s, _ in self.val_losses if s > best_step]
        return len(since) >= patience

    def _fail(self, backup: dict[str, torch.Tensor], why: str) -> TrainResult:
        with torch.no_grad():
            for k, v in self.vectors.items():
                v.copy_(backup[k])
        self.optimizer.zero_grad(set_to_none=True)
        self._save("failed", resume=False)
        msg = f"{why} at step {self.step + 1}; stopped and kept the vectors of step {self.step}"
        logger.error("%s: %s", self.name, msg)
        return self._result("failed", msg)

    def _result(self, status: Status, message: str) -> TrainResult:
        return TrainResult(
            status, self.current_embedding(), self.step, message, list(self.val_losses), list(self.losses)
        )


class _CsvLog:
    def __init__(self, path: Path | None, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            self.file = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115
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

    def write(self, p: Progress) -> None:
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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj

"""The runs of the data-parallel tests, and one process of a 2-process job:
``python -m tests.dp_worker OUT IMAGES`` with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT).

The job joins through :func:`lib_ti.headless.distributed.init_from_env` (gloo on the CPU), runs every
scenario of :data:`PAIR` in order and writes what each gave to ``OUT/rank{RANK}.pt``. The test runs the
same scenarios in one process (:func:`run_scenario` with no shard) and compares.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lib_ti.errors import WriteFailed
from lib_ti.headless.distributed import init_from_env
from lib_ti.training.dataset import DataArgs
from lib_ti.training.loading import load_dataset
from lib_ti.training.parallel import Shard
from lib_ti.training.trainer import TrainArgs, TrainCallbacks, Trainer

from . import conftest  # noqa: F401  (torchvision's operators for open_clip)
from . import train_models as tm
from .test_train import start

COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
#: the run that is stopped and resumed under 1 and 2 processes
RESUMED = {"steps": 4, "batch_size": 2, "warmup_steps": 1, "validation_every": 2, "validation_size": 3}


@dataclass(frozen=True)
class Scenario:
    args: dict[str, Any]
    kind: str = "sd1"
    #: should_stop is true from this step on ...
    stop_at: int | None = None
    #: ... on this rank only (None: every process; Ctrl-C reaching one process first)
    stop_rank: int | None = None
    #: the denoiser returns NaN during this step (0-based) ...
    nan_at: int | None = None
    #: ... on this rank only (None: every process)
    nan_rank: int | None = None
    #: rank 0's save of an automatic resume point fails (a full disk)
    fail_point: bool = False
    #: start from OUT/<this> (resume bytes)
    resume: str | None = None
    #: the CSV log in OUT/logs (the same folder for every process)
    log: bool = False


SCENARIOS = {
    "b2": Scenario({"steps": 3, "batch_size": 2, "validation_every": 2, "validation_size": 3}, log=True),
    "b3a2": Scenario({"steps": 3, "batch_size": 3, "grad_accum": 2}),
    "sdxl": Scenario({"steps": 2, "batch_size": 2}, kind="sdxl"),
    "full": Scenario(RESUMED),
    "stop": Scenario(RESUMED, stop_at=2),
    "stop_rank_1": Scenario({"steps": 4, "batch_size": 2}, stop_at=2, stop_rank=1),
    "resume": Scenario(RESUMED, resume="resume1.bin"),
    "nan": Scenario({"steps": 4, "batch_size": 2}, nan_at=1, nan_rank=1),
    "nan_all": Scenario({"steps": 4, "batch_size": 2}, nan_at=1),
    "write": Scenario({"steps": 4, "batch_size": 2, "point_every": 1}, fail_point=True),
}
#: the scenarios the 2-process job runs (in this order)
PAIR = ("b2", "b3a2", "sdxl", "stop", "stop_rank_1", "resume", "nan", "write")


def image_folder(d: Path) -> Path:
    """Four 64x64 images with some structure and a caption each."""
    d.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(COLORS):
        img = Image.new("RGB", (64, 64), c)
        for x in range(0, 64, 8):
            for y in range(0, 64, 16):
                img.putpixel((x, y), (255 - c[0], 255 - c[1], 255 - c[2]))
        img.save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"color {i}, plain, thing {i}")
    return d


def run_scenario(
    name: str, images: Path, out: Path, rank: int = 0, shard: Shard | None = None, resume: bytes | None = None
) -> dict[str, Any]:
    """Run scenario ``name`` (``shard``: as one process of a job); what it gave, its files included."""
    sc = SCENARIOS[name]
    parts = tm.make_parts(sc.kind)
    data = load_dataset(
        DataArgs(
            str(images),
            "tiemb",
            ["a photo of [name]", "[name], [filewords]"],
            resolution=64,
            flip=True,
            latent_sampling="random",
            shuffle_tags=True,
        ),
        parts.encode_image,
        vae_scale=8,
    )
    args = TrainArgs(**{"lr": "1e-2", "seed": 3, "validation_every": 0, **sc.args})
    if sc.log:
        args.log_dir = str(out / "logs" / name)
    if sc.resume is not None and resume is None:
        resume = (out / sc.resume).read_bytes()
    record: dict[str, Any] = {"saved": [], "progress": [], "previews": [], "resume_written": []}
    holder: dict[str, Trainer] = {}

    def save(emb: Any, reason: str) -> None:
        if sc.fail_point and reason == "point":
            raise WriteFailed("tiemb.safetensors", "No space left on device", 28)
        record["saved"].append((reason, emb.step))

    def should_stop() -> bool:
        return sc.stop_at is not None and holder["t"].step >= sc.stop_at and sc.stop_rank in (None, rank)

    real = parts.denoise

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        out = real(x, t, cond)
        hit = holder["t"].step == sc.nan_at and sc.nan_rank in (None, rank)
        return out * float("nan") if hit else out

    callbacks = TrainCallbacks(
        save=save,
        progress=lambda p: record["progress"].append((p.step, p.loss, p.images_per_sec > 0)),
        preview=lambda e, s: record["previews"].append(s),
        should_stop=should_stop,
        save_resume=record["resume_written"].append,
    )
    parts.denoise = denoise
    try:
        trainer = Trainer(parts, data, start(parts), args, callbacks, resume, shard=shard)
        holder["t"] = trainer
        result = trainer.run()
    finally:
        parts.denoise = real
    return {
        **record,
        "status": result.status,
        "step": result.step,
        "message": result.message,
        "vectors": {k: v.detach().clone() for k, v in result.embedding.vectors.items()},
        "losses": list(result.losses),
        "val_losses": list(result.val_losses),
        "state": trainer.resume_bytes(),
    }


def main() -> None:
    out, images = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    job = init_from_env(timeout=timedelta(seconds=120))
    assert job is not None, "WORLD_SIZE is not set"
    results: dict[str, Any] = {"world": job.world, "backend": job.backend}
    try:
        for name in PAIR:
            results[name] = run_scenario(name, images, out, job.rank, job.shard())
        job.barrier()
    finally:
        job.close()
    torch.save(results, out / f"rank{job.rank}.pt")


if __name__ == "__main__":
    main()

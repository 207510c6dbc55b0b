"""What the automatic resume points cost at their defaults.

    python bench/resume_cost.py [--steps 300] [--library 200]

Trains through the service (the path the tab and the REST API take) on the tests' tiny real-width SD1
model (CLIP-L 768 wide with the real vocabulary, a tiny UNet, 64 px images). Its steps are far faster
than any real model's, so the fraction printed is an upper bound for real runs. The embeddings folder
holds ``--library`` other embeddings, and the "host reload" after each point re-reads every one of
them, as A1111's ``load_textual_inversion_embeddings(force_reload=True)`` does.

Two runs side by side in one process: resume points at the defaults (every 100 steps or 3 minutes,
spaced out when they would cost more than 1 %) and resume points off. A point writes the resume file
and the embedding file (atomic, fsync) and triggers the reload.

Ends with ``resume_cost: overhead=<time in points / time in steps, at the defaults> point_ms=<mean cost
of one point> step_ms=<mean step> points=<count> steps_ratio=<steps time with points / without>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_ti.create import CreateArgs
from lib_ti.embedding import Embedding
from lib_ti.hostinfo import HostServices
from lib_ti.io.formats import list_embedding_files, read_embedding, write_embedding
from lib_ti.service import Service
from lib_ti.training.resume import POINT_EVERY_STEPS
from tests import conftest  # noqa: F401  (defines torchvision's operators for open_clip)
from tests import train_models as tm


def folder_with_library(root: Path, n: int) -> None:
    for d in ("embeddings", "logs", "data"):
        (root / d).mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        emb = Embedding(f"lib{i:04d}", {"clip_l": torch.randn(4, 768, generator=gen) * 0.01})
        write_embedding(emb, root / "embeddings" / f"lib{i:04d}.safetensors")
    for i, c in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        Image.new("RGB", (64, 64), c).save(root / "data" / f"{i}.png")


def run(root: Path, parts, name: str, steps: int, point_every: int) -> tuple[dict, int]:
    """The run's timings and how many automatic points it wrote."""
    options = {"ti_resume_every": point_every}
    reloads = []

    def reload() -> None:  # the host re-reads the whole folder, as A1111 does
        reloads.append(1)
        for path in list_embedding_files(root / "embeddings"):
            read_embedding(path)

    service = Service(
        HostServices(
            embeddings_dir=lambda: str(root / "embeddings"),
            log_dir=lambda: str(root / "logs"),
            build_parts=lambda: parts,
            reload_embeddings=reload,
            exclusive=threading.Lock,
            get_option=lambda key, default: options.get(key, default),
        )
    )
    service.create(CreateArgs(name, 2, "text", "a painting"))
    req = {"embedding": name, "dataset_dir": str(root / "data"), "steps": steps, "resolution": 64,
           "batch_size": 1, "grad_accum": 1, "validation_every": 0, "snapshot_every": 0, "preview_every": 0}  # fmt: skip
    st = service.start_training(req, background=False).status
    assert st.state == "finished", st.message
    return st.timings, len(reloads) - 2  # not the create's and the final save's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--library", type=int, default=200)
    a = ap.parse_args()
    torch.manual_seed(0)
    parts = tm.make_parts("sd1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder_with_library(root, a.library)
        run(root, parts, "warmup", 5, 0)
        off, _ = run(root, parts, "off", a.steps, 0)
        on, points = run(root, parts, "on", a.steps, POINT_EVERY_STEPS)
    step_ms = 1000 * on["steps"] / a.steps
    point_ms = 1000 * on["points"] / max(points, 1)
    overhead = on["points"] / on["steps"]
    print(f"steps: {a.steps}, library: {a.library} embeddings re-read at every point")
    print(f"with points:    steps {on['steps']:.2f} s, points {on['points']:.3f} s")
    print(f"without points: steps {off['steps']:.2f} s, points {off['points']:.3f} s")
    print(
        f"resume_cost: overhead={overhead:.5f} point_ms={point_ms:.1f} step_ms={step_ms:.1f} "
        f"points={points} steps_ratio={on['steps'] / off['steps']:.3f}"
    )


if __name__ == "__main__":
    main()

"""How fast Prepare turns raw pictures into a training folder, and what the WD tagger costs per image.

    python bench/prepare.py [--images 40] [--size 3000x2000] [--resolution 1024]

Pictures are made here (smooth gradients with shapes, saved as jpg like camera photos). Two runs side by
side: the thread pool Prepare uses and a single thread, each reading, de-duplicating, focal-cropping to
the trainer's buckets and writing png, with no captions. Prepare uses one thread per core, at most 4. Then the tiny WD tagger model of the tests
(the real model's input and output, 448 px) captions the written images in batches of 8; a real WD v3
model's network costs more, the pre-processing (padding, bicubic resize) is the same.

Ends with ``prepare: images_per_s=<pool> tag_ms=<per image, tiny tagger> serial_images_per_s=<one
thread> pool_speedup=<pool / one thread> workers=<threads>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_ti.prepare import pipeline
from lib_ti.prepare.options import prepare_request, with_resolution
from lib_ti.prepare.tagger import TaggerArgs, TaggerDeps, WdTagger


def pictures(folder: Path, n: int, w: int, h: int) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a, b = rng.uniform(0.001, 0.01, 2)
        arr = np.stack(
            [127 + 120 * np.sin(a * x + i), 127 + 120 * np.cos(b * y + i), (x * (i + 1) + y) % 256], -1
        )
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            d.ellipse((x0, y0, x0 + w // 5, y0 + h // 5), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.save(folder / f"{i:03d}.jpg", quality=92)


def run(src: Path, out: Path, resolution: int, threads: int) -> float:
    pipeline.workers = lambda: threads  # type: ignore[assignment]
    req = with_resolution(
        prepare_request({"source_dir": str(src), "output_dir": str(out), "crop": "focal"}), resolution
    )
    t0 = time.perf_counter()
    report = pipeline.run_prepare(req)
    seconds = time.perf_counter() - t0
    assert not report.skipped, report.skipped
    return len(report.written) / seconds


def tag_ms(folder: Path, models: Path) -> float:
    from tests.test_tagger import build_model, write_csv

    model = models / "SmilingWolf--wd-vit-tagger-v3"
    model.mkdir(parents=True)
    build_model(model / "model.onnx")
    write_csv(model / "selected_tags.csv")
    import onnxruntime

    tagger = WdTagger.load(
        models, TaggerArgs(), TaggerDeps(fetch=lambda *a: None, install=lambda r: onnxruntime)
    )
    files = sorted(folder.glob("*.png"))
    t0 = time.perf_counter()
    for start in range(0, len(files), pipeline.CAPTION_BATCH):
        images = [Image.open(p).convert("RGB") for p in files[start : start + pipeline.CAPTION_BATCH]]
        tagger.tag(images, TaggerArgs())
    return (time.perf_counter() - t0) / len(files) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--size", default="3000x2000")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=0, help="threads of the pool run (0: what Prepare uses)")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    default_workers = a.workers or pipeline.workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        pictures(root / "src", a.images, w, h)
        run(root / "src", root / "warm", a.resolution, default_workers)  # file cache, imports
        pool = run(root / "src", root / "pool", a.resolution, default_workers)
        serial = run(root / "src", root / "serial", a.resolution, 1)
        ms = tag_ms(root / "pool", root / "models")
    print(
        f"prepare: images_per_s={pool:.2f} tag_ms={ms:.1f} serial_images_per_s={serial:.2f} "
        f"pool_speedup={pool / serial:.2f} workers={default_workers}"
    )


if __name__ == "__main__":
    main()

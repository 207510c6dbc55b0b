"""Our trainer against AUTOMATIC1111's built-in one, side by side, on a running web UI.

    python bench/host_speed.py --base http://127.0.0.1:7860 [--steps 30] [--rounds 2]

Needs the web UI started with ``--api`` and this extension installed, on the tiny SD1 checkpoint
(``../shared/hosttest/launch.sh``). Same images (4 generated, 64x64), same size, batch 1, 1 vector,
no previews or snapshots; rounds alternate (built-in, ours, built-in, ours) so drift hits both.
Each timing covers the whole request (latent caching included) and is reported as steps/s. Then
10 SD1 and 10 SDXL steps of ours, wall time. Ends with
``host_speed: ours_sps=.. builtin_sps=.. ratio=.. sd1_10_steps_s=.. sdxl_10_steps_s=..``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image


def call(base: str, path: str, body: dict | None = None, timeout: float = 3600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else {}


def builtin_run(base: str, data: Path, logs: Path, steps: int) -> float:
    name = f"bench-builtin-{time.time_ns() % 10**8}"
    call(base, "/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": 1, "init_text": "a painting",
                                             "overwrite_old": True})  # fmt: skip
    body = dict(id_task="bench", embedding_name=name, learn_rate="0.005", batch_size=1, gradient_step=1,
                data_root=str(data), log_directory=str(logs), training_width=64, training_height=64, varsize=False,
                steps=steps, clip_grad_mode="disabled", clip_grad_value="0.1", shuffle_tags=False, tag_drop_out=0,
                latent_sampling_method="once", use_weight=False, create_image_every=0, save_embedding_every=0,
                template_filename="subject_filewords.txt", save_image_with_stored_embedding=False,
                preview_from_txt2img=False, preview_prompt="", preview_negative_prompt="", preview_steps=2,
                preview_sampler_name="Euler", preview_cfg_scale=7, preview_seed=1, preview_width=64,
                preview_height=64)  # fmt: skip
    # the built-in trainer writes its settings file before it creates its log folder
    (logs / time.strftime("%Y-%m-%d") / name).mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    r = call(base, "/sdapi/v1/train/embedding", body)
    dt = time.perf_counter() - t
    if "error: None" not in r.get("info", ""):
        msg = f"built-in trainer failed: {r}"
        raise SystemExit(msg)
    return dt


def ours_run(base: str, data: Path, steps: int, name: str | None = None) -> float:
    name = name or f"bench-ours-{time.time_ns() % 10**8}"
    call(base, "/ti/v1/create", {"name": name, "vectors": 1, "init_text": "a painting", "overwrite": True})
    t = time.perf_counter()
    job = call(base, "/ti/v1/train", {"embedding": name, "dataset_dir": str(data), "steps": steps, "width": 64,
                                      "height": 64, "learning_rate": "0.005", "validation_every": 0})["job"]  # fmt: skip
    while True:
        st = call(base, f"/ti/v1/jobs/{job}")
        if st["state"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    dt = time.perf_counter() - t
    if st["state"] != "done":
        msg = f"our trainer failed: {st}"
        raise SystemExit(msg)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:7860")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        data, logs = Path(d) / "data", Path(d) / "logs"
        data.mkdir()
        for i, c in enumerate([(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)]):
            Image.new("RGB", (64, 64), c).save(data / f"{i}-sample.png")
        call(base := args.base, "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1"})
        call(base, "/sdapi/v1/reload-checkpoint", {})
        b_times, o_times = [], []
        for _ in range(args.rounds):
            b_times.append(builtin_run(base, data, logs, args.steps))
            o_times.append(ours_run(base, data, args.steps))
        b_sps, o_sps = args.steps / statistics.median(b_times), args.steps / statistics.median(o_times)
        print(f"built-in: {[round(t, 2) for t in b_times]} s for {args.steps} steps -> {b_sps:.2f} steps/s")
        print(f"ours:     {[round(t, 2) for t in o_times]} s for {args.steps} steps -> {o_sps:.2f} steps/s")
        sd1_10 = ours_run(base, data, 10)
        call(base, "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sdxl"})
        call(base, "/sdapi/v1/reload-checkpoint", {})
        try:
            sdxl_10 = ours_run(base, data, 10)
        finally:
            call(base, "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1"})
        print(f"ours, 10 steps incl. latent caching: SD1 {sd1_10:.2f} s, SDXL {sdxl_10:.2f} s")
        print(f"host_speed: ours_sps={o_sps:.2f} builtin_sps={b_sps:.2f} ratio={o_sps / b_sps:.2f} "
              f"sd1_10_steps_s={sd1_10:.1f} sdxl_10_steps_s={sdxl_10:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()

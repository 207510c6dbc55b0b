"""Our trainer against AUTOMATIC1111's built-in one, side by side, on a running web UI, and where the
time goes in each.

    python bench/host_speed.py --base http://127.0.0.1:7860 [--ckpt tiny-sd1] [--size 64] [--steps 40] [--rounds 2]

Needs the web UI started with ``--api`` and this extension installed. Same images (4 generated, at
``--size``), same steps, batch 1, 1 vector, lr 5e-3, no previews or snapshots; everything else is each
trainer's default (ours: the loaded model's recipe, so flip, random latents and a validation pass every
50 steps). Rounds alternate (built-in, ours, built-in, ours) so drift hits both. Each timing covers the
whole request, from the POST to the job's end (ours: the job's own end time, so polling twice a second
is enough; frequent polling slows a run down).

Where the time goes:
- ours: the job's own figures (``timings`` in ``GET /ti/v1/jobs/{id}``): startup (model parts, freezing),
  caching (latents), steps, validation, saving, previews; "rest" is the request and polling around them;
- built-in: from ``/sdapi/v1/progress`` polled every 0.2 s: startup until "Preparing dataset", caching
  until the first step is reported (minus one step at the run's steady rate), steps until the last step
  is reported, then saving until the request returns.

Full SD1.5 shapes: put a full-size SD1.5 checkpoint in ``models/Stable-diffusion`` (any single-file
SD1.5 layout, random weights are fine) and pass ``--ckpt <its name> --size 256 --steps 10``.
Ends with ``host_speed: ckpt=.. ours_s=.. builtin_s=.. ratio=..`` (ratio = built-in time / ours: above 1
means ours is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image

PHASES_OURS = ("startup", "caching", "steps", "validation", "saving", "points", "previews", "rest")
PHASES_BUILTIN = ("startup", "caching", "steps", "saving")


def call(base: str, path: str, body: dict | None = None, timeout: float = 7200) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else {}


class ProgressWatch(threading.Thread):
    """Timestamps of the built-in trainer's phases, from the host's progress state."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.done = base, threading.Event()
        self.preparing: float | None = None
        self.steps: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                r = call(self.base, "/sdapi/v1/progress?skip_current_image=true", timeout=10)
            except OSError:
                continue
            now = time.perf_counter()
            if self.preparing is None and "Preparing dataset" in str(r.get("textinfo") or ""):
                self.preparing = now
            step = int(r["state"].get("job_no") or 0)
            if step and (not self.steps or self.steps[-1][1] != step):
                self.steps.append((now, step))
            time.sleep(0.2)


def builtin_run(base: str, data: Path, logs: Path, steps: int, size: int) -> tuple[float, dict[str, float]]:
    name = f"bench-builtin-{time.time_ns() % 10**8}"
    call(base, "/sdapi/v1/create/embedding", {"name": name, "num_vectors_per_token": 1, "init_text": "a painting",
                                             "overwrite_old": True})  # fmt: skip
    body = dict(id_task="bench", embedding_name=name, learn_rate="0.005", batch_size=1, gradient_step=1,
                data_root=str(data), log_directory=str(logs), training_width=size, training_height=size,
                varsize=False, steps=steps, clip_grad_mode="disabled", clip_grad_value="0.1", shuffle_tags=False,
                tag_drop_out=0, latent_sampling_method="once", use_weight=False, create_image_every=0,
                save_embedding_every=0, template_filename="subject_filewords.txt",
                save_image_with_stored_embedding=False, preview_from_txt2img=False, preview_prompt="",
                preview_negative_prompt="", preview_steps=2, preview_sampler_name="Euler", preview_cfg_scale=7,
                preview_seed=1, preview_width=64, preview_height=64)  # fmt: skip
    # the built-in trainer writes its settings file before it creates its log folder
    (logs / time.strftime("%Y-%m-%d") / name).mkdir(parents=True, exist_ok=True)
    watch = ProgressWatch(base)
    t0 = time.perf_counter()
    watch.start()
    r = call(base, "/sdapi/v1/train/embedding", body)
    t_end = time.perf_counter()
    watch.done.set()
    watch.join()
    if "error: None" not in r.get("info", ""):
        msg = f"built-in trainer failed: {r}"
        raise SystemExit(msg)
    phases: dict[str, float] = {}
    if watch.preparing and len(watch.steps) >= 2:
        (t_first, s_first), (t_last, s_last) = watch.steps[0], watch.steps[-1]
        per_step = (t_last - t_first) / max(s_last - s_first, 1)
        phases["startup"] = watch.preparing - t0
        phases["caching"] = max(t_first - watch.preparing - per_step * s_first, 0.0)
        phases["steps"] = t_last - t_first + per_step * s_first
        phases["saving"] = t_end - t_last
    return t_end - t0, phases


def ours_run(
    base: str, data: Path, steps: int, size: int, name: str | None = None
) -> tuple[float, dict[str, float]]:
    name = name or f"bench-ours-{time.time_ns() % 10**8}"
    call(base, "/ti/v1/create", {"name": name, "vectors": 1, "init_text": "a painting", "overwrite": True})
    t0 = time.time()
    job = call(base, "/ti/v1/train", {"embedding": name, "dataset_dir": str(data), "steps": steps,
                                      "resolution": size, "batch_size": 1, "grad_accum": 1, "lr": "5e-3",
                                      "snapshot_every": 0, "preview_every": 0})["job"]  # fmt: skip
    while True:
        st = call(base, f"/ti/v1/jobs/{job}")
        if st["state"] not in ("queued", "running"):
            break
        time.sleep(0.5)  # polling often would slow the run it measures (each answer takes the GIL)
    total = st["ended"] - t0  # the job's own end time: exact without frequent polling
    if st["state"] != "done":
        msg = f"our trainer failed: {st}"
        raise SystemExit(msg)
    phases = {k: float(st["timings"].get(k, 0.0)) for k in PHASES_OURS if k != "rest"}
    phases["rest"] = total - sum(phases.values())
    return total, phases


def median_phases(runs: list[dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in names if any(k in r for r in runs)}


def show(label: str, times: list[float], phases: dict[str, float], steps: int) -> None:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
    print(f"{label:9s} {[round(t, 2) for t in times]} s for {steps} steps (median {statistics.median(times):.2f} s): "
          f"{parts}")  # fmt: skip


def switch(base: str, ckpt: str) -> None:
    call(base, "/sdapi/v1/options", {"sd_model_checkpoint": ckpt})
    call(base, "/sdapi/v1/reload-checkpoint", {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:7860")
    ap.add_argument("--ckpt", default="tiny-sd1", help="SD1 checkpoint to compare on")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sdxl", action="store_true", help="also time 10 SDXL steps of ours on tiny-sdxl")
    args = ap.parse_args()
    base = args.base
    with tempfile.TemporaryDirectory() as d:
        data, logs = Path(d) / "data", Path(d) / "logs"
        data.mkdir()
        for i, c in enumerate([(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)]):
            Image.new("RGB", (args.size, args.size), c).save(data / f"{i}-sample.png")
        switch(base, args.ckpt)
        b_runs, o_runs = [], []
        for _ in range(args.rounds):
            b_runs.append(builtin_run(base, data, logs, args.steps, args.size))
            o_runs.append(ours_run(base, data, args.steps, args.size))
        b_times, o_times = [t for t, _ in b_runs], [t for t, _ in o_runs]
        show("built-in", b_times, median_phases([p for _, p in b_runs], PHASES_BUILTIN), args.steps)
        show("ours", o_times, median_phases([p for _, p in o_runs], PHASES_OURS), args.steps)
        b, o = statistics.median(b_times), statistics.median(o_times)
        line = f"host_speed: ckpt={args.ckpt} size={args.size} steps={args.steps} ours_s={o:.2f} builtin_s={b:.2f} ratio={b / o:.2f}"
        if args.sdxl:
            sd1_10, _ = ours_run(base, data, 10, args.size)
            switch(base, "tiny-sdxl")
            try:
                sdxl_10, _ = ours_run(base, data, 10, args.size)
            finally:
                switch(base, args.ckpt)
            line += f" sd1_10_steps_s={sd1_10:.1f} sdxl_10_steps_s={sdxl_10:.1f}"
        print(line)


if __name__ == "__main__":
    main()

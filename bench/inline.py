"""What embedding math in a prompt costs a generation, on a running web UI.

    python bench/inline.py --base http://127.0.0.1:7860 [--ckpts tiny-sd1,tiny-sdxl] [--rounds 15]

Needs the web UI started with ``--api`` and this extension installed. For each checkpoint it saves three
embeddings from three expressions (the Merge view's route), then alternates two txt2img requests:
the prompt with the three expressions inline, and the same prompt with the three saved names. Each
request gets a fresh number in its prompt, so the host's conditioning cache answers neither, and both
encode their prompt every time. ``overhead_ms`` is the median of the per-round differences (inline
minus saved); ``hook_ms`` (with ``LIB_TI_HOST_CHECKS=1`` in the host's environment) is the hook's own
median time per encoding measured inside the host, without the noise of whole generations; ``eval_ms`` is the median time of ``POST /ti/v1/evaluate`` for a new expression (one
evaluation, request included). Ends with one line per checkpoint:
``inline: ckpt=.. overhead_ms=.. eval_ms=.. gen_ms=..``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.error

from host_speed import call

EXPRESSIONS = ("'cat'+'dog'*0.5", "'oil painting'/2 + 'watercolor'", "avg('forest', 'jungle'),'',256")


def generate(base: str, prompt: str, size: int) -> float:
    body = {"prompt": prompt, "steps": 1, "width": size, "height": size, "seed": 1, "sampler_name": "Euler"}
    t0 = time.perf_counter()
    call(base, "/sdapi/v1/txt2img", body)
    return time.perf_counter() - t0


def bench(base: str, ckpt: str, rounds: int, size: int) -> str:
    call(base, "/sdapi/v1/options", {"sd_model_checkpoint": ckpt})
    tag = str(time.time_ns() % 10**8)
    names = []
    for i, expr in enumerate(EXPRESSIONS):
        name = f"bench{tag}x{i}"
        call(base, "/ti/v1/merge", {"expression": expr, "name": name})
        names.append(name)
    inline = "a photo of <{}> in a park, <{}>, detailed, <{}> {}"
    saved = "a photo of {} in a park, {}, detailed, {} {}"
    generate(base, inline.format(*EXPRESSIONS, "warm up"), size)  # first use: evaluation, caches
    generate(base, saved.format(*names, "warm up"), size)
    diffs, gens = [], []
    for r in range(rounds):
        a = generate(base, inline.format(*EXPRESSIONS, f"{tag} {r} a"), size)
        b = generate(base, saved.format(*names, f"{tag} {r} b"), size)
        c = generate(base, inline.format(*EXPRESSIONS, f"{tag} {r} c"), size)
        d = generate(base, saved.format(*names, f"{tag} {r} d"), size)
        diffs.append(((a - b) + (c - d)) / 2)  # a b c d: drift hits both sides alike
        gens.append((b + d) / 2)
    evals = []
    for i in range(rounds):
        t0 = time.perf_counter()
        call(
            base,
            "/ti/v1/evaluate",
            {"expression": f"'cat'*{1 + i / 100:.2f} + 'tree', {256 + i}", "nearest": 0},
        )
        evals.append(time.perf_counter() - t0)
    hook = ""
    try:  # the hook's own time in the host process (only with LIB_TI_HOST_CHECKS=1)
        cost = call(
            base, "/ti/v1/_checks/inline_cost", {"prompt": inline.format(*EXPRESSIONS, tag), "rounds": 50}
        )
        hook = f"hook_ms={cost['median_ms']:.2f} "
    except urllib.error.HTTPError:
        pass
    return (
        f"inline: ckpt={ckpt} overhead_ms={statistics.median(diffs) * 1000:.1f} {hook}"
        f"eval_ms={statistics.median(evals) * 1000:.1f} gen_ms={statistics.median(gens) * 1000:.0f} "
        f"(rounds={rounds}, size={size}, 3 expressions)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="http://127.0.0.1:7860")
    ap.add_argument("--ckpts", default="tiny-sd1,tiny-sdxl")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    lines = [bench(args.base, ckpt, args.rounds, args.size) for ckpt in args.ckpts.split(",")]
    print("\n".join(lines))


if __name__ == "__main__":
    main()

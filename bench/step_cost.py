"""Cost of our trainer's machinery over the inherent work of a textual-inversion step.

    python bench/step_cost.py [--repeats 3] [--kinds sd15,sdxl]

For an SD1.5-shape and an SDXL-shape model (real UNet configurations, CLIP-L 12 layers, CLIP-G 32
layers, random weights, 32x32 latents, batch 1), in the same process:
  (a) the minimal TI step, hand-written: splice the vectors into the token embeddings, text encoders
      forward, UNet forward, MSE, backward to the vectors; nothing else;
  (b) one full step of lib_ti.training.trainer.Trainer at the same shape and batch (data, splice, loss,
      optimizer, norm control, logging included).
Prints b/a per model (target <= 1.10) and the peak resident memory of each variant, measured in
separate processes. Ends with ``step_cost: sd15=.. sdxl=.. peak_mb_sd15=.. peak_mb_sdxl=..``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_models as bm

PROMPT = "a photo of benchemb standing in a garden"


def build(kind: str):
    bm.torchvision_ops()
    import open_clip.tokenizer

    from lib_ti.parts import ModelParts
    from lib_ti.text.encoders import (
        EncoderSettings,
        HFClipEncoder,
        OpenClipEncoder,
        PromptEncoder,
        hf_tokenizer_info,
        open_clip_tokenizer_info,
    )

    tok = bm.clip_tokenizer()
    l_model = bm.clip_l()
    unet = bm.unet(kind)
    if kind == "sd15":
        encs = [HFClipEncoder("clip_l", l_model, hf_tokenizer_info(tok), EncoderSettings())]
        g_model = None
    else:
        g_model = bm.clip_g()
        encs = [
            HFClipEncoder(
                "clip_l", l_model, hf_tokenizer_info(tok), EncoderSettings(skip=1, final_norm=False)
            ),
            OpenClipEncoder(
                "clip_g",
                g_model,
                open_clip_tokenizer_info(open_clip.tokenizer._tokenizer),
                EncoderSettings(skip=1, final_norm=False, pooled=True, id_pad=0),
            ),
        ]

    def denoise(x, t, cond):
        if kind == "sdxl":
            extra = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
            return unet(x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs=extra).sample
        return unet(x, t, encoder_hidden_states=cond["crossattn"]).sample

    parts = ModelParts(
        kind="sd1" if kind == "sd15" else "sdxl",
        prompt_encoder=PromptEncoder(encs),
        denoise=denoise,
        encode_image=bm.encode_image,
        alphas_cumprod=bm.alphas_cumprod(),
    )
    return parts, unet, l_model, g_model, tok


def minimal_step_fn(kind, unet, l_model, g_model, tok, vectors):
    """The inherent work, written by hand (no lib_ti code on the path)."""
    import open_clip.tokenizer

    n = vectors["clip_l"].shape[0]
    words = tok(PROMPT.replace("benchemb", ""), add_special_tokens=False)["input_ids"]
    place = 4  # after "a photo of "
    ids = [49406, *words[:3], *[0] * n, *words[3:], 49407]
    ids = torch.tensor([ids + [49407] * (77 - len(ids))])
    g_ids = ids.clone()
    first_end = int((g_ids[0] == 49407).nonzero()[0])
    g_ids[0, first_end + 1 :] = 0
    del open_clip
    alphas = bm.alphas_cumprod()
    x0 = torch.randn(1, 4, 32, 32)
    noise = torch.randn(1, 4, 32, 32)
    t = torch.tensor([500])
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    mask = torch.full((77, 77), torch.finfo(torch.float32).min).triu_(1)[None, None]

    def splice(table, vec, token_ids):
        base = table(token_ids)[0]
        return torch.cat([base[:place], vec, base[place + n :]])[None]

    def step():
        tm = l_model.text_model
        h = (
            splice(tm.embeddings.token_embedding, vectors["clip_l"], ids)
            + tm.embeddings.position_embedding.weight[None]
        )
        layers = tm.encoder.layers if kind == "sd15" else tm.encoder.layers[:-1]
        for layer in layers:
            h = layer(h, None, mask)[0]
        ctx = tm.final_layer_norm(h) if kind == "sd15" else h
        extra = None
        if kind == "sdxl":
            g = g_model
            x = splice(g.token_embedding, vectors["clip_g"], g_ids) + g.positional_embedding
            x = x.permute(1, 0, 2)
            penult = None
            for i, block in enumerate(g.transformer.resblocks):
                if i == len(g.transformer.resblocks) - 1:
                    penult = x
                x = block(x, attn_mask=g.attn_mask)
            last = g.ln_final(x.permute(1, 0, 2))
            pooled = last[torch.arange(1), g_ids.argmax(-1)] @ g.text_projection
            ctx = torch.cat([ctx, penult.permute(1, 0, 2)], dim=-1)
            extra = {"text_embeds": pooled, "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]])}
        out = unet(x_t, t, encoder_hidden_states=ctx, added_cond_kwargs=extra).sample
        loss = ((out - noise) ** 2).mean()
        loss.backward()
        for v in vectors.values():
            v.grad = None

    return step


def trainer_fn(parts, vectors, folder: Path, steps: int, fresh: bool = False):
    """A function running our trainer; with ``fresh`` each call times one full step of a new 1-step run."""
    from PIL import Image

    from lib_ti.embedding import Embedding
    from lib_ti.training.dataset import DataArgs
    from lib_ti.training.loading import load_dataset
    from lib_ti.training.trainer import TrainArgs, TrainCallbacks, Trainer

    Image.new("RGB", (256, 256), (120, 80, 40)).save(folder / "img.png")
    data = load_dataset(
        DataArgs(
            str(folder), "benchemb", ["a photo of [name] standing in a garden"], resolution=256, buckets=False
        ),
        parts.encode_image,
    )
    emb = Embedding("benchemb", {k: v.detach() for k, v in vectors.items()})
    args = TrainArgs(steps=steps, batch_size=1, validation_every=0, log_dir=str(folder / "log"))

    def run_fresh() -> float:
        trainer = Trainer(parts, data, emb, args, TrainCallbacks())
        t = time.perf_counter()
        result = trainer.run()
        took = time.perf_counter() - t
        if result.status != "finished":
            msg = f"the trainer's step did not finish: {result.message}"
            raise RuntimeError(msg)
        return took

    def run_all() -> None:
        Trainer(parts, data, emb, args, TrainCallbacks()).run()

    return run_fresh if fresh else run_all


def measure(kind: str, repeats: int) -> tuple[float, float]:
    """Median seconds of (a) and (b), interleaved a, b, a, b, ... so drift on a shared machine hits both."""
    parts, unet, l_model, g_model, tok = build(kind)
    n = 2
    vectors = {"clip_l": (torch.randn(n, 768) * 0.02).requires_grad_()}
    if kind == "sdxl":
        vectors["clip_g"] = (torch.randn(n, 1280) * 0.02).requires_grad_()
    step = minimal_step_fn(kind, unet, l_model, g_model, tok, vectors)
    a_times, b_times = [], []
    with tempfile.TemporaryDirectory() as d:
        run_one = trainer_fn(parts, vectors, Path(d), 1, fresh=True)
        step()  # warm-up both
        run_one()
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            a_times.append(time.perf_counter() - t)
            b_times.append(run_one())
    return statistics.median(a_times), statistics.median(b_times)


def _child(call: str) -> str:
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import step_cost as s; {call}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def peak_mb(kind: str, variant: str) -> float:
    out = _child(
        f"import resource; s.one({kind!r}, {variant!r}); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK")))


def timed(kind: str, repeats: int) -> tuple[float, float]:
    """measure() in a fresh process, so only one full-size model is in memory at a time."""
    out = _child(f"print('TIMES', *s.measure({kind!r}, {repeats}))")
    a, b = next(line.split()[1:] for line in out.splitlines() if line.startswith("TIMES"))
    return float(a), float(b)


def one(kind: str, variant: str) -> None:
    """Run two steps of one variant (for the memory measurement in a fresh process)."""
    parts, unet, l_model, g_model, tok = build(kind)
    vectors = {"clip_l": (torch.randn(2, 768) * 0.02).requires_grad_()}
    if kind == "sdxl":
        vectors["clip_g"] = (torch.randn(2, 1280) * 0.02).requires_grad_()
    if variant == "a":
        step = minimal_step_fn(kind, unet, l_model, g_model, tok, vectors)
        step()
        step()
    else:
        with tempfile.TemporaryDirectory() as d:
            trainer_fn(parts, vectors, Path(d), 2)()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", default="sd15,sdxl")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    figures = {}
    for kind in args.kinds.split(","):
        a, b = timed(kind, args.repeats)
        print(f"{kind}: minimal step {a:.2f} s, trainer step {b:.2f} s, ratio {b / a:.3f}")
        figures[kind] = b / a
        if not args.no_memory:
            pa, pb = peak_mb(kind, "a"), peak_mb(kind, "b")
            print(f"{kind}: peak RSS minimal {pa:.0f} MB, trainer {pb:.0f} MB")
            figures[f"peak_mb_{kind}"] = pb
            figures[f"peak_mb_min_{kind}"] = pa
    print(json.dumps(figures))
    line = " ".join(
        f"{k}={v:.2f}" if not k.startswith("peak") else f"{k}={v:.0f}" for k, v in figures.items()
    )
    print(f"step_cost: {line}")


if __name__ == "__main__":
    _ = resource
    main()

"""Training without a web UI: the cost of the headless path's machinery, and data-parallel equality.

    python bench/headless.py [--repeats 5] [--kinds sd15,sdxl] [--threads 2] [--no-dp]

1. For an SD1.5-shape and an SDXL-shape model (the real UNet configurations of bench/step_cost.py,
   transformers CLIP-L with 12 layers and, for SDXL, a transformers ``CLIPTextModelWithProjection``
   CLIP-G with 32 layers; random seeded weights; 32x32 latents, batch 1), in one process per model:
     (a) the minimal TI step, written by hand over the same diffusers / transformers modules: splice
         the vectors into the token embeddings, CLIP-L (and CLIP-G) through the layer the model
         conditions on (SD1.5: the last, through the final norm; SDXL: the penultimate, no final norm,
         and CLIP-G's pooled vector from its last layer), UNet forward (SDXL: text_embeds and
         time_ids), MSE, backward to the vectors; nothing else;
     (b) one full step of lib_ti.training.trainer.Trainer over ``lib_ti.headless.models.build_parts``
         of a ``lib_ti.headless.models.Model`` holding these modules (a tiny diffusers AutoencoderKL
         encodes the one training image once).
   Timed interleaved a, b, a, b, ... after a warm-up of each, with a fixed number of threads; the
   median of each. Prints b/a per model (target <= 1.05).
2. A 2-process data-parallel run (torch.multiprocessing spawn, gloo, a file:// rendezvous,
   ``DistributedShard``) against one process, on a tiny headless SD1 model: 6 steps, batch 3 (odd:
   the ranks train different numbers of rows; rank 1 none of some micro-batches), gradient
   accumulation 2, flips, random latent sampling, shuffled tags. The max abs difference of the final
   vectors (float rounding only, must be < 1e-5).

Ends with ``headless: step_ratio=<max of the models' b/a> dp2_equal=<max abs difference>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_models as bm  # also puts the checkout on sys.path
from step_cost import trainer_fn  # (b): one full step of a new 1-step run of our trainer

NAME = "benchemb"
TEMPLATE = "a photo of [name] standing in a garden"
N_VECTORS = 2
#: the data-parallel run
DP_NAME = "dpemb"
DP_ARGS = {"steps": 6, "batch_size": 3, "grad_accum": 2, "lr": "1e-2", "seed": 3}
DP_COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


# ---------------------------------------------------------------------- models
def clip_g_hf() -> torch.nn.Module:
    """SDXL's CLIP-G as diffusers converts it: transformers CLIPTextModelWithProjection, real shape."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(2)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1280,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    return CLIPTextModelWithProjection(cfg).eval().requires_grad_(False)


def tiny_vae(seed: int = 3) -> torch.nn.Module:
    """A small diffusers AutoencoderKL with SD's 8x downscale (4 blocks) and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.18215,
    )
    return vae.eval().requires_grad_(False)


def _final_norm_bias(clip: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give the final layer norm a random bias: with the initial (1, 0) every token's row has mean 0,
    the mean of the context can round to exactly 0.0 and the web UI's emphasis rescale (mean / mean)
    gives NaN; trained CLIP-L's bias is not zero."""
    gen = torch.Generator().manual_seed(seed)
    ln = clip.text_model.final_layer_norm
    with torch.no_grad():
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=gen) * 0.1)
    return clip


def headless_model(kind: str) -> Any:
    """A ``lib_ti.headless.models.Model`` over the bench's full-shape modules ("sd15" or "sdxl")."""
    from lib_ti.headless.models import Model, clip_tokenizer

    texts: list[tuple[str, torch.nn.Module]] = [("clip_l", _final_norm_bias(bm.clip_l(), 6))]
    if kind == "sdxl":
        texts.append(("clip_g", clip_g_hf()))
    return Model(
        kind="sd1" if kind == "sd15" else "sdxl",
        prediction="eps",
        unet=bm.unet(kind),
        vae=tiny_vae(),
        text_models=texts,
        tokenizers=(clip_tokenizer(), None),
        scaling_factor=0.18215,
        alphas_cumprod=bm.alphas_cumprod(),
        model_hash="bench" + kind,
        model_name=f"bench-{kind}",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def tiny_headless_model() -> Any:
    """A tiny SD1 ``Model``: a small diffusers UNet whose output depends on its conditioning
    (cross-attention outputs scaled up, as tests/train_models.py does), a 2-layer CLIP-L of real width
    and vocabulary, the tiny VAE."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lib_ti.headless.models import Model, clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=768,
    ).eval()
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(8.0)
    torch.manual_seed(1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    ).eval()
    return Model(
        kind="sd1",
        prediction="eps",
        unet=unet.requires_grad_(False),
        vae=tiny_vae(),
        text_models=[("clip_l", _final_norm_bias(clip, 6).requires_grad_(False))],
        tokenizers=(clip_tokenizer(), None),
        scaling_factor=0.18215,
        alphas_cumprod=bm.alphas_cumprod(),
        model_hash="benchtiny",
        model_name="bench-tiny-sd1",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


# ---------------------------------------------------------------------- (a) the minimal step
def minimal_step_fn(kind: str, model: Any, vectors: dict[str, torch.Tensor]):
    """The inherent work, written by hand over the transformers / diffusers modules (no lib_ti code)."""
    tok = model.tokenizers[0]
    texts = dict(model.text_models)
    unet = model.unet
    n = vectors["clip_l"].shape[0]
    words = tok(TEMPLATE.replace("[name]", ""), add_special_tokens=False)["input_ids"]
    place = 4  # after "<start> a photo of"
    ids = [49406, *words[:3], *[0] * n, *words[3:], 49407]
    ids = torch.tensor([ids + [49407] * (77 - len(ids))])
    g_ids = ids.clone()  # CLIP-G pads with 0 after the first end token
    end = int((g_ids[0] == 49407).nonzero()[0])
    g_ids[0, end + 1 :] = 0
    alphas = model.alphas_cumprod
    torch.manual_seed(4)
    x0 = torch.randn(1, 4, 32, 32)
    noise = torch.randn(1, 4, 32, 32)
    t = torch.tensor([500])
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    mask = torch.full((77, 77), torch.finfo(torch.float32).min).triu_(1)[None, None]
    time_ids = torch.tensor([[256.0, 256, 0, 0, 256, 256]])

    def embed(tm: Any, vec: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        base = tm.embeddings.token_embedding(token_ids)[0]
        spliced = torch.cat([base[:place], vec, base[place + n :]])[None]
        return spliced + tm.embeddings.position_embedding.weight[None]

    def step() -> None:
        lm = texts["clip_l"].text_model
        h = embed(lm, vectors["clip_l"], ids)
        layers = lm.encoder.layers if kind == "sd15" else lm.encoder.layers[:-1]
        for layer in layers:
            h = layer(h, None, mask)[0]
        ctx = lm.final_layer_norm(h) if kind == "sd15" else h
        extra = None
        if kind == "sdxl":
            g = texts["clip_g"]
            gm = g.text_model
            x = embed(gm, vectors["clip_g"], g_ids)
            g_layers = gm.encoder.layers
            for layer in g_layers[:-1]:
                x = layer(x, None, mask)[0]
            penult = x
            last = gm.final_layer_norm(g_layers[-1](x, None, mask)[0])
            pooled = g.text_projection(last[:, end])
            ctx = torch.cat([ctx, penult], dim=-1)
            extra = {"text_embeds": pooled, "time_ids": time_ids}
        out = unet(x_t, t, encoder_hidden_states=ctx, added_cond_kwargs=extra).sample
        loss = ((out - noise) ** 2).mean()
        loss.backward()
        for v in vectors.values():
            v.grad = None

    return step


def measure(kind: str, repeats: int, threads: int) -> tuple[list[float], list[float]]:
    """Seconds of (a) and (b) per repeat, interleaved a, b, a, b, ... so drift hits both."""
    from lib_ti.headless.models import build_parts

    torch.set_num_threads(threads)
    model = headless_model(kind)
    parts = build_parts(model)
    torch.manual_seed(5)
    vectors = {"clip_l": (torch.randn(N_VECTORS, 768) * 0.02).requires_grad_()}
    if kind == "sdxl":
        vectors["clip_g"] = (torch.randn(N_VECTORS, 1280) * 0.02).requires_grad_()
    step = minimal_step_fn(kind, model, vectors)
    a_times, b_times = [], []
    with tempfile.TemporaryDirectory() as d:
        run_one = trainer_fn(parts, vectors, Path(d), 1, fresh=True)
        step()  # warm-up both
        run_one()
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            a_times.append(time.perf_counter() - start)
            b_times.append(run_one())
    return a_times, b_times


def timed(kind: str, repeats: int, threads: int) -> tuple[list[float], list[float]]:
    """measure() in a fresh process, so only one full-size model is in memory at a time."""
    cmd = [sys.executable, __file__, "--child", kind, "--repeats", str(repeats), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        msg = f"the {kind} measurement failed (exit {proc.returncode})"
        raise SystemExit(msg)
    fields = {}
    for line in proc.stdout.splitlines():
        if line.startswith(("A ", "B ")):
            fields[line[0]] = [float(x) for x in line.split()[1:]]
    return fields["A"], fields["B"]


# ---------------------------------------------------------------------- data parallel
def dp_images(folder: Path) -> Path:
    """Four 64x64 pictures with some structure and a caption each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(DP_COLORS):
        img = Image.new("RGB", (64, 64), c)
        for x in range(0, 64, 8):
            for y in range(0, 64, 16):
                img.putpixel((x, y), (255 - c[0], 255 - c[1], 255 - c[2]))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"color {i}, plain, thing {i}")
    return folder


def dp_run(rank: int, world: int, init: str, images: str, out: str) -> None:
    """One process of the data-parallel run (``world`` 1: no shard, the reference); rank 0 saves
    (start vectors, final vectors, status) to ``out``."""
    import torch.distributed as dist

    from lib_ti.embedding import Embedding
    from lib_ti.headless.models import build_parts, text_encoders
    from lib_ti.training.dataset import DataArgs
    from lib_ti.training.loading import load_dataset
    from lib_ti.training.parallel import DistributedShard
    from lib_ti.training.trainer import TrainArgs, Trainer

    torch.set_num_threads(1)
    shard = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
        shard = DistributedShard()
    try:
        model = tiny_headless_model()
        parts = build_parts(model)
        data = load_dataset(
            DataArgs(
                images,
                DP_NAME,
                ["a photo of [name]", "[name], [filewords]"],
                resolution=64,
                flip=True,
                latent_sampling="random",
                shuffle_tags=True,
            ),
            parts.encode_image,
            vae_scale=parts.vae_scale,
        )
        first = text_encoders(model)[0].text_vectors("a painting")[:N_VECTORS]
        emb = Embedding(DP_NAME, {"clip_l": first})
        args = TrainArgs(**DP_ARGS, validation_every=0, point_every=0, point_seconds=0)
        result = Trainer(parts, data, emb, args, shard=shard).run()
        if rank == 0:
            torch.save(
                {"start": emb.vectors, "vectors": result.embedding.vectors, "status": result.status}, out
            )
    finally:
        if shard is not None:
            dist.destroy_process_group()


def dp_equal() -> tuple[float, float, str]:
    """(max abs difference 2 processes vs 1, how far the vectors moved, the runs' statuses)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        images = str(dp_images(folder / "images"))
        one, two = folder / "one.pt", folder / "two.pt"
        mp.spawn(dp_run, args=(1, "", images, str(one)), nprocs=1)
        init = f"file://{folder / 'rendezvous'}"
        mp.spawn(dp_run, args=(2, init, images, str(two)), nprocs=2)
        ref, got = torch.load(one), torch.load(two)
    diff = max(float((ref["vectors"][k] - got["vectors"][k]).abs().max()) for k in ref["vectors"])
    moved = max(float((ref["vectors"][k] - ref["start"][k]).abs().max()) for k in ref["vectors"])
    return diff, moved, f"{ref['status']}/{got['status']}"


# ---------------------------------------------------------------------- main
def load_times(checkpoint: str, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds to load ``checkpoint`` with the modules built on the meta device (the loader's way) and
    built with random weights first (the plain way), interleaved."""
    from lib_ti.headless import models

    meta, plain = [], []
    built = models._built
    for _ in range(repeats):
        for way, out in (
            (built, meta),
            (lambda make, state, what: models._load_into(make(), state, what), plain),
        ):
            models._built = way
            t0 = time.perf_counter()
            models.load_model(checkpoint, models.LoadOptions(prediction="eps"))
            out.append(time.perf_counter() - t0)
    models._built = built
    return meta, plain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", default="sd15,sdxl")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the timed processes")
    ap.add_argument("--no-dp", action="store_true", help="skip the data-parallel run")
    ap.add_argument("--load", metavar="CKPT", help="also time loading this checkpoint: meta-device vs plain")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    if args.child:
        a, b = measure(args.child, args.repeats, args.threads)
        print("A", *a)
        print("B", *b)
        return
    started = time.perf_counter()
    ratios = {}
    for kind in args.kinds.split(","):
        a, b = timed(kind, args.repeats, args.threads)
        ma, mb = statistics.median(a), statistics.median(b)
        ratios[kind] = mb / ma
        pairs = [y / x for x, y in zip(a, b)]
        print(
            f"{kind}: minimal step {ma:.3f} s, headless trainer step {mb:.3f} s, ratio {mb / ma:.3f} "
            f"(pairwise b/a median {statistics.median(pairs):.3f}, range {min(pairs):.3f}..{max(pairs):.3f}; "
            f"{args.repeats} repeats, {args.threads} threads)"
        )
    diff = float("nan")
    if not args.no_dp:
        diff, moved, status = dp_equal()
        print(
            f"dp2: {DP_ARGS['steps']} steps, batch {DP_ARGS['batch_size']} x accumulation "
            f"{DP_ARGS['grad_accum']}, 2 processes vs 1: max abs diff {diff:.3g} "
            f"(vectors moved {moved:.3g}; {status})"
        )
    if args.load:
        meta, plain = load_times(args.load, 3)
        m, p = statistics.median(meta), statistics.median(plain)
        print(f"headless_load: {Path(args.load).name} meta_s={m:.2f} plain_s={p:.2f} plain/meta={p / m:.2f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"headless: step_ratio={max(ratios.values()):.3f} dp2_equal={diff:.3g}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

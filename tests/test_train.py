"""The training loop on tiny real models (diffusers UNet, real-width text encoders)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from lib_ti.create import CreateArgs, create_embedding
from lib_ti.io.formats import read_embedding, write_embedding
from lib_ti.training.dataset import DataArgs
from lib_ti.training.errors import TrainingError
from lib_ti.training.loading import load_dataset
from lib_ti.training.streams import random_stream, stream
from lib_ti.training.trainer import TrainArgs, TrainCallbacks, Trainer

from . import train_models as tm

COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i, c in enumerate(COLORS):
        img = Image.new("RGB", (64, 64), c)
        for x in range(0, 64, 8):  # some structure
            for y in range(0, 64, 16):
                img.putpixel((x, y), (255 - c[0], 255 - c[1], 255 - c[2]))
        img.save(d / f"{i}-thing.png")
    return d


def dataset(folder, kind, name="tiemb", templates=("a photo of [name]",), **kw):
    parts = tm.make_parts(kind)
    args = DataArgs(str(folder), name, list(templates), resolution=64, **kw)
    return parts, load_dataset(args, parts.encode_image, vae_scale=8)


def start(parts, text="a painting"):
    vocabs = {e.key: e for e in parts.prompt_encoder.encoders}
    return create_embedding(CreateArgs("tiemb", 2, "text", text), vocabs).embedding


def weights_fingerprint(parts):
    mods = [parts.prompt_encoder.encoders[i] for i in range(len(parts.prompt_encoder.encoders))]
    tensors = [p for e in mods for p in (e.text_model if hasattr(e, "text_model") else e.model).parameters()]
    tensors += list(tm.tiny_unet(parts.kind).parameters())
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_validation_loss_falls_and_only_vectors_change(image_folder, kind):
    parts, data = dataset(image_folder, kind)
    before = weights_fingerprint(parts)
    args = TrainArgs(
        steps=30 if kind == "sd1" else 20,
        batch_size=2,
        lr="3e-2",
        validation_every=10,
        validation_size=4,
        norm_control="off",
        seed=1,
    )
    result = Trainer(parts, data, start(parts), args).run()
    assert result.status == "finished"
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    print(kind, "validation loss", [round(v, 5) for _, v in result.val_losses])
    assert last < first * 0.97, (first, last)
    after = weights_fingerprint(parts)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # every model weight bit-identical


def test_batch4_equals_batch2_accum2(image_folder):
    parts, data = dataset(image_folder, "sd1")
    emb = start(parts)
    common = dict(steps=3, lr="1e-2", validation_every=0, norm_control="hard", seed=3, grad_clip=0.0)
    a = Trainer(parts, data, emb, TrainArgs(batch_size=4, grad_accum=1, **common)).run()
    b = Trainer(parts, data, emb, TrainArgs(batch_size=2, grad_accum=2, **common)).run()
    for k in a.embedding.vectors:
        torch.testing.assert_close(a.embedding.vectors[k], b.embedding.vectors[k], atol=2e-5, rtol=1e-4)
    assert not torch.equal(a.embedding.vectors["clip_l"], emb.vectors["clip_l"])


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_stop_and_resume_equals_uninterrupted(image_folder, tmp_path, kind):
    parts, data = dataset(
        image_folder,
        kind,
        templates=("a photo of [name]", "[name], [filewords]"),
        flip=True,
        latent_sampling="random",
        shuffle_tags=True,
    )
    emb = start(parts)
    args = TrainArgs(steps=6, batch_size=2, lr="1e-2", warmup_steps=2, validation_every=3, seed=5)
    full = Trainer(parts, data, emb, args).run()

    saved, resume = {}, {}
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3  # stop before the 4th step

    cb = TrainCallbacks(
        save=lambda e, why: saved.update({why: e}),
        should_stop=should_stop,
        save_resume=lambda b: resume.update(data=b),
    )
    first = Trainer(parts, data, emb, args, cb).run()
    assert first.status == "stopped"
    assert first.step == 3
    assert saved["stopped"].step == 3
    second = Trainer(parts, data, emb, args, resume=resume["data"]).run()
    assert second.status == "finished"
    for k in full.embedding.vectors:
        torch.testing.assert_close(
            second.embedding.vectors[k], full.embedding.vectors[k], atol=1e-6, rtol=1e-5
        )
    assert [s for s, _ in second.val_losses] == [s for s, _ in full.val_losses]
    assert [v for _, v in second.val_losses] == pytest.approx([v for _, v in full.val_losses], rel=1e-5)


def test_stop_mid_run_leaves_loadable_file(image_folder, tmp_path):
    parts, data = dataset(image_folder, "sdxl")
    emb = start(parts)
    written = []

    def save(e, why):
        written.append(write_embedding(e, tmp_path / f"{e.name}.safetensors", overwrite=True))

    steps_seen = []
    cb = TrainCallbacks(
        save=save, progress=lambda p: steps_seen.append(p.step), should_stop=lambda: len(steps_seen) >= 2
    )
    result = Trainer(parts, data, emb, TrainArgs(steps=50, validation_every=0), cb).run()
    assert result.status == "stopped"
    back = read_embedding(written[-1])
    assert back.step == 2
    assert back.kind == "sdxl"
    assert back.sd_checkpoint_name == "tiny-sdxl"
    assert torch.equal(back.vectors["clip_g"], result.embedding.vectors["clip_g"])


def test_nan_stops_and_keeps_last_good_vectors(image_folder, tmp_path):
    parts, data = dataset(image_folder, "sd1")
    calls = {"n": 0}
    real = parts.denoise

    def flaky(x, t, cond):
        calls["n"] += 1
        out = real(x, t, cond)
        return out * float("nan") if calls["n"] > 3 else out

    parts.denoise = flaky
    good = {}
    saved = {}

    def progress(p):
        good[p.step] = None

    trainer = Trainer(
        parts,
        data,
        start(parts),
        TrainArgs(steps=10, validation_every=0),
        TrainCallbacks(save=lambda e, why: saved.update({why: e}), progress=progress),
    )
    snapshots = []
    orig_step = trainer.optimizer.step

    def record(*a, **k):
        out = orig_step(*a, **k)
        snapshots.append({k2: v.detach().clone() for k2, v in trainer.vectors.items()})
        return out

    trainer.optimizer.step = record
    result = trainer.run()
    assert result.status == "failed"
    assert "NaN" in result.message
    assert result.step == 3
    assert "step 3" in result.message
    kept = saved["failed"]
    assert torch.isfinite(kept.vectors["clip_l"]).all()
    assert torch.equal(kept.vectors["clip_l"], result.embedding.vectors["clip_l"])
    # the kept vectors are those after the last good step (norm control applied after the optimizer)
    assert kept.step == 3


def test_sdxl_time_ids_reach_the_unet(tmp_path):
    sizes = {"wide.png": (192, 128), "tall.png": (128, 192), "square.png": (256, 256)}
    for name, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (90, 120, 200)).save(tmp_path / name)
    parts = tm.make_parts("sdxl")
    data = load_dataset(
        DataArgs(str(tmp_path), "tiemb", ["a photo of [name]"], resolution=256, min_bucket=64),
        parts.encode_image,
    )
    assert len({it.bucket for it in data.items}) == 3  # three aspect ratios, three buckets
    seen = []
    real = parts.denoise

    def spy(x, t, cond):
        seen.append((tuple(x.shape[-2:]), cond["time_ids"][0].tolist()))
        return real(x, t, cond)

    parts.denoise = spy
    Trainer(parts, data, start(parts), TrainArgs(steps=3, validation_every=0)).run()
    expected = {
        (it.bucket[0] // 8, it.bucket[1] // 8): [float(v) for v in (*it.size, *it.crop, *it.bucket)]
        for it in data.items
    }
    assert sorted(shape for shape, _ in seen) == sorted(expected)  # one epoch: every image once
    for shape, ids in seen:
        assert ids == expected[shape]
    assert {tuple(v[:2]) for v in expected.values()} == {(128.0, 192.0), (192.0, 128.0), (256.0, 256.0)}


def test_wrong_model_type_is_refused(image_folder):
    parts, data = dataset(image_folder, "sdxl")
    sd1 = start(tm.make_parts("sd1"))
    with pytest.raises(TrainingError, match="another model type"):
        Trainer(parts, data, sd1, TrainArgs(steps=1))


def test_progress_and_csv_log(image_folder, tmp_path):
    parts, data = dataset(image_folder, "sd1")
    progress, saved = [], []
    result = Trainer(
        parts,
        data,
        start(parts),
        TrainArgs(steps=3, validation_every=2, log_dir=str(tmp_path)),
        TrainCallbacks(progress=progress.append, save=lambda e, why: saved.append(why)),
    ).run()
    assert [p.step for p in progress] == [1, 2, 3]
    assert set(result.timings) == {"steps", "validation", "saving", "points", "previews"}
    assert result.timings["steps"] > 0 and result.timings["validation"] > 0 and result.timings["saving"] > 0
    assert result.timings["previews"] == 0
    assert progress[-1].eta_seconds == 0
    assert progress[1].val_loss is not None
    assert set(progress[0].norms) == {"clip_l"}
    rows = (tmp_path / "tiemb.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss")
    assert len(rows) == 4


def test_v_prediction_target(image_folder):
    """With v prediction the target is sqrt(a) * noise - sqrt(1 - a) * x0: a denoiser that returns
    exactly that has zero loss, and the eps target would not."""
    parts, data = dataset(image_folder, "sd1")
    parts.prediction = "v"
    trainer = Trainer(parts, data, start(parts), TrainArgs(steps=1, validation_every=0))
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 800])
    a = parts.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    real = parts.denoise
    parts.denoise = lambda x, tt, cond: v + 0 * real(x, tt, cond).sum()
    ids = torch.zeros(2, 6)
    assert float(trainer._loss(x0, noise, t, ["a", "b"], ids, None).sum()) < 1e-10
    parts.prediction = "eps"
    assert float(trainer._loss(x0, noise, t, ["a", "b"], ids, None).sum()) > 0.1


def test_snapshots_checkpointing_hook_and_early_stop(image_folder, monkeypatch):
    parts, data = dataset(image_folder, "sd1")
    hook = []
    parts.set_gradient_checkpointing = hook.append
    saved = []
    args = TrainArgs(steps=6, snapshot_every=2, validation_every=0, gradient_checkpointing=True)
    Trainer(
        parts, data, start(parts), args, TrainCallbacks(save=lambda e, why: saved.append((why, e.step)))
    ).run()
    assert saved == [("snapshot", 2), ("snapshot", 4), ("final", 6)]
    assert hook == [True, False]

    # early stop: validation gets worse after step 2; the best vectors (step 2) are what is kept
    losses = iter([1.0, 0.9, 0.8, 0.85, 0.86, 0.87, 0.88, 0.89])
    monkeypatch.setattr(Trainer, "validation_loss", lambda self: next(losses))
    saved.clear()
    args = TrainArgs(steps=20, validation_every=1, early_stop_patience=3)
    res = Trainer(
        parts, data, start(parts), args, TrainCallbacks(save=lambda e, why: saved.append((why, e.step)))
    ).run()
    assert res.status == "early_stopped"
    assert saved == [("final", 2)]
    assert "kept step 2" in res.message


def test_streams_keep_the_seeds_of_earlier_versions():
    """Resume and reproducibility across versions depend on these exact seeds."""

    def fnv(*parts):
        h = 1469598103934665603
        for p in parts:
            h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
        return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)

    def same(a, b):
        return torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))

    seed, step, j = 1234, 17, 3
    assert same(stream(seed, "noise", step, j), fnv(seed, step, j))
    assert same(stream(seed, "latent_sample", step, j), fnv(seed, step, -2, j))
    assert same(stream(seed, "validation_noise", j), fnv(seed, -1, j))
    pairs = [
        (random_stream(seed, "epoch_order", 5), seed * 1000003 + 5),
        (random_stream(seed, "batch", step, j), seed * 15485863 + step * 101 + j),
        (random_stream(seed, "validation_pick"), seed * 7919 + 17),
        (random_stream(seed, "validation_prompt", j), seed * 31 + j),
        (random_stream(seed, "crop", "sub/a.png"), f"{seed}:sub/a.png"),
    ]
    for rng, value in pairs:
        assert rng.random() == random.Random(value).random()
    with pytest.raises(ValueError, match="index"):
        stream(seed, "noise", step)

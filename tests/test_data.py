"""Training data: real image files made with Pillow, encoded by a tiny diffusers VAE or a fixed 8x pool."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional

from lib_ti.parts import LatentDist
from lib_ti.training.buckets import make_buckets, nearest_bucket, place
from lib_ti.training.captions import (
    TemplateError,
    builtin_templates,
    filename_caption,
    fill_template,
    load_template,
    process_tags,
    read_caption,
)
from lib_ti.training.dataset import Batch, DataArgs, Dataset, Item
from lib_ti.training.errors import DataError
from lib_ti.training.images import scan_images
from lib_ti.training.loading import check_args, load_dataset

SMALL = {"resolution": 128, "min_bucket": 64, "bucket_step": 64}  # buckets 64..2048 px at 128x128 area


class PoolEncoder:
    """A fixed 8x image encoder: average-pooled RGB plus their mean, std 0.05; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, pixels: torch.Tensor) -> LatentDist:
        self.calls.append(tuple(pixels.shape))
        assert pixels.min() >= -1 and pixels.max() <= 1
        pooled = functional.avg_pool2d(pixels.float(), 8)
        mean = torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)
        return LatentDist(mean, torch.full_like(mean, 0.05))


class VaeEncoder(PoolEncoder):
    """A real (tiny, randomly initialised) diffusers AutoencoderKL with 8x downscaling."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def __call__(self, pixels: torch.Tensor) -> LatentDist:
        self.calls.append(tuple(pixels.shape))
        dist = self.vae.encode(pixels).latent_dist
        return LatentDist(dist.mean * 0.18215, dist.std * 0.18215)


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )
    return vae.eval().requires_grad_(False)


@pytest.fixture
def vae(tiny_vae) -> VaeEncoder:
    return VaeEncoder(tiny_vae)


@pytest.fixture
def pool() -> PoolEncoder:
    return PoolEncoder()


def make_image(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB", alpha=None) -> Path:
    """Random pixels (asymmetric, so a mirror differs), saved in the format of the suffix."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha))
    elif mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def args_for(folder: Path, **kw) -> DataArgs:
    base = {"folder": str(folder), "name": "tok", "templates": ["a photo of [name], [filewords]"]}
    return DataArgs(**{**base, **kw})


def mixed_folder(root: Path) -> Path:
    """Good images of every type (one in a sub-folder) and a few bad files."""
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255
    make_image(root / "a_rgba.png", 64, 64, 1, alpha=alpha)
    make_image(root / "b_photo.jpg", 128, 64, 2)
    make_image(root / "c_pic.webp", 64, 128, 3)
    make_image(root / "sub" / "d_deep.png", 64, 64, 4)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "fake.jpg").write_text("this is not a jpeg")
    make_image(root / "anim.gif", 8, 8)
    (root / "notes.md").write_text("ignored")
    make_image(root / ".hidden" / "x.png", 64, 64)
    full = make_image(root / "tmp.png", 64, 64, 5).read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "tmp.png").unlink()
    return root


# ---------------------------------------------------------------------------- scanning and skipping


def test_scan_and_skipped_files_are_named(tmp_path, pool, caplog):
    root = mixed_folder(tmp_path / "data")
    paths, skipped = scan_images(str(root))
    names = [Path(p).relative_to(root).as_posix() for p in paths]
    assert names == ["a_rgba.png", "b_photo.jpg", "c_pic.webp", "sub/d_deep.png", "truncated.png"]
    assert sorted(Path(s.split(":")[0]).name for s in skipped) == ["anim.gif", "corrupt.png", "fake.jpg"]
    assert any("not an image" in s for s in skipped)

    with caplog.at_level(logging.WARNING, logger="lib_ti.training.loading"):
        ds = load_dataset(args_for(root, **SMALL), pool)
    assert [Path(it.path).name for it in ds.items] == [
        "a_rgba.png",
        "b_photo.jpg",
        "c_pic.webp",
        "d_deep.png",
    ]
    assert {Path(s.split(":")[0]).name for s in ds.skipped} == {
        "anim.gif",
        "corrupt.png",
        "fake.jpg",
        "truncated.png",
    }
    for name in ("corrupt.png", "fake.jpg", "truncated.png", "anim.gif"):
        assert name in caplog.text


def test_missing_or_empty_folder_fails_before_any_encode(tmp_path, pool):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(args_for(tmp_path / "nope"), pool)
    with pytest.raises(DataError, match="does not exist"):
        scan_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        load_dataset(args_for(tmp_path / "empty"), pool)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fake.jpg").write_text("text")
    (bad / "corrupt.png").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match=r"fake\.jpg"):
        load_dataset(args_for(bad), pool)
    # headers fine, pixel data broken: found only when decoding, still before any encode
    full = make_image(tmp_path / "ok.png", 64, 64).read_bytes()
    (bad / "truncated.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"truncated\.png"):
        load_dataset(args_for(bad, **SMALL), pool)
    assert pool.calls == []


def test_bad_settings_fail_before_scanning(tmp_path, pool):
    make_image(tmp_path / "a.png", 64, 64)
    bad = args_for(tmp_path, templates=["a photo"], tag_dropout=1.5, bucket_step=60, repeats=0)
    problems = check_args(bad)
    assert len(problems) == 4
    with pytest.raises(DataError, match=r"\[name\]"):
        load_dataset(bad, pool)
    with pytest.raises(DataError, match="regex"):
        load_dataset(args_for(tmp_path, filename_word_regex="(unclosed"), pool)
    assert pool.calls == []


# ---------------------------------------------------------------------------- captions and prompts


def test_captions_from_sidecar_or_file_name(tmp_path, pool):
    make_image(tmp_path / "001-a red car.png", 64, 64)
    make_image(tmp_path / "photo.png", 64, 64)
    (tmp_path / "photo.txt").write_text("\ufeffa cat, sitting\n\n", encoding="utf-8")
    make_image(tmp_path / "12 - blue sky.jpg", 64, 64)
    (tmp_path / "12 - blue sky.caption").write_text("from a caption file")

    assert filename_caption("x/001-a red car.png") == "a red car"
    assert filename_caption("x/2024-05-01 blue sky.jpg") == "blue sky"
    assert filename_caption("x/001-a red car.png", re.compile(r"[a-z]+"), "_") == "a_red_car"
    assert read_caption(str(tmp_path / "photo.png")) == "a cat, sitting"
    assert read_caption(str(tmp_path / "12 - blue sky.jpg"), ".caption") == "from a caption file"

    ds = load_dataset(args_for(tmp_path, filename_word_regex=r"\w+", filename_join="+", **SMALL), pool)
    words = {Path(it.path).name: it.filewords for it in ds.items}
    assert words == {
        "001-a red car.png": "a+red+car",
        "photo.png": "a cat, sitting",
        "12 - blue sky.jpg": "blue+sky",
    }


def test_templates(tmp_path):
    builtin = builtin_templates()
    assert {"subject", "subject_filewords", "style", "style_filewords"} <= set(builtin)
    for path in builtin.values():
        lines = load_template(path)
        assert lines
        assert all("[name]" in line for line in lines)
    no_name = tmp_path / "plain.txt"
    no_name.write_text("a photo of [filewords]\n\na picture\n")
    with pytest.raises(TemplateError, match=r"plain\.txt"):
        load_template(no_name)
    with pytest.raises(TemplateError, match=r"missing\.txt"):
        load_template(tmp_path / "missing.txt")
    ok = tmp_path / "ok.txt"
    ok.write_text("\ufeff  a photo of [name]  \n\n[filewords], art by [name]\n")
    assert load_template(ok) == ["a photo of [name]", "[filewords], art by [name]"]


def test_prompt_substitution_and_tags():
    assert fill_template("a photo of [name], [filewords]", "tok", "red, car") == "a photo of tok, red, car"
    assert fill_template("a photo of [name], [filewords]", "tok", "") == "a photo of tok"
    assert fill_template("[filewords], art by [name]", "tok", "") == "art by tok"
    # A1111 order: [filewords] first, so a caption may itself use [name]
    assert fill_template("[filewords]", "tok", "[name] at the beach") == "tok at the beach"

    tags = "keep1, keep2, a, b, c, d, e, f"
    assert process_tags(tags, random.Random(0)) == tags
    seen = set()
    for seed in range(50):
        out = process_tags(tags, random.Random(seed), shuffle=True, keep=2, dropout=0.3).split(", ")
        assert out[:2] == ["keep1", "keep2"]
        assert sorted(out[2:]) == sorted(set(out[2:])) and set(out[2:]) <= set("abcdef")
        seen.add(tuple(out[2:]))
    assert len(seen) > 20  # shuffled and dropped differently
    kept = [
        len(process_tags(tags, random.Random(s), keep=2, dropout=0.5).split(", ")) - 2 for s in range(400)
    ]
    assert 2.5 < np.mean(kept) < 3.5  # 6 droppable tags at p = 0.5
    assert process_tags(tags, random.Random(1), shuffle=True) != process_tags(
        tags, random.Random(2), shuffle=True
    )


def _item(path: str, bucket=(64, 64), words="red, car", value=0.0) -> Item:
    h, w = bucket[0] // 8, bucket[1] // 8
    return Item(
        path, words, bucket, bucket, (0, 0), LatentDist(torch.full((4, h, w), value)), None, None, bucket
    )


def test_dataset_prompt_uses_templates_and_name():
    args = DataArgs("x", "tok", ["a photo of [name]", "[filewords] by [name]"], shuffle_tags=True)
    ds = Dataset([_item("a.png")], args)
    prompts = {ds.prompt(ds.items[0], random.Random(s)) for s in range(40)}
    assert prompts == {"a photo of tok", "red, car by tok", "car, red by tok"}


# ---------------------------------------------------------------------------- buckets and geometry


def test_bucket_set_matches_kohya_rules():
    for res in (512, 768, 1024):
        buckets = make_buckets(res)
        assert (res, res) in buckets
        assert all(h * w <= res * res and h % 64 == 0 and w % 64 == 0 for h, w in buckets)
        assert all(256 <= s <= 2048 for b in buckets for s in b)
        assert buckets == sorted({(w, h) for h, w in buckets})  # symmetric
    assert make_buckets(64) == [(64, 64)]  # below the minimum side: the square only
    assert (4096, 4096) in make_buckets(4096)
    sd1 = make_buckets(512)
    assert {(640, 384), (384, 640), (576, 448), (1024, 256)} <= set(sd1)
    assert nearest_bucket((768, 512), sd1) == (640, 384)
    assert nearest_bucket((512, 768), sd1) == (384, 640)
    assert nearest_bucket((640, 640), sd1) == (512, 512)
    assert nearest_bucket((900, 600), make_buckets(1024)) == (1216, 832)


def test_three_aspect_ratios_land_in_their_buckets(tmp_path, vae):
    make_image(tmp_path / "portrait.png", 512, 768, 1)
    make_image(tmp_path / "landscape.png", 768, 512, 2)
    make_image(tmp_path / "square.jpg", 640, 640, 3)
    ds = load_dataset(args_for(tmp_path, resolution=512, vae_batch_size=4), vae)
    got = {Path(it.path).stem: (it.bucket, tuple(it.latents.mean.shape), it.size) for it in ds.items}
    assert got == {
        "landscape": ((384, 640), (4, 48, 80), (512, 768)),
        "portrait": ((640, 384), (4, 80, 48), (768, 512)),
        "square": ((512, 512), (4, 64, 64), (640, 640)),
    }
    assert ds.bucket_sizes() == {(384, 640): 1, (512, 512): 1, (640, 384): 1}
    assert all(len(c) == 4 and c[0] == 1 for c in vae.calls)  # one bucket per encode call
    assert ds.items[0].latents.std is None  # deterministic sampling keeps only the mean
    portrait = next(it for it in ds.items if "portrait" in it.path)
    assert portrait.resized == (640, 427) and portrait.crop == (0, 21)


def test_no_buckets_squares_everything(tmp_path, pool):
    make_image(tmp_path / "wide.png", 200, 100)
    make_image(tmp_path / "tall.png", 100, 300)
    ds = load_dataset(args_for(tmp_path, resolution=64, buckets=False), pool)
    assert [it.bucket for it in ds.items] == [(64, 64), (64, 64)]
    assert [it.resized for it in ds.items] == [(192, 64), (64, 128)]
    assert [it.crop for it in ds.items] == [(64, 0), (0, 32)]


def test_sdxl_time_ids_carry_real_size_and_crop(tmp_path, pool):
    make_image(tmp_path / "tall.png", 600, 900, 1)
    make_image(tmp_path / "wide.jpg", 1500, 1000, 2)
    ds = load_dataset(args_for(tmp_path, resolution=1024), pool)
    tall, wide = ds.items
    assert (tall.size, tall.bucket, tall.resized, tall.crop) == (
        (900, 600),
        (1216, 832),
        (1248, 832),
        (16, 0),
    )
    assert (wide.size, wide.bucket, wide.resized, wide.crop) == (
        (1000, 1500),
        (832, 1216),
        (832, 1248),
        (0, 16),
    )
    for k, item in enumerate(ds.items):
        batch = ds.make_batch([k], random.Random(0), torch.Generator().manual_seed(0))
        expect = [*item.size, *item.crop, *item.bucket]
        assert batch.time_ids.tolist() == [expect]
        assert batch.latents.shape == (1, 4, item.bucket[0] // 8, item.bucket[1] // 8)
    assert ds.make_batch([0], random.Random(0), torch.Generator()).time_ids.tolist() == [
        [900, 600, 16, 0, 1216, 832]
    ]


def test_exif_orientation_and_16_bit_png(tmp_path, pool):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide x 128 tall, displayed rotated: 128 wide x 64 tall
    img.save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    ds = load_dataset(args_for(tmp_path, **SMALL), pool)
    grey, rotated = ds.items
    assert rotated.size == (64, 128) and rotated.bucket == (64, 192)  # nearest of the 128x128-area set
    assert abs(float(grey.latents.mean.mean())) < 0.01  # mid grey, not clipped to white


# ---------------------------------------------------------------------------- flip and alpha


def test_flipped_latents_equal_the_mirrored_image(tmp_path, vae):
    src = make_image(tmp_path / "a" / "img.png", 300, 280, 7)  # resized to 274 x 256, cropped 9 | 9
    mirrored = tmp_path / "b" / "img.png"
    mirrored.parent.mkdir()
    Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    args = {"resolution": 256}
    flipped = load_dataset(args_for(src.parent, flip=True, **args), vae).items[0]
    plain = load_dataset(args_for(mirrored.parent, **args), vae).items[0]
    assert flipped.crop == flipped.flipped_crop == plain.crop == (0, 9)
    assert flipped.latents_flipped is not None and plain.latents_flipped is None
    torch.testing.assert_close(flipped.latents_flipped.mean, plain.latents.mean, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(flipped.latents.mean, plain.latents.mean, atol=1e-3)


def test_flip_choice_in_batches_mirrors_crop_and_weight(tmp_path, pool):
    alpha = np.zeros((560, 1005), dtype=np.uint8)
    alpha[:, :300] = 255
    make_image(tmp_path / "wide.png", 1005, 560, 3, alpha=alpha)
    ds = load_dataset(args_for(tmp_path, resolution=512, flip=True, alpha_weight=True), pool)
    item = ds.items[0]
    p = place((560, 1005), (384, 640))
    assert (
        (item.bucket, item.resized, item.crop)
        == (p.bucket, p.resized, p.crop)
        == ((384, 640), (384, 689), (0, 24))
    )
    assert item.flipped_crop == p.flipped_crop == (0, 25)
    seen = set()
    for seed in range(20):
        b = ds.make_batch([0], random.Random(seed), torch.Generator().manual_seed(seed))
        is_flipped = torch.equal(b.latents[0], item.latents_flipped.mean)
        assert is_flipped or torch.equal(b.latents[0], item.latents.mean)
        assert b.time_ids[0, 3] == (25 if is_flipped else 24)
        assert torch.equal(b.weight[0], item.weight.flip(-1) if is_flipped else item.weight)
        seen.add(is_flipped)
    assert seen == {True, False}


def test_alpha_weights(tmp_path, pool):
    alpha = np.zeros((64, 64), dtype=np.uint8)
    alpha[:, 32:] = 255
    make_image(tmp_path / "half.png", 64, 64, 1, alpha=alpha)
    make_image(tmp_path / "opaque.jpg", 64, 64, 2)
    pal = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (64, 1)), "P")
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.info["transparency"] = 0  # single-colour transparency (column 0)
    pal.save(tmp_path / "palette.png", transparency=0)
    make_image(tmp_path / "invisible.png", 64, 64, 3, alpha=np.zeros((64, 64), dtype=np.uint8))

    ds = load_dataset(args_for(tmp_path, alpha_weight=True, resolution=64, min_bucket=64), pool)
    by = {Path(it.path).stem: it.weight for it in ds.items}
    assert set(by) == {"half", "opaque", "palette"}
    assert any("invisible.png: fully transparent" in s for s in ds.skipped)
    for w in by.values():
        assert w.shape == (1, 8, 8)
        assert abs(float(w.mean()) - 1) < 1e-5
    assert torch.equal(by["opaque"], torch.ones(1, 8, 8))
    assert torch.all(by["half"][..., :4] == 0) and torch.allclose(by["half"][..., 4:], torch.tensor(2.0))
    assert by["palette"][0, 0, 0] < by["palette"][0, 0, 1]
    batch = ds.make_batch([0, 1, 2], random.Random(0), torch.Generator())
    assert batch.weight.shape == (3, 1, 8, 8)

    plain = load_dataset(args_for(tmp_path, resolution=64, min_bucket=64), pool)
    assert len(plain.items) == 4 and all(it.weight is None for it in plain.items)
    assert plain.make_batch([0], random.Random(0), torch.Generator()).weight is None


# ---------------------------------------------------------------------------- disk cache


def test_disk_cache_hit_corruption_and_invalidation(tmp_path, pool):
    data = tmp_path / "data"
    for k, (w, h) in enumerate([(64, 64), (128, 64), (64, 64)]):
        make_image(data / f"img{k}.png", w, h, k)
    cache = tmp_path / "cache"
    args = args_for(data, cache_dir=str(cache), model_hash="abc123", flip=True, alpha_weight=True, **SMALL)

    first = load_dataset(args, pool)
    assert len(pool.calls) == 4  # two buckets, each plain + flipped
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 3 and not list(cache.glob(".*tmp"))

    second_enc = PoolEncoder()
    second = load_dataset(args, second_enc)
    assert second_enc.calls == []
    for a, b in zip(first.items, second.items):
        assert torch.equal(a.latents.mean, b.latents.mean)
        assert torch.equal(a.latents_flipped.mean, b.latents_flipped.mean)
        assert (a.size, a.bucket, a.crop, a.resized) == (b.size, b.bucket, b.crop, b.resized)

    victim = next(f for f in files if f.name.startswith("img1-"))
    victim.write_bytes(b"not a safetensors file")
    third = PoolEncoder()
    load_dataset(args, third)
    assert third.calls == [(1, 3, 64, 192), (1, 3, 64, 192)]  # only the corrupt one, plain + flipped
    fourth = PoolEncoder()
    load_dataset(args, fourth)
    assert fourth.calls == []  # rewritten

    st = (data / "img0.png").stat()
    os.utime(data / "img0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    changed = PoolEncoder()
    load_dataset(args, changed)
    assert changed.calls == [(1, 3, 128, 128), (1, 3, 128, 128)]

    other_model = PoolEncoder()
    load_dataset(args_for(data, cache_dir=str(cache), model_hash="other", **SMALL), other_model)
    assert len(other_model.calls) == 2

    no_hash = PoolEncoder()
    load_dataset(args_for(data, cache_dir=str(tmp_path / "unused"), **SMALL), no_hash)
    assert len(no_hash.calls) == 2 and not (tmp_path / "unused").exists()


# ---------------------------------------------------------------------------- batching and order


@pytest.fixture
def five(tmp_path, pool) -> Dataset:
    for k, (w, h) in enumerate([(64, 64), (64, 64), (64, 64), (128, 64), (128, 64)]):
        make_image(tmp_path / f"img{k}.png", w, h, k)
        (tmp_path / f"img{k}.txt").write_text(f"tag{k}, red, blue, green")
    args = args_for(
        tmp_path, repeats=3, shuffle_tags=True, latent_sampling="random", vae_batch_size=2, **SMALL
    )
    return load_dataset(args, pool)


def test_epoch_order_is_deterministic_and_complete(five):
    assert len(five) == 15
    a = five.epoch_order(2, random.Random(5))
    assert a == five.epoch_order(2, random.Random(5))
    assert a != five.epoch_order(2, random.Random(6))
    flat = [i for batch in a for i in batch]
    assert sorted(flat) == sorted(list(range(5)) * 3)
    assert all(len({five.items[i].bucket for i in batch}) == 1 for batch in a)
    assert all(1 <= len(batch) <= 2 for batch in a)
    assert sum(len(batch) < 2 for batch in a) <= 2  # at most one short batch per bucket
    assert five.epoch_order(100, random.Random(0)) != []  # bigger than a bucket: one batch per bucket
    assert sorted(len(b) for b in five.epoch_order(100, random.Random(0))) == [6, 9]


def test_make_batch_is_deterministic(five):
    def batch(seed: int, gseed: int) -> Batch:
        return five.make_batch([0, 2, 1], random.Random(seed), torch.Generator().manual_seed(gseed))

    a, b = batch(1, 1), batch(1, 1)
    assert (
        torch.equal(a.latents, b.latents) and a.prompts == b.prompts and torch.equal(a.time_ids, b.time_ids)
    )
    assert a.indices == [0, 2, 1] and a.latents.shape == (3, 4, 16, 16)
    assert not torch.equal(a.latents, batch(1, 2).latents)
    assert {tuple(batch(s, 0).prompts) for s in range(10)} != {tuple(a.prompts)}
    means = torch.stack([five.items[i].latents.mean for i in (0, 2, 1)])
    residual = (a.latents - means) / 0.05
    assert 0.7 < float(residual.std()) < 1.3  # mean + std * noise
    assert all(p.startswith("a photo of tok, ") for p in a.prompts)
    with pytest.raises(ValueError, match="mixes buckets"):
        five.make_batch([0, 3], random.Random(0), torch.Generator())

    five.args.latent_sampling = "deterministic"
    assert torch.equal(batch(1, 1).latents, means)


def test_progress_and_vae_batches(tmp_path, pool):
    for k in range(5):
        make_image(tmp_path / f"img{k}.png", 64, 64, k)
    seen = []
    load_dataset(
        args_for(tmp_path, vae_batch_size=2, **SMALL), pool, progress=lambda d, t: seen.append((d, t))
    )
    assert [c[0] for c in pool.calls] == [2, 2, 1]
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]


def test_random_crop_is_fixed_per_image_and_seed(tmp_path, pool):
    for k in range(4):
        make_image(tmp_path / f"img{k}.png", 200, 64, k)
    crops = [
        [it.crop for it in load_dataset(args_for(tmp_path, random_crop=True, seed=s, **SMALL), pool).items]
        for s in (0, 0, 1)
    ]
    assert crops[0] == crops[1] != crops[2]
    for it in load_dataset(args_for(tmp_path, random_crop=True, **SMALL), pool).items:
        assert 0 <= it.crop[1] <= it.resized[1] - it.bucket[1]


def test_encoder_output_is_checked(tmp_path):
    make_image(tmp_path / "a.png", 64, 64)

    def wrong_shape(pixels):
        return LatentDist(torch.zeros(pixels.shape[0], 4, 4, 4))

    def nan(pixels):
        return LatentDist(
            torch.full((pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8), float("nan"))
        )

    with pytest.raises(DataError, match="shape"):
        load_dataset(args_for(tmp_path, **SMALL), wrong_shape)
    with pytest.raises(DataError, match="NaN"):
        load_dataset(args_for(tmp_path, **SMALL), nan)

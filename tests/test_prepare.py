"""Prepare: real pictures made here (gradients, shapes, a drawn face) through the real pipeline."""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from lib_ti.errors import TIError
from lib_ti.prepare.crop import FACES, fit, focal_window
from lib_ti.prepare.dedupe import THRESHOLD, distance, find_duplicates, mean_colour, phash
from lib_ti.prepare.errors import PrepareError
from lib_ti.prepare.options import PrepareRequest, prepare_request, with_resolution
from lib_ti.prepare.pipeline import REPORT_FILE, PrepareHooks, compose_caption, run_prepare
from lib_ti.training.buckets import bucket_set, nearest_bucket, place
from lib_ti.training.images import find_images

EXIF_ORIENTATION = 0x0112


def gradient(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth picture with a few shapes: distinct per seed, stable under resizing and jpeg."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    arr = np.stack(
        [127 + 120 * np.sin(a * x / w * 3 + c), 127 + 120 * np.cos(b * y / h * 3), (x + y) / (w + h) * 255],
        -1,
    )
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        d.rectangle((x0, y0, x0 + w // 4, y0 + h // 4), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def face(size: int) -> Image.Image:
    """A drawn face that OpenCV's frontal-face cascade finds (checked in the tests)."""
    im = Image.new("RGB", (size, int(size * 1.25)), (60, 60, 60))
    d = ImageDraw.Draw(im)
    w, h = im.size
    d.ellipse((0.1 * w, 0.05 * h, 0.9 * w, 0.95 * h), fill=(220, 190, 170))
    for x0 in (0.22, 0.56):
        d.rectangle((x0 * w, 0.30 * h, (x0 + 0.22) * w, 0.34 * h), fill=(40, 30, 30))
    for x0 in (0.25, 0.58):
        d.ellipse((x0 * w, 0.38 * h, (x0 + 0.17) * w, 0.46 * h), fill=(20, 20, 20))
    d.polygon([(0.5 * w, 0.45 * h), (0.44 * w, 0.62 * h), (0.56 * w, 0.62 * h)], fill=(170, 140, 120))
    d.ellipse((0.35 * w, 0.70 * h, 0.65 * w, 0.78 * h), fill=(80, 40, 40))
    return im.filter(ImageFilter.GaussianBlur(size / 60))


def request(src: Path, out: Path, **kw: Any) -> PrepareRequest:
    return with_resolution(prepare_request({"source_dir": str(src), "output_dir": str(out), **kw}), 512)


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "raw"
    (src / "sub").mkdir(parents=True)
    gradient(800, 600, 1).save(src / "wide.jpg", quality=92)
    gradient(600, 900, 2).save(src / "tall.png")
    gradient(700, 700, 3).save(src / "sub" / "square.webp")
    gradient(300, 200, 4).save(src / "small.bmp")
    frames = [gradient(320, 240, 5), gradient(320, 240, 6)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    (src / "wide.txt").write_text("a landscape, hills\n", encoding="utf-8")
    (src / "notes.md").write_text("not a picture", encoding="utf-8")
    return src


def test_every_crop_mode_writes_exact_trainer_buckets(source: Path, tmp_path: Path) -> None:
    before = digest(source)
    buckets = bucket_set(512)
    for crop in ("focal", "center", "pad", "tiles"):
        out = tmp_path / f"out-{crop}"
        report = run_prepare(request(source, out, crop=crop))
        assert len(report.written) == 5, (crop, report.skipped)
        images, skipped = find_images(str(out))  # the trainer's own scan reads every one
        assert not skipped and len(images) == 5
        for path, size in images:
            assert size in buckets, (crop, path, size)
            # the trainer puts it in its own bucket and does not resize it
            assert nearest_bucket(size, buckets) == size
            assert place(size, size).resized == size
    assert digest(source) == before  # the source is never written


def test_tiles_cut_a_large_picture_into_overlapping_bucket_tiles(tmp_path: Path) -> None:
    img = gradient(2400, 1600, 7)
    tiles = fit(img, (512, 512), "tiles", overlap=0.25)
    assert len(tiles) > 1 and all(t.size == (512, 512) for t in tiles)
    assert (
        fit(gradient(600, 600, 7), (512, 512), "tiles") != []
        and len(fit(gradient(600, 600), (512, 512), "tiles")) == 1
    )


def test_pad_keeps_the_whole_picture_on_the_background(tmp_path: Path) -> None:
    img = Image.new("RGB", (400, 100), (200, 10, 10))
    (out,) = fit(img, (512, 512), "pad", background=(0, 255, 0))
    arr = np.asarray(out)
    assert out.size == (512, 512)
    assert tuple(arr[0, 0]) == (0, 255, 0) and tuple(arr[-1, -1]) == (0, 255, 0)
    red = np.nonzero((arr[..., 0] > 150) & (arr[..., 1] < 60))
    assert red[1].min() == 0 and red[1].max() == 511  # the full width of the picture is kept
    assert 120 <= red[0].max() - red[0].min() + 1 <= 130  # 100 * 512/400 rows high


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    stored = Image.new("RGB", (600, 400), (0, 0, 255))
    ImageDraw.Draw(stored).rectangle((0, 0, 299, 399), fill=(255, 0, 0))  # left half red as stored
    exif = stored.getexif()
    exif[EXIF_ORIENTATION] = 6  # shown rotated 90° clockwise: 400 wide, 600 tall, red on top
    stored.save(src / "rotated.jpg", exif=exif.tobytes(), quality=95)
    report = run_prepare(request(src, out, crop="center", buckets=True))
    (name,) = report.written
    with Image.open(out / name) as im:
        assert im.height > im.width  # portrait bucket
        arr = np.asarray(im.convert("RGB")).astype(int)
    assert arr[5, arr.shape[1] // 2, 0] > 200 and arr[-5, arr.shape[1] // 2, 2] > 200


def test_transparency_is_flattened_on_the_chosen_colour(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rgba = Image.new("RGBA", (512, 512), (255, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((0, 0, 255, 511), fill=(0, 0, 255, 255))
    rgba.save(src / "cutout.png")
    run_prepare(request(src, out, crop="center", background="#00ff00"))
    with Image.open(out / "cutout.png") as im:
        assert im.mode == "RGB"
        arr = np.asarray(im)
    assert tuple(arr[10, 10]) == (0, 0, 255) and tuple(arr[10, 500]) == (0, 255, 0)


def test_bad_files_are_listed_and_skipped_never_a_crash(source: Path, tmp_path: Path) -> None:
    (source / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.new("RGB", (1, 1)).save(source / "dot.png")
    (source / "empty.jpg").write_bytes(b"")
    good = Image.new("RGB", (400, 400))
    good.save(source / "cut.jpg")
    data = (source / "cut.jpg").read_bytes()
    (source / "cut.jpg").write_bytes(data[: len(data) // 3])  # truncated
    report = run_prepare(request(source, tmp_path / "out"))
    reasons = dict(s.split(": ", 1) for s in report.skipped)
    assert set(reasons) == {"corrupt.png", "dot.png", "empty.jpg", "cut.jpg"}
    assert "too small (1x1" in reasons["dot.png"]
    assert "damaged or cut short" in reasons["corrupt.png"] and "damaged" in reasons["cut.jpg"]
    assert reasons["empty.jpg"] == "not an image file"
    assert len(report.written) == 5
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_output_never_overwrites_the_source(source: Path, tmp_path: Path) -> None:
    before = digest(source)
    for out in (source, source / "prepared", tmp_path):  # the same, inside, around
        with pytest.raises(PrepareError, match="overlap"):
            run_prepare(request(source, out, overwrite=True))
    assert digest(source) == before


def test_a_folder_with_files_needs_overwrite(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(PrepareError, match="already holds files"):
        run_prepare(request(source, out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    report = run_prepare(request(source, out, overwrite=True))
    assert len(report.written) == 5 and (out / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_near_duplicates_are_reported_and_not_copied(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    original = gradient(900, 700, 11)
    original.save(src / "a.png")
    original.resize((450, 350), Image.Resampling.BICUBIC).save(src / "b_small.jpg", quality=70)
    gradient(900, 700, 12).save(src / "c_other.png")
    assert distance(phash(original), phash(gradient(900, 700, 12))) > 12
    report = run_prepare(request(src, tmp_path / "out"))
    assert report.duplicates == [{"kept": "a.png", "duplicates": ["b_small.jpg"], "copied": False}]
    assert sorted(report.written) == ["a.png", "c_other.png"]
    report = run_prepare(request(src, tmp_path / "out2", keep_duplicates=True))
    assert len(report.written) == 3 and report.duplicates[0]["copied"] is True
    report = run_prepare(request(src, tmp_path / "out3", dedupe=False))
    assert len(report.written) == 3 and report.duplicates == []


def test_duplicate_groups_keep_the_largest() -> None:
    groups = find_duplicates([0b1010, 0b1011, None, 0xFFFF0000], [10, 50, 0, 10], threshold=2)
    assert [(g.kept, g.dropped) for g in groups] == [(1, (0,))]


def test_flat_pictures_of_different_colours_are_not_duplicates() -> None:
    red, blue = Image.new("RGB", (64, 64), (230, 20, 20)), Image.new("RGB", (64, 64), (20, 20, 230))
    assert distance(phash(red), phash(blue)) <= THRESHOLD  # the hash alone cannot tell them apart
    colours = [mean_colour(red), mean_colour(blue), mean_colour(red)]
    groups = find_duplicates([phash(red), phash(blue), phash(red)], [1, 1, 1], colours=colours)
    assert [(g.kept, g.dropped) for g in groups] == [(0, (2,))]


def test_the_drawn_face_is_found_by_opencv() -> None:
    grey = np.asarray(face(120).convert("L"))
    assert FACES.faces(grey), "the test face must be detectable"


def test_focal_crop_keeps_the_face_inside(tmp_path: Path) -> None:
    scene = gradient(1600, 600, 21)
    scene.paste(face(220), (1330, 200))  # far right
    src = tmp_path / "src"
    src.mkdir()
    scene.save(src / "portrait.png")
    focal = run_prepare(request(src, tmp_path / "focal", crop="focal", buckets=False))
    center = run_prepare(request(src, tmp_path / "center", crop="center", buckets=False))
    for report, folder, expect in ((focal, "focal", True), (center, "center", False)):
        with Image.open(tmp_path / folder / report.written[0]) as im:
            assert im.size == (512, 512)
            found = FACES.faces(np.asarray(im.convert("L")))
        assert bool(found) is expect, folder
    top, left = focal_window(scene, (600, 600))
    assert left <= 1330 and left + 600 >= 1330 + 220


def test_focal_without_a_face_follows_the_detail(tmp_path: Path) -> None:
    flat = Image.new("RGB", (1200, 400), (128, 128, 128))
    ImageDraw.Draw(flat).rectangle((40, 100, 300, 300), fill=(250, 0, 0), outline=(0, 0, 0), width=9)
    top, left = focal_window(flat, (400, 400))
    assert left == 0  # the only detail is at the left edge


def test_flip_copies_are_mirrored_with_the_same_caption(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    img = Image.new("RGB", (512, 512), (0, 0, 255))
    ImageDraw.Draw(img).rectangle((0, 0, 100, 511), fill=(255, 0, 0))
    img.save(src / "left.png")
    (src / "left.txt").write_text("red stripe", encoding="utf-8")
    out = tmp_path / "out"
    report = run_prepare(request(src, out, flip_copies=True, caption_prefix="[name]"))
    assert sorted(report.written) == ["left-flip.png", "left.png"]
    with Image.open(out / "left-flip.png") as im:
        arr = np.asarray(im)
    assert arr[10, 500, 0] > 200 and arr[10, 10, 2] > 200
    assert (out / "left-flip.txt").read_text(encoding="utf-8") == "[name], red stripe\n"
    assert (out / "left.txt").read_text(encoding="utf-8") == "[name], red stripe\n"


@pytest.mark.parametrize(
    ("existing", "new", "prefix", "mode", "expected"),
    [
        ("a, b", "b, c", "", "append", "a, b, c"),
        ("a, b", "b, c", "", "overwrite", "b, c"),
        ("a, b", "", "", "overwrite", "a, b"),
        ("a, b", "b, c", "", "keep", "a, b"),
        ("", "b, c", "", "keep", "b, c"),
        ("a", "c", "[name]", "append", "[name], a, c"),
        ("[name], a", "c", "[name]", "append", "[name], a, c"),
        ("", "", "sks", "append", "sks"),
        ("", "", "", "append", ""),
    ],
)
def test_compose_caption(existing: str, new: str, prefix: str, mode: str, expected: str) -> None:
    assert compose_caption(existing, new, prefix, mode) == expected


def test_captioner_runs_in_batches_under_the_gpu_lock(source: Path, tmp_path: Path) -> None:
    held = threading.local()
    calls: list[int] = []

    @contextmanager
    def exclusive() -> Any:
        held.on = True
        yield
        held.on = False

    def caption(images: list[Image.Image]) -> list[str]:
        assert getattr(held, "on", False), "the captioner runs under the host's GPU lock"
        calls.append(len(images))
        return [f"tag{img.width}" for img in images]

    out = tmp_path / "out"
    report = run_prepare(
        request(source, out, caption_prefix="sks"), PrepareHooks(caption=caption, exclusive=exclusive)
    )
    assert sum(calls) == 5 and report.captions == 5
    assert (out / "wide.txt").read_text(encoding="utf-8").startswith("sks, a landscape, hills, tag")
    assert (out / "tall.txt").read_text(encoding="utf-8") == "sks, tag384\n"


def test_upscaler_is_used_for_small_pictures_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gradient(256, 256, 1).save(src / "small.png")
    gradient(1024, 1024, 2).save(src / "large.png")
    scales: list[float] = []

    def upscale(img: Image.Image, scale: float) -> Image.Image:
        scales.append(scale)
        return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)

    run_prepare(request(src, tmp_path / "out", crop="center"), PrepareHooks(upscale=upscale))
    assert scales == [2.0]


def test_stop_keeps_what_is_written_with_captions(source: Path, tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    stop = threading.Event()

    def tick(done: int, total: int, text: str) -> None:
        progress.append((done, total))
        if text.startswith("wrote") and sum(t.startswith("wrote") for t in [*texts, text]) >= 2:
            stop.set()
        texts.append(text)

    texts: list[str] = []
    out = tmp_path / "out"
    report = run_prepare(
        request(source, out, caption_prefix="sks"), PrepareHooks(progress=tick, should_stop=stop.is_set)
    )
    assert report.stopped and len(report.written) == 2
    assert all(
        (out / w).with_suffix(".txt").read_text(encoding="utf-8").startswith("sks") for w in report.written
    )
    assert "(stopped)" in report.summary()
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert (out / REPORT_FILE).is_file()
    assert len(list(out.glob("*.png"))) == 2  # the pictures queued after the stop were not written


def test_names_from_different_extensions_do_not_collide(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gradient(400, 400, 1).save(src / "cat.png")
    gradient(400, 400, 9).save(src / "cat.jpg")
    report = run_prepare(request(src, tmp_path / "out", image_format="jpg"))
    assert sorted(report.written) == ["cat-2.jpg", "cat.jpg"]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"crop": "squash"}, "crop must be one of focal, center, pad, tiles"),
        ({"background": "not-a-colour"}, "background 'not-a-colour' is not a colour"),
        ({"general_threshold": 1.5}, "general_threshold must be between 0 and 1.0"),
        ({"resolution": 100}, "resolution must be 0"),
        ({"min_size": 0}, "min_size must be at least 1"),
        ({"tile_overlap": 0.95}, "tile_overlap must be between 0 and 0.9"),
        ({"colour": "red"}, "unknown prepare option 'colour'"),
        ({"source_dir": ""}, "source_dir is needed"),
        ({"output_dir": "x\x00y"}, "output_dir contains a NUL"),
    ],
)
def test_bad_requests_name_the_field(given: dict[str, Any], message: str, tmp_path: Path) -> None:
    body = {"source_dir": str(tmp_path), "output_dir": str(tmp_path / "o"), **given}
    with pytest.raises(TIError, match=message.replace("(", r"\(").replace(".", r"\.")):
        prepare_request(body)
    assert not (tmp_path / "o").exists()


def test_empty_source_and_missing_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no pictures"):
        run_prepare(request(tmp_path / "empty", tmp_path / "out"))
    with pytest.raises(PrepareError, match="does not exist"):
        run_prepare(request(tmp_path / "missing", tmp_path / "out2"))


def test_a_failing_captioner_keeps_the_images_and_the_other_captions(source: Path, tmp_path: Path) -> None:
    calls = []

    def caption(images: list[Image.Image]) -> list[str]:
        calls.append(len(images))
        msg = "the web UI's deepbooru interrogator failed (URLError: no network)"
        raise PrepareError(msg)

    out = tmp_path / "out"
    report = run_prepare(request(source, out, caption_prefix="sks"), PrepareHooks(caption=caption))
    assert calls == [5] and len(report.written) == 5 and report.captions == 5
    assert (
        "deepbooru interrogator failed" in report.caption_error and "captioning stopped" in report.summary()
    )
    assert (out / "wide.txt").read_text(encoding="utf-8") == "sks, a landscape, hills\n"


def test_avif_without_a_plugin_says_what_to_install(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "photo.avif").write_bytes(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 64)
    gradient(300, 300).save(src / "ok.png")
    report = run_prepare(request(src, tmp_path / "out"))
    assert report.written == ["ok.png"]
    [reason] = report.skipped
    assert reason.startswith("photo.avif: ") and ("pillow-avif-plugin" in reason or "damaged" in reason)


def test_a_gif_gives_its_first_frame(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    frames = [Image.new("RGB", (256, 256), (250, 0, 0)), Image.new("RGB", (256, 256), (0, 0, 250))]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    run_prepare(request(src, tmp_path / "out", crop="center", resolution=256))
    with Image.open(tmp_path / "out" / "anim.png") as im:
        r, g, b = im.convert("RGB").getpixel((128, 128))
    assert r > 200 and b < 50


def test_sources_named_like_tiles_or_flips_do_not_collide(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (300, 300), (250, 0, 0)).save(src / "a.png")
    (src / "a.txt").write_text("red", encoding="utf-8")
    Image.new("RGB", (300, 300), (0, 0, 250)).save(src / "a-flip.png")
    (src / "a-flip.txt").write_text("blue", encoding="utf-8")
    out = tmp_path / "out"
    report = run_prepare(request(src, out, flip_copies=True, resolution=256, dedupe=False))
    assert len(report.written) == len(set(report.written)) == 4, report.written
    for name in report.written:
        with Image.open(out / name) as im:
            r, _, b = im.convert("RGB").getpixel((100, 100))
        caption = (out / name).with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption == ("red" if r > b else "blue"), (name, caption)


def test_the_captioner_sees_each_image_once_and_a_flip_takes_its_originals_text(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (300, 300), (250, 0, 0)).save(src / "x.png")
    Image.new("RGB", (300, 300), (0, 0, 250)).save(src / "x-flip.png")
    seen: list[str] = []

    def caption(images: list[Image.Image]) -> list[str]:
        out = []
        for im in images:
            r, _, b = im.getpixel((10, 10))
            out.append("red" if r > b else "blue")
        seen.extend(out)
        return out

    out = tmp_path / "out"
    report = run_prepare(
        request(src, out, flip_copies=True, resolution=256, dedupe=False), PrepareHooks(caption=caption)
    )
    assert sorted(seen) == ["blue", "red"]
    for name in report.written:
        with Image.open(out / name) as im:
            r, _, b = im.convert("RGB").getpixel((100, 100))
        assert (out / name).with_suffix(".txt").read_text(encoding="utf-8").strip() == (
            "red" if r > b else "blue"
        )


def test_a_picture_that_fails_is_skipped_not_the_run(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (12000, 64), (10, 200, 10)).save(src / "strip.png")  # a focal analysis one row high
    Image.new("RGB", (100, 100), (200, 10, 10)).save(src / "small.png")  # goes through the upscaler
    gradient(600, 600, 1).save(src / "ok.png")

    def upscale(img: Image.Image, scale: float) -> Image.Image:
        raise RuntimeError("CUDA out of memory")

    report = run_prepare(request(src, tmp_path / "plain", dedupe=False))
    assert sorted(report.written) == ["ok.png", "small.png", "strip.png"] and not report.skipped
    out = tmp_path / "out"
    report = run_prepare(request(src, out, dedupe=False), PrepareHooks(upscale=upscale))
    assert report.written == ["ok.png"]  # both others need enlarging
    assert report.skipped == [
        "small.png: could not be prepared (RuntimeError: CUDA out of memory)",
        "strip.png: could not be prepared (RuntimeError: CUDA out of memory)",
    ]
    assert (out / "ok.txt").is_file() and (out / REPORT_FILE).is_file()


def test_every_image_gets_a_caption_file_and_overwrite_leaves_no_stale_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gradient(900, 400, 1).save(src / "tabby cat.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tabby cat.txt").write_text("a dog", encoding="utf-8")  # from an earlier run
    (out / "keep.png").write_bytes(b"")  # the folder holds files: overwrite is needed
    report = run_prepare(request(src, out, crop="tiles", overwrite=True, resolution=256))
    assert len(report.written) > 1 and report.captions == len(report.written)
    for name in report.written:  # the trainer would read "tabby cat-tile2" from the name
        assert (out / name).with_suffix(".txt").read_text(encoding="utf-8") == "tabby cat\n"


def test_output_through_a_link_into_the_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gradient(300, 300, 1).save(src / "a.png")
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    before = digest(src)
    with pytest.raises(PrepareError, match="overlap"):
        run_prepare(request(src, link / "out"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(src, target_is_directory=True)
    (src / "sub").mkdir()
    gradient(300, 300, 2).save(src / "sub" / "b.png")
    with pytest.raises(PrepareError, match="leads into the source folder"):
        run_prepare(request(src, out, overwrite=True))
    assert digest(src) == before | {"sub/b.png": digest(src)["sub/b.png"]}


def test_progress_counts_the_captions_from_the_start(source: Path, tmp_path: Path) -> None:
    totals: list[int] = []
    run_prepare(
        request(source, tmp_path / "out", dedupe=False),
        PrepareHooks(progress=lambda d, t, _: totals.append(t), caption=lambda ims: ["x"] * len(ims)),
    )
    assert set(totals) == {15}  # 5 pictures read, written and captioned: the bar never goes back

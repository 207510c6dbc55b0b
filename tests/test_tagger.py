"""The WD tagger (lib_ti.prepare.tagger) against a tiny ONNX model of the real signature.

The model takes [N, 448, 448, 3] float32 BGR pixels in 0..255 like the WD v3 models and gives
sigmoid(mean BGR / 255 @ W + b) per tag, so each tag's score follows one colour channel and a red
picture and a blue one get different, predictable tags. Nothing is downloaded: fetching and installing
are replaced, and the hub download is tested with huggingface_hub's function replaced.
"""

from __future__ import annotations

import importlib
import io
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from lib_ti.prepare import tagger as tg
from lib_ti.prepare.errors import PrepareError, TaggerError
from lib_ti.prepare.tagger import (
    DEFAULT_MODEL,
    MODEL_FILES,
    WD_MODELS,
    Tag,
    TaggerArgs,
    TaggerDeps,
    WdTagger,
    ensure_onnxruntime,
    fetch_from_hub,
    format_tags,
    load_tags,
    model_dir,
    prepare_image,
)

onnx = pytest.importorskip("onnx")

# name, category, weight on the input's channels (B, G, R), bias
ROWS = [
    ("general", 9, (0, 0, 0), 2.0),
    ("sensitive", 9, (0, 0, 6), -2.0),
    ("questionable", 9, (0, 0, 0), -3.0),
    ("explicit", 9, (0, 0, 0), -4.0),
    ("1girl", 0, (0, 0, 0), 3.0),
    ("long_hair", 0, (0, 0, 6.5), -3.0),
    ("blue_sky", 0, (7, 0, 0), -3.0),
    ("^_^", 0, (0, 0, 5), -3.0),
    ("smile", 0, (0, 0, 0), -0.2),
    ("ganyu_(genshin_impact)", 4, (0, 0, 8), -4.0),
    ("hatsune_miku", 4, (8, 0, 0), -6.0),
    ("kirby", 4, (0, 0, 0), 0.0),
    ("green_hair", 0, (0, 7, 0), -3.0),
]
TAGS = [Tag(name, cat) for name, cat, _, _ in ROWS]
INDEX = {name: i for i, (name, *_) in enumerate(ROWS)}
W = np.array([w for _, _, w, _ in ROWS], dtype=np.float32).T  # [3, T]
B = np.array([b for *_, b in ROWS], dtype=np.float32)

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
RED_CAPTION = r"ganyu \(genshin impact\), long hair, 1girl, ^_^, smile"
BLUE_CAPTION = "hatsune miku, blue sky, 1girl, smile"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def expected_scores(features_bgr) -> np.ndarray:
    """The tiny model's output for mean BGR / 255 = ``features_bgr``."""
    return sigmoid(np.asarray(features_bgr, dtype=np.float64) @ W + B)


def build_model(
    path: Path, size: int = 448, *, n_tags: int = len(ROWS), nchw: bool = False, batch: int | str = "batch"
) -> Path:
    """An ONNX model of the WD v3 signature: input "input" [batch, size, size, 3], output [batch, n_tags]."""
    from onnx import TensorProto, helper, numpy_helper

    shape = [batch, 3, size, size] if nchw else [batch, size, size, 3]
    axis = 2 if nchw else 1  # the mean over rows, then over columns (float32 sums stay exact)
    weights, bias = np.zeros((3, n_tags), np.float32), np.zeros(n_tags, np.float32)
    k = min(n_tags, len(ROWS))
    weights[:, :k], bias[:k] = W[:, :k], B[:k]
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["rows"], axes=[axis], keepdims=0),
            helper.make_node("ReduceMean", ["rows"], ["mean"], axes=[axis], keepdims=0),
            helper.make_node("Mul", ["mean", "scale"], ["features"]),
            helper.make_node("MatMul", ["features", "weights"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["output"]),
        ],
        "tiny_wd_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, n_tags])],
        [
            numpy_helper.from_array(np.array([1 / 255], np.float32), "scale"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_csv(path: Path, rows=None) -> Path:
    rows = ROWS if rows is None else rows
    lines = ["tag_id,name,category,count"]
    lines += [f"{1000 + i},{name},{cat},{5000 - i}" for i, (name, cat, *_) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A folder holding the tiny model.onnx and its selected_tags.csv."""
    folder = tmp_path_factory.mktemp("tiny_wd")
    build_model(folder / "model.onnx")
    write_csv(folder / "selected_tags.csv")
    return folder


class Deps:
    """TaggerDeps whose fetch copies the tiny model and whose install returns the real onnxruntime."""

    def __init__(self, source: Path) -> None:
        self.source, self.fetched, self.installed = source, [], 0

    def fetch(self, repo, dest, report):
        self.fetched.append((repo, dest))
        report(f"copying {repo}")
        for name in MODEL_FILES:
            shutil.copy(self.source / name, dest / name)

    def install(self, report):
        self.installed += 1
        return onnxruntime

    def deps(self) -> TaggerDeps:
        return TaggerDeps(fetch=self.fetch, install=self.install)


@pytest.fixture(scope="module")
def wd(source, tmp_path_factory) -> WdTagger:
    return WdTagger.load(tmp_path_factory.mktemp("models"), TaggerArgs(), Deps(source).deps())


def solid(color, size=(64, 64), mode="RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def scores_for(features_bgr) -> np.ndarray:
    return expected_scores(features_bgr).astype(np.float32)


# --- format_tags (pure) --------------------------------------------------------------------------------


def test_captions_of_red_and_blue_scores():
    assert format_tags(scores_for((0, 0, 1)), TAGS, TaggerArgs()) == RED_CAPTION
    assert format_tags(scores_for((1, 0, 0)), TAGS, TaggerArgs()) == BLUE_CAPTION


def test_thresholds_per_category():
    red = scores_for((0, 0, 1))  # smile 0.45, kirby (character) 0.5, ganyu 0.98
    assert "smile" not in format_tags(red, TAGS, TaggerArgs(general_threshold=0.5))
    assert "kirby" not in format_tags(red, TAGS, TaggerArgs())
    low_characters = format_tags(red, TAGS, TaggerArgs(character_threshold=0.4))
    assert low_characters.startswith(r"ganyu \(genshin impact\), kirby, long hair")
    assert format_tags(red, TAGS, TaggerArgs(general_threshold=0.99, character_threshold=0.99)) == ""
    # the general threshold does not admit characters, nor the character threshold general tags
    assert "kirby" not in format_tags(red, TAGS, TaggerArgs(general_threshold=0.1))
    assert "smile" in format_tags(red, TAGS, TaggerArgs(character_threshold=0.99))


def test_characters_come_first_each_by_descending_score():
    scores = np.zeros(len(TAGS), np.float32)
    for name, s in {
        "1girl": 0.99,
        "smile": 0.7,
        "long_hair": 0.8,
        "kirby": 0.9,
        "hatsune_miku": 0.95,
    }.items():
        scores[INDEX[name]] = s
    assert format_tags(scores, TAGS, TaggerArgs()) == "hatsune miku, kirby, 1girl, long hair, smile"


def test_drop_list_matches_formatted_tags_case_insensitively():
    red = scores_for((0, 0, 1))
    args = TaggerArgs(drop_tags=" LONG HAIR ,ganyu \\(genshin impact\\), ^_^,,")
    assert format_tags(red, TAGS, args) == "1girl, smile"
    # the raw spelling and the unescaped one match too
    args = TaggerArgs(drop_tags="long_hair, Ganyu (Genshin Impact)")
    assert format_tags(red, TAGS, args) == "1girl, ^_^, smile"
    args = TaggerArgs(drop_tags="long hair", underscores_to_spaces=False)
    assert format_tags(red, TAGS, args) == r"ganyu_\(genshin_impact\), 1girl, ^_^, smile"


def test_underscores_to_spaces_keeps_kaomoji():
    red = scores_for((0, 0, 1))
    assert "^_^" in format_tags(red, TAGS, TaggerArgs()).split(", ")
    kept = format_tags(red, TAGS, TaggerArgs(underscores_to_spaces=False))
    assert kept == r"ganyu_\(genshin_impact\), long_hair, 1girl, ^_^, smile"
    assert tg.format_name("(o)_(o)", TaggerArgs()) == r"\(o\)_\(o\)"
    assert tg.format_name(">_<", TaggerArgs()) == ">_<"


def test_bracket_escaping_can_be_turned_off():
    red = scores_for((0, 0, 1))
    assert format_tags(red, TAGS, TaggerArgs(escape_brackets=False)).startswith("ganyu (genshin impact), ")


def test_max_tags_keeps_the_highest_scoring_in_caption_order():
    red = scores_for((0, 0, 1))  # ganyu .982, long hair .971, 1girl .953, ^_^ .881, smile .45
    assert format_tags(red, TAGS, TaggerArgs(max_tags=2)) == r"ganyu \(genshin impact\), long hair"
    assert (
        format_tags(red, TAGS, TaggerArgs(max_tags=4)) == r"ganyu \(genshin impact\), long hair, 1girl, ^_^"
    )
    assert format_tags(red, TAGS, TaggerArgs(max_tags=0)) == RED_CAPTION
    assert format_tags(red, TAGS, TaggerArgs(max_tags=99)) == RED_CAPTION
    scores = np.zeros(len(TAGS), np.float32)
    scores[[INDEX["1girl"], INDEX["kirby"]]] = (0.99, 0.9)  # the character is kept first, though lower
    assert format_tags(scores, TAGS, TaggerArgs(max_tags=2)) == "kirby, 1girl"
    # dropped tags take no place
    assert (
        format_tags(red, TAGS, TaggerArgs(max_tags=2, drop_tags="long hair"))
        == r"ganyu \(genshin impact\), 1girl"
    )


def test_include_rating_adds_the_top_rating_last():
    red, blue = scores_for((0, 0, 1)), scores_for((1, 0, 0))
    assert format_tags(red, TAGS, TaggerArgs(include_rating=True)) == RED_CAPTION + ", sensitive"
    assert format_tags(blue, TAGS, TaggerArgs(include_rating=True)) == BLUE_CAPTION + ", general"
    assert format_tags(red, TAGS, TaggerArgs(include_rating=True, max_tags=1)) == (
        r"ganyu \(genshin impact\), sensitive"
    )
    assert "sensitive" not in format_tags(red, TAGS, TaggerArgs())
    assert format_tags(red, TAGS, TaggerArgs(include_rating=True, drop_tags="sensitive")) == RED_CAPTION


def test_format_tags_refuses_a_score_count_that_does_not_match():
    with pytest.raises(TaggerError, match="12 scores for 13 tags"):
        format_tags(np.zeros(12), TAGS, TaggerArgs())


def test_args_are_checked():
    with pytest.raises(PrepareError, match="general threshold 1.5 is not between 0 and 1"):
        TaggerArgs(general_threshold=1.5)
    with pytest.raises(PrepareError, match="max tags -1"):
        TaggerArgs(max_tags=-1)


def test_constants():
    assert DEFAULT_MODEL == "SmilingWolf/wd-vit-tagger-v3" and DEFAULT_MODEL in WD_MODELS
    assert len(WD_MODELS) == 5 and all(
        m.startswith("SmilingWolf/wd-") and m.endswith("-tagger-v3") for m in WD_MODELS
    )
    assert MODEL_FILES == ("model.onnx", "selected_tags.csv")


# --- preprocessing -------------------------------------------------------------------------------------


def test_prepare_image_is_bgr_0_255_at_model_size():
    arr = prepare_image(solid(RED), 448)
    assert arr.shape == (448, 448, 3) and arr.dtype == np.float32 and arr.flags.c_contiguous
    assert np.array_equal(arr[200, 200], [0, 0, 255])  # red is channel 2


def test_prepare_image_pads_a_wide_picture_with_white_centred():
    arr = prepare_image(solid(RED, (100, 20)), 100)  # 100 wide, 20 high: 40 white rows above and below
    assert np.array_equal(arr[:40], np.full((40, 100, 3), 255.0))
    assert np.array_equal(arr[60:], np.full((40, 100, 3), 255.0))
    assert np.array_equal(arr[40:60], np.broadcast_to([0, 0, 255.0], (20, 100, 3)))
    tall = prepare_image(solid(BLUE, (10, 50)), 50)
    assert np.array_equal(tall[:, :20], np.full((50, 20, 3), 255.0))
    assert np.array_equal(tall[:, 20:30], np.broadcast_to([255.0, 0, 0], (50, 10, 3)))


def test_prepare_image_composites_transparency_over_white():
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.array_equal(prepare_image(clear, 8), np.full((8, 8, 3), 255.0))
    half = prepare_image(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), 8)
    assert np.allclose(half[0, 0], [127, 127, 255], atol=1)
    la = prepare_image(Image.new("LA", (8, 8), (0, 0)), 8)
    assert np.array_equal(la, np.full((8, 8, 3), 255.0))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1
    palette.putpixel((0, 0), 1)
    arr = prepare_image(palette, 8)
    assert np.array_equal(arr[0, 0], [255, 255, 255]) and np.array_equal(arr[4, 4], [0, 0, 255])


def test_prepare_image_reads_grey_and_16_bit_pictures():
    assert np.array_equal(prepare_image(Image.new("L", (4, 4), 100), 4), np.full((4, 4, 3), 100.0))
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.int32), "I")
    assert np.array_equal(prepare_image(sixteen, 4), np.full((4, 4, 3), 255.0))
    cmyk = prepare_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), 4)  # red in CMYK
    assert np.array_equal(cmyk[0, 0], [0, 0, 255])


def test_prepare_image_resizes_bicubic():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    want = np.asarray(img.resize((448, 448), Image.Resampling.BICUBIC), dtype=np.float32)[:, :, ::-1]
    assert np.array_equal(prepare_image(img, 448), want)


# --- the model -----------------------------------------------------------------------------------------


def test_red_and_blue_pictures_get_their_tags(wd):
    assert wd.size == 448 and wd.batch is None and wd.providers == ["CPUExecutionProvider"]
    assert len(wd.tags) == len(ROWS)
    assert wd.tag([solid(RED), solid(BLUE)], TaggerArgs()) == [RED_CAPTION, BLUE_CAPTION]


def test_red_lights_the_tag_tied_to_input_channel_2(wd):
    """The model reads BGR: a pure red RGB picture is [0, 0, 255] at the input."""
    red, blue = wd.scores([solid(RED), solid(BLUE)])
    assert W[2, INDEX["long_hair"]] > 0 and W[0, INDEX["blue_sky"]] > 0
    assert red[INDEX["long_hair"]] > 0.9 and red[INDEX["blue_sky"]] < 0.1
    assert blue[INDEX["blue_sky"]] > 0.9 and blue[INDEX["long_hair"]] < 0.1
    assert np.allclose(red, expected_scores((0, 0, 1)), atol=1e-5)


def test_batch_of_mixed_sizes_and_modes(wd):
    blue_rgba = Image.new("RGBA", (50, 50), (*BLUE, 255))
    clear = Image.new("RGBA", (40, 40), (*RED, 0))  # all transparent: white
    grey = Image.new("L", (20, 20), 0)  # black
    palette = solid(RED).convert("P")
    wide = solid(RED, (400, 100))  # 3/4 white after padding
    images = [solid(RED, (64, 64)), blue_rgba, clear, grey, palette, wide]
    batch = wd.scores(images)
    assert batch.shape == (len(images), len(ROWS)) and batch.dtype == np.float32
    for image, row in zip(images, batch):
        assert np.allclose(row, wd.scores([image])[0], atol=1e-6)
        want = expected_scores(prepare_image(image, 448).astype(np.float64).mean(axis=(0, 1)) / 255)
        assert np.allclose(row, want, atol=1e-5)
    assert np.allclose(batch[1], expected_scores((1, 0, 0)), atol=1e-5)
    assert np.allclose(batch[2], expected_scores((1, 1, 1)), atol=1e-5)
    assert np.allclose(batch[3], expected_scores((0, 0, 0)), atol=1e-5)
    assert np.allclose(batch[4], batch[0], atol=1e-6)
    assert np.allclose(batch[5], expected_scores((0.75, 0.75, 1)), atol=2e-3)
    captions = wd.tag(images, TaggerArgs())
    assert captions[0] == captions[4] == RED_CAPTION and captions[1] == BLUE_CAPTION
    assert captions[3] == "1girl, smile"
    assert wd.scores([]).shape == (0, len(ROWS))


def test_input_size_is_read_from_the_model(source, tmp_path):
    folder = model_dir(tmp_path, DEFAULT_MODEL)
    folder.mkdir(parents=True)
    build_model(folder / "model.onnx", size=32)
    shutil.copy(source / "selected_tags.csv", folder)
    small = WdTagger.load(tmp_path, TaggerArgs(), Deps(source).deps())
    assert small.size == 32
    args = TaggerArgs(general_threshold=0.9, character_threshold=0.9)  # features (1, 1/3, 1/3): white padding
    assert small.tag([solid(BLUE, (300, 200))], args) == ["blue sky, 1girl"]


def test_a_model_with_a_fixed_batch_size_runs_in_steps(source, tmp_path):
    """WD v2 models take one picture per run; the batch is split."""
    folder = model_dir(tmp_path, "SmilingWolf/wd-v1-4-moat-tagger-v2")
    folder.mkdir(parents=True)
    build_model(folder / "model.onnx", batch=1)
    shutil.copy(source / "selected_tags.csv", folder)
    one = WdTagger.load(tmp_path, TaggerArgs(model="SmilingWolf/wd-v1-4-moat-tagger-v2"), Deps(source).deps())
    assert one.batch == 1
    assert one.tag([solid(RED), solid(BLUE), solid(RED)], TaggerArgs()) == [
        RED_CAPTION,
        BLUE_CAPTION,
        RED_CAPTION,
    ]


def test_an_old_onnxruntime_is_named(source, tmp_path):
    def session(path, providers):
        raise RuntimeError("Opset 18 is under development and support for this is limited")

    old = types.SimpleNamespace(
        __version__="1.16.3",
        get_available_providers=lambda: ["CPUExecutionProvider"],
        InferenceSession=session,
    )
    deps = Deps(source)
    with pytest.raises(
        TaggerError, match=r"onnxruntime 1.16.3 cannot open .*model.onnx \(Opset 18 .*1.17 or newer"
    ):
        WdTagger.load(tmp_path, TaggerArgs(), TaggerDeps(fetch=deps.fetch, install=lambda report: old))
    old.__version__ = "1.17.0"
    with pytest.raises(TaggerError, match="is not a usable ONNX model"):
        WdTagger.load(tmp_path, TaggerArgs(), TaggerDeps(fetch=deps.fetch, install=lambda report: old))


def test_a_model_of_another_layout_is_refused(source, tmp_path):
    folder = model_dir(tmp_path, DEFAULT_MODEL)
    folder.mkdir(parents=True)
    build_model(folder / "model.onnx", nchw=True)
    shutil.copy(source / "selected_tags.csv", folder)
    with pytest.raises(TaggerError, match=r"is not a WD tagger model .*\[batch, side, side, 3\]"):
        WdTagger.load(tmp_path, TaggerArgs(), Deps(source).deps())


def test_cuda_is_asked_for_first_when_offered(source, tmp_path):
    asked = []

    def session(path, providers):
        asked.append(providers)
        return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    fake_ort = types.SimpleNamespace(
        get_available_providers=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
        InferenceSession=session,
    )
    deps = Deps(source)
    wd = WdTagger.load(tmp_path, TaggerArgs(), TaggerDeps(fetch=deps.fetch, install=lambda report: fake_ort))
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert wd.providers == ["CPUExecutionProvider"]  # what the session really runs on


# --- loading: files, deps, errors ------------------------------------------------------------------------


def test_fetch_runs_once_then_the_files_are_used(source, tmp_path):
    deps, messages = Deps(source), []
    wd = WdTagger.load(tmp_path, TaggerArgs(), deps.deps(), messages.append)
    folder = tmp_path / "SmilingWolf--wd-vit-tagger-v3"
    assert deps.fetched == [(DEFAULT_MODEL, folder)] and deps.installed == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(MODEL_FILES)
    assert messages[0] == f"copying {DEFAULT_MODEL}" and "loaded" in messages[-1]
    WdTagger.load(tmp_path, TaggerArgs(), deps.deps())
    assert len(deps.fetched) == 1 and deps.installed == 2
    assert wd.tag([solid(RED)], TaggerArgs()) == [RED_CAPTION]


def test_a_failing_fetch_gives_its_message(source, tmp_path):
    def fetch(repo, dest, report):
        raise TaggerError(f"could not download model.onnx of {repo} from the model hub (offline)")

    with pytest.raises(
        TaggerError, match=r"could not download model.onnx of SmilingWolf/wd-vit-tagger-v3 .*\(offline\)"
    ):
        WdTagger.load(tmp_path, TaggerArgs(), TaggerDeps(fetch=fetch, install=lambda r: onnxruntime))

    def fetch_nothing(repo, dest, report):
        shutil.copy(source / "selected_tags.csv", dest)

    with pytest.raises(TaggerError, match="model.onnx still missing from .*SmilingWolf--wd-vit-tagger-v3"):
        WdTagger.load(tmp_path, TaggerArgs(), TaggerDeps(fetch=fetch_nothing, install=lambda r: onnxruntime))


def test_a_corrupt_model_file_says_to_delete_the_folder(source, tmp_path):
    folder = model_dir(tmp_path, DEFAULT_MODEL)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"<html>rate limited</html>")
    shutil.copy(source / "selected_tags.csv", folder)
    with pytest.raises(TaggerError, match="model.onnx is not a usable ONNX model") as e:
        WdTagger.load(tmp_path, TaggerArgs(), Deps(source).deps())
    assert f"delete {folder} to download it again" in str(e.value)


def test_a_tag_list_of_another_length_is_refused(source, tmp_path):
    folder = model_dir(tmp_path, DEFAULT_MODEL)
    folder.mkdir(parents=True)
    shutil.copy(source / "model.onnx", folder)
    write_csv(folder / "selected_tags.csv", ROWS[:-1])
    with pytest.raises(TaggerError, match="lists 12 tags but the model beside it gives 13 scores") as e:
        WdTagger.load(tmp_path, TaggerArgs(), Deps(source).deps())
    assert "belong to different models" in str(e.value)


def test_load_tags(source, tmp_path):
    assert load_tags(source / "selected_tags.csv") == TAGS
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (source / "selected_tags.csv").read_bytes().replace(b"\n", b"\r\n"))
    assert load_tags(bom, expected=len(TAGS)) == TAGS
    cases = {
        "tag_id,name,count\n1,a,3\n": "no category column",
        "tag_id,title,kind,count\n1,a,0,3\n": "no name or category column",
        "tag_id,name,category,count\n1,a,zero,3\n": "line 2: category 'zero' is not a whole number",
        "tag_id,name,category,count\n1,a,0,3\n2,b\n": "line 3: category None is not a whole number",
        "tag_id,name,category,count\n1,,0,3\n": "line 2: the tag has no name",
        "tag_id,name,category,count\n": "lists no tags",
        "": "no name or category column",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"case{i}.csv"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(TaggerError, match=message):
            load_tags(path)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TaggerError, match="is not a readable tag list"):
        load_tags(binary)
    with pytest.raises(TaggerError, match="missing.csv is missing"):
        load_tags(tmp_path / "missing.csv")
    with pytest.raises(TaggerError, match="lists 13 tags but the model beside it gives 10 scores"):
        load_tags(source / "selected_tags.csv", expected=10)


def test_model_dir(tmp_path):
    assert model_dir(tmp_path, DEFAULT_MODEL) == tmp_path / "SmilingWolf--wd-vit-tagger-v3"
    assert model_dir(str(tmp_path), "me/my_tagger.v2") == tmp_path / "me--my_tagger.v2"
    for repo in WD_MODELS:
        assert model_dir(tmp_path, repo).parent == tmp_path
    bad = [
        "", "wd-vit-tagger-v3", "../x", "a/..", "a/../b", "..a/b", "a/b/c", "/etc/passwd", "a//b", "a/b/",
        "a\\b/c", "a/b\\..", "C:/x", "a/.hidden", "a--b/c", "a/b.", "a/b c", "a/b\n", "~/x", "a/b%2e",
    ]  # fmt: skip
    for repo in bad:
        with pytest.raises(TaggerError, match="is not a model hub repository id"):
            model_dir(tmp_path, repo)
    with pytest.raises(TaggerError, match="is not a model hub repository id"):
        WdTagger.load(tmp_path, TaggerArgs(model="../../etc"), TaggerDeps(fetch=None, install=None))  # type: ignore[arg-type]


# --- fetch_from_hub (offline: huggingface_hub's download and urllib replaced) -----------------------------


def test_fetch_from_hub_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def broken(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        Path(local_dir, filename).write_bytes(b"half a file")
        raise OSError("Connection reset by peer\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    dest, messages = tmp_path / "m", []
    with pytest.raises(TaggerError) as e:
        fetch_from_hub(DEFAULT_MODEL, dest, messages.append)
    assert str(e.value) == (
        f"could not download selected_tags.csv of {DEFAULT_MODEL} from the model hub (Connection reset by peer); "
        f"check the connection, or put model.onnx and selected_tags.csv into {dest} by hand"
    )
    assert messages == [f"downloading selected_tags.csv from the model hub ({DEFAULT_MODEL}) into {dest}"]
    assert list(dest.iterdir()) == []  # nothing named like a model file, no temporary left


def test_fetch_from_hub_moves_whole_files_into_place(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        Path(local_dir, ".cache").mkdir()  # what the real one leaves beside the file
        Path(local_dir, filename).write_text(f"{filename} of {repo_id}")
        return str(Path(local_dir, filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    dest, messages = tmp_path / "m", []
    dest.mkdir()
    (dest / "selected_tags.csv").write_text("kept")
    fetch_from_hub(DEFAULT_MODEL, dest, messages.append)
    assert calls == [(DEFAULT_MODEL, "model.onnx")]
    assert messages == [f"downloading model.onnx from the model hub ({DEFAULT_MODEL}) into {dest}"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(MODEL_FILES)
    assert (dest / "model.onnx").read_text() == f"model.onnx of {DEFAULT_MODEL}"
    assert (dest / "selected_tags.csv").read_text() == "kept"


class _Response(io.BytesIO):
    def __init__(self, data: bytes, length: int) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(length)}


def test_fetch_from_hub_without_huggingface_hub_uses_https(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    urls = []

    def urlopen(url, timeout):
        urls.append(url)
        return _Response(b"data", 4)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    fetch_from_hub(DEFAULT_MODEL, tmp_path, lambda m: None)
    assert urls == [
        f"https://huggingface.co/{DEFAULT_MODEL}/resolve/main/{name}"
        for name in ("selected_tags.csv", "model.onnx")
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(MODEL_FILES)

    (tmp_path / "model.onnx").unlink()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(b"da", 4))
    with pytest.raises(
        TaggerError, match=r"could not download model.onnx .*\(the connection closed after 2 of 4 bytes\)"
    ):
        fetch_from_hub(DEFAULT_MODEL, tmp_path, lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selected_tags.csv"]


# --- ensure_onnxruntime ------------------------------------------------------------------------------


def _no_pip(*args, **kwargs):
    pytest.fail("pip was run")


def test_ensure_onnxruntime_returns_the_module_without_pip(monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_pip)
    messages = []
    assert ensure_onnxruntime(messages.append) is onnxruntime
    assert messages == []


def test_ensure_onnxruntime_installs_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    monkeypatch.setattr(tg, "runtime_package", lambda: "onnxruntime")
    ran, pins = [], []

    def pip(cmd, **kwargs):
        ran.append(cmd)
        pins.extend(Path(cmd[-1]).read_text(encoding="utf-8").split())
        sys.modules["onnxruntime"] = onnxruntime  # installed
        return subprocess.CompletedProcess(cmd, 0, "Successfully installed onnxruntime", "")

    monkeypatch.setattr(subprocess, "run", pip)
    messages = []
    assert ensure_onnxruntime(messages.append) is onnxruntime
    [cmd] = ran
    assert cmd[:6] == [sys.executable, "-m", "pip", "install", "onnxruntime>=1.17", "-c"]
    # every package this Python has is pinned where it is (an install never changes numpy, protobuf...)
    import numpy

    assert f"numpy=={numpy.__version__}" in pins and not any(
        p.lower().startswith("onnxruntime==") for p in pins
    )
    assert not Path(cmd[-1]).exists()  # the constraints file is removed
    assert messages == [
        "installing onnxruntime into this web UI's Python (first use of the WD tagger; this takes a minute)"
    ]


def test_ensure_onnxruntime_failure_names_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(tg, "runtime_package", lambda: "onnxruntime-gpu")
    output = "\n".join(f"line {i}" for i in range(20))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", output))
    with pytest.raises(TaggerError) as e:
        ensure_onnxruntime(lambda m: None)
    text = str(e.value)
    assert text.startswith(
        "could not install onnxruntime-gpu without changing the web UI's own packages; run this by hand, then restart the web UI: "
    )
    assert "-m pip install 'onnxruntime-gpu>=1.17'" in text and sys.executable in text
    assert text.endswith("line 15\nline 16\nline 17\nline 18\nline 19") and "line 14" not in text

    def timeout(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, 1800)

    monkeypatch.setattr(subprocess, "run", timeout)
    with pytest.raises(TaggerError, match="timed out after 1800 seconds"):
        ensure_onnxruntime(lambda m: None)


def test_runtime_package(monkeypatch):
    torch = importlib.import_module("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert tg.runtime_package() == "onnxruntime-gpu"
    monkeypatch.setattr(sys, "platform", "win32")
    assert tg.runtime_package() == "onnxruntime-gpu"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tg.runtime_package() == "onnxruntime"
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(torch.version, "hip", "6.0", raising=False)  # ROCm torch: no CUDA for onnxruntime
    assert tg.runtime_package() == "onnxruntime"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tg.runtime_package() == "onnxruntime"


def test_a_broken_onnxruntime_folder_is_named(monkeypatch, tmp_path):
    """Uninstalling one of onnxruntime / onnxruntime-gpu when both were there leaves a folder without code."""
    empty = types.ModuleType("onnxruntime")
    empty.__path__ = [str(tmp_path / "onnxruntime")]
    monkeypatch.setitem(sys.modules, "onnxruntime", empty)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    monkeypatch.setattr(tg, "runtime_package", lambda: "onnxruntime")
    with pytest.raises(TaggerError, match="onnxruntime in this Python is broken") as e:
        ensure_onnxruntime(lambda m: None)
    assert str(tmp_path / "onnxruntime") in str(e.value)
    assert str(e.value).endswith("-m pip install --force-reinstall onnxruntime")


def test_a_model_without_tag_scores_is_refused(source, tmp_path):
    from onnx import TensorProto, helper

    folder = model_dir(tmp_path, DEFAULT_MODEL)
    folder.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["output"], axes=[1, 2, 3], keepdims=0)],
        "scalar_per_picture",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 448, 448, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    shutil.copy(source / "selected_tags.csv", folder)
    with pytest.raises(TaggerError, match=r"is not a WD tagger model .*\[batch, tags\] scores"):
        WdTagger.load(tmp_path, TaggerArgs(), Deps(source).deps())

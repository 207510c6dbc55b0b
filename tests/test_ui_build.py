"""The tab builds under the installed gradio (3.41 here; CI repeats this under 4.40) and is wired right.

The handlers run against a real Service over tiny real models (tests/train_models.py), so creating,
merging and training through the tab's handlers writes real files.
"""

from __future__ import annotations

import inspect as pyinspect
import threading
import time

import pytest
import torch
from PIL import Image

from lib_ti.embedding import Embedding
from lib_ti.hostinfo import HostInfo, HostServices
from lib_ti.io.formats import read_embedding, write_embedding
from lib_ti.service import Service

from . import train_models as tm

gr = pytest.importorskip("gradio")
pytestmark = pytest.mark.versioned


@pytest.fixture(scope="module")
def sd1_parts():
    return tm.make_parts("sd1")


@pytest.fixture
def folder(tmp_path):
    emb = tmp_path / "embeddings"
    emb.mkdir()
    write_embedding(Embedding("one", {"clip_l": torch.randn(2, 768) * 0.01}, step=3), emb / "one.safetensors")
    sub = emb / "sub"
    sub.mkdir()
    xl = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    write_embedding(Embedding("two", xl), sub / "two.safetensors")
    (emb / "one.preview.png").write_bytes(b"not listed")
    data = tmp_path / "data"
    data.mkdir()
    for i, c in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        Image.new("RGB", (64, 64), c).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"color {i}, plain")
    return emb


@pytest.fixture
def host(folder, tmp_path, sd1_parts):
    reloads: list[int] = []
    services = HostServices(
        embeddings_dir=lambda: str(folder),
        log_dir=lambda: str(tmp_path / "logs"),
        build_parts=lambda: sd1_parts,
        reload_embeddings=lambda: reloads.append(1),
        exclusive=threading.Lock,
    )
    service = Service(services)
    info = HostInfo(
        name="test",
        embeddings_dir=lambda: str(folder),
        embedding_status=lambda: {"one": "loaded", "two": "skipped"},
        reload_embeddings=lambda: reloads.append(1),
        service=lambda: service,
    )
    info.extra.update(reloads=reloads, service=service, data=str(tmp_path / "data"))
    return info


def events(blocks):
    """(fn, n_inputs, n_outputs) for every event, on gradio 3.x and 4.x."""
    out = []
    if isinstance(blocks.fns, dict):  # gradio 4
        for bf in blocks.fns.values():
            out.append((bf.fn, len(bf.inputs), len(bf.outputs)))
    else:  # gradio 3
        for bf, dep in zip(blocks.fns, blocks.dependencies):
            out.append((bf.fn, len(dep["inputs"]), len(dep["outputs"])))
    return out


def sample_args(host) -> dict[str, object]:
    data = host.extra["data"]
    return {
        "relpath": "one.safetensors",
        "current": "one.safetensors",
        "source": "one.safetensors",
        "a": "one.safetensors",
        "other": "sub/two.safetensors",
        "b": "sub/two.safetensors",
        "name": "wired",
        "fmt": "safetensors",
        "target_label": "same kind",
        "overwrite": False,
        "vectors": 2,
        "init_text": "a red car",
        "mode_label": "from the init text",
        "seed": -1,
        "expression": "'cat' * 0.5",
        "lr": "5e-3:2, 1e-3",
        "shape": "constant",
        "warmup": 0,
        "steps": 3,
        "template": "subject_filewords",
        "dataset": data,
        "embedding": "one",
        "form_kind": "sd1",
        "job_id": "",
        "task_id": "",
        # embeddings inside a LoRA file: none in this host's (empty) LoRA folder
        "file": None,
        "names": "",
        "new_name": "",
        "upload": str(host.embeddings_dir() + "/one.safetensors"),
        # the Prepare view's caption editor, on the training folder
        "folder": data,
        "output_dir": data,
        "find": "plain",
        "replace": "simple",
        "regex": False,
        "tag": "simple",
        "new_tag": "flat",
        "tags": "sks",
        "at_start": True,
        "table": [["0.png", "color 0, flat, sks"]],
    }


#: names a second handler would collide on (the same name saved twice)
PER_FUNCTION = {
    "MergeHandlers.save": {"name": "wired_merge"},
    "InspectHandlers.save_as": {"name": "wired_copy"},
}


def form_values(host, **over):
    from lib_ti.ui.train_view import FIELDS

    values = {
        "embedding": "one", "dataset_dir": host.extra["data"], "template": "subject_filewords", "resolution": 64,
        "buckets": True, "batch_size": 1, "grad_accum": 1, "lr": "5e-3", "steps": 3, "snapshot_every": 2,
        "preview_every": 0, "validation_every": 2, "preview_prompt": "", "norm_control": "soft",
        "lr_shape": "constant", "warmup_steps": 0, "flip": False, "shuffle_tags": False, "keep_tags": 0,
        "tag_dropout": 0.0, "repeats": 1, "latent_sampling": "deterministic", "min_snr_gamma": 0.0,
        "noise_offset": 0.0, "seed": 0, "resume": False, "cache_latents_on_disk": False, "train_encoders": "all",
    }  # fmt: skip
    values.update(over)
    return [values[f] for f in FIELDS]


def call(fn, args):
    result = fn(*args)
    if pyinspect.isgenerator(result):
        result = list(result)[-1]
    return result


def test_tab_builds_and_every_handler_matches_its_wiring(host):
    from lib_ti.ui.grid_view import FIELDS as GRID_FIELDS
    from lib_ti.ui.prepare_view import FIELDS as PREPARE_FIELDS
    from lib_ti.ui.tab import TAB_ID, TAB_TITLE, on_ui_tabs
    from lib_ti.ui.train_view import FIELDS

    [(blocks, title, elem_id)] = on_ui_tabs(host)
    assert (title, elem_id) == (TAB_TITLE, TAB_ID)
    handlers = [e for e in events(blocks) if e[0] is not None]
    names = {fn.__qualname__ for fn, _, _ in handlers}
    # the refresh button and opening the Train tab both list the embeddings (and load the recipe)
    assert [fn.__qualname__ for fn, _, _ in handlers].count("TrainHandlers.refresh") == 2
    assert names >= {
        "CreateHandlers.budget", "CreateHandlers.count_tokens", "CreateHandlers.create",
        "MergeHandlers.preview", "MergeHandlers.save",
        "TrainHandlers.refresh", "TrainHandlers.check_lr", "TrainHandlers.template_preview",
        "TrainHandlers.apply_recipe", "TrainHandlers.start", "TrainHandlers.watch", "TrainHandlers.stop",
        "TrainHandlers.current", "TrainHandlers.unfinished", "TrainHandlers.resume",
        "InspectHandlers.describe", "InspectHandlers.describe_upload", "InspectHandlers.refresh",
        "InspectHandlers.compare", "InspectHandlers.save_as",
        "PrepareHandlers.start", "PrepareHandlers.watch", "PrepareHandlers.stop", "PrepareHandlers.load",
        "PrepareHandlers.save_table", "PrepareHandlers.undo", "PrepareHandlers.replace",
        "PrepareHandlers.remove_tag", "PrepareHandlers.rename_tag", "PrepareHandlers.add_tags",
        "PrepareHandlers.sort_tags", "PrepareHandlers.output_folder", "PrepareHandlers.refresh",
        "InspectHandlers.remake", "GridHandlers.start", "GridHandlers.watch", "GridHandlers.stop",
        "GridHandlers.refresh", "InspectHandlers.bundles", "InspectHandlers.extract", "InspectHandlers.refresh_loras",
    }  # fmt: skip
    called = set()
    for fn, n_in, n_out in handlers:
        params = pyinspect.signature(fn).parameters
        if fn.__qualname__ == "PrepareHandlers.start":  # start(task_id, *form): its own test runs it
            assert n_in == 1 + len(PREPARE_FIELDS), (fn.__qualname__, n_in)
            continue
        if fn.__qualname__ == "GridHandlers.start":  # a host with txt2img runs it (test_grid_host)
            assert n_in == 1 + len(GRID_FIELDS), (fn.__qualname__, n_in)
            assert "offers no txt2img" in str(fn("", *[None] * len(GRID_FIELDS)))
            continue
        if any(p.kind is p.VAR_POSITIONAL for p in params.values()):  # start(task_id, *form)
            assert n_in == 1 + len(FIELDS), (fn.__qualname__, n_in)
            args = ["", *form_values(host, embedding="one")]
        else:
            assert len(params) == n_in, (fn.__qualname__, list(params), n_in)
            sample = dict(sample_args(host), **PER_FUNCTION.get(fn.__qualname__, {}))
            args = [sample[p] for p in params]
        result = call(fn, args)
        if n_out > 1:
            assert isinstance(result, tuple), fn.__qualname__
            assert len(result) == n_out, (fn.__qualname__, len(result), n_out)
        if fn.__qualname__ == "TrainHandlers.resume":  # nothing to resume here (or a run is busy)
            assert "no unfinished run" in str(result) or "busy" in str(result), result
        elif fn.__qualname__ == "InspectHandlers.remake":  # the sample file is not made from a recipe
            assert "comparison grid" in str(result), result
        else:
            assert "⚠" not in str(result), (fn.__qualname__, result)
        called.add(fn.__qualname__)
    assert "TrainHandlers.start" in called
    job = host.extra["service"].jobs.current
    job.thread.join(timeout=120)
    # the Stop handler (job id "" = whatever runs) may have been called before the job ended
    assert job.status.state in ("finished", "stopped"), job.status.message


def test_ids_are_prefixed(host):
    from lib_ti.ui.tab import build_tab

    blocks = build_tab(host)
    ids = [b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) > 60
    assert all(i.startswith("ti_") for i in ids), [i for i in ids if not i.startswith("ti_")]
    assert len(ids) == len(set(ids)), "element ids must be unique"


def test_tab_builds_without_a_service(folder):
    """A host where training is unavailable still gets Inspect; the other views say why."""
    from lib_ti.ui.create_view import CreateHandlers
    from lib_ti.ui.tab import build_tab

    info = HostInfo(name="bare", embeddings_dir=lambda: str(folder))
    build_tab(info)
    result, card = CreateHandlers(info).create("x", 1, "zeros", "", -1, False)
    assert "not available on this host" in result and card == ""


def test_create_view(host, folder):
    from lib_ti.ui.create_view import CreateHandlers

    h = CreateHandlers(host)
    assert "2 of the 75 tokens" in h.budget(2)
    assert "overfit" in h.budget(20)
    counts = h.count_tokens("a red sports car", 2)
    assert "clip_l: 4 token(s)" in counts and "vector i starts as token" in counts
    assert "used more than once" in h.count_tokens("car", 3)
    result, card = h.create("mycar", 2, "from the init text", "a red sports car", -1, False)
    assert "Created mycar.safetensors" in result, result
    assert "nearest tokens" in card and "`mycar`" in card
    emb = read_embedding(folder / "mycar.safetensors")
    assert (emb.kind, emb.num_vectors) == ("sd1", 2)
    assert host.extra["reloads"]
    result, _ = h.create("mycar", 1, "zeros", "", -1, False)
    assert "already exists" in result
    result, _ = h.create("../evil", 1, "zeros", "", -1, False)
    assert "⚠" in result and not (folder.parent / "evil.safetensors").exists()
    result, _ = h.create("empty", 1, "from the init text", "   ", -1, False)
    assert "⚠" in result and not (folder / "empty.safetensors").exists()


def test_merge_view(host, folder):
    from lib_ti.ui.merge_view import EXAMPLES, MergeHandlers, syntax_help

    h = MergeHandlers(host)
    for expr in EXAMPLES:  # the examples shown above the box all work
        summary, rows = h.preview(expr)
        assert "⚠" not in summary, (expr, summary)
        assert rows and rows[0][0] == "clip_l"
    summary, rows = h.preview("'one' , 'cat'")
    assert "3 vector(s)" in summary
    summary, rows = h.preview("'cat' * ")
    assert "column" in summary and rows == []
    result, card = h.save("avg('cat', 'dog')", "catdog", False)
    assert "Saved catdog.safetensors" in result, result
    assert read_embedding(folder / "catdog.safetensors").metadata["merge_expression"] == "avg('cat', 'dog')"
    result, _ = h.save("'cat'", "catdog", False)
    assert "already exists" in result
    assert "## Strings" in syntax_help()


def test_train_view_form_helpers(host):
    from lib_ti.training.options import OPTION_FIELDS
    from lib_ti.ui.train_view import TrainHandlers

    h = TrainHandlers(host)
    update, note, kind, *recipe = h.refresh(None, "sd1")
    assert update["choices"] == ["one"]  # "two" is SDXL: not for the loaded SD1 model
    assert update["value"] == "one" and "SD1" in note and kind == "sd1"
    assert recipe == [gr.update()] * len(recipe)  # the form already holds the SD1 recipe
    assert "until step 100" in h.check_lr("5e-3:100, 1e-3", "constant", 0, 1000)
    bad = h.check_lr("5e-3:abc", "constant", 0, 1000)
    assert "⚠" in bad and "column" in bad
    assert "warmup" in h.check_lr("5e-3", "constant", 2000, 1000)
    prompts = h.template_preview("subject_filewords", host.extra["data"], "one")
    assert "color 0, plain" in prompts and "one" in prompts
    assert "⚠" in h.template_preview("subject_filewords", "/no/such/folder", "one")
    assert "⚠" in h.template_preview("nope", host.extra["data"], "one")
    *values, kind, note = h.apply_recipe()
    recipe = dict(zip(OPTION_FIELDS, values))
    assert (recipe["lr"], recipe["steps"], recipe["flip"], kind) == (
        "5e-3",
        2000,
        True,
        "sd1",
    ) and "SD1" in note
    assert "subject_filewords" in h.templates() and "style" in h.templates()


def test_train_view_runs_follows_and_stops_a_job(host, folder, tmp_path):
    from lib_ti.ui.train_view import TrainHandlers

    h = TrainHandlers(host)
    job_id, status = h.start("task(ti-test)", *form_values(host, steps=4))
    assert job_id, status
    frames = list(h.watch(job_id))
    final_status, plot, gallery = frames[-1]
    assert "finished" in final_status and "step **4/4**" in final_status
    assert "<polyline" in plot and "validation loss" in plot
    assert gallery == []
    assert read_embedding(folder / "one.safetensors").step == 4  # a new run counts from 0
    assert h.current() == job_id
    # a bad form is refused at once with the reason; the watch keeps that message
    job2, status = h.start("", *form_values(host, dataset_dir=str(tmp_path / "nothing")))
    assert job2 == "" and "does not exist" in status
    assert [f[0] for f in h.watch(job2)] == [gr.update()]
    # stop: a long run stops after its current step and keeps what it learned
    job3, _ = h.start("", *form_values(host, steps=500, validation_every=0, snapshot_every=0))
    busy, status = h.start("", *form_values(host))
    assert busy == "" and "busy" in status
    deadline = time.time() + 60
    while host.extra["service"].jobs.get(job3).status.step < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert "Stopping" in h.stop(job3)
    final = list(h.watch(job3))[-1][0]
    assert "stopped" in final
    stopped_at = read_embedding(folder / "one.safetensors").step
    assert 1 <= stopped_at < 500
    assert h.stop(job3) == "No training is running."
    # the unfinished run is shown with a Resume button that continues it with its own settings
    note, button = h.unfinished("one")
    assert f"Unfinished run of one**: stopped at step **{stopped_at}/500**" in note and "lr `5e-3`" in note
    assert button["visible"] is True
    assert h.unfinished("two") == ("", gr.update(visible=False))
    job4, status = h.resume("", "one")
    assert job4, status
    job = host.extra["service"].jobs.get(job4)
    while job.status.step <= stopped_at and job.status.running:
        time.sleep(0.05)
    h.stop(job4)
    list(h.watch(job4))
    assert job.status.resumed_from == stopped_at and job.status.losses[0][0] == stopped_at + 1
    assert "no unfinished run" in h.resume("", "two")[1]


def test_train_request_from_the_form(host):
    from lib_ti.errors import TIError
    from lib_ti.ui.train_view import TrainHandlers

    h = TrainHandlers(host)
    req = h.request(*form_values(host, train_encoders="clip_l", resolution=128.0, seed=7.0, lr=" 1e-3 "))
    assert (req.train_encoders, req.resolution, req.seed, req.lr) == ("clip_l", 128, 7, "1e-3")
    with pytest.raises(TIError, match="form values"):
        h.request("one")
    with pytest.raises(TIError, match="norm_control must be one of soft, hard, off"):
        h.request(*form_values(host, norm_control="bogus"))
    with pytest.raises(TIError, match="steps must be a whole number"):
        h.request(*form_values(host, steps=2.5))


def test_inspect_view(host, folder):
    from lib_ti.ui.inspect_view import InspectHandlers

    h = InspectHandlers(host)
    assert h.choices() == ["one.safetensors", "sub/two.safetensors"]
    md, rows, _meta, status, nearest, plot = h.describe("one.safetensors")
    assert "SD1" in md and "loaded by the web UI" in md
    assert len(rows) == 2 and rows[0][0] == "clip_l"
    assert status == ""
    assert len(nearest) == 2 and nearest[0][0] == "clip_l" and "(" in nearest[0][2]
    assert plot.count("<rect") == 2
    md, rows, *_ = h.describe("sub/two.safetensors")
    assert "skipped" in md and len(rows) == 4
    *_, err, _, _ = h.describe("../../etc/passwd")
    assert "outside the embeddings folder" in err
    rows, note = h.compare("one.safetensors", "sub/two.safetensors")
    assert "clip_l only" in note and rows[-1][0] == "overall"
    _, _, msg = h.save_as(
        "sub/two.safetensors", None, "two_l", "pt", "SD1 (CLIP-L half of an SDXL embedding)", False
    )
    assert "Saved" in msg, msg
    assert read_embedding(folder / "two_l.pt").kind == "sd1"
    assert host.extra["reloads"] == [1]
    _, _, msg = h.save_as("one.safetensors", None, "../x", "safetensors", "same kind", False)
    assert "'..'" in msg or "path separator" in msg
    _, _, msg = h.save_as("one.safetensors", None, "two_l", "pt", "same kind", False)
    assert "already exists" in msg
    assert h.refresh("gone", None)[2].startswith("3 file(s)")


def test_upload_path_shapes():
    from lib_ti.ui.compat import uploaded_path

    class Temp:
        name = "/tmp/x.pt"

    assert uploaded_path("/tmp/a.pt") == "/tmp/a.pt"
    assert uploaded_path(Temp()) == "/tmp/x.pt"
    assert uploaded_path({"path": "/tmp/b.pt"}) == "/tmp/b.pt"
    assert uploaded_path(None) is None


def test_plots():
    from lib_ti.ui.plots import bar_plot, line_plot, smooth

    assert "no data yet" in line_plot({"loss": []})
    svg = line_plot({"loss": [(1, 0.5), (2, float("nan")), (3, 0.25)], "val": [(2, 0.4)]}, "loss")
    assert svg.count("<polyline") == 1 and svg.count("<circle") == 1
    assert "nan" not in svg.lower()
    big = line_plot({"loss": [(i, 1 / (i + 1)) for i in range(5000)]})
    assert big.count(" ") < 2000  # thinned to a few hundred points
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    assert bar_plot({"clip_l": [0.5, 1.0], "clip_g": [2.0]}).count("<rect") == 3
    assert "<script" not in line_plot({"<script>": [(0, 1), (1, 2)]})


def test_settings_and_recipes():
    from lib_ti.settings import SETTINGS
    from lib_ti.training.options import OPTION_FIELDS
    from lib_ti.training.recipes import recipe_for

    keys = [s.key for s in SETTINGS]
    assert all(k.startswith("ti_") for k in keys) and len(keys) == len(set(keys))
    assert {
        "ti_dataset_dir",
        "ti_templates_dir",
        "ti_pt_copy",
        "ti_preview_format",
        "ti_default_steps",
    } <= set(keys)
    assert recipe_for("sdxl")["lr"] == "3e-3" and recipe_for("sd1")["lr"] == "5e-3"
    assert recipe_for("sdxl_refiner") == recipe_for("sdxl") and recipe_for("sd2")["resolution"] == 768
    assert list(recipe_for("sd1")) == list(OPTION_FIELDS)
    opts = {"ti_default_steps": 500, "ti_default_lr": " 1e-3 ", "ti_default_batch_size": "bad"}
    r = recipe_for("sd1", lambda k, d: opts.get(k, d))
    assert (r["steps"], r["lr"], r["batch_size"]) == (500, "1e-3", recipe_for("sd1")["batch_size"])


def test_user_templates_and_pt_copy(host, tmp_path):
    from lib_ti.create import CreateArgs

    service = host.extra["service"]
    user = tmp_path / "mytemplates"
    user.mkdir()
    (user / "mine.txt").write_text("a drawing of [name]\n")
    (user / "subject.txt").write_text("shadowed by the shipped one [name]\n")
    opts = {"ti_templates_dir": str(user), "ti_pt_copy": True}
    service.host.get_option = lambda k, d: opts.get(k, d)
    assert service.templates()["mine"] == user / "mine.txt"
    assert service.templates()["subject"].parent.name == "templates"
    service.create(CreateArgs("copyme", 1, "zeros"))
    job = service.start_training(
        {
            "embedding": "copyme",
            "dataset_dir": host.extra["data"],
            "template": "mine",
            "steps": 1,
            "resolution": 64,
            "validation_every": 0,
            "batch_size": 1,
            "grad_accum": 1,
        },
        background=False,
    )
    assert job.status.state == "finished", job.status.message
    assert read_embedding(tmp_path / "logs" / "copyme" / "copyme.pt").step == 1
    assert not (tmp_path / "embeddings" / "copyme.pt").exists()  # one file per name in the folder


def test_prepare_view_prepares_and_edits_captions(host, tmp_path):
    from lib_ti.ui.prepare_view import DEFAULTS, FIELDS, LANCZOS, PrepareHandlers

    src, out = tmp_path / "raw", tmp_path / "set"
    src.mkdir()
    for i, c in enumerate([(200, 40, 40), (40, 200, 40)]):
        Image.new("RGB", (300 + 100 * i, 300), c).save(src / f"p{i}.jpg")
    Image.new("RGB", (1, 1)).save(src / "dot.png")
    h = PrepareHandlers(host)
    names, note = h.captioners()
    assert names == ["none", "wd14"] and "no BLIP and DeepBooru" in note
    assert h.upscalers() == [LANCZOS]
    form = {f: getattr(DEFAULTS, f) for f in FIELDS}
    # what the components hand over: floats for whole numbers, the Lanczos label for ""
    form.update(source_dir=str(src), output_dir=str(out), upscaler=LANCZOS, resolution=256.0, min_size=64.0,
                caption_prefix="[name], photo")  # fmt: skip
    job_id, status = h.start("", *[form[f] for f in FIELDS])
    assert job_id.startswith("prepare-"), status
    status, report = list(h.watch(job_id))[-1]
    assert "✔ done" in status and "2 image(s) and 2 caption(s)" in status, status
    assert "dot.png" in report and "too small" in report and "256x256" in report
    gallery, table, tags, message = h.load(str(out))
    assert (
        len(gallery) == 2
        and table[0] == ["p0.png", "[name], photo"]
        and tags == [["[name]", 2], ["photo", 2]]
    )
    table[1][1] = "[name], photo, green"
    *_, message = h.save_table(str(out), table)
    assert (
        "saved the caption of p1.png" in message
        and (out / "p1.txt").read_text(encoding="utf-8").strip() == "[name], photo, green"
    )
    _, _, tags, message = h.rename_tag(str(out), "photo", "picture")
    assert ["picture", 2] in tags, message
    _, table, _, _ = h.undo(str(out))
    assert table[1] == ["p1.png", "[name], photo, green"]
    *_, message = h.remove_tag(str(out), "")
    assert "⚠" in message
    assert h.output_folder(f" {out} ") == str(out)
    # a second run into the same folder refuses without overwrite, naming the folder
    _, status = h.start("", *[form[f] for f in FIELDS])
    assert "already holds files" in status


def test_inspect_shows_sd3_counts_and_converts_it_for_the_web_ui(host, folder):
    from safetensors.torch import save_file

    from lib_ti.ui.inspect_view import CONVERT_TARGETS, InspectHandlers

    # OneTrainer's SD3 embedding (StableDiffusion3EmbeddingSaver): clip_l, clip_g, t5 and *_out tensors
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280), "t5": torch.randn(5, 4096),
               "clip_l_out": torch.randn(2, 768)}, str(folder / "ot-sd3.safetensors"))  # fmt: skip
    h = InspectHandlers(host)
    md = h.describe("ot-sd3.safetensors")[0]
    assert "SD3" in md and "clip_l 2, clip_g 2, t5 5" in md and "as an SDXL embedding" in md, md
    label = next(k for k, v in CONVERT_TARGETS.items() if v == "sdxl")
    _, _, note = h.save_as("ot-sd3.safetensors", None, "from-sd3", "safetensors", label, False)
    assert "Saved" in note, note
    assert read_embedding(folder / "from-sd3.safetensors").kind == "sdxl"

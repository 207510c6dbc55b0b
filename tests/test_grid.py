"""Comparison grids: rows × columns through a host's txt2img, the checkpoint put back, bad requests.

The host here is a small stand-in for its txt2img and checkpoint list (the real web UIs are driven in
tests/host/test_grid_host.py); everything else (requests, rows, files, drawing, the job) is the product's.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lib_ti.embedding import Embedding
from lib_ti.errors import TIError
from lib_ti.grid import layout
from lib_ti.grid.jobs import snapshots
from lib_ti.grid.options import MAX_CELLS, grid_request
from lib_ti.hostinfo import Generation, HostServices
from lib_ti.io.formats import write_embedding
from lib_ti.names import checkpoint_label
from lib_ti.service import Service
from lib_ti.training.jobs import BusyError

CKPTS = {"tiny-sd1.safetensors [aaaa1111]": "sd1", "other/tiny-two.ckpt [bbbb2222]": "sd1",
         "tiny-sdxl.safetensors [cccc3333]": "sdxl"}  # fmt: skip
SIZE = 64


class FakeHost:
    """The host's side: checkpoints, a load, txt2img (a picture coloured by seed and checkpoint)."""

    def __init__(self) -> None:
        self.loaded = "tiny-sd1.safetensors [aaaa1111]"
        #: what the dropdown shows (the user may change it while the grid runs)
        self.selected = self.loaded
        self.loads: list[str] = []
        self.made: list[Generation] = []
        self.loaded_at_generation: list[str] = []
        self.jobs_counted: list[int] = []
        self.interrupt_after = -1
        self.fail_load = ""

    def load(self, title: str) -> None:
        self.loads.append(title)
        if title == self.fail_load:
            msg = "out of memory"
            raise RuntimeError(msg)
        self.loaded = title

    def generate(self, what: Generation) -> tuple[Image.Image, str]:
        self.made.append(what)
        self.loaded_at_generation.append(self.loaded)
        shade = (what.seed * 7 + len(self.loaded)) % 256
        info = f"{what.prompt}\nSteps: {what.steps}, Seed: {what.seed}, CFG scale: {what.cfg_scale:g}, Model: {self.loaded}"
        return Image.new("RGB", (SIZE, SIZE), (shade, 0, 0)), info

    def interrupted(self) -> bool:
        return 0 <= self.interrupt_after <= len(self.made)


@pytest.fixture
def env(tmp_path):
    fake = FakeHost()
    emb_dir, log_dir = tmp_path / "embeddings", tmp_path / "log"
    emb_dir.mkdir()
    host = HostServices(
        embeddings_dir=lambda: str(emb_dir),
        log_dir=lambda: str(log_dir),
        build_parts=lambda: SimpleNamespace(kind=CKPTS[fake.loaded]),  # type: ignore[arg-type,return-value]
        reload_embeddings=lambda: None,
        checkpoints=lambda: list(CKPTS),
        checkpoint=lambda: fake.loaded,
        selected_checkpoint=lambda: fake.selected,
        load_checkpoint=fake.load,
        generate=fake.generate,
        interrupted=fake.interrupted,
        progress_jobs=fake.jobs_counted.append,
        embedding_status=lambda: {"cat": "loaded", "dog": "loaded"},
    )
    for name, seed in (("cat", 1), ("dog", 2)):
        vec = torch.randn(2, 768, generator=torch.Generator().manual_seed(seed))
        write_embedding(Embedding(name, {"clip_l": vec}), emb_dir / f"{name}.safetensors")
    return Service(host), fake, emb_dir, log_dir


def run(service: Service, **given):
    job = service.grid.start(given, background=False)
    return job.status


def test_two_by_two_grid_has_the_cells_labels_and_infotexts_and_restores_the_checkpoint(env):
    service, fake, _, _ = env
    st = run(service, embeddings=["cat", "dog"], checkpoints=["other/tiny-two.ckpt [bbbb2222]", "tiny-sd1.safetensors [aaaa1111]"],
             prompts=["a photo of [name]"], seeds=[5], steps=3)  # fmt: skip
    assert st.state == "finished", st.message
    assert [(g.prompt, fake.loaded_at_generation[i]) for i, g in enumerate(fake.made)] == [
        ("a photo of cat", "other/tiny-two.ckpt [bbbb2222]"),
        ("a photo of dog", "other/tiny-two.ckpt [bbbb2222]"),
        ("a photo of cat", "tiny-sd1.safetensors [aaaa1111]"),
        ("a photo of dog", "tiny-sd1.safetensors [aaaa1111]"),
    ]
    assert all(g.steps == 3 and g.seed == 5 and g.width == 512 and not g.embeddings for g in fake.made)
    # one load per column, and the one loaded before is loaded at the end
    assert fake.loads == ["other/tiny-two.ckpt [bbbb2222]", "tiny-sd1.safetensors [aaaa1111]"]
    assert fake.loaded == "tiny-sd1.safetensors [aaaa1111]"
    assert fake.jobs_counted == [4]
    meta = layout.read_metadata(st.file)
    assert meta["rows"] == ["cat", "dog"]
    assert meta["columns"] == ["tiny-two", "tiny-sd1"]
    assert [(c["row"], c["column"]) for c in meta["cells"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "Model: other/tiny-two.ckpt" in meta["cells"][0]["infotext"]
    with Image.open(st.file) as im:
        assert im.info["parameters"] == meta["cells"][0]["infotext"]
        top = im.height - 2 * SIZE
        assert top > 0
        assert im.width - 2 * SIZE >= 160  # the row labels' column
        # the cell at row 1, column 0 holds that image's pixels
        label_w = im.width - 2 * SIZE
        assert im.convert("RGB").getpixel((label_w + 5, top + SIZE + 5)) == (
            (5 * 7 + len("other/tiny-two.ckpt [bbbb2222]")) % 256,
            0,
            0,
        )
    assert st.report["images"] == 4


def test_columns_by_cfg_on_the_loaded_checkpoint_and_rows_by_prompt_and_seed(env):
    service, fake, _, _ = env
    st = run(
        service,
        embeddings=["cat"],
        cfg_scales="4, 9",
        prompts="[name] on a hill\n[name] in snow",
        seeds="1,2",
    )
    meta = layout.read_metadata(st.file)
    assert meta["columns"] == ["CFG 4", "CFG 9"]
    assert meta["rows"] == [
        "cat · prompt 1 · seed 1",
        "cat · prompt 1 · seed 2",
        "cat · prompt 2 · seed 1",
        "cat · prompt 2 · seed 2",
    ]
    assert len(fake.made) == 8 and fake.loads == []
    assert sorted({g.cfg_scale for g in fake.made}) == [4.0, 9.0]


def test_snapshot_rows_are_registered_for_their_images_only(env, tmp_path):
    service, fake, _, log_dir = env
    (log_dir / "cat").mkdir(parents=True)
    for step in (10, 20, 30):
        vec = torch.full((2, 768), float(step))
        write_embedding(
            Embedding("cat", {"clip_l": vec}, step=step), log_dir / "cat" / f"cat-{step}.safetensors"
        )
    (log_dir / "cat" / "cat-x.safetensors").write_bytes(b"not a snapshot name")
    assert list(snapshots(log_dir, "cat")) == [10, 20, 30]
    st = run(service, run="cat", run_steps=[10, 30])
    assert layout.read_metadata(st.file)["rows"] == ["cat-10", "cat-30"]
    assert [list(g.embeddings) for g in fake.made] == [["cat-10"], ["cat-30"]]
    assert float(fake.made[1].embeddings["cat-30"].vectors["clip_l"][0, 0]) == 30.0
    assert fake.made[0].prompt == "a photo of cat-10"


def test_an_sd1_embedding_on_an_sdxl_checkpoint_is_a_note_not_an_image(env):
    service, fake, _, _ = env
    st = run(
        service,
        embeddings=["cat"],
        checkpoints=["tiny-sdxl.safetensors [cccc3333]", "tiny-sd1.safetensors [aaaa1111]"],
    )
    meta = layout.read_metadata(st.file)
    assert "SD1 embedding: not usable on this SDXL checkpoint" in meta["cells"][0]["note"]
    assert meta["cells"][1]["infotext"] and not meta["cells"][1]["note"]
    assert len(fake.made) == 1
    assert fake.loaded == "tiny-sd1.safetensors [aaaa1111]"


def test_a_checkpoint_that_does_not_load_spoils_its_column_only(env):
    service, fake, _, _ = env
    fake.fail_load = "other/tiny-two.ckpt [bbbb2222]"
    st = run(
        service,
        embeddings=["cat", "dog"],
        checkpoints=["other/tiny-two.ckpt [bbbb2222]", "tiny-sd1.safetensors [aaaa1111]"],
    )
    meta = layout.read_metadata(st.file)
    assert [c["note"].startswith("tiny-two did not load: out of memory") for c in meta["cells"]] == [
        True,
        False,
        True,
        False,
    ]
    assert st.state == "finished" and st.report["images"] == 2


def test_interrupt_mid_grid_keeps_the_cells_made_and_puts_the_checkpoint_back(env):
    service, fake, _, _ = env
    fake.interrupt_after = 2  # Interrupt pressed while the second image is made
    st = run(
        service,
        embeddings=["cat", "dog"],
        checkpoints=["other/tiny-two.ckpt [bbbb2222]", "tiny-sd1.safetensors [aaaa1111]"],
    )
    assert st.state == "stopped"
    # the host hands back the half-denoised second image: not shown as a result
    assert len(fake.made) == 2 and st.report["images"] == 1
    meta = layout.read_metadata(st.file)
    assert [c["note"] for c in meta["cells"]] == ["", "interrupted"]
    assert fake.loaded == "tiny-sd1.safetensors [aaaa1111]"
    assert fake.loads[-1] == "tiny-sd1.safetensors [aaaa1111]"
    with Image.open(st.file) as im:  # the grid is written whole, the cells not made grey
        rgb = im.convert("RGB")
        label_w, top = im.width - 2 * SIZE, im.height - 2 * SIZE
        assert rgb.getpixel((label_w + 5, top + 5)) != layout.EMPTY
        assert rgb.getpixel((label_w + 5, top + SIZE + 5)) == layout.EMPTY
        assert rgb.getpixel((label_w + SIZE + 5, top + SIZE + 5)) == layout.EMPTY


def test_the_stop_button_stops_between_cells(env):
    service, fake, _, _ = env
    original = fake.generate

    def generate(what):
        service.jobs.current.stop()  # the Stop button while the first image is made
        return original(what)

    service.host.generate = generate
    job = service.grid.start({"embeddings": ["cat", "dog"]}, background=False)
    assert job.status.state == "stopped"
    assert len(fake.made) == 1 and job.status.report["images"] == 1


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"embeddings": ["cat"], "prompts": ["a photo of cat"]}, "has no [name]"),
        ({"embeddings": ["cat"], "checkpoints": ["nope"]}, "checkpoint 'nope' is not one of this web UI's"),
        ({"embeddings": ["cat"], "colour": 1}, "unknown grid option 'colour'"),
        ({}, "choose the rows"),
        ({"embeddings": ["cat"], "run_steps": [5]}, "give run"),
        ({"run": "cat"}, "no snapshots of a training run 'cat'"),
        ({"embeddings": ["../cat"]}, "embedding name"),
        ({"embeddings": ["ghost"]}, "ghost"),
        ({"embeddings": ["cat"], "width": 100}, "multiple of 8"),
        ({"embeddings": ["cat"], "steps": 0}, "steps must be between 1 and 150"),
        ({"embeddings": ["cat"], "cfg_scales": "7, nan"}, "cfg_scales"),
        ({"embeddings": ["cat"], "seeds": [1.5]}, "whole number"),
        ({"embeddings": ["cat"], "seeds": []}, "seeds needs at least one value"),
        ({"embeddings": ["cat"], "checkpoints": "a,a"}, "each checkpoint once"),
        ({"embeddings": ["cat", "dog"] * 12, "seeds": list(range(7))}, f"at most {MAX_CELLS}"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(env, given, message):
    service, fake, _, _ = env
    with pytest.raises(TIError, match=message.replace("[", r"\[").replace("(", r"\(")):
        service.grid.start(given, background=False)
    assert fake.made == [] and fake.loads == []


def test_a_grid_waits_for_nothing_while_training_runs_it_is_refused(env):
    service, _, _, _ = env
    gate = threading.Event()
    service.jobs.submit("train", "busy", lambda job: gate.wait(5))
    try:
        with pytest.raises(BusyError, match="busy: train"):
            service.grid.start({"embeddings": ["cat"]}, background=False)
    finally:
        gate.set()


def test_a_host_without_txt2img_says_so(env):
    service, _, _, _ = env
    service.host.generate = None
    with pytest.raises(TIError, match="offers no txt2img"):
        service.grid.start({"embeddings": ["cat"]}, background=False)


@pytest.mark.parametrize(
    ("title", "short"),
    [("tiny-sd1.safetensors [c77d740a47]", "tiny-sd1"), ("sub/dir/My Model.ckpt", "My Model"),
     ("win\\dir\\x.safetensors [ab12]", "x"), ("plain", "plain")],
)  # fmt: skip
def test_checkpoint_label_names(title, short):
    assert checkpoint_label(title) == short


def test_request_text_forms_match_the_list_forms():
    a = grid_request(
        {"embeddings": "cat, dog", "cfg_scales": "5,7.5", "seeds": "1, 2", "prompts": "[name]\n a [name] "}
    )
    b = grid_request(
        {
            "embeddings": ["cat", "dog"],
            "cfg_scales": [5, 7.5],
            "seeds": [1, 2],
            "prompts": ["[name]", "a [name]"],
        }
    )
    assert a == b


@pytest.fixture
def client(env):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    service = env[0]
    app = FastAPI()
    add_routes(app, service)
    return TestClient(app)


@pytest.mark.versioned
def test_rest_grid_starts_a_job_and_the_status_names_the_file(env, client):
    _, fake, _, _ = env
    opts = client.get("/ti/v1/grid").json()
    assert opts["checkpoints"] == list(CKPTS) and opts["loaded"] == fake.loaded
    assert opts["defaults"]["prompts"] == ["a photo of [name]"]
    r = client.post(
        "/ti/v1/grid", json={"embeddings": ["cat", "dog"], "cfg_scales": "5, 8", "seeds": [3], "steps": 4}
    )
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    st = client.get(f"/ti/v1/jobs/{job}").json()
    for _ in range(200):
        if st["state"] not in ("queued", "running"):
            break
        threading.Event().wait(0.05)
        st = client.get(f"/ti/v1/jobs/{job}").json()
    assert st["state"] == "done", st
    assert st["kind"] == "grid" and st["steps"] == 4 and st["step"] == 4
    assert layout.read_metadata(st["file"])["columns"] == ["CFG 5", "CFG 8"]
    assert "grid" in client.get("/ti/v1/schema").json()["bodies"]


@pytest.mark.versioned
@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"embeddings": ["cat"], "colour": "red"}, 422, "unknown field 'colour'"),
        ({"embeddings": ["cat"], "steps": "many"}, 422, "steps"),
        ({"embeddings": ["cat"], "seeds": [1.5]}, 400, "whole number"),
        ({"embeddings": ["cat"], "prompts": ["no placeholder"]}, 400, "[name]"),
        ({"embeddings": ["cat"], "checkpoints": ["missing.safetensors"]}, 400, "not one of this web UI's"),
    ],
)
def test_rest_grid_refuses_bad_bodies_by_name(env, client, body, status, text):
    r = client.post("/ti/v1/grid", json=body)
    assert (r.status_code, text in r.json()["detail"]) == (status, True), r.text
    assert env[1].made == []


def test_a_checkpoint_named_before_the_host_hashed_it_is_still_found(env):
    service, fake, _, _ = env
    st = run(service, embeddings=["cat"], checkpoints=["other/tiny-two.ckpt"])
    assert st.state == "finished" and fake.loads[0] == "other/tiny-two.ckpt [bbbb2222]"
    # a loaded title that gained its hash meanwhile is the same checkpoint: no reload at the end
    assert fake.loads == ["other/tiny-two.ckpt [bbbb2222]", "tiny-sd1.safetensors [aaaa1111]"]


def test_a_checkpoint_picked_in_the_dropdown_during_the_grid_is_the_one_loaded_after(env):
    service, fake, _, _ = env
    original = fake.generate

    def generate(what):
        if len(fake.made) == 0:
            fake.selected = "tiny-sdxl.safetensors [cccc3333]"  # the user picks another meanwhile
        return original(what)

    service.host.generate = generate
    st = run(
        service,
        embeddings=["cat"],
        checkpoints=["other/tiny-two.ckpt [bbbb2222]", "tiny-sd1.safetensors [aaaa1111]"],
    )
    assert st.state == "finished"
    assert fake.loads[-1] == "tiny-sdxl.safetensors [cccc3333]" and fake.loaded == fake.selected


def test_reading_the_model_is_refused_while_a_grid_switches_checkpoints(env):
    from lib_ti.create import CreateArgs

    service, fake, emb_dir, _ = env
    recipe = {"init_mode": "text", "init_text": "a cat"}
    write_embedding(
        Embedding("kit", {"clip_l": torch.zeros(1, 768)}, step=0, metadata=recipe),
        emb_dir / "kit.safetensors",
    )
    gate, entered = threading.Event(), threading.Event()
    original = fake.generate

    def generate(what):
        entered.set()
        gate.wait(10)
        return original(what)

    service.host.generate = generate
    job = service.grid.start({"embeddings": ["cat"]})
    try:
        assert entered.wait(10)
        for call in (lambda: service.create(CreateArgs("new", 1, "text", "cat")),
                     lambda: service.merge("'cat'", "m"), lambda: service.remake("kit"),
                     service.token_tables):  # fmt: skip
            with pytest.raises(BusyError, match="comparison grid"):
                call()
    finally:
        gate.set()
        job.thread.join(10)


def test_an_embedding_the_host_did_not_load_is_a_note(env):
    service, fake, _, _ = env
    service.host.embedding_status = lambda: {"dog": "loaded"}
    st = run(service, embeddings=["cat", "dog"])
    notes = [c["note"] for c in layout.read_metadata(st.file)["cells"]]
    assert notes[0].startswith("the web UI has not loaded this embedding") and notes[1] == ""
    assert len(fake.made) == 1


@pytest.mark.versioned
@pytest.mark.parametrize("body", [{"embeddings": ["cat"], "steps": 20.7}, {"embeddings": ["cat"], "steps": True},
                                  {"embeddings": ["cat"], "negative_prompt": 5}])  # fmt: skip
def test_rest_grid_scalars_are_strict_on_both_pydantic_versions(env, client, body):
    r = client.post("/ti/v1/grid", json=body)
    assert r.status_code == 422, r.text
    assert env[1].made == []

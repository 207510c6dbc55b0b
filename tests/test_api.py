"""The REST API is strict and trains the tab's recipe (runs under pydantic 1 and 2: -m versioned)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from lib_ti.create import CreateArgs
from lib_ti.hostinfo import HostServices
from lib_ti.service import Service

from . import train_models as tm

pytestmark = pytest.mark.versioned
fastapi = pytest.importorskip("fastapi")


def make_service(tmp_path: Path, kind: str, options: dict | None = None) -> tuple[Service, Path]:
    emb_dir, data = tmp_path / f"emb-{kind}", tmp_path / "data"
    emb_dir.mkdir()
    data.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(data / "0.png")
    parts = tm.make_parts(kind)
    opts = options or {}
    service = Service(
        HostServices(
            embeddings_dir=lambda: str(emb_dir),
            log_dir=lambda: str(tmp_path / "logs"),
            build_parts=lambda: parts,
            reload_embeddings=lambda: None,
            exclusive=threading.Lock,
            get_option=lambda k, d: opts.get(k, d),
        )
    )
    service.create(CreateArgs("subject", 1, "zeros"))
    return service, data


@pytest.fixture
def api(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    service, data = make_service(tmp_path, "sd1")
    app = FastAPI()
    add_routes(app, service)
    return TestClient(app), service, data


def test_unknown_fields_and_bad_values_are_422_naming_them(api):
    client, service, data = api
    body = {"embedding": "subject", "dataset_dir": str(data)}
    r = client.post("/ti/v1/train", json={**body, "learning_rte": "1e-3"})
    assert r.status_code == 422
    assert (
        "unknown field 'learning_rte'" in r.json()["detail"]
        and "did you mean 'learning_rate'" in r.json()["detail"]
    )
    r = client.post("/ti/v1/train", json={**body, "lr_shape": "bogus"})
    assert r.status_code == 422
    assert r.json()["detail"] == "lr_shape must be one of constant, cosine, linear (got 'bogus')"
    r = client.post("/ti/v1/train", json={**body, "steps": "many"})
    assert r.status_code == 422 and r.json()["detail"].startswith("steps:")
    r = client.post("/ti/v1/train", json={**body, "width": 512})
    assert r.status_code == 422 and "width needs height" in r.json()["detail"]
    r = client.post("/ti/v1/train", json={"dataset_dir": str(data)})
    assert r.status_code == 422 and "embedding" in r.json()["detail"]
    r = client.post("/ti/v1/create", json={"name": "x", "init_mode": "noise"})
    assert r.status_code == 422 and "init_mode must be one of text, zeros, random" in r.json()["detail"]
    r = client.post("/ti/v1/create", json={"name": "x", "vector": 2})
    assert r.status_code == 422 and "did you mean 'vectors'" in r.json()["detail"]
    r = client.post("/ti/v1/merge", json={"expression": "'cat'", "name": "y", "format": "png"})
    assert r.status_code == 422 and "format must be one of safetensors, pt" in r.json()["detail"]
    r = client.post("/ti/v1/train", json={**body, "steps": 0})
    assert r.status_code == 400 and r.json()["detail"] == "steps must be at least 1 (got 0)"
    assert service.jobs.current is None  # nothing started


def test_aliases_one_name_per_field(api):
    client, service, data = api
    base = {"embedding": "subject", "steps": 1, "validation_every": 0, "resolution": 64}
    r = client.post("/ti/v1/train", json={**base, "dataset": str(data), "dataset_dir": "/elsewhere"})
    assert r.status_code == 400
    assert r.json()["detail"] == (
        "'dataset' and 'dataset_dir' name the same field with different values; send only 'dataset_dir'"
    )
    r = client.post(
        "/ti/v1/train", json={**base, "dataset_dir": str(data), "lr": "1e-3", "learning_rate": "2e-3"}
    )
    assert r.status_code == 400 and "'learning_rate' and 'lr'" in r.json()["detail"]
    r = client.post(
        "/ti/v1/train", json={**base, "dataset_dir": str(data), "width": 64, "height": 64, "resolution": 128}
    )
    assert r.status_code == 400 and "resolution" in r.json()["detail"]
    # the old names alone (and the same value twice) are accepted, as their fields
    req = service.train_request(
        {
            "embedding": "subject",
            "dataset_dir": str(data),
            "lr": "2e-3",
            "snapshot_every": 7,
            "resolution": 64,
        }
    )
    from lib_ti.ui.api import train_fields

    old = {"embedding": "subject", "dataset": str(data), "learning_rate": 0.002, "lr": 0.002, "save_every": 7,
           "width": 64, "height": 64}  # fmt: skip
    given = train_fields(old)
    assert float(given.pop("lr")) == 0.002
    assert service.train_request({**given, "lr": "2e-3"}) == req


def test_schema_route_lists_every_body_and_field(api):
    from lib_ti.training.options import FIELD_TYPES

    client, *_ = api
    schema = client.get("/ti/v1/schema").json()
    assert set(schema["bodies"]) == {
        "create",
        "merge",
        "evaluate",
        "inspect",
        "train",
        "prepare",
        "captions",
        "grid",
        "remake",
        "bundles",
    }
    train = schema["bodies"]["train"]
    assert set(train["properties"]) == set(FIELD_TYPES)
    assert set(train["required"]) == {"embedding"}  # dataset_dir may be left out when resuming
    assert schema["aliases"]["train"]["learning_rate"] == "lr"
    prepare = schema["bodies"]["prepare"]
    assert (
        set(prepare["required"]) == {"source_dir", "output_dir"} and "tagger_model" in prepare["properties"]
    )
    assert "bogus" not in str(train["properties"]["lr_shape"]) and "cosine" in str(
        train["properties"]["lr_shape"]
    )


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_api_defaults_are_the_tabs_recipe(tmp_path, kind):
    """An API request with only the required fields trains exactly what the tab's untouched form does
    once it shows the loaded model (the tab asks for everything; the API leaves the rest to the recipe)."""
    gr = pytest.importorskip("gradio")
    from lib_ti.hostinfo import HostInfo
    from lib_ti.training.recipes import recipe_for
    from lib_ti.ui import train_view
    from lib_ti.ui.api import train_fields

    opts = {"ti_default_steps": 321}
    service, data = make_service(tmp_path, kind, opts)
    info = HostInfo(name="test", embeddings_dir=service.host.embeddings_dir, service=lambda: service,
                    get_option=lambda k, d: opts.get(k, d))  # fmt: skip
    with gr.Blocks():
        h = train_view.build(info)
    form = {name: comp.value for name, comp in h.components.items()}
    # the user opens the tab and picks an embedding (the refresh button): the form takes the model's recipe
    update, _note, form_kind, *recipe = h.refresh(None, "sd1")
    for name, value in zip(train_view.OPTION_FIELDS, recipe):
        if value != gr.update():
            form[name] = value
    form.update(embedding=update["value"], dataset_dir=str(data))
    from_tab = h.request(*[form[f] for f in train_view.FIELDS])
    from_api = service.train_request(train_fields({"embedding": "subject", "dataset": str(data)}))
    assert from_tab == from_api
    assert form_kind == kind and from_api.steps == 321
    expected = recipe_for(kind)
    assert (from_api.lr, from_api.batch_size, from_api.grad_accum, from_api.flip, from_api.latent_sampling) == (
        expected["lr"], expected["batch_size"], expected["grad_accum"], True, "random")  # fmt: skip
    assert from_api.lr == ("3e-3" if kind == "sdxl" else "5e-3")


def test_merge_preview_reads_unchanged_files_once(tmp_path, monkeypatch):
    import os

    import lib_ti.service as service_module

    service, _ = make_service(tmp_path, "sd1")
    service.create(CreateArgs("other", 2, "text", "a dog"))
    reads: list[str] = []
    real = service_module.read_embedding

    def counting(path, *a, **kw):
        reads.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(service_module, "read_embedding", counting)
    first = service.preview_merge("'subject' + 'other'")
    assert sorted(reads) == ["other.safetensors", "subject.safetensors"]
    reads.clear()
    for text in ("'subject'", "'other' * 2", "'cat' + 'other'"):
        service.preview_merge(text)
    assert reads == []  # unchanged files are not read again
    ctx = service.merge_context(service.host.build_parts())
    assert service.merge_context(service.host.build_parts()) is ctx  # nor the context rebuilt
    path = Path(service.host.embeddings_dir()) / "other.safetensors"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = service.preview_merge("'subject' + 'other'")
    assert reads == ["other.safetensors"]
    assert again.vectors.keys() == first.vectors.keys()
    assert service.merge_context(service.host.build_parts()) is not ctx


def test_evaluate_route_saves_nothing(api):
    client, service, _ = api
    before = sorted(p.name for p in service.folder().iterdir())
    r = client.post("/ti/v1/evaluate", json={"expression": "'cat' + 'dog'", "nearest": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "sd1" and out["vectors"] == 1
    assert len(out["norms"]["clip_l"]) == 1 and out["norms"]["clip_l"][0] > 0
    assert len(out["nearest"]["clip_l"][0]) == 2
    assert sorted(p.name for p in service.folder().iterdir()) == before
    r = client.post("/ti/v1/evaluate", json={"expression": "'cat' +"})
    assert r.status_code == 400 and "column 7" in r.json()["detail"]
    r = client.post("/ti/v1/evaluate", json={"expresion": "'cat'"})
    assert r.status_code == 422 and "did you mean 'expression'" in r.json()["detail"]
    r = client.post("/ti/v1/evaluate", json={"expression": "'cat'", "nearest": 1000})
    assert r.status_code == 400 and "nearest must be 0 to 50" in r.json()["detail"]


def test_numbers_json_cannot_hold_and_text_that_is_not_unicode_are_4xx_naming_the_field(api):
    client, _, data = api
    r = client.post("/ti/v1/evaluate", content=b'{"expression": "\'cat\'", "nearest": ' + b"9" * 5000 + b"}")
    assert r.status_code == 400
    assert r.json()["detail"] == "the body is not valid JSON: it holds a number with too many digits"
    # beyond a float's range (pydantic 1 raised OverflowError on a float field)
    body = {"embedding": "subject", "dataset_dir": str(data), "tag_dropout": 10**400}
    r = client.post("/ti/v1/train", content=json.dumps(body))
    assert r.status_code == 422
    assert r.json()["detail"] == "tag_dropout is too large a number (the limit is ±1.8e+308)"
    # JSON's \ud800 escapes make lone surrogates: no file name or answer can hold one
    r = client.post("/ti/v1/evaluate", content=b'{"expression": "\'cat\' + \\ud800"}')
    assert r.status_code == 422
    assert (
        r.json()["detail"]
        == "expression contains '\\ud800', half of a UTF-16 surrogate pair, which is not text"
    )
    r = client.post("/ti/v1/create", content=b'{"name": "x\\udcff"}')
    assert r.status_code == 422 and r.json()["detail"].startswith("name contains '\\udcff', half of")
    r = client.post("/ti/v1/create", content=b'{"name": "x", "\\ud800": 1}')
    assert r.status_code == 422 and r.json()["detail"].startswith("a field name contains '\\ud800'")


def test_width_and_height_beyond_the_largest_resolution_are_422(api):
    client, _, data = api
    body = {"embedding": "subject", "dataset_dir": str(data)}
    r = client.post("/ti/v1/train", content=json.dumps({**body, "width": 1e308, "height": 1e308}))
    assert r.status_code == 422 and r.json()["detail"] == "width x height must be at most 4096 x 4096 pixels"
    r = client.post("/ti/v1/train", content=json.dumps({**body, "width": float("inf"), "height": 512}))
    assert r.status_code == 422 and r.json()["detail"] == "width and height must be whole numbers"


def test_inspect_nearest_is_bounded_like_evaluate(api):
    client, *_ = api
    r = client.post("/ti/v1/inspect", json={"name": "subject", "nearest": 100_000})
    assert r.status_code == 400 and r.json()["detail"] == "nearest must be 0 to 50 (got 100000)"
    r = client.post("/ti/v1/inspect", json={"name": "subject", "nearest": 2})
    assert r.status_code == 200 and len(r.json()["nearest"]["clip_l"][0]) == 2


def test_older_names_are_suggested_only_on_train(api):
    client, *_ = api
    r = client.post("/ti/v1/evaluate", json={"expression": "'cat'", "dataset": "x"})
    assert r.status_code == 422
    assert r.json()["detail"] == "unknown field 'dataset'; the fields are: expression, nearest"


def test_training_bounds_name_the_field(api):
    client, service, data = api
    body = {"embedding": "subject", "dataset_dir": str(data), "resolution": 64, "validation_every": 0}
    cases = [
        ({"steps": 10**7}, "steps must be at most 1000000 (got 10000000)"),
        ({"resolution": 10**9}, "resolution must be at most 4096 (got 1000000000)"),
        ({"repeats": 5000}, "repeats must be at most 1000 (got 5000)"),
        ({"seed": 2**63}, "seed must be at most 9223372036854775807 (got 9223372036854775808)"),
        ({"seed": -1}, "seed must not be negative (got -1)"),
        ({"noise_offset": float("inf")}, "noise_offset must be a finite number (got inf)"),
        ({"min_snr_gamma": float("nan")}, "min_snr_gamma must be a finite number (got nan)"),
        ({"dataset_dir": "x\x00y"}, "dataset_dir contains a NUL character, which no path can hold"),
        ({"dataset_dir": "a" * 300}, "dataset_dir has a name of 300 bytes ('" + "a" * 48 + "…'); file and folder names here are at most 255"),
    ]  # fmt: skip
    for given, detail in cases:
        r = client.post("/ti/v1/train", content=json.dumps({**body, **given}))
        assert (r.status_code, r.json()["detail"]) == (400, detail), given
    assert service.jobs.current is None


def test_coerce_takes_any_size_of_whole_number_and_no_infinity():
    from lib_ti.errors import TIError
    from lib_ti.training.options import coerce

    assert coerce("seed", 2**70) == 2**70  # exactly (a float would round it); check() bounds it
    with pytest.raises(TIError, match=r"^steps must be a whole number \(got inf\)$"):
        coerce("steps", float("inf"))
    with pytest.raises(TIError, match=r"^tag_dropout must be a number \(got 1000000000"):
        coerce("tag_dropout", 10**400)


def test_answers_json_cannot_hold_become_null_and_escapes(api):
    """A diverged loss (NaN) in a job's status, and a file name in another encoding in the listing."""
    import os

    from lib_ti.training.jobs import Job

    client, service, _ = api
    job = Job("train-9-0", "train", "subject")
    job.status.state, job.status.loss, job.status.losses = "failed", float("nan"), [(1, float("inf"))]
    service.jobs.jobs[job.id] = job
    r = client.get("/ti/v1/jobs/train-9-0")
    assert r.status_code == 200 and r.json()["loss"] is None and r.json()["losses"] == [[1, None]]
    (service.folder() / os.fsdecode(b"odd\xff.safetensors")).write_bytes(b"not an embedding")
    r = client.get("/ti/v1/embeddings")
    assert r.status_code == 200
    assert "odd\\xff.safetensors" in [e["file"] for e in r.json()["embeddings"]]


def test_requests_the_loaded_model_cannot_train_are_400(api, tmp_path):
    client, service, data = api
    body = {"embedding": "subject", "dataset_dir": str(data), "steps": 2, "resolution": 64}
    r = client.post("/ti/v1/train", json={**body, "train_encoders": "clip_g"})
    assert (
        r.status_code == 400 and "train_encoders 'clip_g': the loaded model's encoders are clip_l" in r.text
    )
    (tmp_path / "secret.cfg").write_text("a photo of [name]")
    r = client.post("/ti/v1/train", json={**body, "template": str(tmp_path / "secret.cfg")})
    assert r.status_code == 400 and "a .txt file, or lines with [name]" in r.json()["detail"]


def test_a_huge_folder_is_refused_before_it_is_walked(api, tmp_path, monkeypatch):
    from lib_ti.training import images

    client, service, data = api
    monkeypatch.setattr(images, "MAX_FILES", 3)
    for i in range(5):
        (tmp_path / "many" / str(i)).mkdir(parents=True)
        (tmp_path / "many" / str(i) / "x.png").write_bytes(b"")
    r = client.post("/ti/v1/train", json={"embedding": "subject", "dataset_dir": str(tmp_path / "many")})
    assert r.status_code == 400
    assert (
        "holds more than 3 files (sub-folders included); choose the folder of your training images" in r.text
    )


def test_names_with_glob_characters_find_only_themselves(api):
    client, service, data = api
    assert client.get("/ti/v1/inspect/subject").status_code == 200
    r = client.get("/ti/v1/inspect/[s]ubject")
    assert r.status_code == 404 and "no embedding named '[s]ubject'" in r.json()["detail"]

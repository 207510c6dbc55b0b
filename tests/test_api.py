"""The REST API is strict and trains the tab's recipe (runs under pydantic 1 and 2: -m versioned)."""

from __future__ import annotations

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
    assert set(schema["bodies"]) == {"create", "merge", "evaluate", "inspect", "train"}
    train = schema["bodies"]["train"]
    assert set(train["properties"]) == set(FIELD_TYPES)
    assert set(train["required"]) == {"embedding", "dataset_dir"}
    assert schema["aliases"]["train"]["learning_rate"] == "lr"
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

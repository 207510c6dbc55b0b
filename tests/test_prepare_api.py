"""Prepare and the caption editor through the REST API (pydantic 1 and 2: -m versioned), with the
real pipeline, the real job manager and the tiny WD tagger model of test_tagger."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from lib_ti.prepare.errors import TaggerError
from lib_ti.prepare.tagger import TaggerDeps

from .test_api import make_service
from .test_prepare import gradient

pytestmark = pytest.mark.versioned
fastapi = pytest.importorskip("fastapi")


@pytest.fixture
def api(tmp_path: Path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    service, _ = make_service(tmp_path, "sd1")
    service.host.models_dir = lambda: str(tmp_path / "models")
    app = FastAPI()
    add_routes(app, service)
    src = tmp_path / "raw"
    src.mkdir()
    Image.new("RGB", (700, 500), (230, 20, 20)).save(src / "red.png")
    Image.new("RGB", (500, 700), (20, 20, 230)).save(src / "blue.jpg")
    gradient(640, 640, 3).save(src / "grad.webp")
    return TestClient(app), service, src


def wait(client: Any, job: str, timeout: float = 60) -> dict[str, Any]:
    end = time.time() + timeout
    while time.time() < end:
        st = client.get(f"/ti/v1/jobs/{job}").json()
        if st["state"] not in ("queued", "running"):
            return st
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not end")


def test_prepare_runs_as_a_job_with_the_loaded_models_buckets(api, tmp_path: Path) -> None:
    client, service, src = api
    out = tmp_path / "set"
    r = client.post(
        "/ti/v1/prepare", json={"source_dir": str(src), "output_dir": str(out), "caption_prefix": "[name]"}
    )
    assert r.status_code == 202, r.text
    st = wait(client, r.json()["job"])
    assert st["state"] == "done" and st["kind"] == "prepare", st
    rep = st["report"]
    assert rep["resolution"] == 512 and sorted(rep["written"]) == ["blue.png", "grad.png", "red.png"]
    assert st["step"] == st["steps"] > 0 and "3 image(s) and 3 caption(s)" in st["message"]
    assert (out / "red.txt").read_text(encoding="utf-8") == "[name]\n"
    with Image.open(out / "red.png") as im:
        assert im.size == (576, 448)


def test_options_list_what_this_host_offers(api) -> None:
    client, service, _ = api
    opts = client.get("/ti/v1/prepare").json()
    assert list(opts["captioners"]) == ["none", "wd14"]
    assert "no BLIP and DeepBooru interrogator" in opts["captioner_note"]
    assert opts["defaults"]["crop"] == "focal" and opts["defaults"]["general_threshold"] == 0.35
    service.host.interrogators = lambda: ["deepbooru"]
    opts = client.get("/ti/v1/prepare").json()
    assert list(opts["captioners"]) == ["none", "wd14", "deepbooru"]
    assert "no BLIP interrogator" in opts["captioner_note"]


@pytest.mark.parametrize(
    ("extra", "status", "text"),
    [
        ({"crop": "squash"}, 422, "crop must be one of focal, center, pad, tiles"),
        ({"colour": "red"}, 422, "unknown field 'colour'"),
        ({"captioner": "blip"}, 400, "captioner 'blip': this web UI offers none, wd14"),
        ({"upscaler": "ESRGAN_4x"}, 400, "upscaler 'ESRGAN_4x' is not one of this web UI's"),
        ({"tagger_model": "someone/else", "captioner": "wd14"}, 400, "tagger_model 'someone/else'"),
        ({"general_threshold": 2}, 400, "general_threshold must be between 0 and 1.0"),
    ],
)
def test_bad_prepare_bodies_name_the_field(api, tmp_path: Path, extra, status, text) -> None:
    client, _, src = api
    r = client.post(
        "/ti/v1/prepare", json={"source_dir": str(src), "output_dir": str(tmp_path / "o"), **extra}
    )
    assert r.status_code == status and text in r.json()["detail"], r.text
    assert not (tmp_path / "o").exists()


def test_folders_are_checked_before_a_job_starts(api, tmp_path: Path) -> None:
    client, service, src = api
    r = client.post(
        "/ti/v1/prepare", json={"source_dir": str(tmp_path / "nope"), "output_dir": str(tmp_path / "o")}
    )
    assert r.status_code == 400 and "does not exist" in r.json()["detail"]
    r = client.post("/ti/v1/prepare", json={"source_dir": str(src), "output_dir": str(src / "out")})
    assert r.status_code == 400 and "overlap" in r.json()["detail"]
    r = client.post("/ti/v1/prepare", json={"output_dir": str(tmp_path / "o")})
    assert r.status_code == 422 and "source_dir" in r.json()["detail"]
    assert service.jobs.current is None or service.jobs.current.status.kind != "prepare"


def test_prepare_and_training_never_overlap(api, tmp_path: Path) -> None:
    client, service, src = api
    release = threading.Event()
    service.jobs.submit("train", "subject", lambda job: release.wait(30))
    try:
        r = client.post("/ti/v1/prepare", json={"source_dir": str(src), "output_dir": str(tmp_path / "o")})
        assert r.status_code == 409 and "train of 'subject' is running" in r.json()["detail"]
    finally:
        release.set()
        service.jobs.current.thread.join(10)
    gate = threading.Event()
    service.prepare.tagger_deps = TaggerDeps(
        fetch=lambda repo, dest, report: gate.wait(30), install=lambda r: None
    )
    r = client.post(
        "/ti/v1/prepare",
        json={"source_dir": str(src), "output_dir": str(tmp_path / "o2"), "captioner": "wd14"},
    )
    assert r.status_code == 202
    try:
        r2 = client.post("/ti/v1/train", json={"embedding": "subject", "dataset_dir": str(src), "steps": 1})
        assert r2.status_code == 409 and "prepare of 'o2' is running" in r2.json()["detail"]
    finally:
        gate.set()
    wait(client, r.json()["job"])


def test_the_wd_tagger_captions_through_a_job(api, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from .test_tagger import Deps, build_model, write_csv

    client, service, src = api
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    build_model(tiny / "model.onnx")
    write_csv(tiny / "selected_tags.csv")
    deps = Deps(tiny)
    service.prepare.tagger_deps = deps.deps()
    (src / "red.txt").write_text("my own words", encoding="utf-8")
    body = {"source_dir": str(src), "captioner": "wd14", "caption_prefix": "[name]", "drop_tags": "smile"}
    st = wait(
        client, client.post("/ti/v1/prepare", json={**body, "output_dir": str(tmp_path / "a")}).json()["job"]
    )
    assert st["state"] == "done", st
    red = (tmp_path / "a" / "red.txt").read_text(encoding="utf-8")
    assert red == "[name], my own words, ganyu \\(genshin impact\\), long hair, 1girl, ^_^\n"
    blue = (tmp_path / "a" / "blue.txt").read_text(encoding="utf-8")
    assert blue == "[name], blue sky, 1girl\n"  # hatsune miku scores 0.77: under the character threshold
    assert len(deps.fetched) == 1 and (tmp_path / "models" / "ti-taggers").is_dir()
    st = wait(
        client,
        client.post(
            "/ti/v1/prepare",
            json={
                **body,
                "output_dir": str(tmp_path / "b"),
                "caption_mode": "overwrite",
                "general_threshold": 0.96,
            },
        ).json()["job"],
    )
    assert (tmp_path / "b" / "red.txt").read_text(encoding="utf-8") == "[name], ganyu \\(genshin impact\\)\n"
    assert len(deps.fetched) == 1  # the files are there now: not fetched again


def test_a_failed_download_says_so_and_writes_nothing(api, tmp_path: Path) -> None:
    client, service, src = api

    def fetch(repo: str, dest: Path, report: Any) -> None:
        msg = f"could not download model.onnx of {repo} from the model hub (no network); put model.onnx and selected_tags.csv into {dest} by hand"
        raise TaggerError(msg)

    service.prepare.tagger_deps = TaggerDeps(fetch=fetch, install=lambda r: None)
    out = tmp_path / "o"
    st = wait(
        client,
        client.post(
            "/ti/v1/prepare", json={"source_dir": str(src), "output_dir": str(out), "captioner": "wd14"}
        ).json()["job"],
    )
    assert (
        st["state"] == "failed"
        and "could not download model.onnx" in st["error"]
        and "by hand" in st["error"]
    )
    assert not out.exists() or not any(out.iterdir())


def test_caption_editor_routes(api, tmp_path: Path) -> None:
    client, service, src = api
    out = tmp_path / "set"
    wait(
        client,
        client.post(
            "/ti/v1/prepare",
            json={"source_dir": str(src), "output_dir": str(out), "caption_prefix": "sks, red"},
        ).json()["job"],
    )
    got = client.get("/ti/v1/captions", params={"folder": str(out)}).json()
    assert [i["image"] for i in got["images"]] == ["blue.png", "grad.png", "red.png"]
    assert got["tags"] == [["red", 3], ["sks", 3]]
    r = client.post(
        "/ti/v1/captions", json={"folder": str(out), "op": "rename_tag", "tag": "red", "new_tag": "crimson"}
    )
    assert (
        r.status_code == 200 and r.json()["changed"] == 3 and r.json()["tags"] == [["crimson", 3], ["sks", 3]]
    )
    r = client.post(
        "/ti/v1/captions", json={"folder": str(out), "op": "set", "captions": {"red.png": "sks, apple"}}
    )
    assert r.status_code == 200 and (out / "red.txt").read_text(encoding="utf-8").strip() == "sks, apple"
    r = client.post("/ti/v1/captions", json={"folder": str(out), "op": "undo"})
    assert r.status_code == 200 and (out / "red.txt").read_text(encoding="utf-8").strip() == "sks, crimson"
    r = client.post("/ti/v1/captions", json={"folder": str(out), "op": "remove_tag"})
    assert r.status_code == 400 and r.json()["detail"] == "the caption operation remove_tag needs tag"
    r = client.post("/ti/v1/captions", json={"folder": str(out), "op": "explode"})
    assert r.status_code == 422 and "op must be one of replace" in r.json()["detail"]
    r = client.post(
        "/ti/v1/captions", json={"folder": str(out), "op": "set", "captions": {"../raw/red.png": "x"}}
    )
    assert r.status_code == 400 and not (src / "red.txt").exists()
    r = client.get("/ti/v1/captions")
    assert r.status_code == 400 and "folder" in r.json()["detail"]
    r = client.get("/ti/v1/captions", params={"folder": str(tmp_path / "missing")})
    assert r.status_code == 400 and "does not exist" in r.json()["detail"]

"""Embeddings bundled in LoRA files through the service, the Inspect view's handlers and the REST API:
the LoRA folder listed from headers, extraction into the embeddings folder with a reload, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lib_ti.hostinfo import HostServices
from lib_ti.io.formats import read_embedding
from lib_ti.service import Service

from .test_bundles import KOHYA_META, kohya_lora_weights, vec


@pytest.fixture
def env(tmp_path):
    emb_dir, lora_dir = tmp_path / "embeddings", tmp_path / "Lora"
    emb_dir.mkdir()
    (lora_dir / "chars").mkdir(parents=True)
    sd = kohya_lora_weights()
    sd["bundle_emb.mychar.string_to_param.*"] = vec(2, 768, 1)
    sd["bundle_emb.myoutfit.emb_params"] = vec(3, 768, 2).half()
    save_file(sd, str(lora_dir / "chars" / "char.safetensors"), KOHYA_META)
    save_file(kohya_lora_weights(), str(lora_dir / "plain.safetensors"), KOHYA_META)  # no embeddings
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    reloads: list[int] = []
    host = HostServices(
        embeddings_dir=lambda: str(emb_dir),
        log_dir=lambda: str(tmp_path / "logs"),
        build_parts=lambda: None,  # type: ignore[arg-type,return-value]
        reload_embeddings=lambda: reloads.append(1),
        lora_dir=lambda: str(lora_dir),
    )
    return Service(host), emb_dir, lora_dir, reloads


def test_the_lora_folder_lists_the_files_that_hold_embeddings(env):
    service, *_ = env
    assert service.lora_files() == ["chars/char.safetensors"]
    found = service.bundles("chars/char.safetensors")
    assert [(b["name"], b["kind"], b["vectors"]) for b in found["embeddings"]] == [
        ("mychar", "sd1", 2),
        ("myoutfit", "sd1", 3),
    ]
    assert found["note"] == ""


def test_extract_writes_standalone_files_and_reloads(env):
    service, emb_dir, _, reloads = env
    paths = service.extract("chars/char.safetensors", ["myoutfit"], rename={"myoutfit": "outfit2"})
    assert [p.name for p in paths] == ["outfit2.safetensors"] and reloads == [1]
    emb = read_embedding(emb_dir / "outfit2.safetensors")
    assert torch.equal(emb.vectors["clip_l"], vec(3, 768, 2).half().float())
    assert emb.metadata["source_lora"].endswith("char.safetensors")
    paths = service.extract("chars/char.safetensors")
    assert sorted(p.name for p in paths) == ["mychar.safetensors", "myoutfit.safetensors"]


def test_bad_extractions_write_nothing(env):
    service, emb_dir, _, reloads = env
    for args, kwargs, text in [
        (("chars/char.safetensors", ["nobody"]), {}, "nobody"),
        (("chars/char.safetensors", ["mychar"]), {"rename": {"mychar": "../evil"}}, "embedding name"),
        (("broken.safetensors",), {}, "broken.safetensors"),
        (("plain.safetensors",), {}, "no"),
    ]:
        with pytest.raises(Exception, match=text):
            service.extract(*args, **kwargs)
    assert list(emb_dir.iterdir()) == [] and reloads == []


def test_rest_bundles(env):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    service, emb_dir, lora_dir, _ = env
    app = FastAPI()
    add_routes(app, service)
    client = TestClient(app)
    listing = client.get("/ti/v1/bundles").json()
    assert listing["files"] == ["chars/char.safetensors"] and listing["folder"] == str(lora_dir)
    one = client.get("/ti/v1/bundles", params={"file": str(lora_dir / "chars" / "char.safetensors")}).json()
    assert [b["name"] for b in one["embeddings"]] == ["mychar", "myoutfit"]
    r = client.post("/ti/v1/bundles", json={"file": "chars/char.safetensors", "names": ["mychar"]})
    assert r.status_code == 200 and r.json()["names"] == ["mychar"], r.text
    r = client.post("/ti/v1/bundles", json={"file": "chars/char.safetensors", "names": ["mychar"]})
    assert r.status_code == 409, r.text  # exists
    assert client.post("/ti/v1/bundles", json={"file": "x", "colour": 1}).status_code == 422
    assert client.post("/ti/v1/bundles", json={"file": "missing.safetensors"}).status_code in (400, 404)
    assert sorted(p.name for p in emb_dir.iterdir() if p.suffix == ".safetensors") == ["mychar.safetensors"]


def test_extract_follows_the_rules_of_every_write(env):
    service, emb_dir, _, _ = env
    (emb_dir / "mychar.pt").write_bytes(b"an older file of that name")
    with pytest.raises(Exception, match="already exists \\(mychar.pt\\)"):
        service.extract("chars/char.safetensors")
    assert sorted(p.name for p in emb_dir.iterdir()) == ["mychar.pt"]  # nothing of the two written
    service.extract("chars/char.safetensors", ["myoutfit"])
    assert (emb_dir / "myoutfit.json").exists()  # the card's sidecar, as Create and Merge write it


@pytest.mark.parametrize("given", ["../outside.safetensors", "/etc/passwd", "chars/../../x.safetensors"])
def test_a_lora_path_outside_the_lora_folder_is_refused(env, given):
    service, *_ = env
    with pytest.raises(Exception, match="not in the web UI's LoRA folder"):
        service.bundles(given)


@pytest.mark.versioned
def test_rest_extract_names_must_be_text(env):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    service, emb_dir, _, _ = env
    app = FastAPI()
    add_routes(app, service)
    client = TestClient(app)
    for body in ({"file": "chars/char.safetensors", "names": [1]},
                 {"file": "chars/char.safetensors", "rename": {"mychar": 2}}):  # fmt: skip
        assert client.post("/ti/v1/bundles", json=body).status_code == 422
    assert list(emb_dir.iterdir()) == []

"""Create, merge and train through the service and the REST API, on tiny real models."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from PIL import Image

from lib_ti.create import CreateArgs
from lib_ti.hostinfo import HostServices
from lib_ti.io.formats import read_embedding
from lib_ti.service import Service
from lib_ti.training.jobs import BusyError
from lib_ti.training.options import TrainRequest

from . import train_models as tm


@pytest.fixture
def env(tmp_path):
    emb_dir, log_dir, data_dir = tmp_path / "embeddings", tmp_path / "logs", tmp_path / "data"
    for d in (emb_dir, log_dir, data_dir):
        d.mkdir()
    for i, c in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        Image.new("RGB", (64, 64), c).save(data_dir / f"{i}.png")
        (data_dir / f"{i}.txt").write_text(f"color {i}, plain")
    lock = threading.Lock()
    reloads = []
    host = HostServices(
        embeddings_dir=lambda: str(emb_dir),
        log_dir=lambda: str(log_dir),
        build_parts=lambda: tm.make_parts("sd1"),
        reload_embeddings=lambda: reloads.append(time.time()),
        exclusive=lambda: lock,
    )
    return Service(host), emb_dir, log_dir, data_dir, reloads, lock


def test_create_writes_file_sidecar_and_reloads(env):
    service, emb_dir, _, _, reloads, _ = env
    path, warnings = service.create(CreateArgs("mycat", 2, "text", "a cat"))
    assert path == emb_dir / "mycat.safetensors"
    emb = read_embedding(path)
    assert (emb.kind, emb.num_vectors) == ("sd1", 2)
    assert json.loads((emb_dir / "mycat.json").read_text())["sd version"] == "SD1"
    assert len(reloads) == 1
    assert warnings == []
    with pytest.raises(FileExistsError):
        service.create(CreateArgs("mycat", 1, "zeros"))
    with pytest.raises(FileExistsError):  # the other format counts too: names must stay unique
        service.create(CreateArgs("mycat", 1, "zeros"), fmt="pt")
    service.create(CreateArgs("mycat", 1, "zeros"), overwrite=True)
    assert read_embedding(path).num_vectors == 1


def test_merge_uses_existing_embeddings(env):
    service, emb_dir, *_ = env
    service.create(CreateArgs("base", 2, "text", "a dog"))
    path = service.merge("'base' * 0.5 + 'cat' : 2", "half")
    merged = read_embedding(path)
    base = read_embedding(emb_dir / "base.safetensors")
    assert merged.num_vectors == 2
    assert merged.metadata["merge_expression"] == "'base' * 0.5 + 'cat' : 2"
    assert not torch.equal(merged.matrix, base.matrix)


def test_train_job_runs_saves_and_logs(env):
    service, emb_dir, log_dir, data_dir, reloads, _ = env
    service.create(CreateArgs("trained", 1, "text", "a painting"))
    job = service.start_training(
        dict(
            embedding="trained",
            dataset_dir=str(data_dir),
            template="subject_filewords",
            batch_size=1,
            grad_accum=1,
            steps=3,
            resolution=64,
            validation_every=2,
            snapshot_every=2,
        ),
        background=False,
    )
    st = job.status
    assert st.state == "finished", st.message
    assert st.step == 3
    assert read_embedding(emb_dir / "trained.safetensors").step == 3
    assert (log_dir / "trained" / "trained-2.safetensors").exists()  # snapshot in the log folder
    assert (log_dir / "trained" / "trained.csv").exists()
    assert (log_dir / "trained" / "trained.resume.safetensors").exists()
    assert [s for s, _ in st.losses] == [1, 2, 3]
    assert st.val_losses


def test_a_failing_preview_does_not_end_the_run(env):
    """The host's sampler failing on a preview (reForge without a script runner did) costs the preview only."""
    service, emb_dir, _, data_dir, *_ = env
    calls = []

    def preview(emb, prompt, step, out_dir):
        calls.append(step)
        raise AttributeError("'NoneType' object has no attribute 'alwayson_scripts'")

    service.host.preview = preview
    service.create(CreateArgs("pv", 1, "text", "a painting"))
    req = {"embedding": "pv", "dataset_dir": str(data_dir), "steps": 4, "resolution": 64, "batch_size": 1,
           "preview_every": 2, "validation_every": 0}  # fmt: skip
    st = service.start_training(req, background=False).status
    assert st.state == "finished" and st.step == 4, st.message
    assert calls == [2, 4] and st.previews == []
    assert len(st.warnings) == 2 and "preview at step 2 failed: AttributeError" in st.warnings[0]
    assert read_embedding(emb_dir / "pv.safetensors").step == 4


def test_second_training_is_refused_while_one_runs(env):
    service, _, _, data_dir, _, lock = env
    service.create(CreateArgs("busy", 1, "text", "a painting"))
    lock.acquire()  # the "GPU" is taken: the first job waits inside it
    try:
        job = service.start_training(
            {
                "embedding": "busy",
                "dataset_dir": str(data_dir),
                "steps": 50,
                "resolution": 64,
                "validation_every": 0,
            }
        )
        with pytest.raises(BusyError) as e:
            service.start_training({"embedding": "busy", "dataset_dir": str(data_dir), "steps": 1})
        assert e.value.job_id == job.id
        job.stop()
    finally:
        lock.release()
    job.thread.join(timeout=120)
    assert job.status.state == "stopped"  # stopped while it waited: it ends before training anything
    assert "nothing was trained or written" in job.status.message


def test_bad_requests_are_clear(env):
    service, _, _, data_dir, *_ = env
    from lib_ti.errors import TIError

    service.create(CreateArgs("there", 1, "zeros"))
    with pytest.raises(TIError, match="does not exist"):
        service.start_training(TrainRequest("there", str(data_dir / "nope")))
    with pytest.raises(TIError, match="no embedding named 'missing'"):
        service.start_training(TrainRequest("missing", str(data_dir), steps=1))
    with pytest.raises(TIError, match="'..'|path separator"):
        service.start_training(TrainRequest("../there", str(data_dir), steps=1))
    with pytest.raises(TIError, match="column"):
        service.start_training(TrainRequest("there", str(data_dir), lr="0.005:abc"))
    empty = data_dir.parent / "empty"
    empty.mkdir()
    with pytest.raises(TIError, match="no images"):
        service.start_training(TrainRequest("there", str(empty)))
    assert service.jobs.current is None  # nothing was started


@pytest.mark.versioned
def test_rest_api(env):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    service, _, _, data_dir, _, lock = env
    app = FastAPI()
    add_routes(app, service, auth="ti:secret")
    client = TestClient(app)
    assert client.post("/ti/v1/create", json={"name": "api1"}).status_code == 401
    auth = ("ti", "secret")
    r = client.post("/ti/v1/create", json={"name": "api1", "vectors": 2, "init_text": "a red car"}, auth=auth)
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("name", "kind", "vectors")} == {
        "name": "api1",
        "kind": "sd1",
        "vectors": 2,
    }
    assert client.post("/ti/v1/create", json={"name": "api1"}, auth=auth).status_code == 409
    assert client.post("/ti/v1/create", json={"name": "../x"}, auth=auth).status_code == 400
    r = client.post("/ti/v1/merge", json={"expression": "'api1' * 2", "name": "api2"}, auth=auth)
    assert r.status_code == 200, r.text
    r = client.post("/ti/v1/merge", json={"expression": "'api1' *", "name": "api3"}, auth=auth)
    assert r.status_code == 400
    assert "column" in r.json()["detail"]
    listing = client.get("/ti/v1/embeddings", auth=auth).json()["embeddings"]
    assert [e["file"] for e in listing] == ["api1.safetensors", "api2.safetensors"]
    assert client.get("/ti/v1/inspect/api1", auth=auth).json()["vectors"] == 2
    lock.acquire()
    try:
        body = {
            "embedding": "api1",
            "dataset": str(data_dir),
            "steps": 40,
            "resolution": 64,
            "validation_every": 0,
        }
        r = client.post("/ti/v1/train", json=body, auth=auth)
        assert r.status_code == 202
        assert r.json() == {"job": r.json()["job"]}
        job_id = r.json()["job"]
        r2 = client.post("/ti/v1/train", json=body, auth=auth)
        assert r2.status_code == 409
        assert r2.json()["job"] == job_id and "busy" in r2.json()["detail"]
        assert client.post(f"/ti/v1/jobs/{job_id}/stop", auth=auth).json()["stopping"] is True
    finally:
        lock.release()
    service.jobs.get(job_id).thread.join(timeout=120)
    status = client.get(f"/ti/v1/jobs/{job_id}", auth=auth).json()
    assert status["state"] == "stopped"
    assert status["job"] == job_id
    assert status["steps"] == 40
    assert status["file"] is None and "nothing was trained" in status["message"]  # stopped while queued
    assert status["error"] is None
    assert status["outcome"] == "stopped"
    for twice in ("id", "total", "eta_seconds", "files", "job_id"):  # each value once
        assert twice not in status
    assert client.get("/ti/v1/jobs/nope", auth=auth).json() == {"detail": "no job 'nope'"}
    assert client.get("/ti/v1/jobs/nope", auth=auth).status_code == 404


def test_a_model_load_drops_what_holds_the_old_models_encoders(env):
    """Nearest-token tables, the merge context and prompt-expression results hold the encoders; the host's
    model_loaded callback drops them (measured on Forge Classic: 2.2 GB of SDXL tensors stayed reachable)."""
    import gc
    import weakref

    service, *_ = env
    service.merge("'cat' + 'dog'", "m")
    service.evaluate("'cat' * 2", nearest=2)
    ctx = service.inline_context()
    service.inline.vectors(ctx, "'cat'")
    held = weakref.ref(ctx)
    assert service._merge_cache is not None and service._nearest_cache is not None
    del ctx
    gc.collect()
    assert held() is not None  # still cached: the next expression on the same model is free
    service.forget_model()
    gc.collect()
    assert held() is None
    assert service._merge_cache is None and service._nearest_cache is None

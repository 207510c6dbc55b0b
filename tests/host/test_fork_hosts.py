"""The tab's routes on Forge Neo, Forge Classic and reForge (each skipped unless SD_NEO_DIR,
SD_CLASSIC_DIR or SD_REFORGE_DIR is set; run one host at a time).

Create, use in the next prompt (the host's infotext marker: ``TI:`` on Neo, ``TI hashes`` on the
A1111-style forks), merge, inspect, bad requests, and training: a short run on Neo; on Classic and
reForge the refusal (issue #13 lifts it where a host test proves a run).
"""

from __future__ import annotations

import urllib.error

import pytest

from . import inline_flow as flow
from .test_a1111_training import wait_job

pytestmark = pytest.mark.host


@pytest.fixture(scope="module", params=["neo", "classic", "reforge"])
def host(request):
    return request.getfixturevalue(request.param), request.param


def marker(which: str, name: str) -> str:
    return f"TI: {name}" if which == "neo" else f"{name}: "  # Neo: "TI: a, b"; others: TI hashes "a: hash"


def test_create_is_used_in_the_next_prompt(host):
    h, which = host
    name = f"fork-{which}-{flow.unique()}"
    made = h.post("/ti/v1/create", {"name": name, "vectors": 2, "init_text": "a red car"})
    assert made["kind"] == "sd1" and made["vectors"] == 2
    assert name in h.get("/ti/v1/embeddings")["loaded"]  # hot reload: no restart
    text = flow.info(flow.txt2img(h, f"a photo of {name} {flow.unique()}"))
    assert marker(which, name) in text, text[-400:]
    shown = h.get(f"/ti/v1/inspect/{name}")
    assert (shown["kind"], shown["vectors"]) == ("sd1", 2)
    near = h.post("/ti/v1/inspect", {"name": name, "nearest": 3})
    assert len(near["nearest"]["clip_l"]) == 2 and len(near["nearest"]["clip_l"][0]) == 3


def test_merge_is_used_in_the_next_prompt(host):
    h, which = host
    name = f"forkm-{which}-{flow.unique()}"
    made = h.post("/ti/v1/merge", {"expression": "'cat' + 'dog'*0.5", "name": name})
    assert made["vectors"] == 1
    text = flow.info(flow.txt2img(h, f"a photo of {name} {flow.unique()}"))
    assert marker(which, name) in text, text[-400:]


@pytest.mark.parametrize(
    ("route", "body", "status"),
    [
        ("/ti/v1/create", {"name": "../escape"}, 400),
        ("/ti/v1/create", {"name": "x", "vector": 2}, 422),
        ("/ti/v1/merge", {"expression": "'cat' +", "name": "bad"}, 400),
        ("/ti/v1/inspect", {"name": "no-such-embedding"}, 404),
    ],
)
def test_bad_requests_are_4xx(host, route, body, status):
    h, _ = host
    with pytest.raises(urllib.error.HTTPError) as e:
        h.post(route, body)
    assert e.value.code == status
    assert "detail" in e.value.read().decode()


def test_training(host, dataset):
    h, which = host
    name = f"forkt-{which}-{flow.unique()}"
    h.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "a photo"})
    body = {"embedding": name, "dataset_dir": str(dataset), "steps": 4, "resolution": 64, "batch_size": 1,
            "grad_accum": 1, "validation_every": 2, "warmup_steps": 0}  # fmt: skip
    if which in ("classic", "reforge"):
        with pytest.raises(urllib.error.HTTPError) as e:
            h.post("/ti/v1/train", body)
        assert e.value.code == 400 and "training is not available" in e.value.read().decode()
        return
    st = wait_job(h, h.post("/ti/v1/train", body)["job"])
    assert st["state"] == "done" and st["step"] == 4, st
    text = flow.info(flow.txt2img(h, f"a photo of {name} {flow.unique()}"))
    assert marker(which, name) in text

"""The comparison grid on real hosts (A1111 with its tiny SD1 checkpoints; Forge with its full-shape
SD1.5): 2 embeddings × 2 checkpoints through the host's txt2img, the grid's size and labels, the
checkpoint loaded before put back, and Interrupt mid-grid leaving the host usable.

The second checkpoint is a hard link of the first under another name (no disk), so both columns render
and the infotext names the checkpoint each cell used. Run one host at a time (tests/host/README.md).
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.error
from pathlib import Path

import pytest
from PIL import Image

from lib_ti.grid.layout import read_metadata
from lib_ti.names import checkpoint_label

from .test_a1111_training import wait_job

pytestmark = pytest.mark.host
MARKER = {
    "a1111": "TI hashes",
    "forge": "TI: ",
    "neo": "TI: ",
    "classic": "TI hashes",
    "reforge": "TI hashes",
}
SIZE = 64


@pytest.fixture(scope="module", params=list(MARKER))
def host(request):
    h = request.getfixturevalue(request.param)
    return h, request.param


@pytest.fixture(scope="module")
def two_checkpoints(host):
    h, _ = host
    loaded = h.get("/sdapi/v1/options")["sd_model_checkpoint"]
    models = {m["title"]: Path(m["filename"]) for m in h.get("/sdapi/v1/sd-models")}
    title = next(t for t in models if t == loaded or checkpoint_label(t) == checkpoint_label(loaded))
    src = models[title]
    copies = [src.with_name(f"{src.stem}-{tag}{src.suffix}") for tag in ("gridcopy", "gridpick")]
    # the tiny checkpoints need their config beside them (A1111 reads <checkpoint>.yaml)
    pairs = [
        (a, b) for c in copies for a, b in ((src, c), (src.with_suffix(".yaml"), c.with_suffix(".yaml")))
    ]
    for a, b in pairs:
        if a.exists() and not b.exists():
            os.link(a, b)
    try:
        h.post("/sdapi/v1/refresh-checkpoints", {})
        titles = h.get("/ti/v1/grid")["checkpoints"]
        others = [next(t for t in titles if checkpoint_label(t) == c.stem) for c in copies]
        yield title, *others
    finally:
        for _, b in pairs:
            b.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            h.post("/sdapi/v1/refresh-checkpoints", {})


@pytest.fixture(scope="module")
def rows(host):
    h, _ = host
    for name, text in (("gridcat", "a tabby cat"), ("griddog", "a black dog")):
        h.post("/ti/v1/create", {"name": name, "vectors": 2, "init_text": text, "overwrite": True})
    return ["gridcat", "griddog"]


def loaded_title(h) -> str:
    return h.get("/sdapi/v1/options")["sd_model_checkpoint"]


def test_two_by_two_grid_renders_through_the_host_and_puts_the_checkpoint_back(host, two_checkpoints, rows):
    h, which = host
    first, second, third = two_checkpoints
    opts = h.get("/ti/v1/grid")
    assert opts["available"] is None and checkpoint_label(opts["loaded"]) == checkpoint_label(first)
    t0 = time.time()
    job = h.post("/ti/v1/grid", {"embeddings": rows, "checkpoints": [second, first], "steps": 2,
                                 "width": SIZE, "height": SIZE, "seeds": [11], "prompts": ["a photo of [name], garden"]})["job"]  # fmt: skip
    st = wait_job(h, job, timeout=900)
    print(f"[{which}] 2x2 grid in {time.time() - t0:.1f} s")
    assert st["state"] == "done", st
    assert (st["kind"], st["step"], st["steps"], st["report"]["images"]) == ("grid", 4, 4, 4), st["report"]
    meta = read_metadata(st["file"])
    assert meta["rows"] == rows
    assert meta["columns"] == [checkpoint_label(second), checkpoint_label(first)]
    for cell in meta["cells"]:
        name, column = rows[cell["row"]], meta["columns"][cell["column"]]
        assert not cell["note"], cell
        assert f"a photo of {name}, garden" in cell["infotext"]
        assert f"Model: {column}" in cell["infotext"], cell["infotext"]
        assert MARKER[which] in cell["infotext"] and name in cell["infotext"].split("\n")[-1], cell[
            "infotext"
        ]
    with Image.open(st["file"]) as im:
        label_w, top = im.width - 2 * SIZE, im.height - 2 * SIZE
        assert label_w >= 160 and 0 < top < 100, im.size
    # the checkpoint loaded before is loaded again, and a generation uses it
    assert checkpoint_label(loaded_title(h)) == checkpoint_label(first)
    out = h.post(
        "/sdapi/v1/txt2img", {"prompt": "after the grid, a house", "steps": 1, "width": SIZE, "height": SIZE}
    )
    assert f"Model: {checkpoint_label(first)}" in out["info"]


def test_interrupt_mid_grid_leaves_the_host_usable(host, two_checkpoints, rows):
    h, which = host
    first, second, third = two_checkpoints
    job = h.post("/ti/v1/grid", {"embeddings": rows, "checkpoints": [second, first], "steps": 8, "width": SIZE,
                                 "height": SIZE, "seeds": [1, 2, 3], "prompts": ["[name] by a lake"]})["job"]  # fmt: skip
    deadline = time.time() + 600
    while h.get(f"/ti/v1/jobs/{job}")["step"] < 1:
        assert time.time() < deadline, "no cell made in 600 s"
        time.sleep(0.5)
    h.post("/sdapi/v1/interrupt", {})
    st = wait_job(h, job, timeout=600)
    assert st["state"] == "stopped", st
    assert 1 <= st["report"]["images"] < 12
    meta = read_metadata(st["file"])
    assert len(meta["rows"]) == 6 and len(meta["columns"]) == 2
    assert checkpoint_label(loaded_title(h)) == checkpoint_label(first)
    out = h.post(
        "/sdapi/v1/txt2img",
        {"prompt": "gridcat after an interrupt", "steps": 1, "width": SIZE, "height": SIZE},
    )
    assert out["images"] and f"Model: {checkpoint_label(first)}" in out["info"]
    print(f"[{which}] interrupted after {st['report']['images']} of 12 images")


def test_bad_grid_requests_are_4xx(host, rows):
    h, _ = host
    import urllib.error

    for body, text in (({"embeddings": rows, "checkpoints": ["nope.safetensors"]}, "not one of this web UI's"),
                       ({"embeddings": rows, "prompts": ["no placeholder"]}, "[name]")):  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as e:
            h.post("/ti/v1/grid", body)
        assert e.value.code in (400, 422) and text in e.value.read().decode()


def test_a_training_runs_snapshots_are_rows(host, dataset):
    """Snapshots live in the log folder, not the host's database: the grid registers each for its own
    images, and the infotext names the snapshot."""
    h, which = host
    name = f"gridrun{time.time_ns() % 10**5}"
    h.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "a red ball"})
    try:
        job = h.post("/ti/v1/train", {"embedding": name, "dataset_dir": str(dataset), "steps": 6, "batch_size": 1,
                                      "grad_accum": 1, "resolution": 64, "warmup_steps": 0, "preview_every": 0,
                                      "snapshot_every": 2, "validation_every": 0})["job"]  # fmt: skip
    except urllib.error.HTTPError as e:
        pytest.skip(f"{which} does not train here: {e.read().decode()[:200]}")
    st = wait_job(h, job, timeout=900)
    assert st["state"] == "done" and len(st["snapshots"]) == 2, st
    # a kept copy in the embeddings folder with a snapshot's name stays the web UI's after the grid
    h.post("/ti/v1/create", {"name": f"{name}-2", "vectors": 1, "init_text": "a blue cube"})
    job = h.post("/ti/v1/grid", {"run": name, "steps": 2, "width": SIZE, "height": SIZE,
                                 "prompts": ["a photo of [name] in a field"]})["job"]  # fmt: skip
    st = wait_job(h, job, timeout=600)
    assert st["state"] == "done" and st["report"]["images"] == 2, st
    meta = read_metadata(st["file"])
    assert meta["rows"] == [f"{name}-2", f"{name}-4"]
    for cell, snap in zip(meta["cells"], meta["rows"]):
        assert f"a photo of {snap} in a field" in cell["infotext"]
        assert MARKER[which] in cell["infotext"] and snap in cell["infotext"].split("\n")[-1], cell[
            "infotext"
        ]
    # the snapshots were known for their images only; the folder's own file of that name is back
    listed = h.get("/ti/v1/embeddings")
    assert f"{name}-4" not in listed["loaded"] and f"{name}-2" in listed["loaded"], listed["loaded"]
    out = h.post(
        "/sdapi/v1/txt2img", {"prompt": f"{name}-2 on a table", "steps": 1, "width": SIZE, "height": SIZE}
    )
    assert MARKER[which] in out["info"], out["info"]


def test_a_checkpoint_picked_during_the_grid_waits_for_it_and_is_loaded_after(host, two_checkpoints, rows):
    """The user picks another checkpoint while the grid runs: the grid's cells keep their column's
    checkpoint (their infotext says which), and the user's pick is what is loaded afterwards."""
    import threading

    h, which = host
    first, second, third = two_checkpoints
    job = h.post("/ti/v1/grid", {"embeddings": rows, "checkpoints": [second, first], "steps": 12, "width": SIZE,
                                 "height": SIZE, "seeds": [5], "prompts": ["[name] under a tree"]})["job"]  # fmt: skip
    deadline = time.time() + 600
    while h.get(f"/ti/v1/jobs/{job}")["step"] < 1:
        assert time.time() < deadline
        time.sleep(0.3)
    # the grid is on `second` now and loads `first` next; the user picks `third` meanwhile (a pick of the
    # checkpoint being rendered at that moment is a no-op for the host: it keeps no record of it)
    picked = threading.Thread(target=h.post, args=("/sdapi/v1/options", {"sd_model_checkpoint": third}))
    picked.start()
    time.sleep(1)
    assert h.get(f"/ti/v1/jobs/{job}")["state"] == "running"  # picked while the grid runs
    st = wait_job(h, job, timeout=900)
    picked.join(600)
    try:
        assert st["state"] == "done", st
        meta = read_metadata(st["file"])
        for cell in meta["cells"]:
            assert f"Model: {meta['columns'][cell['column']]}" in cell["infotext"], cell
        assert checkpoint_label(loaded_title(h)) == checkpoint_label(third)
        out = h.post(
            "/sdapi/v1/txt2img", {"prompt": "after the pick", "steps": 1, "width": SIZE, "height": SIZE}
        )
        assert f"Model: {checkpoint_label(third)}" in out["info"], out["info"]
    finally:
        h.post("/sdapi/v1/options", {"sd_model_checkpoint": first})

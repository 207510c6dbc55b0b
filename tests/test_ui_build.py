"""The tab builds under the installed gradio (3.41 here; CI repeats this under 4.40) and is wired right."""

from __future__ import annotations

import inspect as pyinspect

import pytest
import torch

from lib_ti.embedding import Embedding
from lib_ti.formats import read_embedding, write_embedding
from lib_ti.hostinfo import HostInfo

gr = pytest.importorskip("gradio")
pytestmark = pytest.mark.versioned


@pytest.fixture
def folder(tmp_path):
    write_embedding(Embedding("one", {"clip_l": torch.randn(2, 768)}, step=3), tmp_path / "one.safetensors")
    sub = tmp_path / "sub"
    sub.mkdir()
    xl = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    write_embedding(Embedding("two", xl), sub / "two.safetensors")
    (tmp_path / "one.preview.png").write_bytes(b"not listed")
    return tmp_path


@pytest.fixture
def host(folder):
    reloads = []
    info = HostInfo(
        name="test",
        embeddings_dir=lambda: str(folder),
        embedding_status=lambda: {"one": "loaded", "two": "skipped"},
        reload_embeddings=lambda: reloads.append(1),
    )
    info.extra["reloads"] = reloads
    return info


def events(blocks):
    """(fn, n_inputs, n_outputs) for every event, on gradio 3.x and 4.x."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    out = []
    if isinstance(blocks.fns, dict):  # gradio 4
        for bf in fns:
            out.append((bf.fn, len(bf.inputs), len(bf.outputs)))
    else:  # gradio 3
        for bf, dep in zip(fns, blocks.dependencies):
            out.append((bf.fn, len(dep["inputs"]), len(dep["outputs"])))
    return out


SAMPLE_ARGS = {
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
}


def test_tab_builds_and_every_handler_matches_its_wiring(host, folder):
    from lib_ti.ui.tab import TAB_ID, TAB_TITLE, on_ui_tabs

    [(blocks, title, elem_id)] = on_ui_tabs(host)
    assert (title, elem_id) == (TAB_TITLE, TAB_ID)
    handlers = [e for e in events(blocks) if e[0] is not None]
    assert {fn.__name__ for fn, _, _ in handlers} >= {
        "describe",
        "describe_upload",
        "refresh",
        "compare",
        "save_as",
    }
    for fn, n_in, n_out in handlers:
        params = list(pyinspect.signature(fn).parameters)
        assert len(params) == n_in, (fn.__name__, params, n_in)
        sample = dict(SAMPLE_ARGS, upload=str(folder / "one.safetensors"))
        result = fn(*[sample[p] for p in params])
        if n_out > 1:
            assert isinstance(result, tuple), fn.__name__
            assert len(result) == n_out, (fn.__name__, len(result), n_out)
        assert "⚠" not in str(result), (fn.__name__, result)


def test_ids_are_prefixed(host):
    from lib_ti.ui.tab import build_tab

    blocks = build_tab(host)
    ids = [b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)]
    assert ids
    assert all(i.startswith("ti_") for i in ids), ids


def test_handlers_behave(host, folder):
    from lib_ti.ui.inspect_view import InspectHandlers

    h = InspectHandlers(host)
    assert h.choices() == ["one.safetensors", "sub/two.safetensors"]
    md, rows, meta, status = h.describe("one.safetensors")
    assert "SD1" in md and "loaded by the web UI" in md
    assert len(rows) == 2 and rows[0][0] == "clip_l"
    assert status == ""
    md, rows, _, _ = h.describe("sub/two.safetensors")
    assert "skipped" in md and len(rows) == 4
    _, _, _, err = h.describe("../../etc/passwd")
    assert "outside the embeddings folder" in err
    rows, note = h.compare("one.safetensors", "sub/two.safetensors")
    assert "clip_l only" in note and rows[-1][0] == "overall"
    file_upd, other_upd, msg = h.save_as(
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

"""The extension inside a real AUTOMATIC1111 v1.10 web UI (skipped unless SD_WEBUI_DIR is set)."""

from __future__ import annotations

import time

import pytest

from .seed import SEEDED

pytestmark = pytest.mark.host


def _choices(component: dict) -> list[str]:
    raw = component["props"].get("choices") or []
    return [c[1] if isinstance(c, list | tuple) else c for c in raw]


def test_extension_loaded_without_errors(a1111):
    log = a1111.log.read_text(errors="replace")
    assert "Textual Inversion tab (lib_ti" in log
    assert "ti_tab.py" not in log.split("Textual Inversion tab (lib_ti")[0]  # no traceback naming it before


def test_tab_and_settings_exist(a1111):
    cfg = a1111.config()
    tabs = [c["props"].get("label") for c in cfg["components"] if c.get("type") == "tabitem"]
    assert "Textual Inversion" in tabs
    ids = {c.get("props", {}).get("elem_id") for c in cfg["components"]}
    assert {"ti_inspect_file", "ti_inspect_table", "ti_inspect_save"} <= ids
    assert {"ti_tab_create", "ti_tab_merge", "ti_tab_train", "ti_create_button", "ti_train_start"} <= ids
    opts = a1111.get("/sdapi/v1/options")
    assert opts["ti_save_format"] == "safetensors"


def test_inspect_lists_the_embeddings_folder(a1111):
    listed = _choices(a1111.component("ti_inspect_file"))
    print("Inspect lists:", listed)
    assert sorted(listed) == sorted(SEEDED)


def test_host_loads_every_file_we_wrote(a1111):
    emb = a1111.get("/sdapi/v1/embeddings")
    print("host loaded:", sorted(emb["loaded"]), "skipped:", sorted(emb["skipped"]))
    sd1 = {p.split("/")[-1].split(".")[0] for p, k in SEEDED.items() if k == "sd1"}
    sdxl = {p.split("/")[-1].split(".")[0] for p, k in SEEDED.items() if k == "sdxl"}
    on_sd1 = "sd1"  # the tests start on tiny-sd1 unless SD_WEBUI_CKPT says otherwise
    loaded, skipped = set(emb["loaded"]), set(emb["skipped"])
    if on_sd1:
        assert sd1 <= loaded
        assert sdxl <= skipped
    for name in sd1:
        assert emb["loaded"][name]["vectors"] == 2


def test_describe_shows_host_status(a1111):
    md, rows, meta, status, nearest, _plot = a1111.call(
        ["ti_inspect_file"], ["ti-sd1-pt.pt"], outputs_first="ti_inspect_summary"
    )
    print("describe ->", md, rows, meta, status, nearest)
    assert "SD1" in md
    assert "loaded by the web UI" in md
    assert len(rows["data"] if isinstance(rows, dict) else rows) == 2
    assert len(nearest["data"] if isinstance(nearest, dict) else nearest) == 2  # on the loaded CLIP-L
    md, *_ = a1111.call(["ti_inspect_file"], ["ti-sdxl.safetensors"], outputs_first="ti_inspect_summary")
    assert "skipped by the web UI" in md


def test_save_as_is_usable_in_the_next_prompt(a1111):
    name = f"ti-conv-{time.time_ns() % 10**8}"
    inputs = [
        "ti_inspect_file",
        "ti_inspect_other",
        "ti_inspect_new_name",
        "ti_inspect_format",
        "ti_inspect_target",
        "ti_inspect_overwrite",
    ]
    out = a1111.call(
        inputs, ["ti-sdxl.safetensors", None, name, "pt", "SD1 (CLIP-L half of an SDXL embedding)", False]
    )
    assert "Saved" in out[-1], out
    assert (a1111.embeddings / f"{name}.pt").exists()
    assert name in a1111.get("/sdapi/v1/embeddings")["loaded"]
    r = a1111.post(
        "/sdapi/v1/txt2img",
        {"prompt": f"a photo of {name} {time.time_ns()}", "steps": 1, "width": 64, "height": 64, "seed": 1},
    )
    assert f"{name}:" in r["info"], r["info"][-300:]  # "TI hashes: name: hash" in the infotext

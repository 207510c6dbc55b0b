"""The Inspect view's re-make and comparison grid in a real browser on A1111 and Forge (screenshots for the
README): an embedding made from text re-made for the loaded checkpoint, then a grid of it and its
re-made copy across two checkpoints, rendered by the host and shown in the view."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lib_ti.grid.layout import read_metadata
from lib_ti.names import checkpoint_label

from .ui_flow import _fill, _shot, _tab, browser, loaded  # noqa: F401 (browser is a fixture)

pytestmark = pytest.mark.host


#: each host's SD1 checkpoint (A1111's tiny one; the Forge family's full-shape random SD1.5)
SD1 = {"a1111": "tiny-sd1", "forge": "rand-sd15"}


@pytest.fixture(params=list(SD1))
def web(request):
    """A1111 (gradio 3.41) and Forge (gradio 4.40)."""
    return request.getfixturevalue(request.param), SD1[request.param]


@pytest.fixture
def second_checkpoint(web):
    """A hard link of the SD1 checkpoint (and its yaml) under another name: a second one without disk."""
    host, sd1 = web
    models = {m["title"]: Path(m["filename"]) for m in host.get("/sdapi/v1/sd-models")}
    src = next(p for t, p in models.items() if checkpoint_label(t) == sd1)
    copy = src.with_name(f"{sd1}-other.safetensors")
    pairs = [(src, copy), (src.with_suffix(".yaml"), copy.with_suffix(".yaml"))]
    for a, b in pairs:
        if a.exists() and not b.exists():
            os.link(a, b)
    host.post("/sdapi/v1/refresh-checkpoints", {})
    yield copy.stem
    for _, b in pairs:
        b.unlink(missing_ok=True)
    host.post("/sdapi/v1/refresh-checkpoints", {})


def test_remake_and_grid_in_the_browser(web, browser, second_checkpoint):  # noqa: F811
    host, sd1 = web
    loaded(host, sd1)
    name = f"uicat{time.time_ns() % 10**5}"
    host.post("/ti/v1/create", {"name": name, "vectors": 2, "init_text": "a ginger cat"})
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(host.base, wait_until="load", timeout=180_000)
    page.wait_for_selector("#tabs", timeout=180_000)
    _tab(page, "#tabs", "Textual Inversion").click()
    _tab(page, "#ti_tabs", "Inspect").click()
    page.locator("#ti_inspect_refresh").click()
    box = page.locator("#ti_inspect_file input").first
    box.click()
    box.fill(f"{name}.safetensors")
    box.press("Enter")
    page.wait_for_function(
        f"document.querySelector('#ti_inspect_summary').innerText.includes({name!r})", timeout=60_000
    )
    # re-make for the loaded checkpoint
    page.locator("#ti_remake .label-wrap").first.click()
    page.locator("#ti_remake_start").click()
    page.wait_for_function(
        "document.querySelector('#ti_remake_note').innerText.includes('Re-made')", timeout=120_000
    )
    note = page.locator("#ti_remake_note").first.inner_text()
    assert f"{name}-{sd1}" in note, note
    table = page.locator("#ti_remake_table").first.inner_text()
    assert "clip_l" in table and "overall" in table, table  # same checkpoint: cosine 1, |Δ| 0
    _shot(page, "remake.png" if sd1 == "tiny-sd1" else "forge-remake.png", "#ti_remake")

    # a grid: the embedding and its re-made copy on two checkpoints
    page.locator("#ti_grid .label-wrap").first.click()
    page.locator("#ti_grid_refresh").click()
    time.sleep(1)
    pick = page.locator("#ti_grid_embeddings input").first
    for row in (name, f"{name}-{sd1}"):
        pick.click()
        pick.fill(row)
        pick.press("Enter")
    page.locator("#ti_grid_checkpoints label").filter(has_text=second_checkpoint).first.click()
    _fill(page, "ti_grid_steps", "2", number=True)
    _fill(page, "ti_grid_width", "64", number=True)
    _fill(page, "ti_grid_height", "64", number=True)
    _fill(page, "ti_grid_prompts", "a photo of [name] on a sofa")
    page.locator("#ti_grid_start").click()
    page.wait_for_function(
        "document.querySelector('#ti_grid_status').innerText.includes('done')", timeout=600_000
    )
    page.wait_for_selector("#ti_grid_image img", timeout=60_000)
    status = page.locator("#ti_grid_status").first.inner_text()
    assert "4 of 4 images" in status, status
    job = page.locator("#ti_grid_job textarea, #ti_grid_job input").first.input_value()
    meta = read_metadata(host.get(f"/ti/v1/jobs/{job}")["file"])
    assert meta["rows"] == [name, f"{name}-{sd1}"]
    assert sorted(meta["columns"]) == sorted([sd1, second_checkpoint])
    _shot(page, "grid.png" if sd1 == "tiny-sd1" else "forge-grid.png", "#ti_grid")
    page.close()
    assert checkpoint_label(host.get("/sdapi/v1/options")["sd_model_checkpoint"]) == sd1

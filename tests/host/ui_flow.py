"""The tab in a real browser (headless Debian chromium driven by Playwright), for any host.

Creates an embedding through the Create view and sees its card appear in txt2img's Textual Inversion
cards without a page reload; trains through the Train view and sees the host's progress bar, the
loss plot and a preview update. Screenshots go to docs/img/ (shown in the README).
Needs ``pip install -r requirements-host.txt`` and ``apt-get install chromium``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from lib_ti.io.formats import read_embedding

from ..conftest import ROOT

CHROMIUM = os.environ.get("TI_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("TI_SCREENSHOTS", ROOT / "docs" / "img"))
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium (no browser download), or a skip saying what is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-host.txt")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set TI_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


#: what Forge Classic's and reForge's UIs show for any exception raised in their main-thread loop
GENERIC_ERRORS = ("Error(s) occurred during generation", "TypeError: 'NoneType' object is not iterable")


def _tab(page, container: str, label: str):
    return page.locator(f"{container} > .tab-nav > button").filter(has_text=label).first


def _fill(page, elem_id: str, value: str, number: bool = False) -> None:
    box = page.locator(
        f"#{elem_id} input[type=number]" if number else f"#{elem_id} textarea, #{elem_id} input"
    )
    box.first.fill(value)
    box.first.press("Enter" if number else "Tab")


def _shot(page, name: str, locator: str | None = None) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    target = page.locator(locator).first if locator else page
    target.screenshot(path=str(SHOTS / name))


def loaded(host, checkpoint: str) -> None:
    """Select ``checkpoint`` and load it now (Forge and Neo load on first use), not while a page waits."""
    if not str(host.get("/sdapi/v1/options").get("sd_model_checkpoint", "")).startswith(checkpoint + "."):
        host.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoint}, timeout=900)
    host.post("/sdapi/v1/txt2img", {"prompt": "warm-up", "steps": 1, "width": 64, "height": 64}, timeout=900)


def create_and_train(host, browser, tmp_path, sd1_checkpoint: str, shot_prefix: str = "") -> None:
    """The whole flow on ``host`` (a host fixture), on its SD1 checkpoint ``sd1_checkpoint``."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-host.txt")
    loaded(host, sd1_checkpoint)
    host.post("/sdapi/v1/options", {"ti_preview_size": 64})
    data = tmp_path / "data"
    data.mkdir()
    for i, c in enumerate([(220, 60, 60), (60, 220, 60), (60, 60, 220), (220, 220, 60)]):
        Image.new("RGB", (64, 64), c).save(data / f"{i}-red thing.png")
    name = f"ui-made-{time.time_ns() % 10**6}"
    card = f"#txt2img_textual_inversion_cards_html .card[data-name='{name}']"

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:300]))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"[:300]))
    page.goto(host.base, wait_until="load", timeout=180_000)
    page.wait_for_selector("#tabs", timeout=180_000)
    # the txt2img cards are on the page before the embedding exists
    _tab(page, "#txt2img_extra_tabs", "Textual Inversion").click()
    page.wait_for_selector("#txt2img_textual_inversion_cards_html", timeout=60_000)  # may hold no card yet
    assert page.locator(card).count() == 0

    # Create
    _tab(page, "#tabs", "Textual Inversion").click()
    _tab(page, "#ti_tabs", "Create").click()
    _fill(page, "ti_create_name", name)
    _fill(page, "ti_create_init", "a red sports car")
    page.wait_for_function(
        "document.querySelector('#ti_create_tokens').innerText.includes('clip_l: 4 token')", timeout=30_000
    )
    page.locator("#ti_create_button").click()
    page.wait_for_function(
        "document.querySelector('#ti_create_result').innerText.includes('Created')", timeout=60_000
    )
    assert name in page.locator("#ti_create_card").first.inner_text()
    _shot(page, shot_prefix + "create.png", "#tab_ti_tab")
    assert read_embedding(host.embeddings / f"{name}.safetensors").num_vectors == 2

    # its card is in txt2img without a reload (the tab clicked the host's internal refresh)
    _tab(page, "#tabs", "txt2img").click()
    page.wait_for_selector(card, timeout=60_000)
    _shot(page, shot_prefix + "cards.png", "#txt2img_extra_tabs")

    # Train
    _tab(page, "#tabs", "Textual Inversion").click()
    _tab(page, "#ti_tabs", "Train").click()
    # opening the Train tab lists the embeddings for the loaded model (no click on the refresh button)
    page.wait_for_function(
        "document.querySelector('#ti_train_model_note').innerText.includes('SD1')", timeout=30_000
    )
    page.locator("#ti_train_refresh").click()
    dropdown = page.locator("#ti_train_embedding input").first
    dropdown.click()
    dropdown.fill(name)
    dropdown.press("Enter")
    _fill(page, "ti_train_dataset", str(data))
    for elem_id, value in [("ti_train_steps", "16"), ("ti_train_resolution", "64"), ("ti_train_batch", "1"),
                           ("ti_train_accum", "1"), ("ti_train_validation", "2"), ("ti_train_snapshot", "0"),
                           ("ti_train_preview_every", "8")]:  # fmt: skip
        _fill(page, elem_id, value, number=True)
    # the recipe's 100 warmup steps do not fit into 16 steps: the note says so as you type
    page.wait_for_function(
        "document.querySelector('#ti_train_lr_note').innerText.includes('must be fewer')", timeout=30_000
    )
    page.locator("#ti_train_advanced .label-wrap").first.click()
    _fill(page, "ti_train_warmup", "2", number=True)
    page.wait_for_function(
        "document.querySelector('#ti_train_lr_note').innerText.includes('2 warmup steps')", timeout=30_000
    )
    page.wait_for_function(
        "document.querySelector('#ti_train_prompts').innerText.includes('red thing')", timeout=30_000
    )
    assert page.locator("#ti_train_embedding input").first.input_value() == name
    page.locator("#ti_train_start").click()

    progress = page.locator("#tab_ti_tab .progressDiv .progress")
    progress.first.wait_for(timeout=120_000)
    seen_progress: set[str] = set()
    plots: list[str] = []
    deadline = time.time() + 600
    while time.time() < deadline:
        if progress.count():
            with contextlib.suppress(sync_api.Error):  # the bar goes away when the job ends
                seen_progress.add(progress.first.inner_text(timeout=2_000))
        points = page.locator("#ti_train_plot polyline")
        if points.count():
            plots.append(points.first.get_attribute("points") or "")
            if len(plots) == 3:
                _shot(page, shot_prefix + "train.png", "#tab_ti_tab")
        text = page.locator("#ti_train_status").first.inner_text()
        if "finished" in text or "⚠" in text or text.strip() == "Error":
            break
        time.sleep(0.5)
    status = page.locator("#ti_train_status").first.inner_text()
    print("progress texts:", sorted(seen_progress)[:5], "status:", status)
    if "finished" not in status:
        print("browser console:", *console[-20:], sep="\n  ")
        print(
            "jobs:",
            host.get("/ti/v1/embeddings")["loaded"],
            "progress:",
            host.get("/sdapi/v1/progress")["state"],
        )
    assert "finished" in status and "16/16" in status
    assert any("step" in t and "loss" in t for t in seen_progress), seen_progress  # the host's bar, our text
    assert len({p for p in plots if p}) >= 2, "the loss plot updated while training"
    page.wait_for_selector("#ti_train_previews img", timeout=60_000)
    _shot(page, shot_prefix + "train-done.png", "#tab_ti_tab")
    emb = read_embedding(host.embeddings / f"{name}.safetensors")
    assert emb.step == 16
    page.close()


def inline_prompt(host, browser, sd1_checkpoint: str, shot_prefix: str = "") -> None:
    """Embedding math typed into txt2img's prompt: the token counter counts vectors, Generate gives an
    image whose infotext carries EmbeddingMerge; pasting that infotext restores the prompt; a bad
    expression shows the host's error and no image."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-host.txt")
    loaded(host, sd1_checkpoint)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(host.base, wait_until="load", timeout=180_000)
    page.wait_for_selector("#tabs", timeout=180_000)
    _tab(page, "#tabs", "txt2img").click()
    for elem_id, value in [("txt2img_width", "64"), ("txt2img_height", "64"), ("txt2img_steps", "2")]:
        _fill(page, elem_id, value, number=True)
    prompt = "a photo of <'cat' + 'dog'*0.5> in a garden, {'oil painting'/2}"
    box = page.locator("#txt2img_prompt textarea").first
    box.fill(prompt)
    box.press("End")
    # a photo of (3) + 1 vector + in a garden , (4) + 2 vectors: the expressions count as their vectors
    counter = page.locator("#txt2img_token_counter").first
    with contextlib.suppress(sync_api.Error):
        page.wait_for_function(
            "document.querySelector('#txt2img_token_counter').innerText.trim().startsWith('10/')",
            timeout=60_000,
        )
    assert counter.inner_text().strip().startswith("10/"), counter.inner_text()
    page.locator("#txt2img_generate").click()
    page.wait_for_function(
        "document.querySelector('#html_info_txt2img').innerText.includes('EmbeddingMerge')", timeout=300_000
    )
    page.wait_for_selector("#txt2img_gallery img", timeout=60_000)
    info = page.locator("#html_info_txt2img").first.inner_text()
    assert (
        prompt in info and "<'EM_1'>=<'cat' + 'dog'*0.5>" in info and "{'EM_2'}={'oil painting'/2}" in info
    ), info
    with contextlib.suppress(sync_api.Error):  # the "Waiting..." bar goes away after the image
        page.wait_for_function("!document.querySelector('#tab_txt2img .progressDiv')", timeout=10_000)
    _shot(page, shot_prefix + "inline.png", "#tab_txt2img")

    # paste: the infotext into the prompt box and the paste button (what PNG Info's "Send to" does too)
    raw = host.post("/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 3})
    text = json.loads(raw["info"])["infotexts"][0]
    box.fill(text)
    page.locator("#paste").first.click()
    with contextlib.suppress(sync_api.Error):  # the box held the whole infotext until the paste applies
        page.wait_for_function(
            "p => document.querySelector('#txt2img_prompt textarea').value === p", arg=prompt, timeout=30_000
        )
    assert box.input_value() == prompt, box.input_value()

    # a bad expression: the host's error display, quoting the expression
    box.fill("a photo of <'cat' + > here")
    page.locator("#txt2img_generate").click()
    try:
        page.wait_for_function(
            "errs => ['embedding math', ...errs].some(e => "
            "document.querySelector('#html_log_txt2img').innerText.includes(e))",
            arg=list(GENERIC_ERRORS),
            timeout=120_000,
        )
    except sync_api.Error:
        shown = page.evaluate(
            "Array.from(document.querySelectorAll('[id^=html_log], .error')).map(e => e.id + ': ' + e.outerHTML.slice(0, 300))"
        )
        _shot(page, shot_prefix + "inline-error-debug.png", "#tab_txt2img")
        pytest.fail(f"no error shown for a bad expression; error elements: {shown}")
    log = page.locator("#html_log_txt2img").first.inner_text()
    if any(e in log for e in GENERIC_ERRORS):  # Classic, reForge: the reason is in the console only
        assert "embedding math <'cat' +> in the prompt" in host.log.read_text(errors="replace")
    else:
        assert "<'cat' +>" in log and "column 7" in log, log
    assert page.locator("#txt2img_gallery img").count() <= 1  # no new image (the earlier one may stay)
    page.close()

"""Prepare on the real A1111 (SD_WEBUI_DIR): pictures the host itself generated, prepared in the browser
(the host's own upscaler for small ones), captions edited in the caption editor, "Use this folder for
training" filling the Train view, and a training run on the folder right after; the WD tagger's first
use installing onnxruntime into the host's Python; a generation started during a Prepare run completes.
Screenshots go to docs/img/prepare*.png."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_ti.training.buckets import bucket_set

from .ui_flow import _fill, _shot, _tab, browser, loaded

pytestmark = pytest.mark.host
__all__ = ["browser"]
CHECKPOINT = "tiny-sd1"


def wait_job(host, job: str, timeout: float = 900) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        st = host.get(f"/ti/v1/jobs/{job}")
        if st["state"] not in ("queued", "running"):
            return st
        time.sleep(0.3)
    raise AssertionError(f"job {job} did not end")


def generated(host, folder: Path) -> list[str]:
    """Six pictures from the host's txt2img (two sizes), a 1x1 and a damaged file."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (w, h) in enumerate([(128, 96), (96, 128), (160, 160)]):
        r = host.post("/sdapi/v1/txt2img", {"prompt": f"a red thing {i}", "steps": 2, "width": w, "height": h,
                                            "batch_size": 2, "seed": 100 + i})  # fmt: skip
        for j, b64 in enumerate(r["images"]):
            name = f"gen-{i}-{j}.{'jpg' if j else 'png'}"
            Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").save(folder / name)
            names.append(name)
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"x" * 50)
    return names


def test_prepare_in_the_browser_then_train_on_it(a1111, browser, tmp_path):
    host = a1111
    loaded(host, CHECKPOINT)
    src, out = tmp_path / "raw", tmp_path / "prepared"
    generated(host, src)
    opts = host.get("/ti/v1/prepare")
    assert "Nearest" in opts["upscalers"] and "Lanczos" not in opts["upscalers"]
    assert {"blip", "deepbooru"} <= set(opts["captioners"]) and opts["captioner_note"] == ""

    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.goto(host.base, wait_until="load", timeout=180_000)
    page.wait_for_selector("#tabs", timeout=180_000)
    _tab(page, "#tabs", "Textual Inversion").click()
    _tab(page, "#ti_tabs", "Prepare").click()
    _fill(page, "ti_prepare_source_dir", str(src))
    _fill(page, "ti_prepare_output_dir", str(out))
    _fill(page, "ti_prepare_resolution", "128", number=True)
    _fill(page, "ti_prepare_caption_prefix", "[name], generated")
    page.locator("#ti_prepare_pictures .label-wrap").first.click()
    upscaler = page.locator("#ti_prepare_upscaler input").first
    upscaler.click()
    upscaler.fill("Nearest")
    upscaler.press("Enter")
    page.locator("#ti_prepare_start").click()
    page.wait_for_function(
        "document.querySelector('#ti_prepare_status').innerText.includes('done')", timeout=300_000
    )
    status = page.locator("#ti_prepare_status").first.inner_text()
    report = page.locator("#ti_prepare_report").first.inner_text()
    assert "6 image(s) and 6 caption(s)" in status, status
    assert "dot.png" in report and "broken.jpg" in report
    # the caption editor opened the new folder
    page.wait_for_selector("#ti_captions_gallery img", timeout=60_000)
    page.wait_for_function(
        "document.querySelector('#ti_captions_tags').innerText.includes('generated')", timeout=60_000
    )
    _shot(page, "prepare.png", "#tab_ti_tab")
    _fill(page, "ti_captions_tag", "generated")
    _fill(page, "ti_captions_new_tag", "made by the host")
    page.locator("#ti_captions_rename").click()
    page.wait_for_function(
        "document.querySelector('#ti_captions_tags').innerText.includes('made by the host')", timeout=60_000
    )
    assert (out / "gen-0-0.txt").read_text(encoding="utf-8").strip() == "[name], made by the host"
    _shot(page, "prepare-captions.png", "#ti_captions")
    page.locator("#ti_captions_undo").click()
    page.wait_for_function(
        "document.querySelector('#ti_captions_tags').innerText.includes('generated')", timeout=60_000
    )
    assert (out / "gen-0-0.txt").read_text(encoding="utf-8").strip() == "[name], generated"
    # "Use this folder for training" fills the Train view's folder and shows it
    page.locator("#ti_prepare_use").click()
    page.wait_for_function(
        f"document.querySelector('#ti_train_dataset textarea, #ti_train_dataset input').value === {str(out)!r}",
        timeout=30_000,
    )
    assert page.locator("#ti_train_dataset").first.is_visible()
    page.close()

    # every prepared image is exactly one of the trainer's buckets, so training uses it as it is
    sizes = {Image.open(p).size[::-1] for p in out.glob("*.png")}
    assert sizes and sizes <= set(bucket_set(128)), sizes
    name = f"prep-{time.time_ns() % 10**6}"
    host.post("/ti/v1/create", {"name": name, "vectors": 1, "init_text": "thing"})
    job = host.post("/ti/v1/train", {"embedding": name, "dataset_dir": str(out), "steps": 4, "batch_size": 1,
                                     "grad_accum": 1, "resolution": 128, "warmup_steps": 0, "preview_every": 0,
                                     "snapshot_every": 0, "validation_every": 0})["job"]  # fmt: skip
    st = wait_job(host, job)
    assert st["state"] == "done" and st["step"] == 4, st
    print("prepare -> train:", st["message"])


def test_the_wd_tagger_installs_its_runtime_on_first_use(a1111, tmp_path):
    """The tiny tagger model is put where the hub download would put it; onnxruntime is installed into
    the host's Python by the job itself when missing (the real first-use path)."""
    pytest.importorskip("onnx")
    from ..test_tagger import build_model, write_csv

    host = a1111
    loaded(host, CHECKPOINT)
    folder = host.webui / "models" / "ti-taggers" / "SmilingWolf--wd-vit-tagger-v3"
    folder.mkdir(parents=True, exist_ok=True)
    build_model(folder / "model.onnx")
    write_csv(folder / "selected_tags.csv")
    src = tmp_path / "raw"
    src.mkdir()
    Image.new("RGB", (200, 150), (230, 20, 20)).save(src / "red.png")
    Image.new("RGB", (150, 200), (20, 200, 20)).save(src / "green.png")
    job = host.post("/ti/v1/prepare", {"source_dir": str(src), "output_dir": str(tmp_path / "out"),
                                       "resolution": 128, "captioner": "wd14"})["job"]  # fmt: skip
    st = wait_job(host, job, timeout=1800)
    assert st["state"] == "done", st["error"]
    assert "ganyu \\(genshin impact\\)" in (tmp_path / "out" / "red.txt").read_text(encoding="utf-8")
    assert "green hair" in (tmp_path / "out" / "green.txt").read_text(encoding="utf-8")
    print(
        "tagger log:",
        [
            line
            for line in host.log.read_text(errors="replace").splitlines()
            if "onnxruntime" in line or "WD tagger" in line
        ][-5:],
    )


def test_a_generation_during_a_prepare_run_completes(a1111, tmp_path):
    host = a1111
    loaded(host, CHECKPOINT)
    src = tmp_path / "big"
    src.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1536, 0:2048].astype(np.float32)
    for i in range(24):
        a, b = rng.uniform(0.002, 0.02, 2)
        arr = np.stack([127 + 120 * np.sin(a * x + i), 127 + 120 * np.cos(b * y), (x + y) % 256], -1)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(src / f"{i:02d}.png", compress_level=1)
    gen = {"prompt": "during prepare", "steps": 2, "width": 64, "height": 64}
    t0 = time.time()
    host.post("/sdapi/v1/txt2img", gen)
    idle_s = time.time() - t0
    job = host.post("/ti/v1/prepare", {"source_dir": str(src), "output_dir": str(tmp_path / "out"),
                                       "resolution": 512, "dedupe": False})["job"]  # fmt: skip
    time.sleep(0.5)
    assert host.get(f"/ti/v1/jobs/{job}")["state"] == "running"
    t0 = time.time()
    r = host.post("/sdapi/v1/txt2img", gen)
    gen_s = time.time() - t0
    during = host.get(f"/ti/v1/jobs/{job}")
    st = wait_job(host, job)
    print(f"generation during prepare: {gen_s:.2f} s (idle {idle_s:.2f} s, ratio {gen_s / idle_s:.2f}); prepare then at {during['step']}/{during['steps']}, "
          f"ended after {st['report']['seconds']} s")  # fmt: skip
    assert len(r["images"]) == 1
    assert during["state"] == "running", "the generation finished while the Prepare run was still going"
    assert st["state"] == "done" and len(st["report"]["written"]) == 24


#: host -> (its SD1 checkpoint, whether it still has BLIP and DeepBooru)
FAMILY = {"forge": True, "neo": False, "classic": False, "reforge": True}


@pytest.mark.parametrize("name", list(FAMILY))
def test_prepare_on_the_forge_family(name, request, tmp_path):
    """Prepare through the REST API on Forge, Neo, Classic and reForge: what each offers (Neo and Classic
    removed the interrogators: said so), the loaded model's buckets, the host's upscaler, caption edits."""
    host = request.getfixturevalue(name)
    loaded(host, "rand-sd15")
    opts = host.get("/ti/v1/prepare")
    interrogators = {"blip", "deepbooru"} <= set(opts["captioners"])
    assert interrogators is FAMILY[name], opts
    if not FAMILY[name]:
        assert "has no BLIP and DeepBooru interrogator" in opts["captioner_note"], opts
        assert opts["captioner_note"].split(" has no")[0] in ("Forge Neo", "Forge Classic")
    assert "Nearest" in opts["upscalers"], opts["upscalers"]
    src, out = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    y, x = np.mgrid[0:300, 0:400].astype(np.float32)
    for i in range(3):
        arr = np.stack([x * (i + 1) % 256, y % 256, (x + y) / 3 % 256], -1).astype(np.uint8)
        Image.fromarray(arr).save(src / f"p{i}.png")
    Image.new("RGB", (1, 1)).save(src / "dot.png")
    job = host.post("/ti/v1/prepare", {"source_dir": str(src), "output_dir": str(out), "upscaler": "Nearest",
                                       "caption_prefix": "[name], thing"})["job"]  # fmt: skip
    st = wait_job(host, job)
    assert st["state"] == "done", st
    rep = st["report"]
    assert rep["resolution"] == 512 and len(rep["written"]) == 3 and rep["skipped"][0].startswith("dot.png")
    sizes = {Image.open(out / w).size[::-1] for w in rep["written"]}
    assert sizes <= set(bucket_set(512)), sizes
    got = host.post(
        "/ti/v1/captions", {"folder": str(out), "op": "rename_tag", "tag": "thing", "new_tag": "item"}
    )
    assert got["changed"] == 3 and ["item", 3] in got["tags"]
    got = host.post("/ti/v1/captions", {"folder": str(out), "op": "undo"})
    assert (out / "p0.txt").read_text(encoding="utf-8").strip() == "[name], thing"

"""Embedding math in prompts inside a real AUTOMATIC1111 v1.10: a model switch SD1 -> SDXL -> SD1
(skipped unless SD_WEBUI_DIR is set). The checks every host runs are in test_inline_hosts.py."""

from __future__ import annotations

import json

import pytest

from . import inline_flow as flow

pytestmark = pytest.mark.host


def test_model_switch_sd1_sdxl_sd1(a1111):
    salt = flow.unique()
    prompt = f"a photo of <'cat'+'dog'*0.5>, {salt}"
    on_sd1 = flow.pixels(flow.txt2img(a1111, prompt))
    a1111.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sdxl"})
    try:
        name = flow.saved(a1111, "'cat'+'dog'*0.5", "x")
        inline = flow.txt2img(a1111, prompt)
        assert flow.pixels(inline) == flow.pixels(
            flow.txt2img(a1111, prompt.replace("<'cat'+'dog'*0.5>", name))
        )
        assert flow.pixels(inline) != on_sd1
        assert "EmbeddingMerge" in flow.info(inline)
    finally:
        a1111.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1"})
    assert flow.pixels(flow.txt2img(a1111, prompt)) == on_sd1  # no stale conditioning from SDXL
    flow.no_temporary_names(a1111)


def test_xyz_prompt_search_and_replace(a1111):
    """X/Y/Z plot's Prompt S/R makes a prompt per cell: each cell's expression is evaluated."""
    salt = flow.unique()
    cat, dog = flow.saved(a1111, "'cat'*2", "sr"), flow.saved(a1111, "'dog'*2", "sr")
    # Prompt S/R is the 8th axis type on txt2img; include the single images after the grid
    xyz = [7, "cat,dog", [], 0, "", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    res = flow.txt2img(a1111, f"a <'cat'*2> {salt}", script_name="x/y/z plot", script_args=xyz)
    cells = [flow.pixels(res, i) for i in range(len(res["images"]))]
    assert flow.pixels(flow.txt2img(a1111, f"a {cat} {salt}")) in cells
    assert flow.pixels(flow.txt2img(a1111, f"a {dog} {salt}")) in cells
    infos = json.loads(res["info"])["infotexts"]
    assert any("EmbeddingMerge: <'EM_1'>=<'dog'*2>" in t for t in infos), infos

"""Embedding math in prompts inside a real AUTOMATIC1111 v1.10: a model switch SD1 -> SDXL -> SD1
(skipped unless SD_WEBUI_DIR is set). The checks every host runs are in test_inline_hosts.py."""

from __future__ import annotations

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

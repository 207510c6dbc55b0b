"""Embedding math in prompts inside a real AUTOMATIC1111 v1.10 (skipped unless SD_WEBUI_DIR is set).

The tests are tests/host/inline_flow.py's, shared with Forge and Forge Neo; the model switch is here.
"""

from __future__ import annotations

import pytest

from . import inline_flow as flow
from .inline_flow import (  # noqa: F401 (the shared tests)
    first,
    test_bad_expression_generates_nothing,
    test_batch_of_two_expressions,
    test_em_infotext_pastes,
    test_hires_prompt,
    test_paste_round_trip,
    test_same_image_inline_and_saved,
    test_token_counter,
)

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def host(a1111):
    return a1111


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

"""Embedding math in prompts inside a real Forge Classic (skipped unless SD_CLASSIC_DIR is set).

The tests are tests/host/inline_flow.py's, shared with A1111, Forge and Forge Neo. SD1.5 only: the test host has
no SDXL checkpoint (RAM), so the model switch is A1111's test.
"""

from __future__ import annotations

import pytest

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
def host(classic):
    return classic

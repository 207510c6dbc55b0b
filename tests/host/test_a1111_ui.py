"""The tab in a real browser against the real A1111 (screenshots for the README: docs/img/)."""

from __future__ import annotations

import pytest

from .ui_flow import browser, create_and_train, inline_prompt

pytestmark = pytest.mark.host
__all__ = ["browser"]


def test_create_and_train_in_the_browser(a1111, browser, tmp_path):
    create_and_train(a1111, browser, tmp_path, "tiny-sd1")


def test_embedding_math_in_the_prompt_box(a1111, browser):
    inline_prompt(a1111, browser)

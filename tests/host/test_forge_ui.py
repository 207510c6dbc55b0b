"""The tab in a real browser against the real Forge (gradio 4.40); screenshots as docs/img/forge-*.png."""

from __future__ import annotations

import pytest

from .ui_flow import browser, create_and_train

pytestmark = pytest.mark.host
__all__ = ["browser"]


def test_create_and_train_in_the_browser_on_forge(forge, browser, tmp_path):
    create_and_train(forge, browser, tmp_path, "rand-sd15", shot_prefix="forge-")

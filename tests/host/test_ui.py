"""The tab in a real browser against each real host (gradio 3 on A1111, Classic and reForge; gradio 4 on
Forge and Neo): create, the card in txt2img without a reload, train with the host's progress bar.
Screenshots for the README go to docs/img/ (``<host>-*.png``; A1111's without a prefix)."""

from __future__ import annotations

import pytest

from .ui_flow import browser, create_and_train, inline_prompt

pytestmark = pytest.mark.host
__all__ = ["browser"]

#: host -> (its SD1 checkpoint, the screenshots' prefix)
HOSTS = {
    "a1111": ("tiny-sd1", ""),
    "forge": ("rand-sd15", "forge-"),
    "neo": ("rand-sd15", "neo-"),
    "classic": ("rand-sd15", "classic-"),
    "reforge": ("rand-sd15", "reforge-"),
}


@pytest.fixture(scope="module", params=list(HOSTS))
def host(request):
    return request.getfixturevalue(request.param), *HOSTS[request.param]


def test_create_and_train_in_the_browser(host, browser, tmp_path):
    h, checkpoint, prefix = host
    create_and_train(h, browser, tmp_path, checkpoint, shot_prefix=prefix)


def test_embedding_math_in_the_prompt_box(host, browser):
    h, checkpoint, prefix = host
    inline_prompt(h, browser, checkpoint, shot_prefix=prefix)

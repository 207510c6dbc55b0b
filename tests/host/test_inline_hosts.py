"""Embedding math in prompts on every real host: A1111, Forge, Forge Neo, Forge Classic, reForge.

Each host runs when its variable is set (SD_WEBUI_DIR, SD_FORGE_DIR, SD_NEO_DIR, SD_CLASSIC_DIR,
SD_REFORGE_DIR: tests/host/README.md) and skips otherwise; run one host at a time. The checks are in
tests/host/inline_flow.py; A1111's model switch SD1 -> SDXL -> SD1 is in test_a1111_inline.py.
"""

from __future__ import annotations

import pytest

from lib_ti import __version__

from .inline_flow import (
    check_bad_expression,
    check_batch,
    check_em_infotext,
    check_hires,
    check_img2img,
    check_paste_round_trip,
    check_same_image,
    check_token_counter,
    info,
)

pytestmark = pytest.mark.host


@pytest.fixture(scope="module", params=["a1111", "forge", "neo", "classic", "reforge"])
def host(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def first(host):
    return check_same_image(host, "a")


def test_same_image_inline_and_saved(first):
    assert first["images"]
    assert "TI:" not in info(first)  # Forge's "TI: name" line does not list the temporary names


def test_hires_prompt(host):
    check_hires(host, "h")


def test_img2img(host):
    check_img2img(host, "i")


def test_batch_of_two_expressions(host):
    check_batch(host, "b")


def test_paste_round_trip(host, first):
    check_paste_round_trip(host, first)


def test_em_infotext_pastes(host, first):
    check_em_infotext(host, first)


def test_bad_expression_generates_nothing(host):
    check_bad_expression(host)


def test_token_counter(host):
    check_token_counter(host)


def test_detected_as_its_host(host, request):
    """Each host gets its own adapter name in the start-up line (Forge Neo: "neo", from forge_version.py)."""
    name = request.node.callspec.params["host"]
    labels = {"a1111": "AUTOMATIC1111", "forge": "Forge", "neo": "Forge Neo", "classic": "Forge Classic",
              "reforge": "reForge"}  # fmt: skip
    line = f"Textual Inversion tab (lib_ti {__version__}) loaded on {labels[name]} ({name})."
    assert line in host.log.read_text(errors="replace")

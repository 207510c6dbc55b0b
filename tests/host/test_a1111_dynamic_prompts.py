"""Embedding math in prompts next to sd-dynamic-prompts, in the real A1111 (skipped unless SD_WEBUI_DIR
is set and the host has sd-dynamic-prompts in ``extensions/sd-dynamic-prompts``, tests/host/README.md).

sd-dynamic-prompts reads ``{…}`` as its variants; ``{'…'}`` must still be an expression, and
expressions inside its variants must work.
"""

from __future__ import annotations

import json
import os

import pytest

from . import inline_flow as flow
from .conftest import running_host

pytestmark = pytest.mark.host

#: sd-dynamic-prompts 2.17.1 registers its settings after A1111 1.10 has built them, so a fresh install
#: has none and its process() fails (AttributeError: dp_ignore_whitespace); its defaults, given here
DP_SETTINGS = {
    "dp_ignore_whitespace": False, "dp_write_raw_template": False, "dp_write_prompts_to_file": False,
    "dp_parser_variant_start": "{", "dp_parser_variant_end": "}", "dp_parser_wildcard_wrap": "__",
    "dp_limit_jinja_prompts": False, "dp_auto_purge_cache": False, "dp_wildcard_manager_no_dedupe": False,
    "dp_wildcard_manager_no_sort": False, "dp_wildcard_manager_shuffle": False,
    "dp_magicprompt_default_model": "", "dp_magicprompt_batch_size": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def host(host_paths, tmp_path_factory):
    """Its own A1111 (port SD_WEBUI_PORT + 1) with a settings file that holds sd-dynamic-prompts' defaults."""
    webui, python, _ = host_paths
    if not (webui / "extensions" / "sd-dynamic-prompts" / "scripts" / "dynamic_prompting.py").is_file():
        pytest.skip("sd-dynamic-prompts is not in the host's extensions/ (tests/host/README.md)")
    tmp = tmp_path_factory.mktemp("dp")
    (tmp / "config.json").write_text(json.dumps(DP_SETTINGS))
    port = int(os.environ.get("SD_WEBUI_PORT", "7861")) + 1
    extra = ["--ui-settings-file", str(tmp / "config.json")]
    embeddings = tmp / "embeddings"  # its own: the session host's folder holds what other tests expect
    embeddings.mkdir()
    with running_host(webui, python, embeddings, tmp / "webui.log", port, extra) as (h, _proc):
        h.post("/sdapi/v1/reload-checkpoint", {})
        yield h


def same_image(host, expression: str, tag: str, inline_prompt: str, named_prompt: str) -> tuple[dict, str]:
    """``inline_prompt`` (with the expression) and ``named_prompt`` (with ``{name}``, an embedding saved
    from it) give the same image; returns the inline result and the salt both prompts end with."""
    salt = flow.unique()
    name = flow.saved(host, expression, tag)
    inline = flow.txt2img(host, f"{inline_prompt} {salt}")
    named = flow.txt2img(host, f"{named_prompt.format(name=name)} {salt}")
    assert flow.pixels(inline) == flow.pixels(named)
    return inline, salt


def test_curly_expression_and_dynamic_prompts_variants(host):
    inline, salt = same_image(
        host, "'cat'+'dog'", "dp", "a photo of {'cat'+'dog'}, {red|red}", "a photo of {name}, red"
    )
    text = flow.info(inline)
    assert text.startswith(f"a photo of {{'cat'+'dog'}}, red {salt}\n"), text  # the prompt it generated
    assert "EmbeddingMerge: {'EM_1'}={'cat'+'dog'}" in text, text


def test_expressions_inside_variants(host):
    inline, _ = same_image(host, "'cat'*2", "dv", "a {<'cat'*2>|<'cat'*2>}", "a {name}")
    assert "EmbeddingMerge: <'EM_1'>=<'cat'*2>" in flow.info(inline)

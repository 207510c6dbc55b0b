"""The host hook of embedding math in prompts (lib_ti.host.inline) over a stand-in for the web UI's
``modules`` (thin glue only: tests/host runs the real hosts: A1111, Forge, Forge Neo)."""

from __future__ import annotations

import contextlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from lib_ti.host import inline
from lib_ti.inline.plan import TEMP_PREFIX, InlineEvaluator
from lib_ti.merge import MergeContext, MergeError

from .conftest import define_torchvision_ops


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)


class Processing:
    def __init__(self, prompts, negatives=()):
        self.all_prompts = list(prompts)
        self.all_negative_prompts = list(negatives) or [""] * len(prompts)
        self.extra_generation_params = {}

    def get_conds_with_caching(
        self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None
    ):
        result = function(None, required_prompts, steps)
        caches[0][:2] = [tuple(required_prompts), result]
        return result


@pytest.fixture
def host(monkeypatch):
    """A fake web UI: its modules, a registry of temporary names, a service over a real merge context."""
    define_torchvision_ops()
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    table = torch.randn(49408, 768, generator=torch.Generator().manual_seed(1))
    ctx = MergeContext(("clip_l",), tok.encode, lambda ids: {"clip_l": table[torch.tensor(ids)]}, {})
    opts = SimpleNamespace(ti_inline=True, ti_inline_curly=True)
    callbacks: dict[str, list] = {"pasted": [], "counter": []}
    sd_model = SimpleNamespace(extra_generation_params={})
    mods = {
        "modules": types.ModuleType("modules"),
        "modules.shared": SimpleNamespace(opts=opts, sd_model=sd_model),
        "modules.prompt_parser": SimpleNamespace(SdConditioning=SdConditioning),
        "modules.processing": SimpleNamespace(StableDiffusionProcessing=type("SDP", (Processing,), {})),
        "modules.script_callbacks": SimpleNamespace(
            on_infotext_pasted=callbacks["pasted"].append, on_before_token_counter=callbacks["counter"].append
        ),
        "modules.extensions": SimpleNamespace(active=list),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            setattr(mods["modules"], name.split(".")[1], mod)
    monkeypatch.setattr(inline, "_STATE", {})
    registered: dict[str, object] = {}
    log: list[str] = []

    @contextlib.contextmanager
    def temporary(embeddings):
        registered.update(embeddings)
        log.append("enter")
        try:
            yield
        finally:
            for name in embeddings:
                registered.pop(name)
            log.append("exit")

    service = SimpleNamespace(inline=InlineEvaluator(), inline_context=lambda: ctx)
    inline.install(lambda: service, temporary, lambda: True)
    cls = mods["modules.processing"].StableDiffusionProcessing
    return SimpleNamespace(cls=cls, opts=opts, registered=registered, log=log, callbacks=callbacks,
                           sd_model=sd_model, mods=mods, temporary=temporary, service=service)  # fmt: skip


def run(host, prompts, negatives=()):
    p = host.cls(prompts, negatives)
    seen = {}

    def function(model, texts, steps):
        seen["texts"] = texts
        seen["registered"] = dict(host.registered)
        return "cond"

    required = SdConditioning(prompts, width=64)
    caches = [[None, None, {}]]
    assert p.get_conds_with_caching(function, required, 20, caches, None) == "cond"
    return p, seen, required, caches


def test_expressions_become_registered_names_for_the_call_only(host):
    p, seen, required, _ = run(host, ["a <'cat'+'dog'> b", "plain"])
    texts = seen["texts"]
    assert isinstance(texts, SdConditioning) and texts.width == 64 and texts is not required
    (name,) = seen["registered"]
    assert name.startswith(TEMP_PREFIX) and texts == [f"a  {name}  b", "plain"]
    assert host.registered == {} and host.log == ["enter", "exit"]
    assert list(required) == ["a <'cat'+'dog'> b", "plain"]  # the job's prompts stay as written
    assert p.extra_generation_params["EmbeddingMerge"] == ["<'EM_1'>=<'cat'+'dog'>", None]  # per image


def test_plain_prompts_pass_untouched(host):
    p, seen, required, _ = run(host, ["a cat", "a dog"])
    assert seen["texts"] is required and host.log == []
    assert "EmbeddingMerge" not in p.extra_generation_params


def test_a_bad_expression_anywhere_in_the_job_stops_before_encoding(host):
    p = host.cls(["a <'cat'>", "b <'dog'>"], ["", "x <'cat' + > y"])
    with pytest.raises(MergeError, match=r"embedding math <'cat' \+> in the prompt") as e:
        p.get_conds_with_caching(
            lambda *a: pytest.fail("encoded"), SdConditioning(["a <'cat'>"]), 20, [[None, None]], None
        )
    assert e.value.column == 7 and host.log == []


def test_forge_ti_line_loses_the_temporary_names(host):
    host.sd_model.extra_generation_params["TI"] = "mine"
    p = host.cls(["<'cat'>"])

    def function(model, texts, steps):
        names = ", ".join(["mine", *host.registered])
        host.sd_model.extra_generation_params["TI"] = names  # as Forge's engine writes it
        return "cond"

    caches = [[None, None, {"TI": f"{TEMP_PREFIX}abc"}]]
    p.get_conds_with_caching(function, SdConditioning(["<'cat'>"]), 20, caches, None)
    assert host.sd_model.extra_generation_params["TI"] == "mine"
    assert "TI" not in caches[0][2]


def test_settings_and_em_turn_it_off(host, capsys):
    host.opts.ti_inline = False
    _, seen, required, _ = run(host, ["a <'cat'>"])
    assert seen["texts"] is required
    host.opts.ti_inline = True
    host.opts.ti_inline_curly = False
    _, seen, _, _ = run(host, ["a {'cat'}"])
    assert seen["texts"] == ["a {'cat'}"]
    host.opts.ti_inline_curly = True
    em = SimpleNamespace(path=str(_em_extension()))
    host.mods["modules.extensions"].active = lambda: [em]
    inline._STATE.pop("em", None)
    _, seen, required, _ = run(host, ["a <'cat'>"])
    assert seen["texts"] is required  # EM handles its syntax itself
    assert "Embedding Merge extension is enabled" in capsys.readouterr().out
    params = {"Prompt": "<'EM_1'>", "EmbeddingMerge": "<'EM_1'>=<'cat'>"}
    host.callbacks["pasted"][0]("", params)
    assert params["Prompt"] == "<'EM_1'>"  # nor pasting: EM does it


def _em_extension():
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp()) / "stable-diffusion-webui-embedding-merge"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "embedding_merge.py").write_text("# stand-in\n")
    return root


def test_paste_and_token_counter_callbacks(host):
    params = {"Prompt": "x <'EM_1'>", "EmbeddingMerge": "<'EM_1'>=<'cat'+'dog'>"}
    host.callbacks["pasted"][0]("x", params)
    assert params["Prompt"] == "x <'cat'+'dog'>"
    counter = host.callbacks["counter"][0]
    p = SimpleNamespace(prompt="a <'a photo of a cat'> b")
    counter(p)
    assert p.prompt == "a  a a a a a  b"


def test_reload_ui_does_not_wrap_twice(host):
    first = host.cls.get_conds_with_caching
    inline.install(lambda: host.service, host.temporary, lambda: True)
    second = host.cls.get_conds_with_caching
    assert second._lib_ti_inline_original is first._lib_ti_inline_original
    run(host, ["a <'cat'>"])
    assert host.log == ["enter", "exit"]  # one hook, not two


def test_curly_expressions_survive_dynamic_prompts(host, monkeypatch, tmp_path):
    (tmp_path / "dp" / "scripts").mkdir(parents=True)
    (tmp_path / "dp" / "scripts" / "dynamic_prompting.py").write_text("# stand-in\n")
    host.mods["modules.extensions"].active = lambda: [SimpleNamespace(path=str(tmp_path / "dp"))]
    p = SimpleNamespace(prompt="a {'cat'+'dog'} {red|blue} <'sky'>", negative_prompt="{'x'}", hr_prompt="",
                        all_prompts=["a {'cat'+'dog'} {red|blue} <'sky'>"], all_negative_prompts=["{'x'}"])  # fmt: skip
    inline.protect_curly(p)
    assert p.prompt == "a <'cat'+'dog'> {red|blue} <'sky'>" and p.all_negative_prompts == ["<'x'>"]
    # what sd-dynamic-prompts does: it expands its own {a|b} and leaves <'…'> alone
    p.all_prompts = [p.all_prompts[0].replace("{red|blue}", "blue")]
    inline.restore_curly(p)
    assert p.all_prompts == ["a {'cat'+'dog'} blue <'sky'>"] and p.all_negative_prompts == ["{'x'}"]
    assert p.prompt == "a {'cat'+'dog'} {red|blue} <'sky'>"
    inline.restore_curly(p)  # once only
    assert p.all_prompts == ["a {'cat'+'dog'} blue <'sky'>"]


def test_no_dynamic_prompts_no_rewriting(host):
    p = SimpleNamespace(prompt="a {'cat'}", all_prompts=["a {'cat'}"])
    inline.protect_curly(p)
    assert p.prompt == "a {'cat'}" and not getattr(p, "_lib_ti_curly", None)

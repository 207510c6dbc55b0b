"""Embedding math in prompts (lib_ti.inline): finding expressions, rewriting prompts, EM's infotext field,
the token counter text; and the host hook's glue with a minimal stand-in for the web UI's processing.

The merge context is real except for the numbers in the tables: the CLIP BPE tokenizer from open_clip
and seeded random token tables of the real sizes.
"""

from __future__ import annotations

import pytest
import torch

from lib_ti.embedding import Embedding
from lib_ti.inline import infotext
from lib_ti.inline.plan import COUNT_FILLER, TEMP_PREFIX, InlineEvaluator, temp_name
from lib_ti.inline.scan import PromptExpressionError, find_expressions, replace_expressions
from lib_ti.merge import MergeContext, MergeError, evaluate

from .test_merge import make_ctx as merge_ctx

SDXL = ("clip_l", "clip_g")


def make_ctx(tokenizer, tables, encoders=SDXL, embeddings=None) -> MergeContext:
    pads = {"clip_l": 49407, "clip_g": 0}
    return merge_ctx(tokenizer, tables, embeddings or {}, encoders, pad_ids={e: pads[e] for e in encoders})


@pytest.fixture(scope="module")
def sdxl(tokenizer, tables):
    return make_ctx(tokenizer, tables)


@pytest.fixture(scope="module")
def sd1(tokenizer, tables):
    return make_ctx(tokenizer, tables, encoders=("clip_l",))


# ---------------------------------------------------------------- finding expressions


@pytest.mark.parametrize(
    ("prompt", "exprs"),
    [
        ("a photo of <'cat'+'dog'>, best", ["'cat'+'dog'"]),
        ("(<'cat'+'dog'>:1.2), [<'sky'>:<'sea'*0.5>:0.5]", ["'cat'+'dog'", "'sky'", "'sea'*0.5"]),
        ("a [<'cat'>|dog] BREAK {'blurry'+'cropped'} more", ["'cat'", "'blurry'+'cropped'"]),
        ("<lora:detail:0.8> <hypernet:x:1> {a|b} < 'not' > { 'not' }", []),
        ("<'it''s'> and <'a>b'*2>", ["'it''s'", "'a>b'*2"]),
        ("<'', 256 , 00 >x", ["'', 256 , 00"]),
        ("{'a}b'}", ["'a}b'"]),
        ("no expressions here", []),
    ],
)
def test_find_expressions(prompt, exprs):
    assert [f.expr for f in find_expressions(prompt)] == exprs


def test_find_positions_and_brackets():
    prompt = "x <'cat'> y {'dog'} z"
    found = find_expressions(prompt)
    assert [(f.start, f.end, f.curly) for f in found] == [(2, 9, False), (12, 19, True)]
    assert [prompt[f.start : f.end] for f in found] == [f.bracketed for f in found]
    assert [f.expr for f in find_expressions(prompt, curly=False)] == ["'cat'"]


def test_unclosed_and_placeholders_are_located_errors():
    with pytest.raises(PromptExpressionError, match=r"no closing '>' after <'") as info:
        find_expressions("a photo <'cat'+'dog' and more")
    assert info.value.column == 9 and "^" in str(info.value)
    with pytest.raises(PromptExpressionError, match="unclosed|no closing"):
        find_expressions("a <'cat> b")  # the quote never closes, so '>' is inside the string
    with pytest.raises(PromptExpressionError, match=r"<'EM_1'> is a name the Embedding Merge extension gave"):
        find_expressions("a photo of <'EM_1'>")


def test_replace_spaces_names_apart_and_removes_empty():
    prompt = "a,<'x'>,b <'y'>c"
    found = find_expressions(prompt)
    assert replace_expressions(prompt, found, ["N1", ""]) == "a, N1 ,b  c"


# ---------------------------------------------------------------- evaluating and rewriting


def test_plan_rewrites_with_names_from_vectors(sdxl, sd1):
    ev = InlineEvaluator()
    plan = ev.plan(sdxl, ["a photo of <'cat'+'dog'>, (<'cat' + 'dog'>:1.1)", "plain", "", "{'sky'*2}"])
    names = list(plan.embeddings)
    assert len(names) == 2  # 'cat'+'dog' written twice (other spacing): one embedding
    first = names[0]
    assert first.startswith(TEMP_PREFIX)
    assert plan.prompts[0] == f"a photo of  {first} , ( {first} :1.1)"
    assert plan.prompts[1:3] == ["plain", ""]
    want = evaluate("'cat'+'dog'", sdxl)
    for e in SDXL:
        assert torch.equal(plan.embeddings[first].vectors[e], want[e])
    assert plan.embeddings[first].metadata["merge_expression"] == "'cat'+'dog'"
    # same vectors, same name; another model's vectors, another name
    assert temp_name(want) == first
    assert InlineEvaluator().plan(sd1, ["<'cat'+'dog'>"]).prompts[0].strip() != first


def test_zero_vectors_remove_the_text(sdxl):
    plan = InlineEvaluator().plan(sdxl, ["worst quality, <'bad anatomy,':0> blurry"])
    assert plan.prompts == ["worst quality,   blurry"] and plan.embeddings == {}


def test_bad_expression_quotes_it_and_points_at_the_column(sdxl, sd1):
    ev = InlineEvaluator()
    with pytest.raises(MergeError) as info:
        ev.plan(sdxl, ["ok <'cat'>", "a photo of <'cat' + > here"])
    msg = str(info.value)
    assert (
        "embedding math <'cat' +> in the prompt: '+' needs a value after it" in msg and info.value.column == 7
    )
    assert "'cat' +\n" in msg and msg.rstrip().endswith("^")
    with pytest.raises(MergeError, match="needs an SDXL model"):
        ev.plan(sd1, ["<'cat'*0.5L>"])
    # cached: the same bad expression raises again without re-evaluating
    with pytest.raises(MergeError, match="needs an SDXL model"):
        ev.plan(sd1, ["x <'cat'*0.5L>"])


def test_cache_is_per_context(tokenizer, tables, sdxl):
    calls = []
    base = make_ctx(tokenizer, tables)

    def counting(ids):
        calls.append(ids)
        return base.token_vectors(ids)

    ctx = MergeContext(SDXL, tokenizer.encode, counting, {})
    ev = InlineEvaluator()
    ev.plan(ctx, ["<'cat'+'dog'>"])
    n = len(calls)
    ev.plan(ctx, ["again <'cat'+'dog'>"])
    assert len(calls) == n  # evaluated once
    ev.plan(sdxl, ["<'cat'+'dog'>"])  # another context: evaluated there, the old results dropped
    ev.plan(ctx, ["<'cat'+'dog'>"])
    assert len(calls) > n


def test_embeddings_inside_prompt_expressions(tokenizer, tables):
    gen = torch.Generator().manual_seed(3)
    style = Embedding("mystyle", {"clip_l": torch.randn(2, 768, generator=gen)})
    ctx = make_ctx(tokenizer, tables, encoders=("clip_l",), embeddings={"mystyle": style})
    plan = InlineEvaluator().plan(ctx, ["<'mystyle'*0.5>"])
    (emb,) = plan.embeddings.values()
    torch.testing.assert_close(emb.vectors["clip_l"], style.vectors["clip_l"] * 0.5)


def test_token_counter_text(sdxl):
    ev = InlineEvaluator()
    got = ev.counted(sdxl, "a <'a photo of a cat'> b <'x':0> c <'broken'+> d")
    assert got == f"a  {' '.join([COUNT_FILLER] * 5)}  b   c  <'broken'+>  d"
    assert ev.counted(sdxl, "unfinished <'cat") == "unfinished <'cat"


# ---------------------------------------------------------------- EM's README, inside prompts (SD1 and SDXL)

#: every expression of EM's README (klimaleksus/stable-diffusion-webui-embedding-merge), as written in prompts
EM_README = [
    "<'one thing'+'another thing'>",
    "<'one'+'two'>",
    "<'cat'+'dog'>",
    "<'girl'+'doll'>",
    "<'girl'+'doll'=/2>",
    "<'girl'/2+'doll'>",
    "<'sky' * 2/4 + 'forest' * 3/4>",
    "{'blurry'+'cropped'}",
    "{'4k'+'dynamic lighting'+'science fiction'=/3}",
    "<'blonde'+'boy'>",
    "<'red'+'shirt'>",
    "<'green'+'pants'>",
    "<'blue'+'shoes'>",
    "<'king'-'man'+'woman'>",
    "<'yellow'-'red'>",
    "<''-'road'-'grass'>",
    "<'frame, black-white'*-1>",
    "<'peacock'*0.5>",
    "<'giraffe'*0.5>",
    "<'peacock'*4>",
    "<'giraffe'*2>",
    "<'peacock'*0>",
    "<'greg rutkowski'+'hayao miyazaki'>",
    "<'greg rutkowski'*0.5+'hayao miyazaki'*1.5>",
    "<'greg rutkowski'/4+'gustav dore'*0.75>",
    "<'William' + '-' + 'Adolphe'+'Adolphe':+1 + 'Bouguereau'+'Bouguereau':+1+'Bouguereau':+2 =:1>",
    "<'a'+'b' =* 0.5 + 'c'*0 + 'd'*-1>",
    "<'a'/2 + 'b'/2 + '':1 - 'd'>",
    "<'artstation' + 'artstation' :4 :+2>",
    "<'kuvshinov' + 'kuvshinov':-1 + 'kuvshinov':-2 + 'kuvshinov':-3 =: 1>",
    "<'one' + 'two' =* 2>",
    "<'one' + 'two' =: 3>",
    "<'one' + 'two' =:+ 1>",
    "<'one' + 'two' =:- 1>",
    "<'',256>",
    "<'a',256,'c','d',257,258>",
    "<'',0000,'cat',000>",
    "<'close-up',00,00>",
    "<'text' * 0.85>",
    "<'text' * 3/5>",
    "<'text' : 3>",
    "<'text' :+ 1>",
]


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_em_readme_examples_in_prompts(model, sd1, sdxl, tokenizer):
    ctx = sd1 if model == "sd1" else sdxl
    prompt = "A photo of " + ", ".join(EM_README) + ", worst quality, <'bad anatomy,':0> blurry"
    found = find_expressions(prompt)
    assert [f.bracketed for f in found] == [*EM_README, "<'bad anatomy,':0>"]
    plan = InlineEvaluator().plan(ctx, [prompt])
    for f in found[:-1]:
        got = evaluate(f.expr, ctx)
        assert temp_name(got) in plan.prompts[0]
        assert set(got) == set(ctx.encoders)
    assert "bad anatomy" not in plan.prompts[0]
    # the counts EM gives: the longest part of a sum; ,-chains and :N add up
    n = lambda e: next(iter(evaluate(e, ctx).values())).shape[0]  # noqa: E731
    assert n("'one thing'+'another thing'") == 2
    assert n("'artstation' + 'artstation' :4 :+2") == 4
    assert n("'William' + '-' + 'Adolphe'+'Adolphe':+1 =:1") == 1
    assert n("'a',256,'c','d',257,258") == 6
    assert n("'close-up',00,00") == 5
    assert n("'text' : 3") == 3


# ---------------------------------------------------------------- infotext


def test_field_lists_each_expression_once_in_order():
    texts = ["a <'cat'+'dog'> b {'sky'} <'cat'+'dog'>", "<'bad':0>", "", "hires {'sky'} <'x'>"]
    assert infotext.format_field(texts) == (
        "<'EM_1'>=<'cat'+'dog'>, {'EM_2'}={'sky'}, <'EM_3'>=<'bad':0>, <'EM_4'>=<'x'>"
    )
    assert infotext.format_field(["{'sky'}"], curly=False) == ""
    assert infotext.format_field(["unclosed <'cat"]) == ""


def test_field_round_trip_and_em_infotexts():
    field = infotext.format_field(["<'sky' * 2/4 + 'forest' * 3/4> {'blurry'+'cropped'}"])
    assert infotext.parse_field(field) == {
        "<'EM_1'>": "<'sky' * 2/4 + 'forest' * 3/4>",
        "{'EM_2'}": "{'blurry'+'cropped'}",
    }
    # as EM writes it (the host unquotes the value; some tools keep the JSON quotes)
    em = "<'EM_1'>=<'sky' * 2/4 + 'forest' * 3/4>, {'EM_2'}={'blurry'+'cropped'}"
    assert infotext.parse_field(em) == infotext.parse_field(field)
    assert infotext.parse_field('"' + em.replace('"', '\\"') + '"') == infotext.parse_field(field)
    assert infotext.parse_field("<'EM_1'>=<'it''s, a>b' + 'x'>") == {"<'EM_1'>": "<'it''s, a>b' + 'x'>"}
    assert infotext.parse_field("garbage") == {}


def test_pasting_em_infotext_restores_expressions():
    params = {
        "Prompt": "a photo of <'EM_1'>",
        "Negative prompt": "{'EM_2'}, <'EM_9'>",
        "Hires prompt": "<'EM_1'> again",
        "Steps": "8",
        "EmbeddingMerge": "<'EM_1'>=<'sky' * 2/4 + 'forest' * 3/4>, {'EM_2'}={'blurry'+'cropped'}",
    }
    infotext.on_pasted(params)
    assert params["Prompt"] == "a photo of <'sky' * 2/4 + 'forest' * 3/4>"
    assert params["Negative prompt"] == "{'blurry'+'cropped'}, <'EM_9'>"
    assert params["Hires prompt"] == "<'sky' * 2/4 + 'forest' * 3/4> again"
    ours = {"Prompt": "a <'cat'+'dog'>", "EmbeddingMerge": "<'EM_1'>=<'cat'+'dog'>"}
    infotext.on_pasted(ours)
    assert ours["Prompt"] == "a <'cat'+'dog'>"  # our prompts already hold the expressions

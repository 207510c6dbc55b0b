"""Embedding math (lib_ti.merge): parser, evaluator, EM compatibility, and every docs/SYNTAX.md example.

The context is real except for the numbers in the tables: the CLIP BPE tokenizer that ships inside
open_clip, and seeded random token-embedding tables of the real sizes (49408 x 768 and 49408 x 1280).
"""

from __future__ import annotations

import pickle
import re

import pytest
import torch

from lib_ti.embedding import Embedding
from lib_ti.errors import InvalidNameError, TIError
from lib_ti.merge import (
    FUNCTIONS,
    Binary,
    Call,
    Concat,
    Crop,
    Index,
    MergeContext,
    MergeError,
    MergeSyntaxError,
    Node,
    Number,
    Roll,
    Slice,
    SpecialToken,
    Text,
    Unary,
    evaluate,
    merge_to_embedding,
    parse,
    vocab_norms,
)

from .conftest import ROOT

VOCAB = 49408
SDXL = ("clip_l", "clip_g")
DOC = ROOT / "docs" / "SYNTAX.md"


class Lookup:
    """``token_vectors`` over fixed tables; counts its calls."""

    def __init__(self, tables: dict[str, torch.Tensor]) -> None:
        self.tables = tables
        self.calls = 0

    def __call__(self, ids: list[int]) -> dict[str, torch.Tensor]:
        self.calls += 1
        idx = torch.tensor(ids, dtype=torch.long)
        return {k: t[idx] for k, t in self.tables.items()}


@pytest.fixture(scope="module")
def embeddings() -> dict[str, Embedding]:
    gen = torch.Generator().manual_seed(5)
    return {
        "mystyle": Embedding(
            "mystyle",
            {"clip_l": torch.randn(2, 768, generator=gen), "clip_g": torch.randn(2, 1280, generator=gen)},
        ),
        "sd1style": Embedding("sd1style", {"clip_l": torch.randn(1, 768, generator=gen)}),
    }


def make_ctx(tokenizer, tables, embeddings, encoders=SDXL, **kwargs) -> MergeContext:
    lookup = Lookup({e: tables[e] for e in encoders})
    return MergeContext(encoders, tokenizer.encode, lookup, embeddings, **kwargs)


@pytest.fixture(scope="module")
def sdxl(tokenizer, tables, embeddings) -> MergeContext:
    return make_ctx(tokenizer, tables, embeddings)


@pytest.fixture(scope="module")
def sd1(tokenizer, tables, embeddings) -> MergeContext:
    return make_ctx(tokenizer, tables, embeddings, encoders=("clip_l",))


def rows(tables, ids, encoders=SDXL) -> dict[str, torch.Tensor]:
    idx = torch.tensor(ids, dtype=torch.long)
    return {e: tables[e][idx] for e in encoders}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for e in want:
        assert got[e].shape == want[e].shape, e
        torch.testing.assert_close(got[e], want[e], rtol=1e-4, atol=1e-5)


def count(v: dict[str, torch.Tensor]) -> int:
    return next(iter(v.values())).shape[0]


# ---------------------------------------------------------------- parser


def test_parse_builds_a_tree_with_precedence_and_columns():
    assert parse("'a'+'b'*2") == Binary(
        "+", Text("a", col=1), Binary("*", Text("b", col=5), Number(2.0, "2", col=9), col=8), col=4
    )
    assert parse("('a'+'b')*2") == Binary(
        "*", Binary("+", Text("a", col=2), Text("b", col=6), col=5), Number(2.0, "2", col=11), col=10
    )


@pytest.mark.parametrize(
    ("expr", "shape"),
    [
        ("-2^2", "-((2^2))"),
        ("2^-1", "(2^-(1))"),
        ("2^3^2", "(2^(3^2))"),
        ("1-2-3", "((1-2)-3)"),
        ("8/4/2", "((8/4)/2)"),
        ("-'a'*2", "(-('a')*2)"),
        ("'a'+'b' =* 0.5", "(('a'+'b')*0.5)"),
        ("'a'+'b' =*2 + 'c'", "((('a'+'b')*2)+'c')"),
        ("'a'+'b' =:5:+2", "((('a'+'b'):5):+2)"),
        ("'a'*2:3", "(('a'*2):3)"),
        ("'a':4:+2", "(('a':4):+2)"),
        ("'a','b'*2", "(('a','b')*2)"),
        ("'a':2,'b'", "(('a':2),'b')"),
        ("'a','b'[0]", "('a',('b'[0]))"),
        ("avg('a','b')", "avg('a','b')"),
        ("avg(('a','b'))", "avg(('a','b'))"),
        ("'x'[1:3]", "('x'[1:3:])"),
        ("'x'[::-1]", "('x'[::-(1)])"),
        ("'x'[1+1:-1]", "('x'[(1+1):-(1):])"),
    ],
)
def test_parse_precedence(expr, shape):
    assert show(parse(expr)) == shape


def show(node: Node) -> str:
    """A compact, fully bracketed rendering of a tree, for precedence tests."""

    def opt(n):
        return "" if n is None else show(n)

    if isinstance(node, Number):
        return node.text + ({"clip_l": "L", "clip_g": "G"}.get(node.encoder or "", ""))
    if isinstance(node, Text):
        return "'" + node.text.replace("'", "''") + "'"
    if isinstance(node, SpecialToken):
        return {"pad": "00", "eos": "000", "bos": "0000"}[node.which]
    if isinstance(node, Concat):
        return "(" + ",".join(show(i) for i in node.items) + ")"
    if isinstance(node, Unary):
        return f"{node.op}({show(node.operand)})" if node.op == "-" else show(node.operand)
    if isinstance(node, Binary):
        return f"({show(node.left)}{node.op}{show(node.right)})"
    if isinstance(node, Crop):
        return f"({show(node.operand)}:{show(node.size)})"
    if isinstance(node, Roll):
        return f"({show(node.operand)}:{'+' if node.sign > 0 else '-'}{show(node.shift)})"
    if isinstance(node, Index):
        return f"({show(node.operand)}[{show(node.index)}])"
    if isinstance(node, Slice):
        return f"({show(node.operand)}[{opt(node.start)}:{opt(node.stop)}:{opt(node.step)}])"
    if isinstance(node, Call):
        return f"{node.name}({','.join(show(a) for a in node.args)})"
    raise AssertionError(node)


def test_parse_literals():
    assert parse("'it''s'") == Text("it's", col=1)
    assert parse("''''") == Text("'", col=1)
    assert parse("''") == Text("", col=1)
    assert parse("'a'*0.5L").right == Number(0.5, "0.5", "clip_l", col=5)  # type: ignore[attr-defined]
    assert parse("'a' * .5 G").right == Number(0.5, ".5", "clip_g", col=7)  # type: ignore[attr-defined]
    assert parse("'a'*1e-3").right.value == pytest.approx(1e-3)  # type: ignore[attr-defined]
    assert parse("'',00,000,0000,7") == Concat(
        (
            Text("", col=1),
            SpecialToken("pad", col=4),
            SpecialToken("eos", col=7),
            SpecialToken("bos", col=11),
            Number(7.0, "7", col=16),
        ),
        col=1,
    )
    assert parse(" \n'a'\t+ 'b' ") == Binary("+", Text("a", col=3), Text("b", col=9), col=7)


def test_parse_keeps_source_columns_of_string_characters():
    node = parse("'x''y z'")
    assert isinstance(node, Text)
    assert node.text == "x'y z"
    assert node.positions == (2, 3, 5, 6, 7)


# ---------------------------------------------------------------- strings and tokens


def test_string_is_token_rows(sdxl, tables, tokenizer):
    assert_same(evaluate("'cat'", sdxl), rows(tables, [2368]))
    ids = tokenizer.encode("a photo of a cat")
    assert ids == [320, 1125, 539, 320, 2368]
    assert_same(evaluate("'a photo of a cat'", sdxl), rows(tables, ids))


def test_embedding_names_inside_strings(sdxl, tables, embeddings):
    got = evaluate("'a mystyle cat'", sdxl)
    style = embeddings["mystyle"].vectors
    want = {e: torch.cat([tables[e][[320]], style[e], tables[e][[2368]]]) for e in SDXL}
    assert_same(got, want)
    assert_same(evaluate("'MYSTYLE'", sdxl), style)


def test_multi_word_and_ambiguous_embedding_names(tokenizer, tables):
    gen = torch.Generator().manual_seed(1)
    embs = {
        "my style": Embedding("my style", {"clip_l": torch.randn(3, 768, generator=gen)}),
        "Cat": Embedding("Cat", {"clip_l": torch.randn(1, 768, generator=gen)}),
        "CAT": Embedding("CAT", {"clip_l": torch.randn(1, 768, generator=gen)}),
    }
    ctx = make_ctx(tokenizer, tables, embs, encoders=("clip_l",))
    assert count(evaluate("'a  my   style dog'", ctx)) == 1 + 3 + 1
    assert_same(evaluate("'Cat'", ctx), embs["Cat"].vectors)
    with pytest.raises(MergeError, match="matches several embeddings") as info:
        evaluate("'a cat'", ctx)
    assert info.value.column == 4


def test_sd1_embedding_on_sdxl_is_plain_words(sdxl, tables, tokenizer):
    # A1111 skips an SD1 embedding on SDXL, so its name in a prompt is words; EM reads it so too
    assert_same(evaluate("'a  sd1style'", sdxl), rows(tables, tokenizer.encode("a sd1style")))


def test_embedding_name_next_to_punctuation(sdxl, tables, embeddings):
    # found by tokens, as the web UI finds names in prompts (EM: 'mystyle,cat')
    style = embeddings["mystyle"].vectors
    want = {e: torch.cat([style[e], tables[e][[267, 2368]]]) for e in SDXL}
    assert_same(evaluate("'mystyle,cat'", sdxl), want)
    # a longer word that only starts with the name is not the name
    assert count(evaluate("'mystyles'", sdxl)) != 2 or not torch.equal(
        evaluate("'mystyles'", sdxl)["clip_l"], style["clip_l"]
    )


def test_em_multiply_then_chain(sdxl, tables):
    # EM reads 'cat'*2,256 as ('cat'*2),256
    want = {e: torch.cat([tables[e][[2368]] * 2, tables[e][[256]]]) for e in SDXL}
    assert_same(evaluate("'cat'*2,256", sdxl), want)
    assert_same(evaluate("'a' + 'cat'/2,256", sdxl), evaluate("'a' + (('cat'/2),256)", sdxl))


def test_empty_result_only_when_allowed(sdxl):
    got = evaluate("'bad anatomy,':0", sdxl, allow_empty=True)
    assert count(got) == 0 and set(got) == set(SDXL)
    with pytest.raises(MergeError, match="gives 0 vectors"):
        evaluate("'bad anatomy,':0", sdxl)


def test_sd1_embedding_on_sd1(sd1, embeddings):
    assert_same(evaluate("'sd1style'", sd1), embeddings["sd1style"].vectors)


def test_token_ids_and_special_tokens(sdxl, sd1, tokenizer, tables, embeddings):
    assert_same(evaluate("'',256", sdxl), rows(tables, [256]))
    assert_same(evaluate("'cat',1929,00,000,0000", sdxl), rows(tables, [2368, 1929, 49407, 49407, 49406]))
    sd2_like = make_ctx(tokenizer, tables, embeddings, encoders=("clip_l",), pad_id=0)
    assert_same(evaluate("'',00", sd2_like), rows(tables, [0], ("clip_l",)))
    assert_same(evaluate("'',00", sd1), rows(tables, [49407], ("clip_l",)))


def test_pad_is_each_encoders_own(tokenizer, tables, embeddings):
    # SDXL: 00 is 49407 on CLIP-L and 0 on open_clip's CLIP-G (A1111's id_pad), as in EM
    ctx = make_ctx(tokenizer, tables, embeddings, pad_ids={"clip_l": 49407, "clip_g": 0})
    got = evaluate("'cat',00,1929", ctx)
    for e, pad in (("clip_l", 49407), ("clip_g", 0)):
        torch.testing.assert_close(got[e], tables[e][[2368, pad, 1929]])


def test_bracketed_values_in_chains(sdxl, tables):
    assert_same(evaluate("(256),'cat'", sdxl), rows(tables, [256, 2368]))
    assert_same(
        evaluate("('cat'*2),1929", sdxl),
        {e: torch.cat([tables[e][[2368]] * 2, tables[e][[1929]]]) for e in SDXL},
    )
    assert_same(evaluate("avg(('cat','dog'), 'sky')", sdxl), evaluate("(('cat'+'sky')/2),('dog'/2)", sdxl))


def test_chain_batches_ids_into_one_lookup(tokenizer, tables, embeddings):
    ctx = make_ctx(tokenizer, tables, embeddings)
    evaluate("'',1,2,3,4", ctx)
    assert ctx.token_vectors.calls == 1  # type: ignore[attr-defined]


def test_empty_string_is_zero_vectors(sdxl):
    got = evaluate("'':3", sdxl)
    assert count(got) == 3
    assert all(not t.any() for t in got.values())


# ---------------------------------------------------------------- arithmetic


def test_add_pads_the_shorter_with_zeros(sdxl, tables):
    a, b = rows(tables, [320, 1125]), rows(tables, [2368])
    assert_same(
        evaluate("'a photo' + 'cat'", sdxl),
        {e: a[e] + torch.cat([b[e], torch.zeros_like(b[e])]) for e in SDXL},
    )
    assert_same(
        evaluate("'cat' - 'a photo'", sdxl),
        {e: torch.cat([b[e], torch.zeros_like(b[e])]) - a[e] for e in SDXL},
    )


@pytest.mark.parametrize(
    ("expr", "factor"),
    [
        ("'cat'*0.5", 0.5),
        ("0.5*'cat'", 0.5),
        ("'cat'/4", 0.25),
        ("-'cat'", -1.0),
        ("+'cat'", 1.0),
        ("'cat'*(1/3)", 1 / 3),
        ("'cat'*2^-1", 0.5),
        ("'cat'*-2^2", -4.0),
        ("'cat'*(-2)^2", 4.0),
        ("'cat'*2^3^2", 512.0),
        ("'cat'*(1+2*3-4)/6", 0.5),
        ("'cat'*3/5", 0.6),
        ("'cat'*.5", 0.5),
        ("'cat'*5.", 5.0),
        ("'cat'*1e-1", 0.1),
        ("'cat'*1E+1", 10.0),
        ("'cat'*-1", -1.0),
        ("'cat'*+2", 2.0),
        ("'cat'*avg(1,2,3)", 2.0),
        ("'cat'*lerp(1,3,0.25)", 1.5),
    ],
)
def test_scaling_and_numeric_expressions(sdxl, tables, expr, factor):
    cat = rows(tables, [2368])
    assert_same(evaluate(expr, sdxl), {e: cat[e] * factor for e in SDXL})


def test_per_encoder_scale(sdxl, tables):
    cat = rows(tables, [2368])
    assert_same(evaluate("'cat'*0.5L", sdxl), {"clip_l": cat["clip_l"] * 0.5, "clip_g": cat["clip_g"]})
    assert_same(evaluate("'cat' / 2G", sdxl), {"clip_l": cat["clip_l"], "clip_g": cat["clip_g"] / 2})
    assert_same(evaluate("'cat'*-3G", sdxl), {"clip_l": cat["clip_l"], "clip_g": cat["clip_g"] * -3})
    assert_same(evaluate("2L*'cat'", sdxl), {"clip_l": cat["clip_l"] * 2, "clip_g": cat["clip_g"]})
    assert_same(evaluate("'cat' * 0.5 L", sdxl), evaluate("'cat'*0.5L", sdxl))  # EM ignores white space


def test_selectors(sdxl, tables):
    cat, dog = rows(tables, [2368]), rows(tables, [1929])
    assert_same(evaluate("L('cat')", sdxl), {"clip_l": cat["clip_l"], "clip_g": torch.zeros(1, 1280)})
    assert_same(evaluate("G('cat')", sdxl), {"clip_l": torch.zeros(1, 768), "clip_g": cat["clip_g"]})
    assert_same(evaluate("L('cat')+G('dog')", sdxl), {"clip_l": cat["clip_l"], "clip_g": dog["clip_g"]})


# ---------------------------------------------------------------- resize, roll, slices


def test_crop_pad_and_roll(sdxl, tables, tokenizer):
    ids = tokenizer.encode("a photo of a cat")
    seq = rows(tables, ids)
    assert_same(evaluate("'a photo of a cat':2", sdxl), {e: seq[e][:2] for e in SDXL})
    assert_same(
        evaluate("'a photo of a cat':7", sdxl),
        {e: torch.cat([seq[e], seq[e].new_zeros(2, seq[e].shape[1])]) for e in SDXL},
    )
    for shift in (1, 2, 7):
        assert_same(
            evaluate(f"'a photo of a cat':+{shift}", sdxl),
            {e: torch.roll(seq[e], shift, dims=0) for e in SDXL},
        )
        assert_same(
            evaluate(f"'a photo of a cat':-{shift}", sdxl),
            {e: torch.roll(seq[e], -shift, dims=0) for e in SDXL},
        )
    # EM's sign convention: :+1 moves every vector one place later, the last to the front.
    assert_same(evaluate("'a photo of':+1", sdxl), evaluate("'of a photo'", sdxl))
    assert_same(evaluate("'cat':(1+2)", sdxl), evaluate("'cat':3", sdxl))
    assert_same(evaluate("'a photo of a cat':+1000000000002", sdxl), evaluate("'a photo of a cat':+2", sdxl))


@pytest.mark.parametrize(
    ("sub", "index"),
    [
        ("[1:3]", slice(1, 3)),
        ("[0]", slice(0, 1)),
        ("[-1]", slice(4, 5)),
        ("[-2]", slice(3, 4)),
        ("[:2]", slice(None, 2)),
        ("[3:]", slice(3, None)),
        ("[-3:-1]", slice(-3, -1)),
        ("[::2]", slice(None, None, 2)),
        ("[1:100]", slice(1, 100)),
    ],
)
def test_slicing_follows_python(sdxl, tables, tokenizer, sub, index):
    ids = tokenizer.encode("a photo of a cat")
    assert_same(evaluate(f"'a photo of a cat'{sub}", sdxl), rows(tables, ids[index]))


def test_reverse_slice(sdxl, tables, tokenizer):
    ids = tokenizer.encode("a photo of a cat")
    assert_same(evaluate("'a photo of a cat'[::-1]", sdxl), rows(tables, ids[::-1]))


# ---------------------------------------------------------------- functions


def test_avg_and_lerp(sdxl, tables):
    cat, photo = rows(tables, [2368]), rows(tables, [320, 1125])
    padded = {e: torch.cat([cat[e], torch.zeros_like(cat[e])]) for e in SDXL}
    assert_same(evaluate("avg('cat', 'a photo')", sdxl), {e: (padded[e] + photo[e]) / 2 for e in SDXL})
    assert_same(evaluate("mean('cat','cat','cat')", sdxl), cat)
    assert_same(
        evaluate("lerp('cat', 'a photo', 0.25)", sdxl), {e: padded[e] * 0.75 + photo[e] * 0.25 for e in SDXL}
    )


def test_norm_to_the_vocabulary_mean_is_computed_once(tokenizer, tables, embeddings):
    ctx = make_ctx(tokenizer, tables, embeddings)
    want = {e: float(tables[e].norm(dim=1).mean()) for e in SDXL}
    got = evaluate("norm('a photo of a cat')", ctx)
    for e in SDXL:
        torch.testing.assert_close(got[e].norm(dim=1), torch.full((5,), want[e]), rtol=1e-4, atol=0)
        assert vocab_norms(ctx)[e] == pytest.approx(want[e], rel=1e-6)
    calls = ctx.token_vectors.calls  # type: ignore[attr-defined]
    evaluate("norm('cat') + norm('dog')", ctx)
    assert ctx.token_vectors.calls == calls + 2  # type: ignore[attr-defined]  # the two words; the table is cached


def test_norm_to_a_number_or_a_sequence(sdxl, tables):
    got = evaluate("norm('a photo' + '':3, 5)", sdxl)
    for t in got.values():
        torch.testing.assert_close(t.norm(dim=1), torch.tensor([5.0, 5.0, 0.0]))  # zero vectors stay zero
    dog = rows(tables, [1929, 320])
    got = evaluate("norm('cat', 'dog a')", sdxl)
    for e in SDXL:
        assert float(got[e].norm()) == pytest.approx(float(dog[e].norm(dim=1).mean()), rel=1e-5)
    cat = rows(tables, [2368])
    for e in SDXL:  # direction is kept
        assert torch.nn.functional.cosine_similarity(got[e], cat[e]).item() == pytest.approx(1.0, abs=1e-5)


def test_pool(sdxl, tables, tokenizer):
    ids = tokenizer.encode("a photo of a cat dog")
    seq = rows(tables, ids)
    got = evaluate("pool('a photo of a cat dog', 3)", sdxl)
    assert_same(got, {e: seq[e].reshape(3, 2, -1).mean(dim=1) for e in SDXL})
    assert_same(
        evaluate("pool('a photo of a cat dog', 1)", sdxl), {e: seq[e].mean(dim=0, keepdim=True) for e in SDXL}
    )
    long = " ".join(["a photo of a cat"] * 30)  # 150 tokens: more than one prompt chunk on the way
    assert count(evaluate(f"pool('{long}', 4)", sdxl)) == 4


# ---------------------------------------------------------------- EM compatibility (tools.md 1.2, EM README)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("'a'/2 + 'b'/2", "('a'+'b')*0.5"),
        ("'a'/2 + 'b'/2", "'a'+'b' =* 0.5"),
        ("'a'+'b' =/ 2", "('a'+'b')*0.5"),
        ("'a'/2 + 'b'/2 + '':1 - 'd'", "'a'+'b' =* 0.5 + 'c'*0 + 'd'*-1"),
        ("'artstation' + 'artstation' :4 :+2", "'artstation','artstation'"),
        (
            "'kuvshinov' + 'kuvshinov':-1 + 'kuvshinov':-2 + 'kuvshinov':-3 =: 1",
            "'',1836 + '',85 + '',43074 + '',341",
        ),
        (
            "'close-up',00,00 + 'out-of-frame' + 'cropped',00,00,00,00",
            "'up',00,00+'of-frame'+'',00,00,00 =:5:+2 + 'close-'+'out-'+'cropped',00",
        ),
        ("'sky' * 2/4 + 'forest' * 3/4", "('sky'*2 + 'forest'*3)/4"),
        ("'William' + '-' + 'Adolphe'+'Adolphe':+1 =:1", "('William' + '-' + 'Adolphe' + 'Adolphe'[-1]):1"),
        ("'a photo'+'cat' =:+1", "('a photo'+'cat'):+1"),
        ("'a photo'+'cat' =:-1:3", "(('a photo'+'cat'):-1):3"),
    ],
)
def test_em_equivalences(sdxl, left, right):
    assert_same(evaluate(left, sdxl), evaluate(right, sdxl))


def test_em_kuvshinov_tokens_are_real(tokenizer):
    assert tokenizer.encode("kuvshinov") == [1836, 85, 43074, 341]
    assert tokenizer.encode("artstation") == [1486, 2631]


# ---------------------------------------------------------------- results


def test_result_is_a_float32_copy(sdxl, embeddings):
    got = evaluate("'mystyle'", sdxl)
    assert list(got) == ["clip_l", "clip_g"]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in got.values())
    got["clip_l"].zero_()
    assert embeddings["mystyle"].vectors["clip_l"].any()


def test_half_precision_tables_are_converted(tokenizer, tables, embeddings):
    half = {e: t[:3000].half() for e, t in tables.items()}
    ctx = MergeContext(SDXL, tokenizer.encode, Lookup(half), embeddings, vocab_size=3000)
    got = evaluate("'',1,2", ctx)
    assert got["clip_g"].dtype == torch.float32
    assert torch.equal(got["clip_g"], half["clip_g"][[1, 2]].float())
    with pytest.raises(MergeError, match="outside the vocabulary"):
        evaluate("'',3000", ctx)


def test_max_vectors(sdxl):
    assert count(evaluate("'cat':75", sdxl)) == 75
    assert count(evaluate("pool('cat':200, 75)", sdxl)) == 75  # longer values are fine on the way


def test_merge_to_embedding(sdxl):
    emb = merge_to_embedding("avg('cat', 'dog')", sdxl, "catdog")
    assert (emb.name, emb.kind, emb.num_vectors) == ("catdog", "sdxl", 1)
    assert emb.metadata == {"merge_expression": "avg('cat', 'dog')"}
    with pytest.raises(InvalidNameError):
        merge_to_embedding("'cat'", sdxl, "../evil")


def test_errors_are_ti_errors_and_pickle():
    assert issubclass(MergeSyntaxError, MergeError)
    assert issubclass(MergeError, TIError)
    with pytest.raises(MergeSyntaxError) as info:
        parse("'a' + ")
    copy = pickle.loads(pickle.dumps(info.value))
    assert (type(copy), copy.reason, copy.column, str(copy)) == (
        MergeSyntaxError,
        info.value.reason,
        5,
        str(info.value),
    )
    assert str(MergeSyntaxError("bad", 3)) == "bad"  # no expression, no caret


def test_long_lines_are_windowed_around_the_column():
    expr = "'cat' + " * 30 + "oops('x')"
    with pytest.raises(MergeSyntaxError) as info:
        parse(expr)
    _, line, caret = str(info.value).split("\n")
    assert len(line) < 110
    assert line[len(caret) - 1 :].startswith("oops(")


# ---------------------------------------------------------------- located errors


@pytest.mark.parametrize(
    ("expr", "column", "message", "syntax"),
    [
        ("'cat' + 'dog", 9, "unclosed quote", True),
        ("'it''s", 1, "unclosed quote", True),
        ("('cat' + 'dog'", 1, "unbalanced '('", True),
        ("avg('cat', ('dog')", 4, "unbalanced '('", True),
        ("'cat' + 'dog')", 14, "unbalanced ')'", True),
        ("'cat'[1", 6, "unbalanced '['", True),
        ("'cat']", 6, "unbalanced ']'", True),
        ("'cat' * 1.2.3", 9, "bad number '1.2.3'", True),
        ("'cat' * 2x", 9, "bad number '2x'", True),
        ("'cat' * 1e", 9, "bad number '1e'", True),
        ("'cat' * 2Lx", 9, "bad number", True),
        ("'cat' + blend('dog')", 9, "unknown function 'blend'", True),
        ("'cat' + cat", 9, "unknown name 'cat'", True),
        ("avg", 1, "avg is a function", True),
        ("lerp('a', 'b')", 1, "lerp takes 3 arguments, got 2", True),
        ("avg()", 1, "at least 1 argument", True),
        ("'cat' +", 7, "'+' needs a value after it", True),
        ("'cat' *", 7, "'*' needs a value after it", True),
        ("'cat',", 6, "',' needs a value after it", True),
        ("'cat' + * 2", 9, "a value is missing before '*'", True),
        ("'cat' 'dog'", 7, "missing operator", True),
        ("'cat' 2", 7, "missing operator", True),
        ("", 1, "empty", True),
        ("   ", 1, "empty", True),
        ("'cat' ** 2", 7, "write powers with ^", True),
        ("'cat' # 2", 7, "unexpected character '#'", True),
        ("'cat' * ²", 9, "unexpected character '²'", True),
        ('"cat"', 1, "single quotes", True),
        ("'cat' =+ 'dog'", 7, "'=' must be followed by", True),
        ("'cat'[]", 6, "empty brackets", True),
        ("2,3", 2, "chain starts with a string", True),
        ("'',007", 4, "bad token id '007'", True),
        ("'',2L", 4, "no L/G suffix", True),
        ("'cat'*1e999", 7, "too large", True),
        ("'cat' * 'dog'", 7, "cannot multiply two vector sequences", False),
        ("'cat' + 2", 7, "two numbers or two vector sequences", False),
        ("2 / 'cat'", 3, "cannot divide", False),
        ("'cat' / 0", 7, "division by zero", False),
        ("'cat' / (1-1)", 7, "division by zero", False),
        ("'cat' * (1e300 * 1e300)", 16, "overflows", False),
        ("'cat' * 1e30 * 1e30", 1, "not finite", False),
        ("'cat' * (-8)^(1/3)", 13, "not a real number", False),
        ("'cat' : 76", 1, "gives 76 vectors", False),
        ("'cat':5000", 7, "too many", False),
        ("''", 1, "gives 0 vectors", False),
        ("  2 * 3", 3, "gives the number 6", False),
        ("0.5L", 1, "gives the scale 0.5L", False),
        ("'cat' + 0.5L", 9, "only scales vectors", False),
        ("'',49408", 4, "token id 49408 is outside the vocabulary", False),
        ("'',-1", 4, "token id -1 is outside", False),
        ("'',1.5", 4, "not a whole number", False),
        ("'cat':2.5", 7, "whole number", False),
        ("'cat':-'dog'", 8, "whole number", False),
        ("'cat'[3]", 7, "index 3 is out of range for 1 vector", False),
        ("'cat'[::0]", 9, "step cannot be zero", False),
        ("2[0]", 2, "needs vectors", False),
        ("pool('cat', 0)", 13, "needs n from 1", False),
        ("pool('', 2)", 6, "at least one vector", False),
        ("norm('cat', -1)", 13, "cannot be negative", False),
        ("norm('cat', '':2)", 15, "no nonzero vectors", False),  # an operator's column: the ':'
        ("('cat')*()", 9, "empty parentheses", True),
        ("'cat':", 6, "':' needs a value after it", True),
        ("avg('cat',)", 10, "',' needs a value after it", True),
        ("avg('cat', 2)", 12, "needs vectors", False),
        ("lerp('cat', 'dog', 'a')", 20, "must be a number", False),
    ],
)
def test_located_errors(sdxl, expr, column, message, syntax):
    with pytest.raises(MergeError) as info:
        evaluate(expr, sdxl)
    err = info.value
    assert message in err.reason
    assert err.column == column
    assert isinstance(err, MergeSyntaxError) == syntax
    if expr.strip():  # the message shows the expression line and a caret under the column
        _, line, caret = str(err).split("\n")
        assert line == "  " + expr
        assert caret == "  " + " " * (column - 1) + "^"


def test_sdxl_only_errors(sd1, tokenizer, tables, embeddings):
    refiner = make_ctx(tokenizer, tables, embeddings, encoders=("clip_g",))
    cases = [("L('cat')", 1), ("'cat' + G('dog')", 9), ("'cat'*2G", 7), ("'cat' * 0.5L", 9), ("'cat'/2L", 7)]
    for ctx in (sd1, refiner):
        for expr, column in cases:
            with pytest.raises(MergeError, match="needs an SDXL model") as info:
                evaluate(expr, ctx)
            assert info.value.column == column


def test_parse_errors_need_no_context():
    with pytest.raises(MergeSyntaxError) as info:
        parse("avg('cat' + )")
    assert info.value.column == 11
    assert info.value.reason == "'+' needs a value after it"


@pytest.mark.parametrize(
    "expr", ["(" * 3000 + "'cat'" + ")" * 3000, "-" * 3000 + "'cat'", "'a'" + "+'a'" * 3000]
)
def test_deep_nesting_is_an_error_not_a_crash(sd1, expr):
    with pytest.raises(MergeError, match="nested too deeply"):
        evaluate(expr, sd1)


def test_error_on_a_later_line_shows_that_line():
    with pytest.raises(MergeSyntaxError) as info:
        parse("'cat'\n + foo('dog')")
    assert info.value.column == 10
    assert str(info.value).endswith("\n   + foo('dog')\n     ^")


# ---------------------------------------------------------------- docs/SYNTAX.md


def doc_examples() -> list[tuple[str, str]]:
    """``(expression, result)`` from every table of SYNTAX.md whose header is ``| Expression | Result |``."""
    examples = []
    in_examples = False
    previous = ""
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("|") and not previous.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            in_examples = cells[:2] == ["Expression", "Result"]
        elif in_examples and line.startswith("|") and not line.startswith("|---"):
            m = re.match(r"^\|\s*`([^`]+)`\s*\|\s*([^|]*?)\s*\|", line)
            assert m, f"cannot read the SYNTAX.md row {line!r}"
            examples.append((m.group(1), m.group(2)))
        previous = line
    return examples


DOC_EXAMPLES = doc_examples()


def test_syntax_md_has_examples_for_every_construct():
    assert len(DOC_EXAMPLES) >= 80
    trees = [parse(expr) for expr, result in DOC_EXAMPLES if "error" not in result]
    found: set[str] = set()

    def walk(node):
        found.add(type(node).__name__)
        if isinstance(node, Call):
            found.add(node.name + "()")
        if isinstance(node, SpecialToken):
            found.add(node.which)
        if isinstance(node, (Binary, Unary)):
            found.add(node.op)
        if isinstance(node, Number) and node.encoder:
            found.add(node.encoder)
        for value in vars(node).values():
            for child in value if isinstance(value, tuple) else (value,):
                if isinstance(child, Node):
                    walk(child)

    for tree in trees:
        walk(tree)
    wanted = {
        cls.__name__
        for cls in (Number, Text, SpecialToken, Concat, Unary, Binary, Crop, Roll, Index, Slice, Call)
    }
    wanted |= {f + "()" for f in FUNCTIONS} | {
        "pad",
        "eos",
        "bos",
        "+",
        "-",
        "*",
        "/",
        "^",
        "clip_l",
        "clip_g",
    }
    assert wanted <= found, sorted(wanted - found)
    sources = " ".join(expr for expr, _ in DOC_EXAMPLES)
    for em in ("=*", "=/", "=:", "=:+"):
        assert em in sources.replace(" ", ""), em


def test_syntax_md_error_sample_is_real():
    block = re.search(r"```text\n(.*?)\n```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert block
    expr = block.group(1).split("\n")[1][2:]
    with pytest.raises(MergeSyntaxError) as info:
        parse(expr)
    assert str(info.value) == block.group(1)


@pytest.mark.parametrize(("expr", "result"), DOC_EXAMPLES, ids=[e for e, _ in DOC_EXAMPLES])
def test_syntax_md_example(sdxl, sd1, tables, expr, result):
    ctx = sd1 if result.startswith("SD1:") else sdxl
    plain = re.sub(r"`[^`]*`", "", result)
    error = re.search(r"error at column (\d+)", plain)
    if error:
        with pytest.raises(MergeError) as info:
            evaluate(expr, ctx)
        assert info.value.column == int(error.group(1)), str(info.value)
        return
    got = evaluate(expr, ctx)
    checks = 0
    n = re.search(r"(\d+) vectors?\b", plain)
    if n:
        assert count(got) == int(n.group(1))
        checks += 1
    for other in re.findall(r"= `([^`]+)`", result):
        assert_same(got, evaluate(other, ctx))
        checks += 1
    if re.search(r"\bzero\b", plain):
        assert all(not t.any() for t in got.values())
        checks += 1
    length = re.search(r"length (vocab|[\d.]+)", plain)
    if length:
        for e, t in got.items():
            want = (
                float(tables[e].norm(dim=1).mean()) if length.group(1) == "vocab" else float(length.group(1))
            )
            torch.testing.assert_close(t.norm(dim=1), torch.full((t.shape[0],), want), rtol=1e-4, atol=1e-5)
        checks += 1
    like = re.search(r"length of `([^`]+)`", result)
    if like:
        target = evaluate(like.group(1), ctx)
        for e, t in got.items():
            want = float(target[e].norm(dim=1).mean())
            torch.testing.assert_close(t.norm(dim=1), torch.full((t.shape[0],), want), rtol=1e-4, atol=1e-5)
        checks += 1
    assert checks, f"the SYNTAX.md result {result!r} has nothing to check"

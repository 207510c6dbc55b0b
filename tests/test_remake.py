"""Re-making an embedding for another checkpoint from its recipe, and the re-made name.

Two models share the real CLIP BPE tokenizer and differ in their (seeded random) token tables.
"""

from __future__ import annotations

import pytest
import torch

from lib_ti.create import CreateArgs, create_embedding
from lib_ti.embedding import Embedding
from lib_ti.errors import InvalidNameError, TIError
from lib_ti.merge import MergeContext, merge_to_embedding
from lib_ti.names import MAX_NAME_LENGTH, validate_name
from lib_ti.remake import (
    SHORT_NAME_LENGTH,
    RemakeError,
    checkpoint_short_name,
    recipe_of,
    remake,
    remake_name,
)
from lib_ti.text.encoders import open_clip_tokenizer_info
from lib_ti.text.vocab import TokenTable

from . import models

SDXL = ("clip_l", "clip_g")
SD1 = ("clip_l",)
TEXT = "a small orange tabby cat"
GRID = "re-making is not possible for trained embeddings.*comparison grid shows how the file behaves on each checkpoint"


class Model:
    """What a checkpoint gives Create (vocabularies) and Merge (a context), from seeded tables."""

    def __init__(self, tables: dict[str, torch.Tensor], encoders: tuple[str, ...], embeddings=None) -> None:
        tok = open_clip_tokenizer_info(models.open_clip_tokenizer())
        self.tables = {e: tables[e] for e in encoders}
        self.vocabs = {e: TokenTable(e, t, tok) for e, t in self.tables.items()}
        self.ctx = self.context(embeddings or {})

    def lookup(self, ids: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(ids, dtype=torch.long)
        return {e: t[idx] for e, t in self.tables.items()}

    def context(self, embeddings: dict[str, Embedding]) -> MergeContext:
        return MergeContext(tuple(self.tables), models.open_clip_tokenizer().encode, self.lookup, embeddings)


@pytest.fixture(scope="module")
def table_sets() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    out = []
    for seed in (11, 12):
        gen = torch.Generator().manual_seed(seed)
        out.append(
            {
                "clip_l": torch.randn(49408, 768, generator=gen) * 0.02,
                "clip_g": torch.randn(49408, 1280, generator=gen) * 0.025,
            }
        )
    return out[0], out[1]


@pytest.fixture(scope="module", params=["sdxl", "sd1"])
def pair(request, table_sets) -> tuple[Model, Model]:
    encoders = SDXL if request.param == "sdxl" else SD1
    return Model(table_sets[0], encoders), Model(table_sets[1], encoders)


def delta_by_hand(a: Embedding, b: Embedding) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for enc in a.vectors:
        x, y = a.vectors[enc].double(), b.vectors[enc].double()
        cos = [float(x[i] @ y[i] / (x[i].norm() * y[i].norm())) for i in range(x.shape[0])]
        mad = [float((x[i] - y[i]).abs().sum() / x.shape[1]) for i in range(x.shape[0])]
        out[enc] = (cos, mad)
    return out


def assert_delta(result, original: Embedding) -> None:
    want = delta_by_hand(original, result.embedding)
    assert [p.encoder for p in result.delta.encoders] == list(want)
    for part in result.delta.encoders:
        cos, mad = want[part.encoder]
        assert part.cosine == pytest.approx(cos, abs=1e-12)
        assert part.mean_abs_diff == pytest.approx(mad, rel=1e-12)


def test_text_recipe_equals_a_fresh_create_on_the_other_model(pair):
    a, b = pair
    original = create_embedding(CreateArgs("tabby", 3, "text", TEXT), a.vocabs).embedding
    assert recipe_of(original) == "text"
    result = remake(original, b.vocabs, b.ctx, "tabby-b")
    fresh = create_embedding(CreateArgs("tabby-b", 3, "text", TEXT), b.vocabs)
    assert result.recipe == "text"
    assert result.embedding.kind == original.kind
    assert result.embedding.vectors.keys() == fresh.embedding.vectors.keys()
    for enc, t in fresh.embedding.vectors.items():
        assert torch.equal(result.embedding.vectors[enc], t)
        assert not torch.equal(result.embedding.vectors[enc], original.vectors[enc])  # the tables differ
    assert result.warnings == fresh.warnings  # 5 tokens into 3 vectors, said for the new model
    assert result.embedding.name == "tabby-b"
    assert result.embedding.step == 0
    assert result.embedding.metadata == {"init_mode": "text", "init_text": TEXT, "remade_from": "tabby"}
    assert_delta(result, original)
    # on its own model the recipe gives the original back: nothing changed
    same = remake(original, a.vocabs, a.ctx, "tabby-a")
    assert all(torch.equal(same.embedding.vectors[e], t) for e, t in original.vectors.items())
    for part in same.delta.encoders:
        assert part.mean_abs_diff == [0.0] * 3
        assert part.cosine == pytest.approx([1.0] * 3)


EXPRESSIONS = ["'cat' * 0.5 + 'dog' - 'bird' * 0.2, 'sunset'", "avg('kitten', 'puppy'):+1", "'',320,49407"]


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_merge_recipe_equals_the_expression_on_the_other_model(pair, expr):
    a, b = pair
    original = merge_to_embedding(expr, a.ctx, "mixed")
    assert recipe_of(original) == "merge"
    result = remake(original, b.vocabs, b.ctx, "mixed-b", checkpoint="other.safetensors [0123abcd]")
    want = merge_to_embedding(expr, b.ctx, "mixed-b")
    assert result.recipe == "merge"
    assert result.embedding.vectors.keys() == want.vectors.keys()
    for enc, t in want.vectors.items():
        assert torch.equal(result.embedding.vectors[enc], t)
    assert result.embedding.metadata == {
        "merge_expression": expr,
        "remade_from": "mixed",
        "remade_for": "other.safetensors [0123abcd]",
    }
    assert_delta(result, original)


def test_merge_recipe_reads_embeddings_but_not_the_original_itself(table_sets):
    gen = torch.Generator().manual_seed(3)
    style = Embedding(
        "mystyle",
        {"clip_l": torch.randn(2, 768, generator=gen), "clip_g": torch.randn(2, 1280, generator=gen)},
    )
    a = Model(table_sets[0], SDXL, {"mystyle": style})
    original = merge_to_embedding("'kitten' * 2 + 'mystyle':1", a.ctx, "kitten")
    # the target's folder holds the style and the original file itself; the word 'kitten' stays a word
    b = Model(table_sets[1], SDXL, {"mystyle": style, "kitten": original})
    result = remake(original, b.vocabs, b.ctx, "kitten-b")
    want = merge_to_embedding("'kitten' * 2 + 'mystyle':1", b.context({"mystyle": style}), "kitten-b")
    for enc, t in want.vectors.items():
        assert torch.equal(result.embedding.vectors[enc], t)
    # read through the folder, 'kitten' would have been the original's vectors
    shadowed = merge_to_embedding("'kitten' * 2 + 'mystyle':1", b.ctx, "kitten-b")
    assert not torch.equal(shadowed.vectors["clip_l"], want.vectors["clip_l"])
    assert "kitten" in b.ctx.embeddings  # the caller's context is not changed
    words = merge_to_embedding("'kitten' * 2 + 'mystyle':1", b.context({}), "kitten-b")
    assert not torch.equal(words.vectors["clip_l"], want.vectors["clip_l"])  # 'mystyle' was the embedding


def test_random_recipe_keeps_directions_and_takes_the_new_norms(pair):
    a, b = pair
    original = create_embedding(CreateArgs("noise", 2, "random", seed=77), a.vocabs).embedding
    assert recipe_of(original) == "random"
    result = remake(original, b.vocabs, b.ctx, "noise-b")
    fresh = create_embedding(CreateArgs("noise-b", 2, "random", seed=77), b.vocabs).embedding
    for enc, t in fresh.vectors.items():
        assert torch.equal(result.embedding.vectors[enc], t)
    assert result.embedding.metadata["init_seed"] == "77"
    for part in result.delta.encoders:
        assert part.cosine == pytest.approx([1.0, 1.0], abs=1e-6)  # same draw, other norm statistics
        assert min(part.mean_abs_diff) > 0
    assert_delta(result, original)


def test_zeros_recipe(pair):
    a, b = pair
    original = create_embedding(CreateArgs("blank", 4, "zeros"), a.vocabs).embedding
    result = remake(original, b.vocabs, None, "blank-b")
    assert result.recipe == "zeros"
    assert all(t.shape[0] == 4 and not t.any() for t in result.embedding.vectors.values())


def test_an_sd1_recipe_remade_on_sdxl_gets_both_halves(table_sets):
    a, b = Model(table_sets[0], SD1), Model(table_sets[1], SDXL)
    original = create_embedding(CreateArgs("tabby", 2, "text", "tabby cat"), a.vocabs).embedding
    original.sd_checkpoint_name = "v1-5-pruned"
    original.metadata["stored_name"] = "old"
    original.metadata["transfer"] = "nearest-tokens k=8"
    result = remake(original, b.vocabs, b.ctx, "tabby-xl")
    assert result.embedding.kind == "sdxl"
    fresh = create_embedding(CreateArgs("tabby-xl", 2, "text", "tabby cat"), b.vocabs).embedding
    for enc, t in fresh.vectors.items():
        assert torch.equal(result.embedding.vectors[enc], t)
    assert [p.encoder for p in result.delta.encoders] == ["clip_l"]
    assert any("kinds differ" in n for n in result.delta.notes)
    assert result.embedding.metadata == {
        "init_mode": "text",
        "init_text": "tabby cat",
        "remade_from": "tabby",
        "remade_from_checkpoint": "v1-5-pruned",
    }
    assert result.embedding.sd_checkpoint_name is None


def test_sd2_recipe_on_sdxl_has_no_delta(table_sets):
    b = Model(table_sets[1], SDXL)
    original = Embedding(
        "h", {"clip_h": torch.ones(1, 1024)}, step=0, metadata={"init_mode": "text", "init_text": "cat"}
    )
    result = remake(original, b.vocabs, b.ctx, "h-xl")
    assert result.delta is None
    assert any("share no text encoder" in w for w in result.warnings)


def test_trained_and_recipe_less_files_are_refused(table_sets):
    b = Model(table_sets[1], SD1)
    made = {"init_mode": "text", "init_text": "cat"}
    vec = {"clip_l": torch.ones(1, 768)}
    refused = {
        "trained step": Embedding("t1", vec, step=500, metadata=made),
        "trainer metadata": Embedding("t2", vec, step=0, metadata={**made, "trainer": "lib_ti 0.1.0"}),
        "resume state": Embedding("t3", vec, metadata={"merge_expression": "'cat'", "resume": "{}"}),
        "bad step": Embedding("t4", vec, metadata={**made, "step": "abc"}),
        "no recipe": Embedding("t5", vec, step=0),
        "a1111 create": Embedding("t6", vec, step=0, sd_checkpoint="abc", metadata={"init_mode": "text"}),
        "no seed": Embedding("t7", vec, step=0, metadata={"init_mode": "random"}),
        "bad seed": Embedding("t8", vec, step=0, metadata={"init_mode": "random", "init_seed": "-3"}),
    }
    for why, emb in refused.items():
        with pytest.raises(RemakeError, match=GRID) as info:
            remake(emb, b.vocabs, b.ctx, "x")
        assert emb.name in str(info.value), why
    with pytest.raises(RemakeError, match=r"t1 was trained \(step 500\)"):
        recipe_of(refused["trained step"])
    with pytest.raises(RemakeError, match="t2 was trained \\(its metadata has 'trainer'\\)"):
        recipe_of(refused["trainer metadata"])
    with pytest.raises(RemakeError, match="needs the target model's merge context"):
        remake(Embedding("m", vec, metadata={"merge_expression": "'cat'"}), b.vocabs, None, "x")
    with pytest.raises(RemakeError, match="needs the target model's text encoders"):
        remake(Embedding("c", vec, step=0, metadata=made), {}, b.ctx, "x")
    with pytest.raises(InvalidNameError):
        remake(Embedding("c", vec, step=0, metadata=made), b.vocabs, b.ctx, "../x")
    assert issubclass(RemakeError, TIError)


@pytest.mark.parametrize(
    ("title", "short"),
    [
        ("sd_xl_base_1.0.safetensors [31e35c80fc]", "sd_xl_base_1.0"),
        ("sd_xl_base_1.0", "sd_xl_base_1.0"),  # no extension: '.0' stays
        ("SDXL/sub/juggernautXL_v9.ckpt [c9e3e68f89]", "juggernautXL_v9"),
        ("C:\\models\\Stable-diffusion\\dreamshaper_8.SafeTensors", "dreamshaper_8"),
        ("My Model (v2) [final].safetensors [1234abcd]", "My_Model_v2_final"),
        ("  spaced  name.pt  [ab12]  ", "spaced_name"),
        ("a..b:c*d?.safetensors", "a.b_c_d"),
        ("モデル.safetensors", "モデル"),
        ("[0123456789]", ""),
        ("", ""),
        ("x" * 300 + ".safetensors", "x" * SHORT_NAME_LENGTH),
        ("ab" + "_" * 37 + "-cd.safetensors", "ab_-cd"),
        ("a" * 39 + "....b", "a" * 39),  # cut after '.', which a name may not end with
    ],
)
def test_checkpoint_short_name(title, short):
    assert checkpoint_short_name(title) == short


def test_remake_name():
    assert remake_name("tabby", "sd_xl_base_1.0.safetensors [31e35c80fc]") == "tabby-sd_xl_base_1.0"
    assert remake_name("my cat", "SDXL/pony v6.safetensors") == "my cat-pony_v6"
    assert remake_name("tabby", "[abc]") == "tabby-remade"
    long_name = "x" * 58 + " y" + "z" * 40  # 100 characters, the limit
    got = remake_name(long_name, "w" * 80 + ".safetensors [abcdef0123]")
    assert got == "x" * 58 + "-" + "w" * SHORT_NAME_LENGTH  # cut, and no space before the dash
    assert len(got) <= MAX_NAME_LENGTH
    for name in ("a", "n" * MAX_NAME_LENGTH, "a.b", "a b"):
        for title in ("m.safetensors [1]", "x" * 500, "<>|?*", "../../etc/passwd", "a.b.c."):
            validate_name(remake_name(name, title))
    with pytest.raises(InvalidNameError):
        remake_name("../x", "m.safetensors")

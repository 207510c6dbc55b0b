"""Nearest-token transfer CLIP-L <-> CLIP-G on tables of the real sizes (seeded random numbers)."""

from __future__ import annotations

import pytest
import torch

from lib_ti.embedding import Embedding
from lib_ti.errors import EmbeddingFormatError, TIError
from lib_ti.text.transfer import (
    DEFAULT_K,
    MAX_K,
    TransferError,
    to_sd1_by_tokens,
    to_sdxl_by_tokens,
    transfer_vectors,
)

WORDS = "a watercolor painting of a cat, café, 1girl"


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize(("src", "dst"), [("clip_l", "clip_g"), ("clip_g", "clip_l")])
def test_single_tokens_are_exact(tables, tokenizer, src, dst):
    ids = tokenizer.encode(WORDS)
    res = transfer_vectors(tables[src][ids], tables[src], tables[dst])
    want = tables[dst][ids]
    assert res.vectors.shape == want.shape
    assert res.vectors.dtype == torch.float32
    assert torch.allclose(res.vectors, want, rtol=0, atol=1e-6)
    assert (cosines(res.vectors, want) > 1 - 1e-9).all()
    assert [[t for t, _ in toks] for toks in res.tokens] == [[i] for i in ids]  # one token, nothing else
    assert all(abs(toks[0][1] - 1.0) < 1e-9 for toks in res.tokens)
    assert max(res.residual) < 1e-9
    assert min(res.fit_cosine) == pytest.approx(1.0)


def test_scaled_token_keeps_its_scale(tables):
    res = transfer_vectors(tables["clip_l"][[2368]] * 2.5, tables["clip_l"], tables["clip_g"])
    assert res.tokens[0][0][0] == 2368
    assert res.tokens[0][0][1] == pytest.approx(2.5)
    assert torch.allclose(res.vectors[0], tables["clip_g"][2368] * 2.5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4, DEFAULT_K])
def test_mixes_of_up_to_k_tokens_are_recovered(tables, k):
    gen = torch.Generator().manual_seed(k)
    vectors, truth, recipes = [], [], []
    for m in range(1, k + 1):
        ids = torch.randperm(49406, generator=gen)[:m]
        w = (0.1 + 0.9 * torch.rand(m, generator=gen, dtype=torch.float64)) * torch.where(
            torch.rand(m, generator=gen) < 0.3, -1.0, 1.0
        ).double()  # Merge subtracts: negative weights must come back too
        vectors.append((w @ tables["clip_l"][ids].double()).float())
        truth.append(w @ tables["clip_g"][ids].double())
        recipes.append(dict(zip(ids.tolist(), w.tolist())))
    res = transfer_vectors(torch.stack(vectors), tables["clip_l"], tables["clip_g"], k)
    want = torch.stack(truth)
    assert (cosines(res.vectors, want) > 1 - 1e-9).all()
    assert torch.allclose(res.vectors.double(), want, rtol=0, atol=1e-5)
    for got, recipe in zip(res.tokens, recipes):
        assert {t for t, _ in got} == set(recipe)
        for t, w in got:
            assert w == pytest.approx(recipe[t], abs=1e-5)
    assert max(res.residual) < 1e-6


def test_a_vector_outside_the_vocabulary_reports_its_fit(tables):
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(2, 768, generator=gen)
    res = transfer_vectors(v, tables["clip_l"], tables["clip_g"], 5)
    for i in range(2):
        ids = [t for t, _ in res.tokens[i]]
        w = torch.tensor([w for _, w in res.tokens[i]], dtype=torch.float64)
        assert len(ids) == 5
        fit = w @ tables["clip_l"][ids].double()
        r = float((v[i].double() - fit).norm() / v[i].double().norm())
        assert res.residual[i] == pytest.approx(r, rel=1e-6)
        assert 0.1 < res.residual[i] < 1.0
        assert res.fit_cosine[i] == pytest.approx(float(cosines(fit[None], v[i][None])), rel=1e-6)
        # the fit is the least-squares one: its residual is orthogonal to every row used
        assert (tables["clip_l"][ids].double() @ (v[i].double() - fit)).abs().max() < 1e-9
        assert torch.allclose(res.vectors[i].double(), w @ tables["clip_g"][ids].double(), atol=1e-6)


def test_zero_vector_and_half_tables(tables):
    res = transfer_vectors(torch.zeros(1, 768), tables["clip_l"], tables["clip_g"])
    assert not res.vectors.any()
    assert res.tokens == [[]]
    assert res.residual == [0.0]
    small_l = tables["clip_l"][:3000].half()  # real checkpoints hold float16 tables
    small_g = tables["clip_g"][:3000].half()
    res = transfer_vectors(small_l[[10, 20]], small_l, small_g, 2)
    assert torch.equal(res.vectors, small_g[[10, 20]].float())


def test_sd1_to_sdxl_and_back(tables, tokenizer):
    ids = tokenizer.encode("orange cat")
    emb = Embedding(
        "kitty",
        {"clip_l": tables["clip_l"][ids]},
        step=0,
        sd_checkpoint="abc",
        metadata={"init_text": "orange cat"},
    )
    xl = to_sdxl_by_tokens(emb, tables["clip_l"], tables["clip_g"], 3)
    assert xl.kind == "sdxl"
    assert (xl.name, xl.step, xl.sd_checkpoint) == ("kitty", 0, "abc")
    assert xl.vectors["clip_l"].shape == (2, 768)
    assert xl.vectors["clip_g"].shape == (2, 1280)
    assert torch.equal(xl.vectors["clip_l"], emb.vectors["clip_l"])
    assert torch.allclose(xl.vectors["clip_g"], tables["clip_g"][ids], atol=1e-6)
    assert xl.metadata["init_text"] == "orange cat"
    assert xl.metadata["transfer"] == "nearest-tokens k=3"
    assert xl.metadata["transfer_fit"] == "1.0000,1.0000"
    assert emb.metadata == {"init_text": "orange cat"}  # the input is not changed
    assert to_sdxl_by_tokens(emb, tables["clip_l"], tables["clip_g"], name="other").name == "other"

    g_only = Embedding("gee", {"clip_g": tables["clip_g"][ids]})
    sd1 = to_sd1_by_tokens(g_only, tables["clip_g"], tables["clip_l"])
    assert sd1.kind == "sd1"
    assert sd1.vectors["clip_l"].shape == (2, 768)
    assert torch.allclose(sd1.vectors["clip_l"], tables["clip_l"][ids], atol=1e-6)
    assert sd1.metadata["transfer"] == f"nearest-tokens k={DEFAULT_K}"


def test_errors(tables):
    l_t, g_t = tables["clip_l"], tables["clip_g"]
    sd1 = Embedding("one", {"clip_l": l_t[[5]]})
    xl = Embedding("xl", {"clip_l": l_t[[5]], "clip_g": g_t[[5]]})
    g_only = Embedding("g", {"clip_g": g_t[[5]]})
    with pytest.raises(EmbeddingFormatError, match="only an SD1"):
        to_sdxl_by_tokens(xl, l_t, g_t)
    with pytest.raises(EmbeddingFormatError, match="has a CLIP-L half already"):
        to_sd1_by_tokens(xl, g_t, l_t)
    with pytest.raises(EmbeddingFormatError, match="only a CLIP-G"):
        to_sd1_by_tokens(sd1, g_t, l_t)
    with pytest.raises(TransferError, match=r"CLIP-L token table must be \[tokens, 768\]"):
        to_sdxl_by_tokens(sd1, g_t, l_t)
    with pytest.raises(
        TransferError, match=r"CLIP-G token table must be \[tokens, 1280\], not \[49408, 768\]"
    ):
        to_sd1_by_tokens(g_only, l_t, l_t)
    with pytest.raises(TransferError, match=r"different row counts \(49408 and 49407\)"):
        to_sdxl_by_tokens(sd1, l_t, g_t[:-1])
    for k in (0, MAX_K + 1, True, 2.0, "3"):
        with pytest.raises(TransferError, match=f"from 1 to {MAX_K}"):
            to_sdxl_by_tokens(sd1, l_t, g_t, k)  # type: ignore[arg-type]
    with pytest.raises(TransferError, match="from 1 to 10"):
        transfer_vectors(l_t[:1, :10], l_t[:10, :10], g_t[:10], 11)  # k cannot pass the row count
    with pytest.raises(TransferError, match="the vectors are 1280 wide but the source token table is 768"):
        transfer_vectors(g_t[:1], l_t, g_t)
    with pytest.raises(TransferError, match="2-D"):
        transfer_vectors(l_t[0], l_t, g_t)
    with pytest.raises(TransferError, match="NaN"):
        transfer_vectors(torch.full((1, 768), float("nan")), l_t, g_t)
    assert issubclass(TransferError, TIError)

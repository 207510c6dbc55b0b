"""Nearest vocabulary tokens per vector, on the real vocabulary."""

from __future__ import annotations

import torch

from lib_ti.embedding import Embedding
from lib_ti.text.encoders import open_clip_tokenizer_info
from lib_ti.text.nearest import NearestTokens, nearest_tokens
from lib_ti.text.vocab import TokenTable

from . import models


def test_nearest_finds_the_token_itself():
    tok = open_clip_tokenizer_info(models.open_clip_tokenizer())
    gen = torch.Generator().manual_seed(0)
    tables = {
        k: TokenTable(k, torch.randn(49408, d, generator=gen), tok)
        for k, d in (("clip_l", 768), ("clip_g", 1280))
    }
    ids = tok.tokenize(["cat dog"])[0]
    emb = Embedding("x", {k: t.token_vectors(ids) * 3.0 for k, t in tables.items()})  # scale must not matter
    found = nearest_tokens(emb, {k: NearestTokens(t) for k, t in tables.items()}, k=3)
    for key in ("clip_l", "clip_g"):
        assert [row[0].token_id for row in found[key]] == ids
        assert [row[0].text for row in found[key]] == ["cat ", "dog "]
        assert all(abs(row[0].score - 1.0) < 1e-5 for row in found[key])
        assert all(row[0].score >= row[1].score >= row[2].score for row in found[key])


def test_decode_handles_bytes_and_word_ends():
    tok = open_clip_tokenizer_info(models.open_clip_tokenizer())
    ids = tok.tokenize(["café"])[0]
    assert "".join(tok.decode(i) for i in ids).strip() == "café"

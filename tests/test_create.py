"""Create: A1111's init formula per encoder, zeros, random at the vocabulary's norms; files hold every encoder."""

from __future__ import annotations

import pytest
import torch

from lib_ti.create import CreateArgs, create_embedding, vocab_norm_stats
from lib_ti.errors import InvalidNameError, TIError
from lib_ti.io.formats import read_embedding, write_embedding
from lib_ti.text.encoders import (
    EncoderSettings,
    HFClipEncoder,
    OpenClipEncoder,
    hf_tokenizer_info,
    open_clip_tokenizer_info,
)

from . import models


def vocabs_for(kind):
    l_tok = hf_tokenizer_info(models.hf_tokenizer())
    oc_tok = open_clip_tokenizer_info(models.open_clip_tokenizer())
    l_enc = HFClipEncoder("clip_l", models.clip_l(), l_tok, EncoderSettings())
    if kind == "sd1":
        return {"clip_l": l_enc}
    if kind == "sd2":
        return {
            "clip_h": OpenClipEncoder(
                "clip_h", models.open_clip_tower("ti-tiny-H"), oc_tok, EncoderSettings()
            )
        }
    g = OpenClipEncoder(
        "clip_g", models.open_clip_tower("ti-tiny-bigG"), oc_tok, EncoderSettings(pooled=True)
    )
    return {"clip_l": l_enc, "clip_g": g}


TEXT = "a small orange tabby cat"  # 5 tokens


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_init_formula(kind, n, tmp_path):
    vocabs = vocabs_for(kind)
    res = create_embedding(CreateArgs("made", n, "text", TEXT), vocabs)
    emb = res.embedding
    assert emb.kind == kind
    for key, vocab in vocabs.items():
        ids = vocab.tokenize(TEXT)
        assert len(ids) == 5
        table = vocab.table_weight
        for i in range(n):
            assert torch.equal(emb.vectors[key][i], table[ids[i * len(ids) // n]])
    assert (len(res.warnings) > 0) == (n != 5)
    back = read_embedding(write_embedding(emb, tmp_path / "made.safetensors"))
    assert set(back.vectors) == set(vocabs)  # SDXL files hold both encoders
    assert back.metadata["init_text"] == TEXT


def test_zeros_and_random():
    vocabs = vocabs_for("sdxl")
    z = create_embedding(CreateArgs("z", 3, "zeros"), vocabs).embedding
    assert not any(t.any() for t in z.vectors.values())
    r1 = create_embedding(CreateArgs("r", 4, "random", seed=5), vocabs).embedding
    r2 = create_embedding(CreateArgs("r", 4, "random", seed=5), vocabs).embedding
    assert all(torch.equal(r1.vectors[k], r2.vectors[k]) for k in vocabs)
    for key, vocab in vocabs.items():
        mean, std = vocab_norm_stats(vocab)
        norms = r1.vectors[key].norm(dim=1)
        assert ((norms - mean).abs() < 4 * std + 1e-6).all()


def test_warnings_and_errors():
    vocabs = vocabs_for("sd1")
    res = create_embedding(CreateArgs("many", 20, "zeros"), vocabs)
    assert any("overfit" in w for w in res.warnings)
    with pytest.raises(TIError, match="1 to 75"):
        create_embedding(CreateArgs("x", 76, "zeros"), vocabs)
    with pytest.raises(TIError, match="1 to 75"):
        create_embedding(CreateArgs("x", 0, "zeros"), vocabs)
    with pytest.raises(TIError, match="empty"):
        create_embedding(CreateArgs("x", 1, "text", "  "), vocabs)
    with pytest.raises(InvalidNameError):
        create_embedding(CreateArgs("../x", 1, "zeros"), vocabs)
    # torch takes 64-bit seeds; 2**70 raised RuntimeError ("Overflow when unpacking long")
    for seed in (2**70, -1, 2**63):
        with pytest.raises(
            TIError, match=r"^the seed must be a whole number from 0 to 9223372036854775807 \(got "
        ):
            create_embedding(CreateArgs("x", 1, "random", seed=seed), vocabs)
    assert create_embedding(CreateArgs("x", 1, "random", seed=2**63 - 1), vocabs).embedding.num_vectors == 1


def test_overwrite_only_when_asked(tmp_path):
    vocabs = vocabs_for("sd1")
    emb = create_embedding(CreateArgs("same", 1, "text", "cat"), vocabs).embedding
    path = write_embedding(emb, tmp_path / "same.safetensors")
    other = create_embedding(CreateArgs("same", 1, "text", "dog"), vocabs).embedding
    with pytest.raises(FileExistsError):
        write_embedding(other, path)
    assert torch.equal(read_embedding(path).matrix, emb.matrix)
    write_embedding(other, path, overwrite=True)
    assert torch.equal(read_embedding(path).matrix, other.matrix)

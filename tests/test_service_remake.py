"""Re-make for the loaded checkpoint and nearest-token conversion, through the service, the Inspect
view's library and the REST API, on tiny real models with different token tables."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lib_ti.create import CreateArgs, create_embedding
from lib_ti.embedding import Embedding
from lib_ti.hostinfo import HostServices
from lib_ti.io import library
from lib_ti.io.formats import read_embedding, write_embedding
from lib_ti.remake import RemakeError
from lib_ti.service import Service
from lib_ti.text.encoders import EncoderSettings, HFClipEncoder, PromptEncoder

from . import models
from . import train_models as tm


def parts_with_seed(seed: int):
    """An SD1 model whose CLIP-L token table is another seed's (another fine-tune, as far as TI goes)."""
    base = tm.make_parts("sd1")
    tok = tm.hf_tokenizer_info(models.hf_tokenizer())
    enc = PromptEncoder([HFClipEncoder("clip_l", models.clip_l(seed), tok, EncoderSettings())])
    return dataclasses.replace(base, prompt_encoder=enc, model_hash=f"seed{seed}")


@pytest.fixture
def env(tmp_path):
    emb_dir = tmp_path / "embeddings"
    emb_dir.mkdir()
    current = {"parts": parts_with_seed(0), "title": "tiny-one.safetensors [1111aaaa]"}
    host = HostServices(
        embeddings_dir=lambda: str(emb_dir),
        log_dir=lambda: str(tmp_path / "logs"),
        build_parts=lambda: current["parts"],
        reload_embeddings=lambda: None,
        checkpoint=lambda: current["title"],
    )
    return Service(host), current, emb_dir


def test_a_text_made_embedding_re_made_equals_a_fresh_create_on_the_other_checkpoint(env):
    service, current, emb_dir = env
    service.create(CreateArgs("kitty", 3, "text", "a tabby cat"))
    original = read_embedding(emb_dir / "kitty.safetensors")
    current["parts"], current["title"] = parts_with_seed(1), "finetunes/Tiny Two.safetensors [2222bbbb]"
    done = service.remake("kitty")
    assert done["name"] == "kitty-Tiny_Two" and done["recipe"] == "text"
    remade = read_embedding(done["file"])
    fresh = create_embedding(
        CreateArgs("x", 3, "text", "a tabby cat"), service.vocabularies(current["parts"])
    )
    assert torch.equal(remade.vectors["clip_l"], fresh.embedding.vectors["clip_l"])
    assert not torch.equal(remade.vectors["clip_l"], original.vectors["clip_l"])  # the tables differ
    assert remade.metadata["remade_from"] == "kitty"
    assert remade.metadata["remade_for"] == "finetunes/Tiny Two.safetensors [2222bbbb]"
    # the table of differences, computed here independently
    a, b = original.vectors["clip_l"], remade.vectors["clip_l"]
    enc = done["delta"]["encoders"][0]
    assert enc["encoder"] == "clip_l"
    assert enc["cosine"] == pytest.approx(F.cosine_similarity(a, b, dim=1).tolist(), abs=1e-6)
    assert enc["mean_abs_diff"] == pytest.approx((a - b).abs().mean(dim=1).tolist(), abs=1e-7)


def test_a_merge_made_embedding_is_re_made_from_its_expression(env):
    service, current, emb_dir = env
    service.merge("'cat' + 0.5 * 'dog'", "catdog")
    current["parts"], current["title"] = parts_with_seed(2), "three.ckpt"
    done = service.remake("catdog")
    assert done["recipe"] == "merge" and done["name"] == "catdog-three"
    remade = read_embedding(done["file"])
    # the same expression merged on the loaded (second) model
    assert torch.equal(
        remade.vectors["clip_l"], service.preview_merge("'cat' + 0.5 * 'dog'").vectors["clip_l"]
    )


def test_a_trained_embedding_is_refused_and_pointed_at_the_grid(env):
    service, _, emb_dir = env
    write_embedding(
        Embedding("trained", {"clip_l": torch.randn(2, 768)}, step=500), emb_dir / "trained.safetensors"
    )
    before = sorted(p.name for p in emb_dir.iterdir())
    with pytest.raises(RemakeError, match="comparison grid"):
        service.remake("trained")
    assert sorted(p.name for p in emb_dir.iterdir()) == before


def test_rest_remake(env):
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.ui.api import add_routes

    service, current, _ = env
    app = FastAPI()
    add_routes(app, service)
    client = TestClient(app)
    service.create(CreateArgs("pup", 1, "text", "puppy"))
    current["parts"], current["title"] = parts_with_seed(1), "two.safetensors"
    r = client.post("/ti/v1/remake", json={"name": "pup"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "pup-two" and len(r.json()["delta"]["encoders"][0]["cosine"]) == 1
    r = client.post("/ti/v1/remake", json={"name": "pup"})
    assert r.status_code == 409, r.text  # exists; overwrite: true replaces it
    assert client.post("/ti/v1/remake", json={"name": "pup", "overwrite": True}).status_code == 200
    assert client.post("/ti/v1/remake", json={"name": "pup", "colour": 1}).status_code == 422
    assert client.post("/ti/v1/remake", json={"name": "nobody"}).status_code == 404


def test_sd1_to_sdxl_by_nearest_tokens_through_the_library(env, tmp_path):
    service, current, emb_dir = env
    sdxl = tm.make_parts("sdxl")
    tables = {e.key: e.table_weight for e in sdxl.prompt_encoder.encoders}
    ids = sdxl.prompt_encoder.encoders[0].tokenize("cat dog")
    l_rows = tables["clip_l"][ids].detach().float()
    write_embedding(Embedding("words", {"clip_l": l_rows}), emb_dir / "words.safetensors")
    path = library.convert_and_save(emb_dir, "words.safetensors", "words-xl", "safetensors", "sdxl_g_by_tokens",
                                    tables=lambda: tables)  # fmt: skip
    out = read_embedding(path)
    assert out.kind == "sdxl" and torch.equal(out.vectors["clip_l"], l_rows)
    g_rows = tables["clip_g"][ids].detach().float()
    assert F.cosine_similarity(out.vectors["clip_g"], g_rows, dim=1).min() > 0.99999
    assert out.metadata["transfer"].startswith("nearest-tokens")
    # an SD1 model has no CLIP-G table: said plainly, nothing written
    with pytest.raises(library.TIError, match="needs an SDXL model loaded"):
        library.convert_and_save(emb_dir, "words.safetensors", "words-xl2", "safetensors", "sdxl_g_by_tokens",
                                 tables=service.token_tables)  # fmt: skip
    assert not (emb_dir / "words-xl2.safetensors").exists()

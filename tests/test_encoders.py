"""Our encoder path equals the libraries' own forward, splices exactly, and trains only the vectors."""

from __future__ import annotations

import copy

import pytest
import torch

from lib_ti.text.encoders import (
    EncoderSettings,
    HFClipEncoder,
    OpenClipEncoder,
    PromptEncoder,
    PromptSettings,
    hf_tokenizer_info,
    open_clip_tokenizer_info,
)

from . import models

pytestmark = pytest.mark.versioned  # transformers 4.30 (A1111) and 4.46 (Forge) internals

PROMPT = "a photo of a red cat sitting on a chair, high quality"


def hf_encoder(model=None, **kw):
    return HFClipEncoder(
        "clip_l", model or models.clip_l(), hf_tokenizer_info(models.hf_tokenizer()), EncoderSettings(**kw)
    )


def oc_encoder(name="ti-tiny-bigG", model=None, key="clip_g", **kw):
    kw.setdefault("id_pad", 0)
    tower = model or models.open_clip_tower(name)
    return OpenClipEncoder(
        key, tower, open_clip_tokenizer_info(models.open_clip_tokenizer()), EncoderSettings(**kw)
    )


def ids77(text, pad):
    ids = [49406, *models.open_clip_tokenizer().encode(text), 49407]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


# ---------------------------------------------------------------- parity with the libraries
@pytest.mark.parametrize(("skip", "final_norm"), [(0, True), (1, False), (1, True)])
def test_hf_equals_library_forward(skip, final_norm):
    model = models.clip_l()
    ours = PromptEncoder([hf_encoder(skip=skip, final_norm=final_norm)]).encode(PROMPT).crossattn
    with torch.no_grad():
        out = model(input_ids=ids77(PROMPT, 49407), output_hidden_states=True)
    if skip == 0:
        ref = out.last_hidden_state
    else:
        ref = out.hidden_states[-1 - skip]
        if final_norm:
            ref = model.text_model.final_layer_norm(ref)
    assert ours.shape == (1, 77, 768)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_open_clip_pooled_equals_encode_text():
    tower = models.open_clip_tower("ti-tiny-bigG")
    cond = PromptEncoder([oc_encoder(skip=1, final_norm=False, pooled=True)]).encode(PROMPT)
    with torch.no_grad():
        ref = tower.encode_text(ids77(PROMPT, 0))
    torch.testing.assert_close(cond.pooled, ref, atol=1e-5, rtol=1e-5)


def _tower_state(tower, text, pad):
    """The library's own transformer forward on a tower; ln_final applied."""
    with torch.no_grad():
        ids = ids77(text, pad)
        x = tower.token_embedding(ids) + tower.positional_embedding
        x = tower.transformer(x.permute(1, 0, 2), attn_mask=tower.attn_mask).permute(1, 0, 2)
        return x, tower.ln_final(x)


@pytest.mark.parametrize(("name", "final_norm"), [("ti-tiny-bigG", False), ("ti-tiny-H", True)])
def test_open_clip_penultimate_equals_truncated_tower(name, final_norm):
    tower = models.open_clip_tower(name)
    short = copy.deepcopy(tower)
    short.transformer.resblocks = short.transformer.resblocks[:-1]
    raw, normed = _tower_state(short, PROMPT, 0)
    ref = normed if final_norm else raw
    ours = PromptEncoder([oc_encoder(name, skip=1, final_norm=final_norm)]).encode(PROMPT).crossattn
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    full_raw, _ = _tower_state(tower, PROMPT, 0)
    assert not torch.allclose(ours, full_raw, atol=1e-3)  # the penultimate state is really a different layer


def test_sdxl_concatenates_l_and_g_and_pools_from_g():
    enc = PromptEncoder(
        [hf_encoder(skip=1, final_norm=False), oc_encoder(skip=1, final_norm=False, pooled=True)]
    )
    cond = enc.encode([PROMPT, "another prompt"])
    assert cond.crossattn.shape == (2, 77, 2048)
    assert cond.pooled.shape == (2, 1280)


# ---------------------------------------------------------------- splicing
@pytest.mark.parametrize("word", ["cat", "a fluffy cat"])
def test_embedding_of_a_words_vectors_equals_the_word(word):
    l_enc, g_enc = hf_encoder(skip=1, final_norm=False), oc_encoder(skip=1, final_norm=False, pooled=True)
    enc = PromptEncoder([l_enc, g_enc])
    emb = {"myemb": {"clip_l": l_enc.text_vectors(word), "clip_g": g_enc.text_vectors(word)}}
    with_name = enc.encode("a photo of myemb on a chair", emb)
    with_word = enc.encode(f"a photo of {word} on a chair")
    torch.testing.assert_close(with_name.crossattn, with_word.crossattn, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(with_name.pooled, with_word.pooled, atol=1e-6, rtol=1e-6)


def test_different_vectors_change_the_result():
    l_enc = hf_encoder()
    enc = PromptEncoder([l_enc])
    a = enc.encode("a photo of myemb", {"myemb": {"clip_l": l_enc.text_vectors("cat")}}).crossattn
    b = enc.encode("a photo of myemb", {"myemb": {"clip_l": l_enc.text_vectors("dog")}}).crossattn
    assert not torch.allclose(a, b)


def test_sd2_pads_with_zero_after_end():
    enc = oc_encoder("ti-tiny-H", key="clip_h", skip=1, final_norm=True)
    chunks = PromptEncoder([enc]).chunks("a cat", {})
    ids = enc.chunk_ids(chunks[0])
    head = [49406, *models.open_clip_tokenizer().encode("a cat"), 49407]
    assert ids[: len(head)] == head
    assert set(ids[len(head) :]) == {0}
    assert len(ids) == 77


def test_emphasis_changes_only_weighted_rows_then_restores_mean():
    enc = PromptEncoder([hf_encoder()])
    plain = enc.encode("a red cat").crossattn
    strong = enc.encode("a (red:1.5) cat").crossattn
    assert not torch.allclose(plain, strong)
    torch.testing.assert_close(strong.mean(), plain.mean(), atol=1e-5, rtol=1e-4)
    none = (
        PromptEncoder([hf_encoder()], PromptSettings(emphasis="Ignore")).encode("a (red:1.5) cat").crossattn
    )
    torch.testing.assert_close(none, plain)


def test_long_prompt_gives_several_chunks():
    cond = PromptEncoder([hf_encoder()]).encode(" ".join(["cat"] * 100))
    assert cond.crossattn.shape == (1, 154, 768)


# ---------------------------------------------------------------- gradients
def test_gradients_reach_only_the_vectors():
    l_enc, g_enc = hf_encoder(skip=1, final_norm=False), oc_encoder(skip=1, final_norm=False, pooled=True)
    enc = PromptEncoder([l_enc, g_enc])
    vl = l_enc.text_vectors("a cat").clone().requires_grad_()
    vg = g_enc.text_vectors("a cat").clone().requires_grad_()
    cond = enc.encode(["myemb in a garden", "(myemb:1.2) at night"], {"myemb": {"clip_l": vl, "clip_g": vg}})
    (cond.crossattn.square().mean() + cond.pooled.square().mean()).backward()
    assert vl.grad is not None and vl.grad.abs().sum() > 0
    assert vg.grad is not None and vg.grad.abs().sum() > 0
    for model in (models.clip_l(), models.open_clip_tower("ti-tiny-bigG")):
        assert all(p.grad is None for p in model.parameters())
        assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- host-wrapped token_embedding
@pytest.mark.parametrize("kind", ["hf", "open_clip"])
def test_host_wrapped_token_embedding_is_looked_through(kind):
    if kind == "hf":
        wrapped, wrapper = models.wrapped_copy(models.clip_l(), "hf")
        plain_enc, host_enc = hf_encoder(), hf_encoder(model=wrapped)
    else:
        wrapped, wrapper = models.wrapped_copy(models.open_clip_tower("ti-tiny-bigG"), "open_clip")
        plain_enc = oc_encoder(skip=1, final_norm=False, pooled=True)
        host_enc = oc_encoder(model=wrapped, skip=1, final_norm=False, pooled=True)
    vec = {"myemb": {plain_enc.key: plain_enc.text_vectors("dog")}}
    a = PromptEncoder([plain_enc]).encode("myemb on grass", vec)
    b = PromptEncoder([host_enc]).encode("myemb on grass", vec)
    torch.testing.assert_close(a.crossattn, b.crossattn)
    assert wrapper.calls == 0

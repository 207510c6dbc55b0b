"""Each producer's layout, built here the way that producer writes it, reads correctly."""

from __future__ import annotations

import base64
import json
from collections import OrderedDict

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from lib_ti.io.formats import read_diffusers_pair, read_embedding

from .conftest import DATA


def vec(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_a1111_pt(tmp_path):
    # modules/textual_inversion/textual_inversion.py Embedding.save: torch.save of this dict.
    v = vec(3, 768).requires_grad_()
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": v},
        "name": "a1111",
        "step": 500,
        "sd_checkpoint": "c77d740a47",
        "sd_checkpoint_name": "tiny-sd1",
    }
    torch.save(data, tmp_path / "a1111.pt")
    emb = read_embedding(tmp_path / "a1111.pt")
    assert (emb.kind, emb.num_vectors, emb.step) == ("sd1", 3, 500)
    assert (emb.sd_checkpoint, emb.sd_checkpoint_name) == ("c77d740a47", "tiny-sd1")
    assert torch.equal(emb.matrix, v.detach())


def test_original_textual_inversion_parameterdict(tmp_path):
    # rinongal/textual_inversion EmbeddingManager.save and early A1111: string_to_param is a ParameterDict.
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec(2, 768, 1))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "old.pt")
    emb = read_embedding(tmp_path / "old.pt")
    assert emb.kind == "sd1"
    assert torch.equal(emb.matrix, vec(2, 768, 1))


def test_a1111_pt_sd2_with_ordereddict(tmp_path):
    torch.save({"string_to_param": OrderedDict([("*", vec(1, 1024))]), "step": 3}, tmp_path / "sd2.pt")
    emb = read_embedding(tmp_path / "sd2.pt")
    assert (emb.kind, emb.step) == ("sd2", 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kohya_sd1_safetensors(tmp_path, dtype):
    # sd-scripts train_textual_inversion.py save_weights: {"emb_params": T} with save_dtype and metadata.
    save_file(
        {"emb_params": vec(4, 768).to(dtype)},
        str(tmp_path / "k.safetensors"),
        {"ss_output_name": "k", "modelspec.title": "k"},
    )
    emb = read_embedding(tmp_path / "k.safetensors")
    assert (emb.kind, emb.num_vectors) == ("sd1", 4)
    assert torch.equal(emb.matrix, vec(4, 768).to(dtype).float())
    assert emb.metadata["ss_output_name"] == "k"


def test_kohya_sd1_pt(tmp_path):
    torch.save({"emb_params": vec(2, 768)}, tmp_path / "k.pt")
    assert read_embedding(tmp_path / "k.pt").num_vectors == 2


def test_kohya_sdxl(tmp_path):
    # sdxl_train_textual_inversion.py: {"clip_l": [N,768], "clip_g": [N,1280]}
    save_file({"clip_l": vec(2, 768), "clip_g": vec(2, 1280, 1)}, str(tmp_path / "x.safetensors"))
    emb = read_embedding(tmp_path / "x.safetensors")
    assert emb.kind == "sdxl"
    assert torch.equal(emb.vectors["clip_g"], vec(2, 1280, 1))


def test_onetrainer_sd1_with_output_embedding(tmp_path):
    # OneTrainer StableDiffusionEmbeddingSaver: "emp_params" (sic), optionally "emp_params_out".
    save_file({"emp_params": vec(2, 768), "emp_params_out": vec(2, 768, 5)}, str(tmp_path / "o.safetensors"))
    emb = read_embedding(tmp_path / "o.safetensors")
    assert torch.equal(emb.matrix, vec(2, 768))
    assert emb.metadata["ignored_tensors"] == "emp_params_out"


def test_onetrainer_sdxl_with_outputs(tmp_path):
    t = {
        "clip_l": vec(1, 768),
        "clip_g": vec(1, 1280),
        "clip_l_out": vec(1, 768, 2),
        "clip_g_out": vec(1, 1280, 2),
    }
    save_file(t, str(tmp_path / "o.safetensors"))
    emb = read_embedding(tmp_path / "o.safetensors")
    assert emb.kind == "sdxl"
    assert torch.equal(emb.vectors["clip_l"], t["clip_l"])


def test_diffusers_bin_single_token_1d(tmp_path):
    # Older diffusers textual_inversion.py: {placeholder: learned_embeds[768]} via torch.save to .bin
    torch.save({"<cat-toy>": vec(1, 768)[0]}, tmp_path / "learned_embeds.bin")
    emb = read_embedding(tmp_path / "learned_embeds.bin")
    assert (emb.kind, emb.num_vectors, emb.metadata["token"]) == ("sd1", 1, "<cat-toy>")


def test_diffusers_safetensors_multi_vector(tmp_path):
    save_file({"<cat-toy>": vec(3, 768)}, str(tmp_path / "learned_embeds.safetensors"), {"format": "pt"})
    emb = read_embedding(tmp_path / "learned_embeds.safetensors")
    assert emb.num_vectors == 3


def test_diffusers_sdxl_pair(tmp_path):
    # textual_inversion_sdxl.py writes one file per text encoder.
    save_file({"<t>": vec(2, 768)}, str(tmp_path / "learned_embeds.safetensors"), {"format": "pt"})
    save_file({"<t>": vec(2, 1280, 3)}, str(tmp_path / "learned_embeds_2.safetensors"), {"format": "pt"})
    emb = read_diffusers_pair(
        tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors", "t"
    )
    assert (emb.name, emb.kind) == ("t", "sdxl")
    assert torch.equal(emb.vectors["clip_g"], vec(2, 1280, 3))


def test_diffusers_pair_refuses_two_clip_l_files(tmp_path):
    from lib_ti.errors import EmbeddingFormatError

    save_file({"<t>": vec(2, 768)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(EmbeddingFormatError, match="one 768-wide"):
        read_diffusers_pair(tmp_path / "a.safetensors", tmp_path / "a.safetensors")


def test_a1111_png_text_chunk(tmp_path):
    # image_embedding.embedding_to_b64: JSON with {"TORCHTENSOR": lists}, base64, in chunk "sd-ti-embedding".
    v = vec(2, 768)
    payload = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": {"TORCHTENSOR": v.tolist()}},
        "name": "chunky",
        "step": 7,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(payload).encode()))
    Image.new("RGB", (32, 32)).save(tmp_path / "whatever.png", pnginfo=info)
    emb = read_embedding(tmp_path / "whatever.png")
    assert (emb.name, emb.step) == ("chunky", 7)  # A1111 uses the stored name for images
    assert torch.equal(emb.matrix, v)


REF = DATA / "a1111_img_vectors.safetensors"


@pytest.mark.parametrize(
    ("fixture", "carrier"),
    [
        ("a1111_chunk_and_border.png", "chunk"),
        ("a1111_border_only.png", "border"),
        ("a1111_border_only.webp", "border"),
    ],
)
def test_images_written_by_real_a1111(fixture, carrier):
    """Fixtures made by the host's own image_embedding code (tests/host/make_a1111_fixtures.py)."""
    emb = read_embedding(DATA / fixture)
    assert carrier in emb.source
    assert (emb.name, emb.step, emb.sd_checkpoint) == ("a1111-img", 42, "c77d740a47")
    assert torch.equal(emb.matrix, load_file(str(REF))["vec"])


def test_our_border_encoder_matches_a1111_pixel_for_pixel():
    import numpy as np

    from lib_ti.io.image_data import insert_border_data

    v = load_file(str(REF))["vec"]
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": v},
        "name": "a1111-img",
        "step": 42,
        "sd_checkpoint": "c77d740a47",
        "sd_checkpoint_name": "tiny-sd1",
    }
    ours = insert_border_data(Image.new("RGB", (24, 32), (200, 120, 60)), data)
    with Image.open(DATA / "a1111_border_only.png") as theirs:
        assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))


def test_raw_tensor_pt(tmp_path):
    torch.save(vec(2, 1024), tmp_path / "raw.pt")
    assert read_embedding(tmp_path / "raw.pt").kind == "sd2"


def test_onetrainer_sd3_with_output_embeddings(tmp_path):
    # OneTrainer modules/modelSaver/stableDiffusion3/StableDiffusion3EmbeddingSaver.py _to_state_dict:
    # clip_l, clip_g, t5 and clip_l_out, clip_g_out, t5_out, cast to the save dtype, save_file without
    # metadata. The T5 part has its own count (ModelSetupEmbeddingMixin._create_new_embedding sizes each
    # encoder's vectors by its own tokens of the init text when no token count is set).
    t = {
        "clip_l": vec(2, 768),
        "clip_g": vec(2, 1280, 1),
        "t5": vec(3, 4096, 2),
        "clip_l_out": vec(2, 768, 3),
        "clip_g_out": vec(2, 1280, 4),
        "t5_out": vec(3, 4096, 5),
    }
    save_file({k: v.bfloat16() for k, v in t.items()}, str(tmp_path / "ot_sd3.safetensors"))
    emb = read_embedding(tmp_path / "ot_sd3.safetensors")
    assert (emb.kind, emb.convention, emb.num_vectors) == ("sd3", "onetrainer", 2)
    assert emb.vector_counts == {"clip_l": 2, "clip_g": 2, "t5": 3}
    assert torch.equal(emb.vectors["t5"], t["t5"].bfloat16().float())
    assert emb.metadata["ignored_tensors"] == "clip_g_out,clip_l_out,t5_out"


def test_onetrainer_flux_with_output_embeddings(tmp_path):
    # flux/FluxEmbeddingSaver.py _to_state_dict: clip_l, t5, clip_l_out, t5_out.
    t = {
        "clip_l": vec(1, 768),
        "t5": vec(2, 4096, 1),
        "clip_l_out": vec(1, 768, 2),
        "t5_out": vec(2, 4096, 3),
    }
    save_file(t, str(tmp_path / "ot_flux.safetensors"))
    emb = read_embedding(tmp_path / "ot_flux.safetensors")
    assert (emb.kind, emb.convention, emb.vector_counts) == ("flux", "onetrainer", {"clip_l": 1, "t5": 2})
    assert emb.metadata["ignored_tensors"] == "clip_l_out,t5_out"


@pytest.mark.parametrize(
    ("tensors", "kind"),
    [
        ({"clip_l": (2, 768), "clip_g": (2, 1280), "t5xxl": (2, 4096)}, "sd3"),
        ({"clip_l": (2, 768), "t5xxl": (4, 4096)}, "flux"),
    ],
)
def test_comfyui_sd3_and_flux(tmp_path, tensors, kind):
    # ComfyUI comfy/sd1_clip.py load_embed: each tokenizer takes its own embedding_key from the file
    # (sd1_clip.SDTokenizer "clip_l", sdxl_clip.SDXLClipGTokenizer "clip_g", T5XXLTokenizer "t5xxl" in
    # comfy/text_encoders/sd3_clip.py and flux.py), so the counts are independent there.
    data = {k: vec(*shape, seed=i) for i, (k, shape) in enumerate(tensors.items())}
    save_file(data, str(tmp_path / "c.safetensors"))
    emb = read_embedding(tmp_path / "c.safetensors")
    assert (emb.kind, emb.convention) == (kind, "comfyui")
    assert torch.equal(emb.vectors["t5"], data["t5xxl"])
    assert "ComfyUI keys" in emb.source


def test_comfyui_multi_model_file_with_umt5xxl(tmp_path):
    # umt5xxl is the key of ComfyUI's UMT5-XXL tokenizer (comfy/text_encoders/wan.py, Wan video models):
    # another encoder than SD3/Flux's T5-XXL. Beside t5xxl it is left out; alone it is refused.
    data = {
        "clip_l": vec(1, 768),
        "clip_g": vec(1, 1280, 1),
        "t5xxl": vec(1, 4096, 2),
        "umt5xxl": vec(1, 4096, 3),
    }
    save_file(data, str(tmp_path / "all.safetensors"))
    emb = read_embedding(tmp_path / "all.safetensors")
    assert (emb.kind, emb.metadata["ignored_tensors"]) == ("sd3", "umt5xxl")
    assert torch.equal(emb.vectors["t5"], data["t5xxl"])
    save_file({"umt5xxl": vec(2, 4096)}, str(tmp_path / "wan.safetensors"))
    from lib_ti.errors import EmbeddingFormatError

    with pytest.raises(EmbeddingFormatError, match="UMT5-XXL"):
        read_embedding(tmp_path / "wan.safetensors")


def test_lora_given_as_embedding_says_so(tmp_path):
    from lib_ti.errors import EmbeddingFormatError

    lora = {f"lora_unet_block_{i}.lora_down.weight": vec(4, 320, i) for i in range(20)}
    save_file(lora, str(tmp_path / "l.safetensors"))
    with pytest.raises(EmbeddingFormatError, match=r"this is a LoRA .*\(20 in all\)"):
        read_embedding(tmp_path / "l.safetensors")

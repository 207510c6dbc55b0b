"""Embeddings bundled in LoRA files: listed from the header alone, read from their byte ranges, extracted
into files that read back equal; bad files give one clear error and write nothing."""

from __future__ import annotations

import builtins
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_ti.errors import EmbeddingExists, EmbeddingFormatError
from lib_ti.io import bundles
from lib_ti.io.bundles import FORGE_BUNDLE_NOTE, extract_bundled, has_bundled, list_bundled, read_bundled
from lib_ti.io.formats import read_embedding


def vec(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def kohya_lora_weights(te: tuple[str, ...] = ("lora_te",), width: int = 768) -> dict[str, torch.Tensor]:
    """A few tensors of a kohya sd-scripts LoRA (networks/lora.py: lora_down/lora_up/alpha per module)."""
    out: dict[str, torch.Tensor] = {}
    for prefix in te:
        mod = f"{prefix}_text_model_encoder_layers_0_mlp_fc1"
        out[f"{mod}.lora_down.weight"] = vec(4, width, 7).half()
        out[f"{mod}.lora_up.weight"] = vec(3072, 4, 8).half()
        out[f"{mod}.alpha"] = torch.tensor(4.0).half()
    unet = "lora_unet_down_blocks_0_attentions_0_proj_in"
    out[f"{unet}.lora_down.weight"] = vec(4, 320, 9).half()
    out[f"{unet}.lora_up.weight"] = vec(320, 4, 10).half()
    out[f"{unet}.alpha"] = torch.tensor(4.0).half()
    return out


KOHYA_META = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_output_name": "char"}
OT_META = {"ot_branch": "master", "ot_revision": "23df3832", "modelspec.architecture": "stable-diffusion-xl"}


@pytest.fixture
def kohya_sd1_lora(tmp_path):
    # A kohya LoRA packed with embeddings by a pivotal-tuning packer (deepghs/cyberharem
    # cyberharem/publish/convert.py pack_to_bundle_lora): every tensor of the embedding file goes in as
    # bundle_emb.<name>.<key>, a dict of tensors as bundle_emb.<name>.<key>.<subkey>. From an A1111-style
    # .pt: string_to_param.*; from a kohya textual-inversion .safetensors: emb_params.
    sd = kohya_lora_weights()
    sd["bundle_emb.mychar.string_to_param.*"] = vec(2, 768, 1)
    sd["bundle_emb.myoutfit.emb_params"] = vec(3, 768, 2).half()
    path = tmp_path / "char_sd1.safetensors"
    save_file(sd, str(path), {**KOHYA_META, "ss_base_model_version": "sd_v1"})
    return path


@pytest.fixture
def kohya_sdxl_lora(tmp_path):
    # The same packer with a kohya SDXL textual-inversion file (sdxl_train_textual_inversion.py:
    # {"clip_l": [N, 768], "clip_g": [N, 1280]}), saved in bf16.
    sd = kohya_lora_weights(("lora_te1", "lora_te2"))
    sd["bundle_emb.xlchar.clip_l"] = vec(2, 768, 3).bfloat16()
    sd["bundle_emb.xlchar.clip_g"] = vec(2, 1280, 4).bfloat16()
    path = tmp_path / "char_sdxl.safetensors"
    save_file(sd, str(path), {**KOHYA_META, "ss_base_model_version": "sdxl_base_v1-0"})
    return path


@pytest.fixture
def onetrainer_sdxl_lora(tmp_path):
    # OneTrainer modules/modelSaver/stableDiffusionXL/StableDiffusionXLLoRASaver.py _get_state_dict with
    # bundle_additional_embeddings: bundle_emb.<placeholder>.clip_l / .clip_g, and .clip_l_out /
    # .clip_g_out for output embeddings; the header from DtypeModelSaverMixin (ot_branch, ot_revision).
    # The default placeholder is "<embedding>" (modules/util/config/TrainConfig.py), no valid file name.
    sd = kohya_lora_weights(("lora_te1", "lora_te2"))
    sd["bundle_emb.<embedding>.clip_l"] = vec(1, 768, 5)
    sd["bundle_emb.<embedding>.clip_g"] = vec(1, 1280, 6)
    sd["bundle_emb.ohwx.clip_l"] = vec(2, 768, 7)
    sd["bundle_emb.ohwx.clip_g"] = vec(2, 1280, 8)
    sd["bundle_emb.ohwx.clip_l_out"] = vec(2, 768, 9)
    sd["bundle_emb.ohwx.clip_g_out"] = vec(2, 1280, 10)
    path = tmp_path / "ot_sdxl.safetensors"
    save_file(sd, str(path), OT_META)
    return path


@pytest.fixture
def onetrainer_sd1_lora(tmp_path):
    # StableDiffusionLoRASaver.py: an SD1 bundle is bundle_emb.<placeholder>.clip_l (not emb_params).
    sd = kohya_lora_weights()
    sd["bundle_emb.sks.clip_l"] = vec(3, 768, 11).half()
    path = tmp_path / "ot_sd1.safetensors"
    save_file(sd, str(path), {**OT_META, "modelspec.architecture": "stable-diffusion-v1"})
    return path


@pytest.fixture
def onetrainer_sd3_flux_lora(tmp_path):
    # StableDiffusion3LoRASaver.py: clip_l, clip_g, t5 (+ _out); FluxLoRASaver.py: clip_l, t5 (+ _out).
    # The T5 part may hold another vector count (ModelSetupEmbeddingMixin._create_new_embedding).
    sd = {"lora_transformer_x.lora_down.weight": vec(4, 64, 1)}
    sd["bundle_emb.sd3thing.clip_l"] = vec(2, 768, 12).bfloat16()
    sd["bundle_emb.sd3thing.clip_g"] = vec(2, 1280, 13).bfloat16()
    sd["bundle_emb.sd3thing.t5"] = vec(3, 4096, 14).bfloat16()
    sd["bundle_emb.fluxthing.clip_l"] = vec(1, 768, 15)
    sd["bundle_emb.fluxthing.t5"] = vec(1, 4096, 16)
    sd["bundle_emb.fluxthing.t5_out"] = vec(1, 4096, 17)
    path = tmp_path / "ot_sd3_flux.safetensors"
    save_file(sd, str(path), OT_META)
    return path


def by_name(path):
    return {b.name: b for b in list_bundled(path)}


# ------------------------------------------------------------------ listing


def test_kohya_sd1_bundle_listing(kohya_sd1_lora):
    found = by_name(kohya_sd1_lora)
    assert list(found) == ["mychar", "myoutfit"]
    a, b = found["mychar"], found["myoutfit"]
    assert (a.kind, a.vectors, a.widths, a.producer, a.dtype) == ("sd1", 2, {"clip_l": 768}, "a1111", "F32")
    assert (b.kind, b.vectors, b.dtype, b.producer) == ("sd1", 3, "F16", "a1111")
    assert a.tensors == ("bundle_emb.mychar.string_to_param.*",)
    assert a.problem is None and a.name_problem is None
    assert has_bundled(kohya_sd1_lora)


def test_kohya_sdxl_bundle_listing(kohya_sdxl_lora):
    (x,) = list_bundled(kohya_sdxl_lora)
    assert (x.name, x.kind, x.vectors, x.dtype, x.producer) == ("xlchar", "sdxl", 2, "BF16", "a1111")
    assert x.widths == {"clip_l": 768, "clip_g": 1280}


def test_onetrainer_bundles_listing(onetrainer_sdxl_lora, onetrainer_sd1_lora, onetrainer_sd3_flux_lora):
    found = by_name(onetrainer_sdxl_lora)
    emb, ohwx = found["<embedding>"], found["ohwx"]
    assert (emb.kind, emb.producer, emb.vectors) == ("sdxl", "onetrainer", 1)
    assert "not allowed in file names" in emb.name_problem
    assert emb.problem is None
    assert ohwx.ignored == ("bundle_emb.ohwx.clip_g_out", "bundle_emb.ohwx.clip_l_out")
    (sks,) = list_bundled(onetrainer_sd1_lora)
    assert (sks.kind, sks.producer, sks.vectors, sks.dtype) == ("sd1", "onetrainer", 3, "F16")
    found = by_name(onetrainer_sd3_flux_lora)
    sd3, flux = found["sd3thing"], found["fluxthing"]
    assert (sd3.kind, sd3.vectors, sd3.counts) == ("sd3", 2, {"clip_l": 2, "clip_g": 2, "t5": 3})
    assert sd3.widths == {"clip_l": 768, "clip_g": 1280, "t5": 4096}
    assert (flux.kind, flux.producer, flux.ignored) == (
        "flux",
        "onetrainer",
        ("bundle_emb.fluxthing.t5_out",),
    )


def test_to_dict_is_json(onetrainer_sdxl_lora):
    d = by_name(onetrainer_sdxl_lora)["ohwx"].to_dict()
    assert json.loads(json.dumps(d))["ignored"] == [
        "bundle_emb.ohwx.clip_g_out",
        "bundle_emb.ohwx.clip_l_out",
    ]
    assert "keys" not in d


def test_forge_note_is_one_sentence():
    assert FORGE_BUNDLE_NOTE.endswith(".") and FORGE_BUNDLE_NOTE.count(". ") == 0
    assert "Forge" in FORGE_BUNDLE_NOTE and "extract" in FORGE_BUNDLE_NOTE


# ------------------------------------------------------------------ reading only what is needed


def raw_safetensors(path, items, metadata=None, pad_to=None):
    """A safetensors file laid out by hand: items are (key, dtype, shape, bytes or None); None leaves a
    hole of the tensor's size (a sparse file: a huge LoRA weight that is never written)."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    header, offset = {}, 0
    for key, dtype, shape, _data in items:
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        start = f.tell()
        for key, _dtype, _shape, data in items:
            if data is not None:
                f.seek(start + header[key]["data_offsets"][0])
                f.write(data)
        f.truncate(start + (pad_to if pad_to is not None else offset))
    return path


def tensor_bytes(t: torch.Tensor) -> bytes:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).contiguous().numpy().tobytes()


class CountingOpen:
    """``open`` for lib_ti.io.bundles that counts the bytes read."""

    def __init__(self):
        self.read = 0

    def __call__(self, *args, **kwargs):
        f = builtins.open(*args, **kwargs)  # noqa: SIM115 (the caller closes it)
        counter, real_read = self, f.read

        def read(n=-1):
            data = real_read(n)
            counter.read += len(data)
            return data

        f.read = read
        return f


BIG = 512 * 2**20  # a 512 MiB LoRA weight, never written (sparse) and never read


@pytest.fixture
def big_lora(tmp_path):
    lv, g = vec(2, 768, 20).half(), vec(2, 1280, 21).half()
    items = [
        ("lora_unet_huge.lora_down.weight", "F16", (BIG // 2,), None),
        ("bundle_emb.big.clip_l", "F16", (2, 768), tensor_bytes(lv)),
        ("bundle_emb.big.clip_g", "F16", (2, 1280), tensor_bytes(g)),
    ]
    path = raw_safetensors(tmp_path / "big.safetensors", items, {"ss_network_module": "networks.lora"})
    return path, lv, g


def test_listing_reads_the_header_only(big_lora, monkeypatch):
    path, _l, _g = big_lora
    assert path.stat().st_size > BIG
    counting = CountingOpen()
    monkeypatch.setattr(bundles, "open", counting, raising=False)
    (info,) = list_bundled(path)
    assert (info.name, info.kind) == ("big", "sdxl")
    assert 8 < counting.read < 1024  # the 8-byte length and the JSON header


def test_reading_reads_its_byte_ranges_only(big_lora, monkeypatch):
    path, lv, g = big_lora
    counting = CountingOpen()
    monkeypatch.setattr(bundles, "open", counting, raising=False)
    emb = read_bundled(path, "big")
    assert torch.equal(emb.vectors["clip_l"], lv.float())
    assert torch.equal(emb.vectors["clip_g"], g.float())
    tensors = (2 * 768 + 2 * 1280) * 2
    assert tensors < counting.read < tensors + 1024  # the header and the two tensors
    with safe_open(str(path), "pt") as f:  # the hand-made file is a valid safetensors file
        assert torch.equal(f.get_tensor("bundle_emb.big.clip_g"), g)


# ------------------------------------------------------------------ reading and extracting


def test_read_bundled_values_and_metadata(kohya_sd1_lora, kohya_sdxl_lora):
    emb = read_bundled(kohya_sd1_lora, "mychar")
    assert (emb.name, emb.kind) == ("mychar", "sd1")
    assert torch.equal(emb.matrix, vec(2, 768, 1))
    assert emb.metadata == {"source_lora": "char_sd1.safetensors", "bundle_producer": "a1111"}
    assert "bundled in char_sd1.safetensors" in emb.source
    assert torch.equal(read_bundled(kohya_sd1_lora, "myoutfit").matrix, vec(3, 768, 2).half().float())
    x = read_bundled(kohya_sdxl_lora, "xlchar")
    assert torch.equal(x.vectors["clip_g"], vec(2, 1280, 4).bfloat16().float())  # BF16 exactly


@pytest.mark.parametrize("fixture", ["kohya_sd1_lora", "kohya_sdxl_lora", "onetrainer_sd1_lora"])
def test_extract_all_reads_back_equal(fixture, request, tmp_path):
    lora = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    paths = extract_bundled(lora, out)
    assert [p.parent for p in paths] == [out] * len(paths)
    for p in paths:
        assert p.suffix == ".safetensors"
        assert read_embedding(p).equals(read_bundled(lora, p.stem))


def test_extract_sd3_and_flux_keep_onetrainer_keys(onetrainer_sd3_flux_lora, tmp_path):
    paths = extract_bundled(onetrainer_sd3_flux_lora, tmp_path)
    for p in paths:
        back = read_embedding(p)
        assert back.equals(read_bundled(onetrainer_sd3_flux_lora, p.stem))
        assert back.convention == "onetrainer"
    with safe_open(str(tmp_path / "sd3thing.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l", "t5"]
    assert read_embedding(tmp_path / "sd3thing.safetensors").vector_counts["t5"] == 3
    again = extract_bundled(onetrainer_sd3_flux_lora, tmp_path / "c", ["fluxthing"], convention="comfyui")
    with safe_open(str(again[0]), "pt") as f:
        assert sorted(f.keys()) == ["clip_l", "t5xxl"]


def test_extract_chosen_names_renamed_and_formats(onetrainer_sdxl_lora, tmp_path):
    paths = extract_bundled(
        onetrainer_sdxl_lora, tmp_path, ["<embedding>"], rename={"<embedding>": "ot_emb"}, fmt="pt"
    )
    assert [p.name for p in paths] == ["ot_emb.pt"]
    back = read_embedding(paths[0])
    assert torch.equal(back.vectors["clip_g"], vec(1, 1280, 6))


# ------------------------------------------------------------------ bad input: clear errors, nothing written


def test_invalid_bundled_name_is_refused_and_nothing_written(tmp_path):
    sd = kohya_lora_weights()
    sd["bundle_emb.good.emb_params"] = vec(1, 768)
    sd["bundle_emb.../evil.emb_params"] = vec(1, 768, 1)
    lora = tmp_path / "evil.safetensors"
    save_file(sd, str(lora))
    found = by_name(lora)
    assert set(found) == {"good", "../evil"}
    assert "'..'" in found["../evil"].name_problem or "separator" in found["../evil"].name_problem
    out = tmp_path / "out"
    with pytest.raises(EmbeddingFormatError, match="extract it under another name"):
        extract_bundled(lora, out)
    with pytest.raises(EmbeddingFormatError, match="cannot be used under the name"):
        read_bundled(lora, "../evil")
    assert not out.exists()
    assert not (tmp_path / "evil").exists()
    # under a name of the user's choosing it is fine
    (p,) = extract_bundled(lora, out, ["../evil"], rename={"../evil": "evil"})
    assert p == out / "evil.safetensors"
    with pytest.raises(EmbeddingFormatError, match="separator|'..'"):
        extract_bundled(lora, out, ["good"], rename={"good": "../x"})


def test_nan_vectors_are_refused_and_nothing_written(tmp_path):
    bad = vec(2, 768)
    bad[1, 5] = float("nan")
    sd = kohya_lora_weights()
    sd["bundle_emb.fine.emb_params"] = vec(1, 768)
    sd["bundle_emb.broken.emb_params"] = bad
    lora = tmp_path / "nan.safetensors"
    save_file(sd, str(lora))
    assert by_name(lora)["broken"].kind == "sd1"  # the header cannot tell
    out = tmp_path / "out"
    with pytest.raises(EmbeddingFormatError, match=r"bundled embedding 'broken'.*vector 1 holds NaN"):
        extract_bundled(lora, out)
    assert not out.exists()


def test_truncated_file(kohya_sdxl_lora, tmp_path):
    data = kohya_sdxl_lora.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(EmbeddingFormatError, match="outside the file's .* data bytes"):
        list_bundled(cut)
    cut.write_bytes(data[:50])  # inside the header
    with pytest.raises(EmbeddingFormatError, match="truncated"):
        list_bundled(cut)
    with pytest.raises(EmbeddingFormatError, match="truncated"):
        extract_bundled(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_header_offsets_beyond_the_end(tmp_path):
    lora = raw_safetensors(
        tmp_path / "short.safetensors",
        [("bundle_emb.x.emb_params", "F32", (1, 768), tensor_bytes(vec(1, 768)))],
        pad_to=100,  # the header promises 3072 bytes of data, the file holds 100
    )
    with pytest.raises(
        EmbeddingFormatError, match=r"data offsets \[0, 3072\] outside the file's 100 data bytes"
    ):
        list_bundled(lora)


def test_damaged_header_and_not_safetensors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 20) + b'{"a": [1, 2,,]}     ' + b"\0" * 8)
    with pytest.raises(EmbeddingFormatError, match="not valid JSON"):
        list_bundled(junk)
    pt = tmp_path / "lora.pt"
    torch.save(kohya_lora_weights(), pt)
    with pytest.raises(EmbeddingFormatError, match="torch pickle, not a .safetensors file"):
        list_bundled(pt)
    text = tmp_path / "readme.safetensors"
    text.write_text("hello, this is no model at all")
    with pytest.raises(EmbeddingFormatError, match="not a .safetensors file"):
        list_bundled(text)
    assert not has_bundled(text) and not has_bundled(tmp_path / "missing.safetensors")
    with pytest.raises(EmbeddingFormatError, match="does not exist"):
        list_bundled(tmp_path / "missing.safetensors")


def test_no_bundles_unknown_name_and_output_only(tmp_path, kohya_sd1_lora):
    plain = tmp_path / "plain.safetensors"
    save_file(kohya_lora_weights(), str(plain))
    with pytest.raises(EmbeddingFormatError, match="holds no bundled embeddings"):
        list_bundled(plain)
    assert not has_bundled(plain)
    with pytest.raises(
        EmbeddingFormatError, match=r"no bundled embedding named 'nope' \(it has: 'mychar', 'myoutfit'\)"
    ):
        read_bundled(kohya_sd1_lora, "nope")
    with pytest.raises(EmbeddingFormatError, match="no bundled embedding named 'nope'"):
        extract_bundled(kohya_sd1_lora, tmp_path / "o", ["mychar", "nope"])
    assert not (tmp_path / "o").exists()
    # a OneTrainer output embedding alone (is_output_embedding: only output_vector is saved)
    sd = kohya_lora_weights()
    sd["bundle_emb.outonly.clip_l_out"] = vec(1, 768)
    sd["bundle_emb.wide.emb_params"] = vec(1, 999)
    odd = tmp_path / "odd.safetensors"
    save_file(sd, str(odd))
    found = by_name(odd)
    assert "output embeddings" in found["outonly"].problem and found["outonly"].kind is None
    assert "999 wide" in found["wide"].problem
    with pytest.raises(EmbeddingFormatError, match="'outonly' holds only OneTrainer output embeddings"):
        read_bundled(odd, "outonly")


def test_existing_file_is_kept_unless_overwrite(kohya_sd1_lora, tmp_path):
    (tmp_path / "mychar.safetensors").write_bytes(b"mine")
    with pytest.raises(EmbeddingExists, match="already exists"):
        extract_bundled(kohya_sd1_lora, tmp_path)
    assert (tmp_path / "mychar.safetensors").read_bytes() == b"mine"
    assert not (tmp_path / "myoutfit.safetensors").exists()
    extract_bundled(kohya_sd1_lora, tmp_path, overwrite=True)
    assert read_embedding(tmp_path / "mychar.safetensors").num_vectors == 2


def test_sd3_bundle_cannot_be_written_as_pt(onetrainer_sd3_flux_lora, tmp_path):
    with pytest.raises(EmbeddingFormatError, match=r"\.safetensors only"):
        extract_bundled(onetrainer_sd3_flux_lora, tmp_path / "o", fmt="pt")
    assert not (tmp_path / "o").exists()

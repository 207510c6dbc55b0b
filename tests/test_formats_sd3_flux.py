"""SD3/SD3.5 and Flux embeddings: both key conventions read and written, conversions to SDXL and SD1,
the rules on vector counts, and the clear refusals of the parts that need a web UI kind."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_ti.embedding import HOST_KINDS, KIND_LABELS, KINDS, Embedding, refuse_non_host_kind
from lib_ti.errors import EmbeddingFormatError
from lib_ti.io import safetensors_io
from lib_ti.io.convert import convert_to, to_sd1, to_sdxl, to_sdxl_l, with_convention
from lib_ti.io.formats import (
    file_tensors,
    header_metadata,
    read_embedding,
    to_a1111_pt_bytes,
    to_safetensors_bytes,
    write_embedding,
)


def vec(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def sd3(name="s3", n=2, t5=3, **kw) -> Embedding:
    return Embedding(
        name, {"clip_l": vec(n, 768, 1), "clip_g": vec(n, 1280, 2), "t5": vec(t5, 4096, 3)}, **kw
    )


def flux(name="fx", n=2, t5=2, **kw) -> Embedding:
    return Embedding(name, {"clip_l": vec(n, 768, 4), "t5": vec(t5, 4096, 5)}, **kw)


def keys(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def test_kinds_and_labels():
    assert KINDS[frozenset({"clip_l", "clip_g", "t5"})] == "sd3"
    assert KINDS[frozenset({"clip_l", "t5"})] == "flux"
    assert "T5-XXL 4096" in KIND_LABELS["sd3"] and "T5-XXL 4096" in KIND_LABELS["flux"]
    assert "sd3" not in HOST_KINDS and "flux" not in HOST_KINDS
    assert sd3().kind == "sd3" and flux().kind == "flux"


def test_t5_count_may_differ_but_clip_counts_must_match():
    e = sd3(n=2, t5=5)
    assert (e.num_vectors, e.vector_counts) == (2, {"clip_l": 2, "clip_g": 2, "t5": 5})
    with pytest.raises(EmbeddingFormatError, match="different vector counts"):
        Embedding("x", {"clip_l": vec(2, 768), "clip_g": vec(3, 1280), "t5": vec(2, 4096)})
    with pytest.raises(EmbeddingFormatError, match="t5 vectors are 1024 wide, t5 needs 4096"):
        Embedding("x", {"clip_l": vec(2, 768), "t5": vec(2, 1024)})
    with pytest.raises(EmbeddingFormatError, match="t5 has 76 vectors"):
        Embedding("x", {"clip_l": vec(2, 768), "t5": vec(76, 4096)})
    with pytest.raises(EmbeddingFormatError, match="do not form SD1, SD2, SDXL, SD3 or Flux"):
        Embedding("x", {"clip_g": vec(2, 1280), "t5": vec(2, 4096)})
    with pytest.raises(EmbeddingFormatError, match="matrices"):
        _ = sd3().matrix


@pytest.mark.parametrize(("make", "convention", "t5_key"), [
    (sd3, "onetrainer", "t5"),
    (sd3, "comfyui", "t5xxl"),
    (flux, "onetrainer", "t5"),
    (flux, "comfyui", "t5xxl"),
])  # fmt: skip
def test_round_trip_in_both_conventions(tmp_path, make, convention, t5_key):
    emb = make("e", step=12, metadata={"note": "x"})
    path = write_embedding(emb, tmp_path / "e.safetensors", convention=convention)
    assert keys(path) == sorted([*(k for k in emb.vectors if k != "t5"), t5_key])
    back = read_embedding(path)
    assert back.equals(emb)
    assert back.convention == convention
    assert ("ComfyUI keys" if convention == "comfyui" else "OneTrainer keys") in back.source
    # written again without a convention: the one it was read with
    again = write_embedding(back, tmp_path / "again.safetensors")
    assert keys(again) == keys(path)


def test_new_embeddings_default_to_comfyui_keys(tmp_path):
    assert sorted(file_tensors(flux())) == ["clip_l", "t5xxl"]
    with pytest.raises(EmbeddingFormatError, match="unknown key convention 'kohya'"):
        file_tensors(flux(), "kohya")  # type: ignore[arg-type]


def test_conversion_between_conventions(tmp_path):
    ot = write_embedding(sd3(), tmp_path / "ot.safetensors", convention="onetrainer")
    comfy = with_convention(read_embedding(ot), "comfyui")
    assert comfy.convention == "comfyui"
    p = write_embedding(comfy, tmp_path / "c.safetensors")
    assert keys(p) == ["clip_g", "clip_l", "t5xxl"]
    assert read_embedding(p, "ot").equals(read_embedding(ot))
    assert convert_to(read_embedding(p), "onetrainer").convention == "onetrainer"
    with pytest.raises(EmbeddingFormatError, match="differ only for SD3 and Flux"):
        with_convention(Embedding("a", {"clip_l": vec(1, 768)}), "comfyui")


def test_sd3_to_sdxl_and_sd3_flux_to_sd1(tmp_path):
    s = sd3(step=3, metadata={"k": "v"})
    x = to_sdxl(s)
    assert x.kind == "sdxl" and x.convention is None
    assert torch.equal(x.vectors["clip_g"], s.vectors["clip_g"])
    assert (x.step, x.metadata) == (3, {"k": "v"})
    p = write_embedding(x, tmp_path / "x.safetensors")
    assert keys(p) == ["clip_g", "clip_l"]
    for source in (s, flux(), to_sdxl(s)):
        one = to_sd1(source, "one")
        assert one.kind == "sd1" and torch.equal(one.matrix, source.vectors["clip_l"])
    assert convert_to(flux(), "sd1").kind == "sd1"
    # Flux has no CLIP-G; it goes through SD1 and an explicit CLIP-G source
    with pytest.raises(EmbeddingFormatError, match="no CLIP-G vectors"):
        to_sdxl(flux())
    assert to_sdxl_l(to_sd1(flux()), "zeros").kind == "sdxl"
    with pytest.raises(EmbeddingFormatError, match="needs CLIP-G vectors too"):
        convert_to(Embedding("a", {"clip_l": vec(1, 768)}), "sdxl")
    with pytest.raises(EmbeddingFormatError, match="unknown conversion"):
        convert_to(s, "sd2")


def parsed(data: bytes) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors file: the header's __metadata__ order varies per save."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_sd1_sd2_sdxl_files_are_written_as_before(tmp_path):
    """SD1/SD2/SDXL files do not depend on the new code paths (nor on a convention)."""
    cases = [
        Embedding("a", {"clip_l": vec(2, 768)}, step=4, metadata={"m": "1"}),
        Embedding("b", {"clip_h": vec(1, 1024)}),
        Embedding("c", {"clip_l": vec(2, 768), "clip_g": vec(2, 1280)}, sd_checkpoint="abc"),
    ]
    for emb in cases:
        before = {"emb_params": emb.matrix} if len(emb.vectors) == 1 else dict(emb.vectors)
        want = parsed(safetensors_io.save_bytes(before, header_metadata(emb)))
        assert parsed(to_safetensors_bytes(emb)) == want
        assert parsed(to_safetensors_bytes(emb, "onetrainer")) == want
        assert emb.convention is None
    pt = torch.load(io.BytesIO(to_a1111_pt_bytes(cases[2])), weights_only=True)
    assert sorted(pt) == ["clip_g", "clip_l"] and torch.equal(pt["clip_g"], cases[2].vectors["clip_g"])


@pytest.mark.parametrize("suffix", [".pt", ".png"])
def test_sd3_flux_only_as_safetensors(tmp_path, suffix):
    with pytest.raises(EmbeddingFormatError, match=r"cannot be written as .*; write it as \.safetensors"):
        write_embedding(sd3(), tmp_path / f"s{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_two_t5_keys(tmp_path):
    same = vec(2, 4096)
    save_file({"clip_l": vec(2, 768), "t5": same, "t5xxl": same.clone()}, str(tmp_path / "same.safetensors"))
    e = read_embedding(tmp_path / "same.safetensors")
    assert (e.kind, e.convention, e.metadata["ignored_tensors"]) == ("flux", "comfyui", "t5")
    save_file(
        {"clip_l": vec(2, 768), "t5": same, "t5xxl": vec(2, 4096, 9)}, str(tmp_path / "two.safetensors")
    )
    with pytest.raises(EmbeddingFormatError, match="two different T5 matrices"):
        read_embedding(tmp_path / "two.safetensors")


def test_t5_alone_is_refused_clearly(tmp_path):
    # OneTrainer's PixArt and Chroma embedding savers write {"t5": ...}: not SD3/Flux
    save_file({"t5": vec(2, 4096)}, str(tmp_path / "pixart.safetensors"))
    with pytest.raises(EmbeddingFormatError, match="T5-only model"):
        read_embedding(tmp_path / "pixart.safetensors")


# ------------------------------------------------------------------ refusals where SD3/Flux cannot go


def test_refuse_non_host_kind_message():
    refuse_non_host_kind(Embedding("ok", {"clip_l": vec(1, 768)}), "training")
    with pytest.raises(EmbeddingFormatError, match=r"training works on SD1, SD2 and SDXL .* --to sdxl"):
        refuse_non_host_kind(sd3(), "training")
    with pytest.raises(EmbeddingFormatError, match=r"Flux .* --to-sd1"):
        refuse_non_host_kind(flux(), "training")


def test_training_refuses_sd3_and_flux(tmp_path):
    from PIL import Image

    from lib_ti.training.dataset import DataArgs
    from lib_ti.training.errors import TrainingError
    from lib_ti.training.loading import load_dataset
    from lib_ti.training.trainer import TrainArgs, Trainer

    from . import train_models as tm

    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "a.png")
    for kind, emb in (("sdxl", sd3("tiemb")), ("sd1", flux("tiemb"))):
        parts = tm.make_parts(kind)
        data = load_dataset(
            DataArgs(str(tmp_path), "tiemb", ["a photo of [name]"], resolution=64), parts.encode_image
        )
        with pytest.raises(TrainingError, match="training works on SD1, SD2 and SDXL embeddings"):
            Trainer(parts, data, emb, TrainArgs(steps=1))


def test_merge_refuses_sd3_and_flux_by_name(tokenizer, tables):
    from lib_ti.merge.errors import MergeError
    from lib_ti.merge.evaluator import MergeContext, evaluate

    def lookup(encoders):
        return lambda ids: {e: tables[e][torch.tensor(ids, dtype=torch.long)] for e in encoders}

    embs = {"mysd3": sd3("mysd3"), "myflux": flux("myflux")}
    sdxl = MergeContext(("clip_l", "clip_g"), tokenizer.encode, lookup(("clip_l", "clip_g")), embs)
    with pytest.raises(MergeError, match="embedding math works on SD1, SD2 and SDXL") as info:
        evaluate("'a mysd3' * 2", sdxl)
    assert info.value.column == 4
    sd1 = MergeContext(("clip_l",), tokenizer.encode, lookup(("clip_l",)), embs)
    with pytest.raises(MergeError, match="myflux is an embedding for Flux"):
        evaluate("'myflux'", sd1)
    # a Flux embedding has no CLIP-G: on SDXL its name is plain words, as for an SD1 embedding
    assert evaluate("'myflux'", sdxl)["clip_g"].shape[0] == len(tokenizer.encode("myflux"))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_suggested_conversion_command_runs(tmp_path, kind):
    from lib_ti.cli import main
    from lib_ti.embedding import Embedding, non_host_kind_message
    from lib_ti.io.formats import read_embedding, write_embedding

    parts = {"clip_l": torch.randn(2, 768), "t5": torch.randn(3, 4096)}
    if kind == "sd3":
        parts["clip_g"] = torch.randn(2, 1280)
    emb = Embedding("x", parts)
    src = tmp_path / "x.safetensors"
    write_embedding(emb, src)
    command = non_host_kind_message(emb, "training").split("python -m lib_ti ")[1].rstrip(")")
    args = command.replace("FILE", str(src)).replace("OUT", str(tmp_path / "out.safetensors")).split()
    assert main(args) == 0
    assert read_embedding(tmp_path / "out.safetensors").kind == ("sdxl" if kind == "sd3" else "sd1")


def test_compare_covers_t5_with_its_own_count():
    from lib_ti.embedding import Embedding
    from lib_ti.stats import compare

    g = torch.Generator().manual_seed(3)
    a = Embedding("a", {"clip_l": torch.randn(2, 768, generator=g), "t5": torch.randn(4, 4096, generator=g)})
    b = Embedding("b", {"clip_l": a.vectors["clip_l"].clone(), "t5": -a.vectors["t5"][:3].clone()})
    result = compare(a, b)
    by = {e.encoder: e for e in result.encoders}
    assert set(by) == {"clip_l", "t5"}
    assert by["clip_l"].cosine == pytest.approx([1.0, 1.0])
    assert by["t5"].cosine == pytest.approx([-1.0, -1.0, -1.0])  # the first 3 of 4
    assert result.notes == ["t5: vector counts differ (4 vs 3); compared the first 3"]

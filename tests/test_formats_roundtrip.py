"""Every written format reads back to the same tensors and metadata."""

from __future__ import annotations

import pytest
import torch

from lib_ti.embedding import Embedding
from lib_ti.io.formats import read_embedding, write_embedding
from lib_ti.io.safetensors_io import parse_header

KINDS = {
    "sd1": {"clip_l": (3, 768)},
    "sd2": {"clip_h": (2, 1024)},
    "sdxl": {"clip_l": (4, 768), "clip_g": (4, 1280)},
    "sdxl_refiner": {"clip_g": (1, 1280)},
}


def make(kind: str, name: str = "thing", gen: torch.Generator | None = None, **kw) -> Embedding:
    gen = gen or torch.Generator().manual_seed(0)
    vecs = {k: torch.randn(*s, generator=gen) for k, s in KINDS[kind].items()}
    return Embedding(name, vecs, **kw)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".png"])
def test_roundtrip(tmp_path, kind, suffix):
    emb = make(
        kind,
        step=120,
        sd_checkpoint="c77d740a47",
        sd_checkpoint_name="tiny-sd1",
        metadata={"lr": "0.005:100, 1e-3", "note": "ünïcode"},
    )
    path = write_embedding(emb, tmp_path / f"thing{suffix}")
    back = read_embedding(path)
    assert back.kind == kind
    for k, v in emb.vectors.items():
        assert torch.equal(back.vectors[k], v)
    if suffix == ".pt" and kind.startswith("sdxl"):
        # A1111 calls .detach() on every value of an SDXL .pt dict, so such files hold tensors only.
        assert back.metadata == {}
        assert back.step is None
    else:
        assert back.equals(emb), (back, emb)


def test_safetensors_layout_is_what_hosts_load(tmp_path):
    sd1 = write_embedding(make("sd1"), tmp_path / "a.safetensors")
    xl = write_embedding(make("sdxl", step=5), tmp_path / "b.safetensors")
    entries, meta = parse_header(sd1.read_bytes(), "a")
    assert set(entries) == {"emb_params"}
    assert entries["emb_params"]["shape"] == [3, 768]
    assert meta["name"] == "thing"
    entries, meta = parse_header(xl.read_bytes(), "b")
    assert set(entries) == {"clip_l", "clip_g"}  # metadata never as extra tensor keys
    assert meta["step"] == "5"


def test_name_comes_from_the_file_like_the_hosts(tmp_path):
    path = write_embedding(make("sd1", name="orig"), tmp_path / "renamed.safetensors")
    back = read_embedding(path)
    assert back.name == "renamed"
    assert back.metadata["stored_name"] == "orig"


def test_fp16_files_read_as_fp32(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(2, 768).half()
    save_file({"emb_params": t}, str(tmp_path / "h.safetensors"))
    back = read_embedding(tmp_path / "h.safetensors")
    assert back.matrix.dtype == torch.float32
    assert torch.equal(back.matrix, t.float())


def test_no_overwrite_unless_asked(tmp_path):
    path = write_embedding(make("sd1"), tmp_path / "x.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_embedding(make("sd1", gen=torch.Generator().manual_seed(9)), path)
    assert path.read_bytes() == before
    write_embedding(make("sd1", gen=torch.Generator().manual_seed(9)), path, overwrite=True)
    assert path.read_bytes() != before

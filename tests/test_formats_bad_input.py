"""Bad input: a clear error, nothing written, nothing executed."""

from __future__ import annotations

import builtins
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from lib_ti.embedding import Embedding
from lib_ti.errors import EmbeddingFormatError, InvalidNameError, UnsafeFileError
from lib_ti.io.formats import read_embedding, write_embedding


def good_file(tmp_path, suffix=".safetensors"):
    emb = Embedding("good", {"clip_l": torch.randn(2, 768)}, step=1)
    return write_embedding(emb, tmp_path / f"good{suffix}")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".png"])
def test_truncated_file(tmp_path, suffix):
    data = good_file(tmp_path, suffix).read_bytes()
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(EmbeddingFormatError, match="cut"):
        read_embedding(bad)


def test_empty_file(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(EmbeddingFormatError, match="empty"):
        read_embedding(tmp_path / "e.pt")


def test_garbage_file(tmp_path):
    (tmp_path / "g.bin").write_bytes(os.urandom(64) + b"not an embedding")
    with pytest.raises(EmbeddingFormatError, match="not a known embedding format|not a readable"):
        read_embedding(tmp_path / "g.bin")


def _safetensors_with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_safetensors_header_longer_than_file(tmp_path):
    p = tmp_path / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    with pytest.raises(EmbeddingFormatError, match="not a known embedding format|claims"):
        read_embedding(p)


def test_safetensors_huge_header(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{" + b" " * 32)
    with pytest.raises(EmbeddingFormatError):
        read_embedding(p)
    from lib_ti.io.safetensors_io import parse_header

    with pytest.raises(EmbeddingFormatError, match="more than"):
        parse_header(p.read_bytes(), "huge")


def test_safetensors_offsets_lie(tmp_path):
    header = {"emb_params": {"dtype": "F32", "shape": [2, 768], "data_offsets": [0, 2 * 768 * 4]}}
    p = tmp_path / "short.safetensors"
    p.write_bytes(_safetensors_with_header(header, b"\0" * 100))
    with pytest.raises(EmbeddingFormatError, match="outside the file"):
        read_embedding(p)


def test_safetensors_shape_disagrees_with_size(tmp_path):
    header = {"emb_params": {"dtype": "F32", "shape": [4, 768], "data_offsets": [0, 768 * 4]}}
    p = tmp_path / "shape.safetensors"
    p.write_bytes(_safetensors_with_header(header, b"\0" * (768 * 4)))
    with pytest.raises(EmbeddingFormatError, match="does not match"):
        read_embedding(p)


def test_safetensors_header_not_json(tmp_path):
    p = tmp_path / "nj.safetensors"
    p.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 8)
    with pytest.raises(EmbeddingFormatError, match="not valid JSON"):
        read_embedding(p)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"emb_params": torch.randn(2, 700)}, "700 wide"),
        ({"clip_l": torch.randn(2, 1280), "clip_g": torch.randn(2, 1280)}, "clip_l vectors are 1280 wide"),
        ({"emb_params": torch.randn(2, 3, 768)}, "2-D"),
        ({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}, "different vector counts"),
        ({"emb_params": torch.randn(76, 768)}, "76 vectors"),
        ({"emb_params": torch.randn(0, 768)}, "0 vectors"),
        ({"emb_params": torch.ones(2, 768, dtype=torch.int32)}, "not floating point"),
        ({"a": torch.randn(1, 768), "b": torch.randn(1, 768)}, "expected one embedding tensor"),
    ],
)
def test_wrong_shapes(tmp_path, tensors, match):
    p = tmp_path / "w.safetensors"
    save_file(tensors, str(p))
    with pytest.raises(EmbeddingFormatError, match=match):
        read_embedding(p)


@pytest.mark.parametrize(("value", "what"), [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_nan_and_inf(tmp_path, value, what):
    t = torch.randn(3, 768)
    t[1, 5] = value
    save_file({"emb_params": t}, str(tmp_path / "n.safetensors"))
    with pytest.raises(EmbeddingFormatError, match=f"vector 1 holds {what}"):
        read_embedding(tmp_path / "n.safetensors")


def test_nan_never_written(tmp_path):
    t = torch.randn(1, 768)
    t[0, 0] = float("nan")
    with pytest.raises(EmbeddingFormatError):
        Embedding("bad", {"clip_l": t})


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_never_executed(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    data = {"string_to_param": {"*": torch.randn(1, 768)}, "name": _Payload(str(marker))}
    torch.save(data, tmp_path / "evil.pt", _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    with pytest.raises(UnsafeFileError, match=r"builtins\.open|io\.open"):
        read_embedding(tmp_path / "evil.pt")
    assert not marker.exists()


def test_pickle_with_extra_zip_record_is_refused(tmp_path):
    import zipfile

    good = good_file(tmp_path, ".pt")
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, tmp_path / "z.pt")
    with zipfile.ZipFile(tmp_path / "z.pt", "a") as z:
        z.writestr("z/extra.py", "print('hi')")
    with pytest.raises(UnsafeFileError, match="unexpected record"):
        read_embedding(tmp_path / "z.pt")
    assert good.exists()


def test_directory_passed_as_file(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(EmbeddingFormatError, match="is a folder"):
        read_embedding(d)


def test_missing_file(tmp_path):
    with pytest.raises(EmbeddingFormatError, match="does not exist"):
        read_embedding(tmp_path / "nope.pt")


def test_permission_error(tmp_path, monkeypatch):
    p = good_file(tmp_path)
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(p):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(EmbeddingFormatError, match="permission denied"):
        read_embedding(p)


def test_image_without_embedding(tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "plain.png")
    with pytest.raises(EmbeddingFormatError, match="carries no embedding"):
        read_embedding(tmp_path / "plain.png")


def test_png_chunk_not_base64(tmp_path):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", "%%%%")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", pnginfo=info)
    with pytest.raises(EmbeddingFormatError):
        read_embedding(tmp_path / "x.png")


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "nul\x00", ".."])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".png"])
def test_bad_names_write_nothing(tmp_path, name, suffix):
    folder = tmp_path / "emb"
    folder.mkdir()
    emb = Embedding("ok", {"clip_l": torch.randn(1, 768)})
    emb.name = name
    with pytest.raises(InvalidNameError):
        write_embedding(emb, folder / f"x{suffix}")
    assert list(tmp_path.rglob("*")) == [folder]


def test_failed_write_leaves_old_file_untouched(tmp_path, monkeypatch):
    path = good_file(tmp_path)
    before = path.read_bytes()
    import lib_ti.io.formats as formats

    def boom(emb):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(formats, "to_safetensors_bytes", boom)
    with pytest.raises(RuntimeError):
        write_embedding(Embedding("good", {"clip_l": torch.randn(2, 768)}), path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]


def test_failure_midway_through_write_cleans_temp(tmp_path):
    from lib_ti.io.atomic import atomic_write

    target = tmp_path / "t.bin"
    target.write_bytes(b"old")

    def half(f):
        f.write(b"new but")
        raise OSError("no space left")

    with pytest.raises(OSError, match="no space"):
        atomic_write(target, half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_host_patched_torch_load_is_bypassed(tmp_path, monkeypatch):
    """A1111 and Forge replace torch.load with a checker that returns None for file objects."""
    path = good_file(tmp_path, ".pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)
    assert read_embedding(path).num_vectors == 2

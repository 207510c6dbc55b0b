"""``python -m lib_ti``: inspect, diff, convert, and exit code 2 with one line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lib_ti.cli import main
from lib_ti.embedding import Embedding
from lib_ti.io.formats import read_embedding, write_embedding

from .conftest import ROOT


def sd1(tmp_path, name="a", seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return write_embedding(
        Embedding(name, {"clip_l": torch.randn(n, 768, generator=g)}, step=7),
        tmp_path / f"{name}.safetensors",
    )


def sdxl(tmp_path, name="x", seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    vecs = {"clip_l": torch.randn(n, 768, generator=g), "clip_g": torch.randn(n, 1280, generator=g)}
    return write_embedding(Embedding(name, vecs), tmp_path / f"{name}.safetensors")


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "lib_ti", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_json(tmp_path, capsys):
    a = sd1(tmp_path)
    assert main(["inspect", str(a), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["kind"], out["vectors"], out["step"], out["widths"]) == ("sd1", 2, 7, {"clip_l": 768})
    norms = [s["norm"] for s in out["stats"]["clip_l"]]
    assert norms == pytest.approx(read_embedding(a).matrix.norm(dim=1).tolist())


def test_inspect_text_several_files(tmp_path, capsys):
    assert main(["inspect", str(sd1(tmp_path)), str(sdxl(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "SD1 (CLIP-L 768)" in out
    assert "SDXL (CLIP-L 768 + CLIP-G 1280)" in out
    assert "clip_g" in out


def test_diff_same_kind(tmp_path, capsys):
    a, b = sd1(tmp_path, "a", 0), sd1(tmp_path, "b", 1)
    assert main(["diff", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ea, eb = read_embedding(a).matrix, read_embedding(b).matrix
    cos = torch.nn.functional.cosine_similarity(ea, eb, dim=1)
    assert out["encoders"][0]["cosine"] == pytest.approx(cos.tolist(), abs=1e-6)
    assert out["mean_abs_diff"] == pytest.approx(float((ea - eb).abs().mean()), rel=1e-6)


def test_diff_identical_is_one_and_zero(tmp_path, capsys):
    a = sdxl(tmp_path, "a", 3)
    assert main(["diff", str(a), str(a), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for enc in out["encoders"]:
        assert enc["cosine"] == pytest.approx([1.0, 1.0])
        assert enc["mean_abs_diff_all"] == 0
    assert out["mean_abs_diff"] == 0


def test_diff_sd1_vs_sdxl_on_clip_l(tmp_path, capsys):
    assert main(["diff", str(sd1(tmp_path)), str(sdxl(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "compared on clip_l only" in out


def test_diff_refuses_kinds_without_shared_encoder(tmp_path):
    sd2 = write_embedding(Embedding("h", {"clip_h": torch.randn(1, 1024)}), tmp_path / "h.safetensors")
    r = run("diff", sd2, sd1(tmp_path))
    assert r.returncode == 2
    assert "share no text encoder" in r.stderr
    assert "Traceback" not in r.stderr


def test_convert_formats(tmp_path):
    a = sd1(tmp_path)
    assert main(["convert", str(a), str(tmp_path / "a2.pt")]) == 0
    assert main(["convert", str(tmp_path / "a2.pt"), str(tmp_path / "a3.png")]) == 0
    back = read_embedding(tmp_path / "a3.png")
    assert torch.equal(back.matrix, read_embedding(a).matrix)
    assert back.step == 7


def test_convert_to_sdxl_l_needs_g_source(tmp_path):
    a = sd1(tmp_path)
    r = run("convert", a, tmp_path / "out.safetensors", "--to-sdxl-l")
    assert r.returncode == 2
    assert "--g-zeros" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_to_sdxl_l_with_zeros_and_with_source(tmp_path):
    a, x = sd1(tmp_path), sdxl(tmp_path)
    assert main(["convert", str(a), str(tmp_path / "z.safetensors"), "--to-sdxl-l", "--g-zeros"]) == 0
    z = read_embedding(tmp_path / "z.safetensors")
    assert z.kind == "sdxl"
    assert torch.equal(z.vectors["clip_l"], read_embedding(a).matrix)
    assert not z.vectors["clip_g"].any()
    assert main(["convert", str(a), str(tmp_path / "g.safetensors"), "--to-sdxl-l", "--g-from", str(x)]) == 0
    g = read_embedding(tmp_path / "g.safetensors")
    assert torch.equal(g.vectors["clip_g"], read_embedding(x).vectors["clip_g"])


def test_convert_g_source_vector_count_mismatch(tmp_path):
    r = run(
        "convert",
        sd1(tmp_path, n=2),
        tmp_path / "o.safetensors",
        "--to-sdxl-l",
        "--g-from",
        sdxl(tmp_path, n=3),
    )
    assert r.returncode == 2
    assert "must match" in r.stderr


def test_convert_to_sd1(tmp_path):
    x = sdxl(tmp_path)
    assert main(["convert", str(x), str(tmp_path / "l.pt"), "--to-sd1"]) == 0
    back = read_embedding(tmp_path / "l.pt")
    assert back.kind == "sd1"
    assert torch.equal(back.matrix, read_embedding(x).vectors["clip_l"])


def test_convert_diffusers_pair(tmp_path):
    from safetensors.torch import save_file

    save_file({"<t>": torch.randn(2, 768)}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<t>": torch.randn(2, 1280)}, str(tmp_path / "learned_embeds_2.safetensors"))
    assert (
        main(
            [
                "convert",
                str(tmp_path / "learned_embeds.safetensors"),
                str(tmp_path / "t.safetensors"),
                "--g-from",
                str(tmp_path / "learned_embeds_2.safetensors"),
            ]
        )
        == 0
    )
    assert read_embedding(tmp_path / "t.safetensors").kind == "sdxl"


def test_convert_refuses_overwrite_and_bad_name(tmp_path):
    a = sd1(tmp_path)
    before = a.read_bytes()
    r = run("convert", a, a)
    assert r.returncode == 2
    assert "already exists" in r.stderr
    assert a.read_bytes() == before
    r = run("convert", a, tmp_path / "x.safetensors", "--name", "../../etc")
    assert r.returncode == 2
    assert "'..'" in r.stderr or "path separator" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x80\x02garbage"])
def test_bad_input_exit_2_one_line_no_traceback(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    r = run("inspect", p)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ")
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_usage_error_is_exit_2():
    r = run("frobnicate")
    assert r.returncode == 2


def bundled_lora(tmp_path):
    """A kohya-style LoRA with a bundled SD1 embedding (A1111 bundle format, as deepghs/cyberharem's
    pack_to_bundle_lora writes it) and a OneTrainer-style SDXL one under OneTrainer's default
    placeholder (StableDiffusionXLLoRASaver: bundle_emb.<placeholder>.clip_l/.clip_g/.clip_l_out)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    sd = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 768, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
        "bundle_emb.mychar.string_to_param.*": torch.randn(2, 768, generator=g),
        "bundle_emb.<embedding>.clip_l": torch.randn(1, 768, generator=g),
        "bundle_emb.<embedding>.clip_g": torch.randn(1, 1280, generator=g),
        "bundle_emb.<embedding>.clip_l_out": torch.randn(1, 768, generator=g),
    }
    path = tmp_path / "lora.safetensors"
    save_file(sd, str(path), {"ss_network_module": "networks.lora"})
    return path


def sd3_file(tmp_path, name="s3"):
    g = torch.Generator().manual_seed(4)
    vecs = {
        "clip_l": torch.randn(2, 768, generator=g),
        "clip_g": torch.randn(2, 1280, generator=g),
        "t5": torch.randn(3, 4096, generator=g),
    }
    return write_embedding(Embedding(name, vecs), tmp_path / f"{name}.safetensors", convention="onetrainer")


def test_inspect_lora_lists_bundled_embeddings(tmp_path, capsys):
    lora = bundled_lora(tmp_path)
    assert main(["inspect", str(lora), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lora"] is True and "Forge" in out["note"]
    found = {b["name"]: b for b in out["bundled"]}
    assert (found["mychar"]["kind"], found["mychar"]["producer"]) == ("sd1", "a1111")
    assert (found["<embedding>"]["kind"], found["<embedding>"]["producer"]) == ("sdxl", "onetrainer")
    assert found["<embedding>"]["ignored"] == ["bundle_emb.<embedding>.clip_l_out"]
    assert main(["inspect", str(lora), str(sd1(tmp_path))]) == 0
    text = capsys.readouterr().out
    assert "a LoRA with 2 bundled embedding(s)" in text
    assert "--name '<embedding>' --as NEW_NAME" in text
    assert "SD1 (CLIP-L 768)" in text


def test_extract_all_and_one_renamed(tmp_path, capsys):
    lora = bundled_lora(tmp_path)
    out = tmp_path / "embeddings"
    r = run("extract", lora, "--out", out)
    assert r.returncode == 2
    assert "extract it under another name" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert main(["extract", str(lora), "--out", str(out), "--name", "mychar"]) == 0
    assert main(["extract", str(lora), "--out", str(out), "--name", "<embedding>", "--as", "ot_char"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["mychar.safetensors", "ot_char.safetensors"]
    assert read_embedding(out / "ot_char.safetensors").kind == "sdxl"
    assert read_embedding(out / "mychar.safetensors").metadata["source_lora"] == "lora.safetensors"


def test_extract_bad_input_exit_2(tmp_path):
    lora = bundled_lora(tmp_path)
    r = run("extract", lora, "--out", tmp_path / "o", "--as", "x")
    assert r.returncode == 2 and "exactly one --name" in r.stderr
    r = run("extract", lora, "--out", tmp_path / "o", "--name", "nope")
    assert r.returncode == 2 and "no bundled embedding named 'nope'" in r.stderr
    r = run("extract", sd1(tmp_path), "--out", tmp_path / "o")
    assert r.returncode == 2 and "holds no bundled embeddings" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_convert_sd3_to_sdxl_sd1_and_conventions(tmp_path):
    from safetensors import safe_open

    s3 = sd3_file(tmp_path)
    assert main(["inspect", str(s3), "--json"]) == 0
    assert main(["convert", str(s3), str(tmp_path / "x.safetensors"), "--to", "sdxl"]) == 0
    x = read_embedding(tmp_path / "x.safetensors")
    assert x.kind == "sdxl" and torch.equal(x.vectors["clip_g"], read_embedding(s3).vectors["clip_g"])
    assert main(["convert", str(s3), str(tmp_path / "one.pt"), "--to-sd1"]) == 0
    assert read_embedding(tmp_path / "one.pt").kind == "sd1"
    assert main(["convert", str(s3), str(tmp_path / "c.safetensors"), "--to", "comfyui"]) == 0
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l", "t5xxl"]
    assert (
        main(
            [
                "convert",
                str(tmp_path / "c.safetensors"),
                str(tmp_path / "o.safetensors"),
                "--to",
                "onetrainer",
            ]
        )
        == 0
    )
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l", "t5"]


def test_inspect_sd3_text_shows_t5_count(tmp_path, capsys):
    assert main(["inspect", str(sd3_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "SD3 / SD3.5" in out and "vectors: 2 (t5: 3)" in out and "OneTrainer keys" in out


def test_convert_sd3_refusals_exit_2(tmp_path):
    s3 = sd3_file(tmp_path)
    r = run("convert", s3, tmp_path / "a.pt")
    assert r.returncode == 2 and "write it as .safetensors" in r.stderr
    r = run("convert", s3, tmp_path / "b.safetensors", "--to", "sdxl", "--to-sd1")
    assert r.returncode == 2 and "--to cannot be combined" in r.stderr
    r = run("convert", sd1(tmp_path), tmp_path / "c.safetensors", "--to", "comfyui")
    assert r.returncode == 2 and "differ only for SD3 and Flux" in r.stderr
    assert not any((tmp_path / n).exists() for n in ("a.pt", "b.safetensors", "c.safetensors"))


def test_sd1_has_one_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "a.safetensors", str(tmp_path / "b.safetensors"), "--to", "sd1"])
    assert "invalid choice: 'sd1'" in capsys.readouterr().err

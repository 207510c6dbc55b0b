"""Training without a web UI: tiny single-file checkpoints in the web UI's layout, loaded through diffusers,
the web UI's conditioning, the command line, the queue, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lib_ti.cli import main
from lib_ti.headless.checkpoint import CheckpointError, inferred_config, load_checkpoint
from lib_ti.headless.models import LoadOptions, build_parts, load_model
from lib_ti.headless.options import KNOWN_KEYS, TRAIN_KEYS, resolve
from lib_ti.io.formats import read_embedding
from lib_ti.text.encoders import (
    EncoderSettings,
    HFClipEncoder,
    OpenClipEncoder,
    PromptEncoder,
    hf_tokenizer_info,
    open_clip_tokenizer_info,
)
from lib_ti.training.options import FIELD_TYPES, HELP
from lib_ti.training.resume import read_info_file

from . import ldm_checkpoints, models
from .conftest import ROOT

PROMPTS = [
    "a photo of a cat",
    "(a red car:1.3), [blurry], painting by an old master, " * 8,  # two chunks, emphasis
    "",
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    models.open_clip_module()  # the torchvision shim before open_clip
    folder = tmp_path_factory.mktemp("ckpt")
    return {kind: ldm_checkpoints.build(kind, folder) for kind in ("sd1", "sdxl", "sd2")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    for i in range(4):
        Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"tag{i}, red, blue", encoding="utf-8")
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIB_TI_CACHE", str(tmp_path / "cache"))


def web_ui_encoder(ckpt) -> PromptEncoder:
    """Our encoders over the modules the web UI builds from the same file, with A1111's settings
    (lib_ti.host.a1111_model): transformers CLIP-L, open_clip towers with open_clip's tokenizer."""
    l_tok = hf_tokenizer_info(models.hf_tokenizer())
    g_tok = open_clip_tokenizer_info(models.open_clip_tokenizer())
    if ckpt.kind == "sd1":
        return PromptEncoder([HFClipEncoder("clip_l", ckpt.text["clip_l"], l_tok, EncoderSettings())])
    if ckpt.kind == "sd2":
        h = EncoderSettings(skip=1, final_norm=True, id_pad=0)
        return PromptEncoder([OpenClipEncoder("clip_h", ckpt.text["clip_h"], g_tok, h)])
    g = EncoderSettings(skip=1, final_norm=False, pooled=True, id_pad=0)
    return PromptEncoder(
        [
            HFClipEncoder("clip_l", ckpt.text["clip_l"], l_tok, EncoderSettings(skip=1, final_norm=False)),
            OpenClipEncoder("clip_g", ckpt.text["clip_g"], g_tok, g),
        ]
    )


@pytest.mark.versioned  # transformers 4.30 and 4.46
# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_the_same_modules(ckpts, kind):
    ckpt = ckpts[kind]
    model = load_model(str(ckpt.path), LoadOptions(prediction="eps"))
    assert model.kind == kind
    assert model.model_hash == read_sha(ckpt.path)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    ctx = torch.randn(2, 77, model.unet.config.cross_attention_dim)
    extra = {}
    if kind == "sdxl":
        ids = torch.tensor([[64, 64, 0, 0, 64, 64.0]] * 2)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280), "time_ids": ids}}
    assert torch.equal(model.unet(x, t, ctx, **extra).sample, ckpt.unet(x, t, ctx, **extra).sample)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(model.vae.encode(img).latent_dist.mean, ckpt.vae.encode(img).latent_dist.mean)


def read_sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@pytest.mark.versioned  # transformers 4.30 and 4.46
@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_conditioning_equals_the_web_uis(ckpts, kind):
    """Same file: the headless encoders (diffusers/transformers modules) against the web UI's modules."""
    ckpt = ckpts[kind]
    parts = build_parts(load_model(str(ckpt.path), LoadOptions(prediction="eps")))
    ours = web_ui_encoder(ckpt)
    g = torch.Generator().manual_seed(3)
    vecs = {k: torch.randn(2, enc.width, generator=g) for k, enc in zip(ours.keys, ours.encoders)}
    assert parts.prompt_encoder.keys == ours.keys
    prompts = [*PROMPTS, "hlemb in the snow, detailed"]
    with torch.no_grad():
        a = parts.prompt_encoder.encode(prompts, {"hlemb": vecs})
        b = ours.encode(prompts, {"hlemb": vecs})
    assert a.crossattn.shape == b.crossattn.shape
    diff = float((a.crossattn - b.crossattn).abs().max())
    assert diff < 2e-5 * float(b.crossattn.abs().max()), diff
    if kind == "sdxl":
        assert a.pooled is not None and b.pooled is not None
        assert float((a.pooled - b.pooled).abs().max()) < 2e-5 * float(b.pooled.abs().max())
    else:
        assert a.pooled is None


def test_gradients_reach_the_vectors(ckpts):
    parts = build_parts(load_model(str(ckpts["sdxl"].path), LoadOptions()))
    vecs = {
        "clip_l": torch.randn(2, 768, requires_grad=True),
        "clip_g": torch.randn(2, 1280, requires_grad=True),
    }
    c = parts.prompt_encoder.encode(["a photo of hlemb"], {"hlemb": vecs})
    (c.crossattn.sum() + c.pooled.sum()).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vecs.values())
    for _, m in load_model(str(ckpts["sd1"].path), LoadOptions()).text_models:
        assert not any(p.requires_grad for p in m.parameters())


def test_shape_inference_matches_the_yaml(ckpts):
    """SD1's shapes give the yaml's UNet and VAE (heads aside, which the shapes cannot tell)."""
    ck = load_checkpoint(ckpts["sd1"].path)
    assert ck.config_source.endswith("tiny-sd1.yaml")
    inferred = inferred_config(ck.state, "sd1")["model"]["params"]
    unet, yaml_unet = (
        inferred["unet_config"]["params"],
        ck.original_config["model"]["params"]["unet_config"]["params"],
    )
    for key in (
        "in_channels",
        "out_channels",
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "context_dim",
    ):
        assert unet[key] == yaml_unet[key], key
    assert sorted(unet["attention_resolutions"]) == sorted(yaml_unet["attention_resolutions"])
    vae = inferred["first_stage_config"]["params"]["ddconfig"]
    assert {k: vae[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels")} == {
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 4,
    }  # fmt: skip


def test_original_config_flag_wins(ckpts, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(ldm_checkpoints.SD1_YAML.replace("num_heads: 4", "num_heads: 2"), encoding="utf-8")
    ck = load_checkpoint(ckpts["sd1"].path, str(other))
    assert ck.config_source == str(other)
    assert ck.original_config["model"]["params"]["unet_config"]["params"]["num_heads"] == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint at all", "not a readable safetensors file"),
        (None, "not a Stable Diffusion checkpoint"),
        ("refiner", "SDXL refiner"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, content, message):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "refiner":
        save_file({"conditioner.embedders.0.model.ln_final.weight": torch.ones(2)}, str(path))
    else:
        save_file({"some.weight": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_ckpt_goes_through_the_restricted_unpickler(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(Exception, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------- options and --help
def test_every_training_option_is_a_flag_with_help():
    assert set(HELP) == set(FIELD_TYPES)
    flags = {k.replace("_", "-") for k in KNOWN_KEYS}
    help_text = subprocess.run(
        [sys.executable, "-m", "lib_ti", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for key in TRAIN_KEYS:
        assert f"--{key.replace('_', '-')}" in help_text, key
    assert "default: 2000 (SDXL 1200)" in help_text
    assert {"name", "data", "checkpoint", "init-text", "vectors", "out", "config", "queue"} <= flags | {
        "config",
        "queue",
    }


def test_options_are_checked_with_names():
    r = resolve({"name": "a", "data": "d", "batch_size": 3, "precision": "bf16"})
    assert r.train == {"embedding": "a", "dataset_dir": "d", "batch_size": 3}
    assert r.run.precision == "bf16"
    with pytest.raises(Exception, match="unknown option 'batchsize'"):
        resolve({"batchsize": 3})
    with pytest.raises(Exception, match="precision must be one of fp32, fp16, bf16"):
        resolve({"precision": "fp8"})
    with pytest.raises(Exception, match="clip_skip must be at least 1"):
        resolve({"clip_skip": 0})


def test_bad_flags_exit_2_with_one_line(tmp_path, capsys):
    assert main(["train", "--name", "x", "--data", str(tmp_path), "--steps", "many"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps" in err
    assert main(["train", "--name", "x", "--data", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------- training from the command line
def base_args(ckpt, images, out, *extra):
    return [
        "train", "--checkpoint", str(ckpt.path), "--data", str(images), "--out", str(out),
        "--resolution", "64", "--steps", "4", "--batch-size", "2", "--grad-accum", "1",
        "--validation-every", "2", "--snapshot-every", "2", "--preview-every", "0", "--quiet", *extra,
    ]  # fmt: skip


@pytest.mark.versioned  # transformers 4.30 and 4.46
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_train_writes_the_tabs_files(ckpts, images, tmp_path, kind):
    out = tmp_path / "emb"
    args = base_args(
        ckpts[kind], images, out, "--name", "hlcat", "--init-text", "a tabby cat", "--vectors", "3"
    )
    assert main([*args, "--preview-every", "4", "--preview-steps", "2", "--pt-copy"]) == 0
    emb = read_embedding(out / "hlcat.safetensors")
    assert (emb.kind, emb.num_vectors, emb.step) == (kind, 3, 4)
    assert emb.sd_checkpoint == read_sha(ckpts[kind].path)
    assert emb.metadata["trainer"].startswith("lib_ti")
    logs = tmp_path / "textual_inversion_ti" / "hlcat"
    assert (logs / "hlcat-2.safetensors").is_file()
    assert (logs / "hlcat.pt").is_file()
    rows = (logs / "hlcat.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 5
    assert read_info_file(logs / "hlcat.resume.safetensors").state == "finished"
    preview = logs / "previews" / "hlcat-4.png"
    carried = read_embedding(preview)  # the PNG carries the embedding of its step
    assert all(torch.allclose(carried.vectors[k], v) for k, v in emb.vectors.items())
    snapshot = read_embedding(logs / "hlcat-2.safetensors")
    assert snapshot.step == 2
    assert not torch.equal(emb.vectors["clip_l"], snapshot.vectors["clip_l"])  # the vectors moved


def test_headless_equals_the_same_run_twice_and_resumes(ckpts, images, tmp_path):
    """Deterministic runs: a run stopped by its own --steps and resumed to more steps equals one run."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--name", "hlr", "--init-text", "a dog", "--seed", "5"]
    assert main([*base_args(ckpts["sd1"], images, a, *common), "--steps", "4"]) == 0
    assert main([*base_args(ckpts["sd1"], images, b, *common), "--steps", "4"]) == 0
    va, vb = read_embedding(a / "hlr.safetensors"), read_embedding(b / "hlr.safetensors")
    assert torch.equal(va.vectors["clip_l"], vb.vectors["clip_l"])


def test_existing_embedding_needs_resume_or_overwrite(ckpts, images, tmp_path, capsys):
    out = tmp_path / "emb"
    args = base_args(ckpts["sd1"], images, out, "--name", "hle", "--init-text", "a cat", "--steps", "2")
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main([a for a in args if a not in ("--init-text", "a cat")] + ["--steps", "3"]) == 0
    assert read_embedding(out / "hle.safetensors").step == 3


def test_missing_images_create_nothing(ckpts, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(base_args(ckpts["sd1"], tmp_path / "nope", out, "--name", "hln", "--init-text", "x")) == 2
    assert "nope" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------- the queue
def write_queue(tmp_path, ckpt, images, extra=""):
    q = tmp_path / "jobs.toml"
    q.write_text(
        f"""
[defaults]
checkpoint = "{ckpt.path.as_posix()}"
resolution = 64
steps = 3
batch_size = 2
grad_accum = 1
validation_every = 0
snapshot_every = 0
preview_every = 0
out = "emb"
quiet = true

[[job]]
name = "qa"
data = "{images.as_posix()}"
init_text = "a cat"

[[job]]
name = "qb"
data = "no-such-folder"
init_text = "a dog"

[[job]]
name = "qc"
data = "{images.as_posix()}"
init_text = "a bird"
steps = 2
{extra}""",
        encoding="utf-8",
    )
    return q


def test_queue_runs_skips_and_goes_on_after_a_failure(ckpts, images, tmp_path, capsys):
    q = write_queue(tmp_path, ckpts["sd1"], images)
    assert main(["train", "--queue", str(q)]) == 1
    err = capsys.readouterr().err
    assert "qb: the training image folder" in err
    assert read_embedding(tmp_path / "emb" / "qa.safetensors").step == 3
    assert read_embedding(tmp_path / "emb" / "qc.safetensors").step == 2
    assert not (tmp_path / "emb" / "qb.safetensors").exists()  # a failed check creates nothing
    mtime = (tmp_path / "emb" / "qa.safetensors").stat().st_mtime_ns
    assert main(["train", "--queue", str(q)]) == 1
    table = capsys.readouterr().err
    assert "qa   skipped" in table and "qc   skipped" in table and "qb   failed" in table
    assert (tmp_path / "emb" / "qa.safetensors").stat().st_mtime_ns == mtime


def test_queue_resumes_a_stopped_job(ckpts, images, tmp_path, capsys):
    """A job stopped at step 2 (its resume file says so) is resumed, not restarted, by the next run."""
    q = write_queue(tmp_path, ckpts["sd1"], images)
    assert main(["train", "--queue", str(q), "--steps", "2"]) == 1  # flags override every job
    info = tmp_path / "textual_inversion_ti" / "qa" / "qa.resume.safetensors"
    assert read_info_file(info).state == "finished"
    # a longer queue: the finished 2-step job counts as finished; a stopped one is what resumes
    stop_at = run_until_stopped(ckpts["sd1"], images, tmp_path / "emb", "qd", steps=30)
    assert (
        read_info_file(tmp_path / "textual_inversion_ti" / "qd" / "qd.resume.safetensors").state == "stopped"
    )
    q2 = write_queue(
        tmp_path, ckpts["sd1"], images,
        extra=f'\n[[job]]\nname = "qd"\ndata = "{images.as_posix()}"\ninit_text = "x"\nsteps = 30\n',
    )  # fmt: skip
    capsys.readouterr()
    assert main(["train", "--queue", str(q2), "--steps", "30"]) == 1
    err = capsys.readouterr().err
    assert f"qd: resuming (stopped at step {stop_at})" in err
    assert read_embedding(tmp_path / "emb" / "qd.safetensors").step == 30


def run_until_stopped(ckpt, images, out, name, steps):
    """Start a run in a subprocess, send SIGINT once it has trained a few steps; its exit code is 130."""
    args = base_args(ckpt, images, out, "--name", name, "--init-text", "a cat", "--steps", str(steps))
    args += ["--validation-every", "0", "--snapshot-every", "0", "--resume-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIB_TI_CACHE": os.environ["LIB_TI_CACHE"]}
    proc = subprocess.Popen(
        [sys.executable, "-c", SHIM, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    log = out.parent / "textual_inversion_ti" / name / f"{name}.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "saving first" in err
    return read_embedding(out / f"{name}.safetensors").step


#: the command line, after the tests' torchvision shim (the CPU torch has no torchvision operators)
SHIM = (
    "import sys; from tests.conftest import define_torchvision_ops; define_torchvision_ops(); "
    "from lib_ti.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_ctrl_c_saves_and_exits_130(ckpts, images, tmp_path):
    out = tmp_path / "emb"
    step = run_until_stopped(ckpts["sd1"], images, out, "hlc", steps=200)
    assert 2 <= step < 200
    info = read_info_file(tmp_path / "textual_inversion_ti" / "hlc" / "hlc.resume.safetensors")
    assert (info.state, info.step) == ("stopped", step)
    resumed = base_args(ckpts["sd1"], images, out, "--name", "hlc", "--resume", "--quiet")
    assert main([*resumed, "--steps", str(step + 2)]) == 0
    assert read_embedding(out / "hlc.safetensors").step == step + 2


# ---------------------------------------------------------------------- a diffusers folder
def test_diffusers_folder_loads_and_trains(ckpts, images, tmp_path):
    """A diffusers model folder (as ``save_pretrained`` writes it) gives the same conditioning and trains."""
    import json

    ck = ckpts["sd1"]
    folder = tmp_path / "tiny-sd1-diffusers"
    ck.unet.save_pretrained(folder / "unet")
    ck.vae.save_pretrained(folder / "vae")
    ck.text["clip_l"].save_pretrained(folder / "text_encoder")
    models.hf_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "num_train_timesteps": 1000,
                "prediction_type": "epsilon",
            }
        )
    )
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    model = load_model(str(folder), LoadOptions())
    assert (model.kind, model.prediction, model.model_name) == ("sd1", "eps", "tiny-sd1-diffusers")
    single = build_parts(load_model(str(ck.path), LoadOptions()))
    with torch.no_grad():
        a = build_parts(model).prompt_encoder.encode(PROMPTS)
        b = single.prompt_encoder.encode(PROMPTS)
    assert torch.equal(a.crossattn, b.crossattn)
    out = tmp_path / "emb"
    args = base_args(ck, images, out, "--name", "hldf", "--init-text", "a cat", "--steps", "2")
    args[args.index("--checkpoint") + 1] = str(folder)
    assert main(args) == 0
    assert read_embedding(out / "hldf.safetensors").step == 2


# ---------------------------------------------------------------------- the extension without the extras
BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'diffusers':
            raise ImportError('No module named ' + repr(name) + ' (blocked by the test)')
sys.meta_path.insert(0, Block())
"""


def test_the_web_ui_side_needs_none_of_the_headless_extras(ckpts, images, tmp_path):
    """Without diffusers (the one extra no web UI has): the tab, the host adapters and the file tools import; ``train`` says
    what to install (exit 2)."""
    code = BLOCK + (
        "from tests.conftest import define_torchvision_ops; define_torchvision_ops()\n"
        "import lib_ti.ui.tab, lib_ti.host.detect, lib_ti.service\n"
        "from lib_ti.cli import main\n"
        f"sys.exit(main({base_args(ckpts['sd1'], images, tmp_path / 'emb', '--name', 'x', '--init-text', 'y')!r}))\n"
    )
    env = {**os.environ, "LIB_TI_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pip install -r requirements-headless.txt" in r.stderr
    assert not (tmp_path / "emb").exists()


def test_config_file_holds_the_same_keys_and_flags_override_it(ckpts, images, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        f'checkpoint = "{ckpts["sd1"].path.as_posix()}"\ninit_text = "a cat"\nsteps = 2\nbatch_size = 2\n'
        f'resolution = 64\nvalidation_every = 0\npreview_every = 0\nquiet = true\nout = "{(tmp_path / "emb").as_posix()}"\n',
        encoding="utf-8",
    )
    assert (
        main(["train", "--config", str(config), "--name", "hlcfg", "--data", str(images), "--steps", "3"])
        == 0
    )
    emb = read_embedding(tmp_path / "emb" / "hlcfg.safetensors")
    assert (emb.step, emb.metadata["batch_size"]) == (3, "2")
    config.write_text("batch-size = 2\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--name", "x", "--data", str(images)]) == 2
    assert "unknown option 'batch-size'" in capsys.readouterr().err


def test_recipe_flag_picks_another_kinds_defaults(ckpts, images, tmp_path):
    out = tmp_path / "emb"
    args = [
        "train",
        "--checkpoint",
        str(ckpts["sd1"].path),
        "--data",
        str(images),
        "--out",
        str(out),
        "--quiet",
    ]
    args += ["--resolution", "64", "--steps", "1", "--validation-every", "0", "--preview-every", "0"]
    assert main([*args, "--name", "hlsd1", "--init-text", "a cat"]) == 0
    assert main([*args, "--name", "hlxl", "--init-text", "a cat", "--recipe", "sdxl"]) == 0
    sd1, xl = (
        read_embedding(out / "hlsd1.safetensors").metadata,
        read_embedding(out / "hlxl.safetensors").metadata,
    )
    assert (sd1["lr"], sd1["batch_size"], sd1["grad_accum"]) == ("5e-3", "2", "2")
    assert (xl["lr"], xl["batch_size"], xl["grad_accum"]) == ("3e-3", "1", "4")


def test_inpainting_checkpoints_are_refused_at_load(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpts["sd1"].path))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, *state[key].shape[2:])
    path = tmp_path / "inpaint.safetensors"  # no yaml beside it: the shapes say 9 channels
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="9 input channels"):
        load_model(str(path), LoadOptions())


def test_whole_numbers_given_as_text_stay_exact():
    from lib_ti.training.options import coerce

    assert coerce("seed", "9007199254740993") == 9007199254740993
    assert resolve({"seed": "9007199254740993"}).train["seed"] == 9007199254740993


def test_queue_refuses_per_job_flags(tmp_path, capsys):
    (tmp_path / "q.toml").write_text('[[job]]\nname = "a"\ndata = "d"\n', encoding="utf-8")
    assert main(["train", "--queue", str(tmp_path / "q.toml"), "--name", "x"]) == 2
    assert "--name with --queue" in capsys.readouterr().err


def test_queue_never_overwrites_a_file_it_did_not_make(ckpts, images, tmp_path, capsys):
    """A foreign embedding of a job's name is refused with init_text and trained further without it; a
    finished job whose file was deleted is trained again."""
    from lib_ti.embedding import Embedding
    from lib_ti.io.formats import write_embedding

    (tmp_path / "emb").mkdir()
    foreign = Embedding("qa", {"clip_l": torch.randn(3, 768)})  # a downloaded file: no step, no recipe
    write_embedding(foreign, tmp_path / "emb" / "qa.safetensors")
    q = write_queue(tmp_path, ckpts["sd1"], images)
    assert main(["train", "--queue", str(q)]) == 1
    err = capsys.readouterr().err
    assert "no run of this queue made it" in err
    kept = read_embedding(tmp_path / "emb" / "qa.safetensors")
    assert kept.num_vectors == 3 and torch.equal(kept.vectors["clip_l"], foreign.vectors["clip_l"])
    q.write_text(q.read_text().replace('init_text = "a cat"\n', ""), encoding="utf-8")
    assert main(["train", "--queue", str(q)]) == 1  # qb still fails
    trained = read_embedding(tmp_path / "emb" / "qa.safetensors")
    assert (trained.num_vectors, trained.step) == (3, 3)
    (tmp_path / "emb" / "qc.safetensors").unlink()  # a finished result deleted: train it again
    capsys.readouterr()
    assert main(["train", "--queue", str(q)]) == 1
    assert "qc: starting" in capsys.readouterr().err
    assert read_embedding(tmp_path / "emb" / "qc.safetensors").step == 2


def test_gradient_checkpointing_trains_the_same_vectors(ckpts, images, tmp_path, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    common = ["--name", "hlgc", "--init-text", "a cat", "--steps", "2", "--validation-every", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(base_args(ckpts["sdxl"], images, a, *common)) == 0
    assert not calls
    assert main([*base_args(ckpts["sdxl"], images, b, *common), "--gradient-checkpointing"]) == 0
    assert calls  # the UNet's blocks were recomputed
    va, vb = read_embedding(a / "hlgc.safetensors"), read_embedding(b / "hlgc.safetensors")
    for k in ("clip_l", "clip_g"):
        assert torch.allclose(va.vectors[k], vb.vectors[k], atol=1e-6)


def test_ckpt_files_load_through_the_restricted_unpickler(ckpts, tmp_path):
    """A ``.ckpt`` (torch pickle with a ``state_dict``, as old checkpoints are) gives the same model."""
    from safetensors.torch import load_file

    state = load_file(str(ckpts["sd1"].path))
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    (tmp_path / "old.yaml").write_text(ldm_checkpoints.SD1_YAML, encoding="utf-8")
    model = load_model(str(path), LoadOptions())
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 768)
    assert torch.equal(model.unet(x, t, ctx).sample, ckpts["sd1"].unet(x, t, ctx).sample)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--lr", "5e-3:abc", "learning rate schedule"), ("--template", "no-such-template", "unknown template")],
)
def test_a_bad_request_creates_nothing(ckpts, images, tmp_path, capsys, flag, value, message):
    out = tmp_path / "emb"
    args = base_args(ckpts["sd1"], images, out, "--name", "hlbad", "--init-text", "a cat", flag, value)
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (out / "hlbad.safetensors").exists()

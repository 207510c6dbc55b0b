"""A web UI checkpoint file as headless training reads it: its tensors, its family, its LDM configuration.

A single-file checkpoint (``.safetensors``, or ``.ckpt`` through the restricted unpickler) holds the
original LDM/sgm key layout that AUTOMATIC1111 and Forge load. Its configuration comes, first match
wins, from ``--original-config``, a ``.yaml`` of the same name beside it (the web UI's own rule), or the
tensors' shapes (channels, levels, attention, depths, context width) with the family's attention heads
(SD1: 8 heads; SD2 and SDXL: 64-wide heads), which covers the released models and their fine-tunes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lib_ti.errors import TIError
from lib_ti.io.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

Family = Literal["sd1", "sd2", "sdxl"]
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_CLIP = "cond_stage_model.model."
XL_CLIP_L = "conditioner.embedders.0.transformer."
XL_CLIP_G = "conditioner.embedders.1.model."
#: an SDXL refiner's only text encoder (CLIP-G, first)
REFINER_CLIP_G = "conditioner.embedders.0.model."
#: the marker key v-prediction SDXL fine-tunes carry (Forge and ComfyUI read it)
V_PRED_KEY = "v_pred"
#: latent scale factors of the families (sgm's SDXL VAE; ldm's SD1/SD2)
SCALE_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


class CheckpointError(TIError):
    """A checkpoint that cannot be read or is not an SD1, SD2 or SDXL model."""


@dataclass
class Checkpoint:
    """A checkpoint file's tensors and what they are."""

    path: Path
    state: dict[str, torch.Tensor]
    family: Family
    #: the LDM-style configuration (``model.params``...), from a yaml or the shapes
    original_config: dict[str, Any]
    #: where the configuration came from, for the log
    config_source: str
    #: the web UI's short hash (the first 10 hex digits of the file's sha256) and its name (the stem)
    short_hash: str
    name: str


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError  # type: ignore[attr-defined]
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            msg = f"{path}: not a readable safetensors file ({e})"
            raise CheckpointError(msg) from None
    from lib_ti.io import safe_pickle

    obj = safe_pickle.load(path.read_bytes(), str(path))
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        msg = f"{path}: holds a {type(obj).__name__}, not a model's tensors"
        raise CheckpointError(msg)
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def family_of(state: Mapping[str, torch.Tensor]) -> Family:
    """SD1, SD2 or SDXL from the text encoders' keys; CheckpointError for anything else."""
    if any(k.startswith(REFINER_CLIP_G) for k in state):
        msg = "this is an SDXL refiner (CLIP-G only): refiners cannot be trained; use an SDXL base model"
        raise CheckpointError(msg)
    if any(k.startswith(XL_CLIP_G) for k in state):
        if not any(k.startswith(XL_CLIP_L) for k in state):
            msg = "this SDXL checkpoint has no CLIP-L text encoder (conditioner.embedders.0)"
            raise CheckpointError(msg)
        return "sdxl"
    if any(k.startswith(SD2_CLIP) for k in state):
        return "sd2"
    if any(k.startswith(SD1_CLIP) for k in state):
        return "sd1"
    if any(k.startswith(UNET) for k in state):
        msg = "the checkpoint has a UNet but no text encoder the web UI's SD1, SD2 or SDXL would load"
    elif any("double_blocks" in k or "joint_blocks" in k for k in state):
        msg = "this looks like a Flux or SD3 model: only SD1, SD2 and SDXL can be trained here"
    else:
        msg = "not a Stable Diffusion checkpoint (no model.diffusion_model. keys)"
    raise CheckpointError(msg)


def cache_dir() -> Path:
    """Where headless training keeps what it computes once (hashes, the tokenizer files): ``LIB_TI_CACHE``,
    else ``~/.cache/lib_ti``."""
    return Path(os.environ.get("LIB_TI_CACHE", Path.home() / ".cache" / "lib_ti"))


def short_hash(path: Path) -> str:
    """The web UI's short hash of a file (sha256, 10 hex digits), cached by path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return str(cache[key])
    logger.info("hashing %s (once; the web UI names embeddings' checkpoints by this hash)", path.name)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()[:10]
    if not isinstance(cache, dict):
        cache = {}
    cache[key] = value
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, json.dumps(cache).encode("utf-8"))
    except (OSError, TIError) as e:
        logger.debug("cannot keep the hash cache %s: %s", cache_file, e)
    return value


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        msg = f"{path}: not a readable yaml config ({e})"
        raise CheckpointError(msg) from None
    if not isinstance(data, dict) or not isinstance(data.get("model", {}).get("params"), dict):
        msg = f"{path}: not an LDM/sgm model config (no model.params)"
        raise CheckpointError(msg)
    return data


def load_checkpoint(path: str | os.PathLike[str], original_config: str | None = None) -> Checkpoint:
    """Read a single-file checkpoint and find its family and configuration."""
    p = Path(path)
    if not p.is_file():
        msg = f"{p}: no such checkpoint file"
        raise CheckpointError(msg)
    if p.suffix.lower() not in CHECKPOINT_SUFFIXES:
        msg = f"{p}: a checkpoint is a {', '.join(CHECKPOINT_SUFFIXES)} file (or a diffusers folder)"
        raise CheckpointError(msg)
    state = _read_state(p)
    family = family_of(state)
    beside = p.with_suffix(".yaml")
    if original_config:
        config, source = read_yaml(Path(original_config)), str(original_config)
    elif beside.is_file():
        config, source = read_yaml(beside), str(beside)
    else:
        config, source = inferred_config(state, family), "the tensors' shapes"
    logger.info("%s: %s, configuration from %s", p.name, family, source)
    return Checkpoint(p, state, family, config, source, short_hash(p), p.stem)


# ---------------------------------------------------------------------- configuration from shapes
def _count(state: Mapping[str, Any], pattern: str) -> int:
    """How many distinct integers fill the ``(\\d+)`` of ``pattern`` among the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _unet_params(state: Mapping[str, torch.Tensor], family: Family) -> dict[str, Any]:
    u = {k[len(UNET) :]: v for k, v in state.items() if k.startswith(UNET)}
    if "input_blocks.0.0.weight" not in u:
        msg = "the checkpoint's UNet has no input_blocks.0.0.weight"
        raise CheckpointError(msg)
    conv_in = u["input_blocks.0.0.weight"]
    channels = int(conv_in.shape[0])
    levels: list[dict[str, Any]] = [{"res": 0, "out": channels, "depth": 0}]
    context = None
    linear = False
    i = 1
    while any(k.startswith(f"input_blocks.{i}.") for k in u):
        if f"input_blocks.{i}.0.op.weight" in u:
            levels.append({"res": 0, "out": channels, "depth": 0})
        else:
            level = levels[-1]
            level["res"] += 1
            level["out"] = int(u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
            proj = u.get(f"input_blocks.{i}.1.proj_in.weight")
            if proj is not None:
                linear = proj.ndim == 2
                level["depth"] = _count(u, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
                context = int(u[f"input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
        i += 1
    if context is None:
        msg = "the checkpoint's UNet has no cross-attention"
        raise CheckpointError(msg)
    params: dict[str, Any] = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(u["out.2.weight"].shape[0]),
        "model_channels": channels,
        "channel_mult": [lv["out"] // channels for lv in levels],
        "num_res_blocks": levels[0]["res"],
        "attention_resolutions": [2**n for n, lv in enumerate(levels) if lv["depth"]],
        "transformer_depth": [lv["depth"] or 1 for lv in levels],
        "context_dim": context,
        "use_linear_in_transformer": linear,
        "use_spatial_transformer": True,
    }
    if family == "sd1":
        params["num_heads"] = 8
    else:
        params["num_head_channels"] = 64
    if "label_emb.0.0.weight" in u:
        params["num_classes"] = "sequential"
        params["adm_in_channels"] = int(u["label_emb.0.0.weight"].shape[1])
    return params


def _vae_params(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    v = {k[len(VAE) :]: t for k, t in state.items() if k.startswith(VAE)}
    if "encoder.conv_in.weight" not in v:
        msg = "the checkpoint has no VAE (first_stage_model.encoder): bake one in, or use a full checkpoint"
        raise CheckpointError(msg)
    ch = int(v["encoder.conv_in.weight"].shape[0])
    n_levels = _count(v, r"encoder\.down\.(\d+)\.")
    mult = [int(v[f"encoder.down.{n}.block.0.conv2.weight"].shape[0]) // ch for n in range(n_levels)]
    return {
        "double_z": True,
        "z_channels": int(v["encoder.conv_out.weight"].shape[0]) // 2,
        "in_channels": int(v["encoder.conv_in.weight"].shape[1]),
        "out_ch": int(v["decoder.conv_out.weight"].shape[0]),
        "ch": ch,
        "ch_mult": mult,
        "num_res_blocks": _count(v, r"encoder\.down\.0\.block\.(\d+)\."),
        "attn_resolutions": [],
    }


def inferred_config(state: Mapping[str, torch.Tensor], family: Family) -> dict[str, Any]:
    """An LDM-style configuration of the checkpoint from its tensors' shapes (see the module docstring)."""
    key = "network_config" if family == "sdxl" else "unet_config"
    return {
        "model": {
            "params": {
                "scale_factor": SCALE_FACTOR[family],
                "linear_start": 0.00085,
                "linear_end": 0.012,
                "timesteps": 1000,
                key: {"params": _unet_params(state, family)},
                "first_stage_config": {"params": {"ddconfig": _vae_params(state)}},
            }
        }
    }

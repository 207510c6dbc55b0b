"""diffusers and transformers modules from a checkpoint file or a diffusers folder, and the trainer's
:class:`~lib_ti.parts.ModelParts` over them with the web UI's conditioning.

The conditioning is AUTOMATIC1111's: SD1 CLIP-L's last layer (or ``--clip-skip``) through the final
norm; SD2 OpenCLIP-H's penultimate layer through the final norm; SDXL CLIP-L's penultimate layer and
CLIP-G's penultimate layer without the final norm, CLIP-G's pooled vector from the real end token of
the last layer; A1111's 75-token chunks, emphasis and comma backtracking (:mod:`lib_ti.text.encoders`).
OpenCLIP towers become transformers ``CLIPTextModel``\\ s, as diffusers converts them (SD2 keeps the
layers up to the penultimate one).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lib_ti.errors import TIError
from lib_ti.headless.checkpoint import (
    SD1_CLIP,
    SD2_CLIP,
    V_PRED_KEY,
    XL_CLIP_G,
    XL_CLIP_L,
    Checkpoint,
    CheckpointError,
    Family,
    cache_dir,
    load_checkpoint,
    short_hash,
)
from lib_ti.io.atomic import atomic_write_bytes
from lib_ti.parts import LatentDist, ModelParts, Prediction
from lib_ti.text.encoders import (
    EncoderSettings,
    HFClipEncoder,
    PromptEncoder,
    PromptSettings,
    TextEncoder,
    freeze,
    hf_tokenizer_info,
    open_clip_tokenizer_info,
)

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: the text encoders' heads are 64 wide in every released SD text encoder
HEAD_WIDTH = 64
NEEDS = "pip install -r requirements-headless.txt"


@dataclass
class LoadOptions:
    """How to load and run the frozen model (the headless options that are not training options)."""

    original_config: str | None = None
    device: str = ""
    precision: Precision = "fp32"
    #: "" (eps for SD1/SDXL, detected for SD2), "eps" or "v"
    prediction: str = ""
    #: SD1's "Clip skip" (1: the last layer)
    clip_skip: int = 1


@dataclass
class Model:
    """The frozen modules of one model and what the trainer needs to know of them."""

    kind: Family
    prediction: Prediction
    unet: Any
    vae: Any
    #: (key, transformers CLIPTextModel or CLIPTextModelWithProjection), in the web UI's order
    text_models: list[tuple[str, nn.Module]]
    #: (CLIP-L tokenizer, OpenCLIP tokenizer or None: the CLIP-L one for every encoder)
    tokenizers: tuple[Any, Any]
    scaling_factor: float
    alphas_cumprod: torch.Tensor
    model_hash: str
    model_name: str
    device: torch.device
    dtype: torch.dtype
    clip_skip: int = 1


def _diffusers() -> Any:
    try:
        import diffusers
        from diffusers.loaders import single_file_utils
    except ImportError as e:
        msg = f"training without a web UI needs diffusers ({e}): {NEEDS}"
        raise TIError(msg) from None
    return diffusers, single_file_utils


def pick_device(name: str) -> torch.device:
    if name:
        try:
            return torch.device(name)
        except RuntimeError as e:
            msg = f"--device {name!r}: {e}"
            raise TIError(msg) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------- tokenizers
def _bpe_file() -> Path:
    """open_clip's copy of the CLIP BPE vocabulary (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    msg = f"the CLIP vocabulary ships with open-clip-torch, which is not installed: {NEEDS}"
    raise TIError(msg)


def write_clip_vocabulary(folder: Path) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` of the CLIP BPE vocabulary in ``folder`` (made once, from
    open_clip's copy): what transformers' CLIPTokenizer reads."""
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return vocab_file, merges_file
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    with gzip.open(_bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(merges_file, ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    atomic_write_bytes(
        vocab_file, json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False).encode("utf-8")
    )
    return vocab_file, merges_file


def clip_tokenizer(folder: Path | None = None) -> Any:
    """transformers' CLIPTokenizer over the CLIP BPE vocabulary, as the web UI's CLIP-L uses it (offline:
    the files are written once into ``folder``, default the cache folder)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_vocabulary(folder or cache_dir() / "clip-tokenizer")
    return CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def open_clip_tokenizer() -> Any:
    """open_clip's tokenizer (the web UI's for OpenCLIP-H and CLIP-G), or None when it cannot be imported."""
    try:
        from open_clip.tokenizer import _tokenizer
    except (ImportError, RuntimeError) as e:
        logger.info("open_clip cannot be imported (%s): CLIP-G and OpenCLIP-H use the CLIP-L tokenizer", e)
        return None
    return _tokenizer


# ---------------------------------------------------------------------- single-file checkpoints
def _clip_config(state: dict[str, torch.Tensor], act: str, projection: int | None) -> Any:
    from transformers import CLIPTextConfig

    table = state["text_model.embeddings.token_embedding.weight"]
    width = int(table.shape[1])
    layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=int(table.shape[0]),
        hidden_size=width,
        intermediate_size=int(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=width // HEAD_WIDTH,
        max_position_embeddings=int(state["text_model.embeddings.position_embedding.weight"].shape[0]),
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if act == "quick_gelu" else 0,
        **extra,
    )


def _built(make: Callable[[], nn.Module], state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """``make()`` loaded with ``state``. The module is made on the meta device (no random initialisation
    of weights the checkpoint replaces: seconds for SDXL) and takes the checkpoint's tensors as they are;
    a buffer the checkpoint lacks (transformers' ``position_ids``) is made for real."""
    try:
        with torch.device("meta"):
            model = make()
    except (AttributeError, TypeError, RuntimeError):  # a torch without device contexts
        return _load_into(make(), state, what)
    _load_into(model, state, what, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if leaf != "position_ids":
                return _load_into(make(), state, what)  # unknown buffers: the plain way
            ids = torch.arange(buf.shape[-1]).expand(buf.shape)
            owner.register_buffer(leaf, ids, persistent=leaf in owner.state_dict())
    return model


def _load_into(
    model: nn.Module, state: dict[str, torch.Tensor], what: str, *, assign: bool = False
) -> nn.Module:
    kwargs = {"assign": True} if assign else {}
    missing, unexpected = model.load_state_dict(state, strict=False, **kwargs)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        msg = f"the checkpoint's {what} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
        raise CheckpointError(msg)
    return model


def _clip_l(ckpt: Checkpoint, prefix: str, sfu: Any) -> nn.Module:
    from transformers import CLIPTextModel

    sub = {k: v for k, v in ckpt.state.items() if k.startswith(prefix)}
    state = sfu.convert_ldm_clip_checkpoint(sub)
    state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}
    config = _clip_config(state, "quick_gelu", None)
    return _built(lambda: CLIPTextModel(config), state, "CLIP-L")


def _open_clip(ckpt: Checkpoint, prefix: str, sfu: Any, with_projection: bool) -> nn.Module:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    proj = ckpt.state.get(prefix + "text_projection")
    width = int(ckpt.state[prefix + "token_embedding.weight"].shape[1])
    projection = int(proj.shape[1]) if proj is not None else None
    # diffusers splits the attention's in_proj by this width when the file has no text projection
    holder = type("_Config", (), {"config": type("_C", (), {"projection_dim": projection or width})()})()
    state = sfu.convert_open_clip_checkpoint(holder, ckpt.state, prefix=prefix)
    if not with_projection:
        # SD2: the web UI builds OpenCLIP-H with 24 blocks and conditions on the 23rd (a file may hold 23
        # or 24 of them; diffusers drops a 24th itself); other towers: all but their last block
        count = _count_blocks(ckpt, prefix)
        keep = (24 if width == 1024 and count in (23, 24) else count) - 1
        state.pop("text_projection.weight", None)
        drop = tuple(f"text_model.encoder.layers.{i}." for i in range(keep, count))
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    config = _clip_config(state, "gelu", projection if with_projection else None)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _built(lambda: cls(config), state, "OpenCLIP text encoder")


def _count_blocks(ckpt: Checkpoint, prefix: str) -> int:
    start = prefix + "transformer.resblocks."
    return len({k[len(start) :].split(".")[0] for k in ckpt.state if k.startswith(start)})


def _alphas(params: dict[str, Any]) -> torch.Tensor:
    start, end = float(params.get("linear_start", 0.00085)), float(params.get("linear_end", 0.012))
    n = int(params.get("timesteps", 1000))
    betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


def _prediction_from_config(config: dict[str, Any]) -> str:
    params = config["model"]["params"]
    if params.get("parameterization") == "v":
        return "v"
    scaling = str(params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target"))
    return "v" if scaling.endswith("VScaling") else ""


def from_checkpoint(ckpt: Checkpoint, opts: LoadOptions) -> Model:
    """The modules of a single-file checkpoint (LDM keys converted to diffusers' as diffusers does)."""
    diffusers, sfu = _diffusers()
    config = ckpt.original_config
    params = config["model"]["params"]
    unet_params = (params.get("unet_config") or params.get("network_config") or {}).get("params", {})
    if not unet_params:
        msg = f"{ckpt.config_source}: no unet_config or network_config"
        raise CheckpointError(msg)
    try:
        unet_config = sfu.create_unet_diffusers_config_from_ldm(config, ckpt.state)
        if "num_head_channels" in unet_params and "num_heads" not in unet_params:
            width = int(unet_params["model_channels"])
            heads = [width * m // int(unet_params["num_head_channels"]) for m in unet_params["channel_mult"]]
            unet_config["attention_head_dim"] = heads
        if ckpt.family == "sdxl":
            unet_config["addition_time_embed_dim"] = 256
        if unet_config["in_channels"] != 4:
            msg = (
                f"{ckpt.path.name}: its UNet takes {unet_config['in_channels']} input channels (an inpainting, "
                "instruct-pix2pix or depth model); train on the base model the embedding is meant for"
            )
            raise CheckpointError(msg)
        unet_state = sfu.convert_ldm_unet_checkpoint(ckpt.state, unet_config)
        unet = _built(lambda: diffusers.UNet2DConditionModel(**unet_config), unet_state, "UNet")
        scale = float(params.get("scale_factor", 0.18215))
        vae_config = sfu.create_vae_diffusers_config_from_ldm(config, ckpt.state, scaling_factor=scale)
        vae_state = sfu.convert_ldm_vae_checkpoint(ckpt.state, vae_config)
        vae = _built(lambda: diffusers.AutoencoderKL(**vae_config), vae_state, "VAE")
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        msg = (
            f"{ckpt.path.name}: cannot build the UNet/VAE from {ckpt.config_source} ({type(e).__name__}: {e})"
        )
        raise CheckpointError(msg) from None
    if ckpt.family == "sdxl":
        texts = [
            ("clip_l", _clip_l(ckpt, XL_CLIP_L, sfu)),
            ("clip_g", _open_clip(ckpt, XL_CLIP_G, sfu, True)),
        ]
    elif ckpt.family == "sd2":
        texts = [("clip_h", _open_clip(ckpt, SD2_CLIP, sfu, False))]
    else:
        texts = [("clip_l", _clip_l(ckpt, SD1_CLIP, sfu))]
    ckpt.state.clear()  # the tensors now live in the modules
    return _finish(
        ckpt.family,
        unet,
        vae,
        texts,
        scale,
        _alphas(params),
        opts,
        opts.prediction or ("v" if V_PRED_KEY in ckpt.state else _prediction_from_config(config)),
        ckpt.short_hash,
        ckpt.name,
    )


# ---------------------------------------------------------------------- diffusers folders
def from_diffusers_folder(folder: Path, opts: LoadOptions) -> Model:
    """The modules of a diffusers model folder (``model_index.json``, ``unet/``, ``vae/``, ...)."""
    diffusers, _ = _diffusers()
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def part(name: str) -> Path:
        path = folder / name
        if not path.is_dir():
            msg = f"{folder}: a diffusers folder needs {name}/"
            raise CheckpointError(msg)
        return path

    unet = diffusers.UNet2DConditionModel.from_pretrained(part("unet"))
    vae = diffusers.AutoencoderKL.from_pretrained(part("vae"))
    first = CLIPTextModel.from_pretrained(part("text_encoder"))
    texts: list[tuple[str, nn.Module]]
    if (folder / "text_encoder_2").is_dir():
        family: Family = "sdxl"
        texts = [
            ("clip_l", first),
            ("clip_g", CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")),
        ]
    else:
        family = "sd2" if first.config.hidden_size == 1024 else "sd1"
        texts = [("clip_h" if family == "sd2" else "clip_l", first)]
    scheduler = json.loads((part("scheduler") / "scheduler_config.json").read_text(encoding="utf-8"))
    betas = torch.linspace(
        float(scheduler.get("beta_start", 0.00085)) ** 0.5,
        float(scheduler.get("beta_end", 0.012)) ** 0.5,
        int(scheduler.get("num_train_timesteps", 1000)),
        dtype=torch.float64,
    )
    alphas = torch.cumprod(1 - betas**2, dim=0).float()
    prediction = opts.prediction or ("v" if scheduler.get("prediction_type") == "v_prediction" else "eps")
    tokenizer = CLIPTokenizer.from_pretrained(part("tokenizer"))
    weights = sorted((folder / "unet").glob("*.safetensors")) or sorted((folder / "unet").glob("*.bin"))
    digest = short_hash(weights[0]) if weights else ""  # the UNet's weights tell fine-tunes apart
    return _finish(
        family,
        unet,
        vae,
        texts,
        float(vae.config.scaling_factor),
        alphas,
        opts,
        prediction,
        digest,
        folder.name,
        tokenizer,
    )


# ---------------------------------------------------------------------- common
def _finish(
    family: Family,
    unet: Any,
    vae: Any,
    texts: list[tuple[str, nn.Module]],
    scale: float,
    alphas: torch.Tensor,
    opts: LoadOptions,
    prediction: str,
    model_hash: str,
    name: str,
    tokenizer: Any = None,
) -> Model:
    device = pick_device(opts.device)
    dtype = DTYPES[opts.precision]
    if dtype == torch.float16 and device.type == "cpu":
        msg = "--precision fp16 needs a GPU; use fp32 or bf16 on the CPU"
        raise TIError(msg)
    for module in (unet, vae, *(m for _, m in texts)):
        freeze(module).eval()
    unet.to(device, dtype)
    vae.to(device, torch.float32 if dtype == torch.float16 else dtype)  # the fp16 VAE overflows on SDXL
    for _, m in texts:
        m.to(device, dtype)
    model = Model(
        kind=family,
        prediction="eps",
        unet=unet,
        vae=vae,
        text_models=texts,
        tokenizers=(tokenizer or clip_tokenizer(), None if tokenizer else open_clip_tokenizer()),
        scaling_factor=scale,
        alphas_cumprod=alphas,
        model_hash=model_hash,
        model_name=name,
        device=device,
        dtype=dtype,
        clip_skip=max(int(opts.clip_skip), 1),
    )
    if prediction not in ("", "eps", "v"):
        msg = f"--prediction must be eps or v (got {prediction!r})"
        raise TIError(msg)
    model.prediction = "v" if prediction == "v" else "eps"
    if not prediction and family == "sd2":
        model.prediction = detect_v_prediction(model)
        logger.info("SD2 checkpoint: %s-prediction (detected; --prediction overrides)", model.prediction)
    return model


@torch.no_grad()
def detect_v_prediction(model: Model) -> Prediction:
    """SD2 768-v or 512-base: the web UI's probe (the UNet at the last timestep on a flat latent with a
    flat 2-token context; an eps model predicts about the input there, a v model far below it)."""
    unet = model.unet
    x = torch.full((1, 4, 8, 8), 0.5, device=model.device, dtype=model.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=model.device, dtype=model.dtype)
    out = unet(x, torch.tensor([999], device=model.device), encoder_hidden_states=context).sample
    return "v" if float((out.float() - x.float()).mean()) < -1 else "eps"


def load_model(source: str, opts: LoadOptions) -> Model:
    """A checkpoint file or a diffusers folder."""
    path = Path(source)
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            msg = f"{path}: a folder must be a diffusers model (model_index.json, unet/, vae/, ...)"
            raise CheckpointError(msg)
        return from_diffusers_folder(path, opts)
    return from_checkpoint(load_checkpoint(path, opts.original_config), opts)


def text_encoders(model: Model) -> list[TextEncoder]:
    """Our differentiable encoders over the model's text modules, with the web UI's settings."""
    l_tok, g_tok = model.tokenizers
    l_info = hf_tokenizer_info(l_tok)
    g_info = open_clip_tokenizer_info(g_tok) if g_tok is not None else l_info
    out: list[TextEncoder] = []
    for key, module in model.text_models:
        if model.kind == "sd1":
            out.append(HFClipEncoder(key, module, l_info, EncoderSettings(skip=model.clip_skip - 1)))
        elif model.kind == "sd2":
            # diffusers keeps SD2's layers up to the penultimate: its last state is the web UI's
            out.append(HFClipEncoder(key, module, g_info, EncoderSettings(skip=0, final_norm=True, id_pad=0)))
        elif key == "clip_l":
            out.append(HFClipEncoder(key, module, l_info, EncoderSettings(skip=1, final_norm=False)))
        else:
            settings = EncoderSettings(skip=1, final_norm=False, pooled=True, id_pad=0)
            out.append(HFClipEncoder(key, module, g_info, settings))
    return out


def build_parts(model: Model, prompt_settings: PromptSettings | None = None) -> ModelParts:
    """The trainer's view of ``model``."""
    unet, vae = model.unet, model.vae
    dev = model.device

    if model.kind == "sdxl":

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            extra = {"text_embeds": cond["pooled"].to(x.dtype), "time_ids": cond["time_ids"].to(x.dtype)}
            hidden = cond["crossattn"].to(x.dtype)
            return unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=extra).sample

    else:

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            return unet(x, t, encoder_hidden_states=cond["crossattn"].to(x.dtype)).sample

    @torch.no_grad()
    def encode_image(pixels: torch.Tensor) -> LatentDist:
        p = next(vae.parameters())
        dist = vae.encode(pixels.to(device=p.device, dtype=p.dtype)).latent_dist
        scale = model.scaling_factor
        return LatentDist((dist.mean * scale).float().cpu(), (dist.std * scale).float().cpu())

    def set_checkpointing(on: bool) -> None:
        # diffusers checkpoints only in training mode; the UNet has no dropout or batch norm to change
        if on:
            unet.enable_gradient_checkpointing()
            unet.train()
        else:
            unet.disable_gradient_checkpointing()
            unet.eval()

    return ModelParts(
        kind=model.kind,
        prompt_encoder=PromptEncoder(text_encoders(model), prompt_settings),
        denoise=denoise,
        encode_image=encode_image,
        alphas_cumprod=model.alphas_cumprod,
        prediction=model.prediction,
        latent_channels=int(unet.config.in_channels),
        vae_scale=2 ** (len(vae.config.block_out_channels) - 1),
        model_hash=model.model_hash,
        model_name=model.model_name,
        device=dev,
        dtype=model.dtype,
        set_gradient_checkpointing=set_checkpointing,
    )


def release_vae(model: Model) -> Callable[[], None]:
    """Move the VAE to the CPU once latents are cached (it returns for previews); the restore function."""
    if model.device.type == "cpu":
        return lambda: None
    model.vae.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return lambda: model.vae.to(model.device)

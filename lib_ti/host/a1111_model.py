"""ModelParts from AUTOMATIC1111's loaded model (SD1 ldm, SD2 ldm + OpenCLIP-H, SDXL sgm).

Our encoders run over the host's own modules, looking through its token-embedding hook
(``EmbeddingsWithFixes.wrapped``), so sgm's ``torch.no_grad`` in ``GeneralConditioner.forward`` is
never on the path: gradients reach the vectors without changing the host for anyone else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from lib_ti.parts import LatentDist, ModelParts
from lib_ti.text.encoders import (
    EncoderSettings,
    HFClipEncoder,
    OpenClipEncoder,
    PromptEncoder,
    PromptSettings,
    TextEncoder,
    hf_tokenizer_info,
    open_clip_tokenizer_info,
)

logger = logging.getLogger(__name__)

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def _opt(name: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, name, default)


def prompt_settings() -> PromptSettings:
    emphasis = str(_opt("emphasis", "Original"))
    if emphasis not in ("Original", "No norm", "Ignore", "None"):
        emphasis = "Original"
    return PromptSettings(int(_opt("comma_padding_backtrack", 20)), emphasis)  # type: ignore[arg-type]


def _skip_for_hidden_index(n_layers: int, index: int) -> int:
    """Blocks not run when the host reads ``hidden_states[index]`` (``hidden_states`` has n+1 entries)."""
    run = index if index >= 0 else n_layers + 1 + index
    return n_layers - run


def _open_clip_tokenizer() -> Any:
    import open_clip.tokenizer

    return open_clip.tokenizer._tokenizer


def _clip_l_sd1(cond_model: Any) -> TextEncoder:
    wrapped = cond_model.wrapped
    stop = int(_opt("CLIP_stop_at_last_layers", 1))
    return HFClipEncoder(
        "clip_l",
        wrapped.transformer,
        hf_tokenizer_info(wrapped.tokenizer),
        EncoderSettings(skip=max(stop, 1) - 1),
    )


def _clip_h_sd2(cond_model: Any) -> TextEncoder:
    wrapped = cond_model.wrapped
    if is_forge1_encoder(wrapped):  # reForge, Forge Classic
        return _ldm_patched(
            "clip_h", wrapped, int(getattr(wrapped, "layer_idx", -2) or -2), False, final_norm=True
        )
    return OpenClipEncoder(
        "clip_h",
        wrapped.model,
        open_clip_tokenizer_info(_open_clip_tokenizer()),
        EncoderSettings(skip=int(getattr(wrapped, "layer_idx", 0)), final_norm=True, id_pad=0),
    )


def _clip_l_sdxl(embedder: Any) -> TextEncoder:
    wrapped = embedder.wrapped
    n_layers = len(wrapped.transformer.text_model.encoder.layers)
    if _opt("sdxl_clip_l_skip", False) is True:
        settings = EncoderSettings(
            skip=max(int(_opt("CLIP_stop_at_last_layers", 1)), 1) - 1, final_norm=False
        )
    elif wrapped.layer == "last":
        settings = EncoderSettings(skip=0, final_norm=True)
    else:
        settings = EncoderSettings(
            skip=_skip_for_hidden_index(n_layers, int(wrapped.layer_idx)), final_norm=False
        )
    return HFClipEncoder("clip_l", wrapped.transformer, hf_tokenizer_info(wrapped.tokenizer), settings)


def is_forge1_encoder(wrapped: Any) -> bool:
    """reForge / Forge Classic: open_clip's ``.model`` is replaced by a placeholder (not a module) and the
    encoder is a transformers CLIPTextModel in ``.transformer`` (modules_forge/forge_loader.py)."""
    return not isinstance(getattr(wrapped, "model", None), torch.nn.Module) and hasattr(
        getattr(wrapped, "transformer", None), "text_model"
    )


def _ldm_patched(
    key: str, wrapped: Any, hidden_index: int, pooled: bool, final_norm: bool = False
) -> TextEncoder:
    """reForge and Forge Classic give SD2's CLIP-H and SDXL's CLIP-G as a transformers CLIPTextModel in
    ``wrapped.transformer`` with an HF tokenizer and ``wrapped.text_projection``."""
    n_layers = len(wrapped.transformer.text_model.encoder.layers)
    settings = EncoderSettings(
        skip=_skip_for_hidden_index(n_layers, hidden_index), final_norm=final_norm, pooled=pooled, id_pad=0
    )
    projection = getattr(wrapped, "text_projection", None) if pooled else None
    return HFClipEncoder(key, wrapped.transformer, hf_tokenizer_info(wrapped.tokenizer), settings, projection)


def _clip_g_sdxl(embedder: Any) -> TextEncoder:
    wrapped = embedder.wrapped
    if is_forge1_encoder(wrapped):  # reForge, Forge Classic
        return _ldm_patched("clip_g", wrapped, int(getattr(wrapped, "layer_idx", -2) or -2), True)
    skip = 1 if wrapped.layer == "penultimate" else 0
    return OpenClipEncoder(
        "clip_g",
        wrapped.model,
        open_clip_tokenizer_info(_open_clip_tokenizer()),
        EncoderSettings(skip=skip, final_norm=False, pooled=True, id_pad=0),
    )


def model_kind(m: Any) -> str:
    if getattr(m, "is_sdxl", False):
        return "sdxl"
    if getattr(m, "is_sd2", False):
        return "sd2"
    # reForge / Forge Classic set is_sd2 False for SD2 (they test the wrapper): look at the wrapped encoder
    wrapped = getattr(getattr(m, "cond_stage_model", None), "wrapped", None)
    if type(wrapped).__name__ == "FrozenOpenCLIPEmbedder":
        return "sd2"
    return "sd1"


def text_encoders(m: Any) -> list[TextEncoder]:
    kind = model_kind(m)
    if kind == "sdxl":
        embedders = m.conditioner.embedders
        texts = [e for e in embedders if getattr(e, "input_key", None) == "txt"]
        if len(texts) != 2:
            msg = (
                "this SDXL model has no CLIP-L + CLIP-G text encoders (refiner models cannot be trained yet)"
            )
            raise RuntimeError(msg)
        return [_clip_l_sdxl(texts[0]), _clip_g_sdxl(texts[1])]
    if kind == "sd2":
        return [_clip_h_sd2(m.cond_stage_model)]
    return [_clip_l_sd1(m.cond_stage_model)]


def _encode_image(m: Any) -> Any:
    is_sdxl = model_kind(m) == "sdxl"
    scale = float(m.scale_factor)

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> LatentDist:
        fsm = m.first_stage_model
        p = next(fsm.parameters())
        x = pixels.to(device=p.device, dtype=p.dtype)
        if is_sdxl:
            moments = fsm.encoder(x)
            if getattr(fsm, "quant_conv", None) is not None:
                moments = fsm.quant_conv(moments)
            mean, logvar = torch.chunk(moments, 2, dim=1)
            std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        else:
            dist = m.encode_first_stage(x)
            mean, std = dist.mean, dist.std
        return LatentDist((mean * scale).float().cpu(), (std * scale).float().cpu())

    return encode


def sdxl_vector(m: Any) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """SDXL's ``vector`` (pooled + the size embeddings of ``time_ids``) from the host's conditioner."""
    size_embedders = [e for e in m.conditioner.embedders if getattr(e, "input_key", None) in SIZE_KEYS]

    def vector(cond: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = cond["time_ids"]
        inputs = {SIZE_KEYS[0]: ids[:, 0:2], SIZE_KEYS[1]: ids[:, 2:4], SIZE_KEYS[2]: ids[:, 4:6]}
        with torch.no_grad():
            sizes = [e(inputs[e.input_key].to(cond["pooled"].device)) for e in size_embedders]
        return torch.cat([cond["pooled"], *[s.to(cond["pooled"].dtype) for s in sizes]], dim=1)

    return vector


def _denoise(m: Any) -> Any:
    if model_kind(m) != "sdxl":

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
            return m.apply_model(x, t, cond["crossattn"])

        return denoise

    vector = sdxl_vector(m)

    def denoise_xl(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return m.apply_model(x, t, {"crossattn": cond["crossattn"], "vector": vector(cond)})

    return denoise_xl


def build_parts(m: Any) -> ModelParts:
    """ModelParts over the host's loaded model ``m`` (``shared.sd_model``)."""
    from modules import devices, sd_models

    info = getattr(m, "sd_checkpoint_info", None)
    still = m

    def still_loaded() -> bool:
        from modules import shared

        if sd_models.model_data.sd_model is not still:
            return False
        wanted = sd_models.get_closet_checkpoint_match(str(shared.opts.sd_model_checkpoint))
        return wanted is None or info is None or wanted.filename == info.filename

    return ModelParts(
        kind=model_kind(m),  # type: ignore[arg-type]
        prompt_encoder=PromptEncoder(text_encoders(m), prompt_settings()),
        denoise=_denoise(m),
        encode_image=_encode_image(m),
        alphas_cumprod=m.alphas_cumprod.detach().float().cpu(),
        prediction="v" if getattr(m, "parameterization", "eps") == "v" else "eps",
        model_hash=(getattr(info, "shorthash", None) or getattr(info, "hash", None) or "") if info else "",
        model_name=getattr(info, "model_name", "") if info else "",
        device=devices.device,
        dtype=devices.dtype_unet,
        still_loaded=still_loaded,
    )


def freeze(m: Any) -> Callable[[], None]:
    """Turn off ``requires_grad`` on every weight of the model; returns the function that turns it back
    on for those that had it."""
    changed = [p for p in m.parameters() if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)

    def restore() -> None:
        for p in changed:
            p.requires_grad_(True)

    return restore

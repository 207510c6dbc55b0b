"""Which adapter each host gets, and what reForge / Forge Classic can do (no test host for them here).

Their code paths were written from their sources (Panchovix/stable-diffusion-webui-reForge main,
Haoming02/sd-webui-forge-classic classic): both keep A1111's embedding database; their text encoders
are ldm_patched CLIP modules (``wrapped.transformer`` with an HF tokenizer) instead of open_clip.
"""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import pytest
import torch
from torch import nn

from lib_ti.host import detect

from .models import hf_tokenizer


def _fake_callbacks(monkeypatch, take_name: bool) -> None:
    mod = types.ModuleType("modules.script_callbacks")
    if take_name:

        def on_ui_tabs(callback, *, name=None):
            return None

    else:

        def on_ui_tabs(callback):
            return None

    mod.on_ui_tabs = on_ui_tabs
    pkg = types.ModuleType("modules")
    pkg.script_callbacks = mod
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", mod)


@pytest.mark.parametrize(
    ("present", "take_name", "version", "expected"),
    [
        (set(), True, "", "a1111"),
        ({"modules_forge", "backend.text_processing"}, True, "2.0.1v1.10.1", "forge"),
        ({"modules_forge", "backend.text_processing"}, False, "neo", "neo"),  # Neo keeps the Forge2 backend
        ({"modules_forge"}, True, "", "reforge"),
        ({"modules_forge"}, False, "classic", "classic"),
    ],
)
def test_host_name(monkeypatch, present, take_name, version, expected):
    from lib_ti.host.adapter import HostAdapter

    monkeypatch.setattr(detect, "_exists", lambda name: name in present)
    version_module = types.ModuleType("modules_forge.forge_version")
    version_module.version = version
    monkeypatch.setitem(sys.modules, "modules_forge", types.ModuleType("modules_forge"))
    monkeypatch.setitem(sys.modules, "modules_forge.forge_version", version_module)
    _fake_callbacks(monkeypatch, take_name)
    assert detect.host_name() == expected
    forge_backend = expected in ("forge", "neo")
    assert detect.is_a1111_style(expected) == (not forge_backend)
    adapter = detect.detect_adapter()
    assert isinstance(adapter, HostAdapter) and adapter.name == expected
    # Forge builds new engines (which read the folder) at every model load: no hook there
    assert (adapter.model_loaded_hook() is None) == forge_backend


def test_every_adapter_provides_the_interface():
    from lib_ti.host.adapter import HostAdapter
    from lib_ti.hostinfo import HostInfo, HostServices

    for name, cls in detect.ADAPTERS.items():
        adapter = cls()
        assert isinstance(adapter, HostAdapter) and adapter.name == name
        assert adapter.label and (name != "neo" or adapter.label == "Forge Neo")
        services = adapter.host_services()
        assert isinstance(services, HostServices)
        info = adapter.host_info(None, 4)
        assert isinstance(info, HostInfo) and (info.name, info.gradio_major, info.service) == (name, 4, None)
        assert info.embeddings_dir == services.embeddings_dir  # one source for the shared fields
        assert info.extra.get("image_embeddings", True) == (name != "classic")


def test_exists_survives_missing_parents():
    assert detect._exists("torch")
    assert not detect._exists("no_such_package_xyz.sub")


def test_every_host_can_train():
    """reForge and Forge Classic train through the ldm_patched backend's parts (tests/host proves the runs)."""
    from lib_ti.host import forks, ldm_patched_model

    for name, cls in detect.ADAPTERS.items():
        services = cls().host_services()
        assert services.training_blocked() is None, name
    for name in ("reforge", "classic"):
        assert issubclass(detect.ADAPTERS[name], forks.LdmPatchedAdapter)
        assert detect.ADAPTERS[name]().host_services().build_parts is forks._parts
    assert forks._parts.__module__ == "lib_ti.host.forks" and ldm_patched_model.build_parts


class _Holder(nn.Module):
    """A1111's EmbeddingsWithFixes keeps the real table as ``.wrapped``."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.wrapped = table


def _ldm_patched_wrapped(width: int) -> types.SimpleNamespace:
    """The attributes reForge / Classic give SDXL's CLIP-G embedder (modules_forge/forge_loader.py)."""
    torch.manual_seed(0)
    text_model = nn.Module()
    text_model.embeddings = nn.Module()
    text_model.embeddings.token_embedding = _Holder(nn.Embedding(49408, width))
    text_model.encoder = nn.Module()
    text_model.encoder.layers = nn.ModuleList(nn.Identity() for _ in range(4))
    text_model.final_layer_norm = nn.LayerNorm(width)
    transformer = nn.Module()
    transformer.text_model = text_model
    projection = nn.Linear(width, width, bias=False)
    return types.SimpleNamespace(
        transformer=transformer, tokenizer=hf_tokenizer(), text_projection=projection, layer="hidden", layer_idx=-2,
        model=types.SimpleNamespace(),  # forge_loader's FakeObject placeholder: not a module, not None
    )  # fmt: skip


def test_reforge_and_classic_text_encoders_serve_token_lookups():
    from lib_ti.host.a1111_model import _clip_g_sdxl, _clip_h_sd2

    wrapped = _ldm_patched_wrapped(1280)
    enc = _clip_g_sdxl(types.SimpleNamespace(wrapped=wrapped))
    assert (enc.key, enc.width) == ("clip_g", 1280)
    assert (enc.settings.skip, enc.settings.final_norm, enc.settings.pooled, enc.settings.id_pad) == (
        1,
        False,
        True,
        0,
    )
    assert enc.projection is wrapped.text_projection
    ids = enc.tokenize("a red car")
    assert len(ids) == 3
    table = wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight
    assert torch.equal(enc.token_vectors(ids), table[ids].detach())
    h = _clip_h_sd2(types.SimpleNamespace(wrapped=_ldm_patched_wrapped(1024)))
    assert (h.key, h.width, h.settings.pooled, h.settings.id_pad, h.settings.final_norm) == (
        "clip_h",
        1024,
        False,
        0,
        True,
    )


def test_sd2_is_recognised_when_the_fork_says_is_sd2_false():
    from lib_ti.host.a1111_model import model_kind

    open_clip_wrapper = type("FrozenOpenCLIPEmbedder", (), {})
    m = types.SimpleNamespace(
        is_sdxl=False, is_sd2=False, cond_stage_model=types.SimpleNamespace(wrapped=open_clip_wrapper())
    )
    assert model_kind(m) == "sd2"
    m.cond_stage_model.wrapped = object()
    assert model_kind(m) == "sd1"


def test_classic_refuses_image_embeddings_in_inspect(tmp_path):
    pytest.importorskip("gradio")
    from lib_ti.embedding import Embedding
    from lib_ti.hostinfo import HostInfo
    from lib_ti.io.formats import write_embedding
    from lib_ti.ui.inspect_view import InspectHandlers

    write_embedding(Embedding("one", {"clip_l": torch.randn(1, 768)}), tmp_path / "one.safetensors")
    info = HostInfo(name="classic", embeddings_dir=lambda: str(tmp_path), extra={"image_embeddings": False})
    _, _, msg = InspectHandlers(info).save_as("one.safetensors", None, "as_png", "png", "same kind", False)
    assert "cannot load embeddings stored in images" in msg
    assert not (tmp_path / "as_png.png").exists()


def test_ldm_patched_vae_encode_scales_once(monkeypatch):
    """reForge / Classic: the posterior mean and std from the backend's VAE encoder, scaled once by the
    model's latent format (the host's own encode_first_stage samples and scales in one step)."""
    from types import ModuleType, SimpleNamespace

    from lib_ti.host import ldm_patched_model

    mm = ModuleType("ldm_patched.modules.model_management")
    loaded: list = []
    mm.load_models_gpu = loaded.append  # type: ignore[attr-defined]
    for mod, name in ((ModuleType("ldm_patched"), "ldm_patched"), (ModuleType("ldm_patched.modules"), "ldm_patched.modules"),
                      (mm, "ldm_patched.modules.model_management")):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["ldm_patched"].modules = sys.modules["ldm_patched.modules"]  # type: ignore[attr-defined]
    sys.modules["ldm_patched.modules"].model_management = mm  # type: ignore[attr-defined]
    torch.manual_seed(0)
    fsm = nn.Module()
    fsm.encoder = nn.Conv2d(3, 8, 8, stride=8)
    fsm.quant_conv = nn.Conv2d(8, 8, 1)
    vae = SimpleNamespace(
        first_stage_model=fsm, device=torch.device("cpu"), vae_dtype=torch.float32, patcher="vae"
    )
    fmt = SimpleNamespace(scale_factor=0.18215, process_in=lambda z: z * 0.18215)
    unet = SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(latent_format=fmt)))
    m = SimpleNamespace(forge_objects=SimpleNamespace(vae=vae, unet=unet))
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    got = ldm_patched_model._encode_image(m)(pixels)
    mean, logvar = fsm.quant_conv(fsm.encoder(pixels)).detach().chunk(2, dim=1)
    torch.testing.assert_close(got.mean, mean * 0.18215)
    torch.testing.assert_close(got.std, torch.exp(0.5 * logvar) * 0.18215)
    assert loaded == [["vae"]]  # loaded through the backend's memory manager first


def test_forget_cached_conditioning_clears_every_holder_in_place(monkeypatch):
    """The hosts keep the last prompt's conditioning in class-level lists (Neo's have three slots) that
    each processing object also holds: cleared in place, every holder sees them empty."""
    from lib_ti.host import webui

    class Processing:
        cached_c: ClassVar[list] = ["key", "cond", {"TI": "x"}]
        cached_uc: ClassVar[list] = ["key", "uncond", {}]

    class Txt2Img(Processing):
        cached_hr_c: ClassVar[list] = ["key", "hr"]
        cached_hr_uc: ClassVar[list] = ["key", "hr-uncond"]

    held = Processing.cached_c  # what p.cached_c refers to in a running job
    mod = types.ModuleType("modules.processing")
    mod.StableDiffusionProcessing = Processing  # type: ignore[attr-defined]
    mod.StableDiffusionProcessingTxt2Img = Txt2Img  # type: ignore[attr-defined]
    pkg = types.ModuleType("modules")
    pkg.processing = mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "modules.processing", mod)
    webui.forget_cached_conditioning()
    assert held == [None, None, None] and held is Processing.cached_c
    assert Processing.cached_uc == [None, None, None]
    assert Txt2Img.cached_hr_c == [None, None] and Txt2Img.cached_hr_uc == [None, None]

"""Gradient-safe calls into the Forge family's UNets (Forge, Forge Neo, Forge Classic, reForge).

These hosts build their models for inference only; three things stand between them and a backward
pass, and each has one remedy here, used by every adapter that needs it:

- weights created under ``torch.inference_mode`` are inference tensors, which autograd cannot save:
  :func:`normal_weights` replaces each by a normal tensor with the same values, in place;
- their transformer blocks add residuals in place (``x += n``), which autograd rejects once those
  tensors are saved: :func:`out_of_place_blocks` swaps in :func:`block_forward` (same arithmetic) for
  one block class, only around our own UNet calls;
- Forge Classic decorates its UNet's ``forward`` with ``torch.inference_mode``:
  :func:`plain_forward` calls the undecorated function.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def normal_weights(modules: list[nn.Module]) -> tuple[int, Callable[[], None]]:
    """Replace every inference-tensor parameter and buffer of ``modules`` by a normal tensor with the
    same values (in place, one tensor at a time; a tensor held in several places, or by modules listed
    twice, gets one replacement everywhere) and turn off ``requires_grad``. Returns the number replaced
    and a function that restores the ``requires_grad`` flags (the values stay: generation is unchanged)."""
    # first every slot of every inference tensor, while all of them are alive (ids are then unique);
    # a replacement is never looked up by id, so a freed tensor's id reused by a new one cannot mislead
    slots: dict[int, tuple[torch.Tensor, list[tuple[dict[str, Any], str]]]] = {}
    for module in modules:
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, t in store.items():
                    if t is not None and t.is_inference():
                        slots.setdefault(id(t), (t, []))[1].append((store, name))
    count = len(slots)
    with torch.inference_mode(False), torch.no_grad():
        for key in list(slots):
            t, where = slots.pop(key)
            new: Any = (
                nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                if isinstance(t, nn.Parameter)
                else t.clone()
            )
            for store, name in where:
                store[name] = new
            del t, where, new  # the old tensor goes now: one extra tensor at a time
    flags: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                flags.append(p)
                p.requires_grad_(False)

    def restore() -> None:
        # the host may have turned some back into inference tensors meanwhile (Forge's encode casts
        # the CLIP tables in inference mode); their flag can only be set in inference mode
        with torch.inference_mode():
            for p in flags:
                try:
                    p.requires_grad_(True)
                except RuntimeError as e:
                    logger.debug("could not restore requires_grad: %s", e)

    return count, restore


def trainable(modules: list[nn.Module]) -> Callable[[], None]:
    """:func:`normal_weights` for a training run or check (logging what it replaced); returns the
    function that restores the ``requires_grad`` flags."""
    count, restore = normal_weights(modules)
    if count:
        logger.info("replaced %d inference tensors of the model by normal tensors (same values)", count)
    return restore


def block_forward(
    self: Any, x: torch.Tensor, context: Any = None, transformer_options: Any = None
) -> torch.Tensor:
    """A BasicTransformerBlock's ``_forward`` without in-place residual adds and without patches (we
    pass none), for Forge's ``backend.nn.unet`` and ldm_patched's ``attention`` blocks alike."""
    if self.ff_in:
        skip = x
        x = self.ff_in(self.norm_in(x))
        if self.is_res:
            x = x + skip
    n = self.norm1(x)
    n = self.attn1(n, context=context if self.disable_self_attn else None, value=None)
    x = x + n
    if self.attn2 is not None:
        n = self.norm2(x)
        n = self.attn2(n, context=context, value=None)
    x = x + n
    skip = x
    x = self.ff(self.norm3(x))
    return x + skip if self.is_res else x


@contextlib.contextmanager
def out_of_place_blocks(cls: type) -> Iterator[None]:
    """Use :func:`block_forward` for ``cls`` inside this context only: as its ``_forward`` where
    ``forward`` wraps one (Forge, Classic: checkpointing), else as its ``forward`` (reForge)."""
    attr = "_forward" if "_forward" in cls.__dict__ else "forward"
    original = cls.__dict__[attr]
    setattr(cls, attr, block_forward)
    try:
        yield
    finally:
        setattr(cls, attr, original)


def plain_forward(net: nn.Module) -> Callable[..., Any]:
    """``net.forward`` without torch's grad-mode decorators (``inference_mode``, ``no_grad``): those
    wrap the function in ``decorate_context`` and keep it as ``__wrapped__``; other wrappers stay."""
    fn = type(net).forward
    while getattr(getattr(fn, "__code__", None), "co_name", "") == "decorate_context" and hasattr(
        fn, "__wrapped__"
    ):
        fn = fn.__wrapped__
    return fn.__get__(net, type(net))


def vae_posterior(
    fsm: Any, pixels: torch.Tensor, device: Any, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unscaled posterior mean and std of a Forge-family VAE (``encoder``, optional ``quant_conv``)
    for ``pixels`` in [-1, 1], computed outside inference mode (normal tensors, no graph), in float32."""
    # inference_mode(False) turns gradients back on: no_grad must come after it
    with torch.inference_mode(False), torch.no_grad():
        moments = fsm.encoder(pixels.to(device=device, dtype=dtype))
        if getattr(fsm, "quant_conv", None) is not None:
            moments = fsm.quant_conv(moments)
        mean, logvar = torch.chunk(moments.float(), 2, dim=1)
        return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


def unet_call(
    net: nn.Module, block_cls: type, dtype: torch.dtype
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``call(x, t, context, y)``: the raw UNet (eps or v output) with gradients to ``context`` and ``y``."""
    forward = plain_forward(net)

    def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        device = next(net.parameters()).device
        with out_of_place_blocks(block_cls):
            out = forward(
                x.to(device, dtype),
                t.to(device).float(),
                context=context.to(device, dtype),
                y=None if y is None else y.to(device, dtype),
                control=None,
                transformer_options={},
            )
        return out.to(x.dtype)

    return call

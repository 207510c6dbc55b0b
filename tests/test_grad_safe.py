"""The Forge family's gradient remedies (:mod:`lib_ti.host.grad_safe`) on real torch modules.

Forge, Neo, Classic and reForge build weights under ``torch.inference_mode``, add residuals in place in
their transformer blocks and (Classic) run their UNet's forward under inference mode. These tests
build modules that do exactly that and check that our call gives the host's values and a gradient to
the conditioning, and that the host's classes are left as they were.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from lib_ti.host import grad_safe
from lib_ti.host.grad_safe import normal_weights


def _inference_model() -> nn.Module:
    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
        model.register_buffer("scale", torch.ones(4))
        model[0].weight.copy_(torch.randn(16, 8))
    return model


def test_inference_weights_block_backward_until_replaced():
    model = _inference_model()
    assert all(p.is_inference() for p in model.parameters())
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        model(x).sum().backward()
    with torch.inference_mode():
        reference = model(x.detach()).clone()
    count, restore = normal_weights([model])
    assert count == 7  # 6 parameters and 1 buffer
    assert not any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    assert not any(p.requires_grad for p in model.parameters())
    out = model(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # only the input got a gradient
    assert torch.equal(out.detach(), reference)  # same values: generation is unchanged
    restore()
    assert all(p.requires_grad for p in model.parameters())


def test_shared_tensors_stay_shared():
    with torch.inference_mode():
        table = nn.Embedding(10, 4)
    wrapper = nn.Module()
    wrapper.wrapped = table
    wrapper.weight = table.weight  # Forge's CLIPEmbeddingForTextualInversion aliases the table like this
    count, _ = normal_weights([wrapper])
    assert count == 1
    assert wrapper.weight is table.weight and not table.weight.is_inference()


def test_restore_survives_weights_turned_back_into_inference_tensors():
    model = _inference_model()
    _, restore = normal_weights([model])
    with torch.inference_mode():  # what Forge's encode does to the CLIP tables between steps
        model[1].weight.data = model[1].weight.data.to(torch.float64).float()
    restore()  # does not raise


def test_normal_model_is_left_alone():
    model = nn.Linear(3, 3)
    before = model.weight
    count, restore = normal_weights([model])
    assert count == 0 and model.weight is before
    restore()
    assert model.weight.requires_grad


class ResidualBlock(nn.Module):
    """ldm_patched / Forge shape: ``forward`` wraps ``_forward``, which adds residuals in place."""

    ff_in = None
    is_res = True
    disable_self_attn = False

    def __init__(self, dim: int, ctx: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, ctx)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x, context=None, transformer_options=None):
        return self._forward(x, context, transformer_options or {})

    def _forward(self, x, context=None, transformer_options=None):
        n = self.attn1(self.norm1(x), context=None, value=None)
        x += n
        n = self.attn2(self.norm2(x), context=context, value=None)
        x += n
        skip = x
        x = self.ff(self.norm3(x))
        x += skip
        return x


class ForwardOnlyBlock(ResidualBlock):
    """reForge's shape: the whole block is ``forward`` (no ``_forward``)."""

    forward = ResidualBlock._forward


class Attention(nn.Module):
    def __init__(self, dim: int, ctx: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (
            nn.Linear(dim, dim),
            nn.Linear(ctx, dim),
            nn.Linear(ctx, dim),
            nn.Linear(dim, dim),
        )

    def forward(self, x, context=None, value=None):
        c = x if context is None else context
        w = torch.softmax(self.q(x) @ self.k(c).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.out(w @ self.v(c))


class Net(nn.Module):
    """Classic's UNet shape: ``forward`` under ``torch.inference_mode``, ldm_patched's signature."""

    def __init__(self, block_cls: type, dim: int = 8, ctx: int = 6) -> None:
        super().__init__()
        self.proj = nn.Linear(4, dim)
        self.blocks = nn.ModuleList([block_cls(dim, ctx), block_cls(dim, ctx)])
        self.head = nn.Linear(dim, 4)

    @torch.inference_mode()
    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None):
        h = self.proj(x.flatten(2).transpose(1, 2)) + timesteps.float()[:, None, None] / 1000
        for block in self.blocks:
            h = block(h, context=context)
        return self.head(h).transpose(1, 2).reshape(x.shape)


def _inference_net(block_cls: type) -> Net:
    torch.manual_seed(0)
    with torch.inference_mode():
        return Net(block_cls)


@pytest.mark.parametrize("block_cls", [ResidualBlock, ForwardOnlyBlock])
def test_unet_call_gives_the_hosts_values_and_a_gradient(block_cls):
    net = _inference_net(block_cls)
    x, t, ctx = torch.randn(1, 4, 2, 2), torch.tensor([500]), torch.randn(1, 3, 6)
    with torch.inference_mode():
        theirs = net(x, t, context=ctx).clone()
    c = ctx.clone().requires_grad_()
    out = net(x, t, context=c)  # the host's own forward: no graph at all
    assert out.is_inference() and not out.requires_grad
    original = dict(vars(block_cls))
    count, restore = normal_weights([net])
    assert count > 0
    call = grad_safe.unet_call(net, block_cls, torch.float32)
    ours = call(x, t, c, None)
    ours.square().mean().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    assert torch.allclose(ours.detach(), theirs, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())  # only the conditioning got a gradient
    assert dict(vars(block_cls)) == original  # the host's block class is as it was
    restore()


def test_in_place_residuals_fail_without_the_swap():
    net = _inference_net(ResidualBlock)
    normal_weights([net])
    c = torch.randn(1, 3, 6, requires_grad=True)
    out = grad_safe.plain_forward(net)(torch.randn(1, 4, 2, 2), torch.tensor([1]), context=c)
    with pytest.raises(RuntimeError, match="inplace|in-place"):
        out.sum().backward()


def test_plain_forward_unwraps_only_torch_grad_modes():
    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapper

    calls: list[str] = []

    class Wrapped(nn.Linear):
        @torch.no_grad()
        @logged
        def forward(self, x):
            return super().forward(x)

    m = Wrapped(2, 2)
    x = torch.randn(1, 2, requires_grad=True)
    assert not m(x).requires_grad
    out = grad_safe.plain_forward(m)(x)
    assert out.requires_grad and calls == ["forward", "forward"]  # the extension-style wrapper still runs


def test_modules_listed_twice_keep_every_tensor_in_its_place():
    """A wrapper listed beside the module it wraps (SDXL's conditioner around the CLIP encoders): the
    second visit sees the new tensors; none may be taken for a freed old one whose id it reuses."""
    with torch.inference_mode():
        inner = nn.Sequential(
            *[nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3)) for _ in range(40)]
        )
    outer = nn.Module()
    outer.inner = inner
    outer.alias = inner[3][0].weight  # registered twice, as the loaders' aliases are
    before = {n: (tuple(p.shape), p.detach().clone()) for n, p in inner.named_parameters()}
    count, _ = normal_weights([inner, outer, inner])
    assert count == len(before)
    for n, p in inner.named_parameters():
        assert (tuple(p.shape), p.is_inference()) == (before[n][0], False), n
        assert torch.equal(p.detach(), before[n][1]), n
    assert outer.alias is inner[3][0].weight

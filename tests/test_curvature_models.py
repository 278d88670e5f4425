"""Small float64 models and dense ground truth shared by the curvature tests.

Dense Hessians come from ``torch.autograd.functional.hessian`` (never ``torch.func.hessian``,
which is wrong through LayerNorm on torch 2.13, spec §2).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from quotientsharp.functional import math_attention


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny float64 models run far faster on one intra-op thread (and the CI box is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp_with_layernorm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3)).double()


class SDPATransformer(nn.Module):
    """One pre-LN transformer block using ``F.scaled_dot_product_attention``, mean-pooled head."""

    def __init__(self, d_in: int = 4, d_model: int = 8, n_heads: int = 2, n_classes: int = 3):
        super().__init__()
        self.n_heads = n_heads
        self.embed = nn.Linear(d_in, d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x):
        h = self.embed(x)
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        h = h + self.proj(attn)
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


def transformer(seed: int = 0, d_model: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return SDPATransformer(d_model=d_model).double()


def classification_data(n: int, shape: tuple, n_classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, n_classes, (n,), generator=g)


def flat_loss(model: nn.Module, X, y, names: list[str] | None = None, loss_fn=F.cross_entropy):
    """(θ_flat, θ ↦ L(θ)) over the parameters ``names`` (default: all)."""
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def loss(flat):
        parts = flat.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        return loss_fn(functional_call(model, params, (X,), strict=False), y)

    return theta, loss


def dense_hessian(model: nn.Module, X, y, names: list[str] | None = None, loss_fn=F.cross_entropy) -> torch.Tensor:
    theta, loss = flat_loss(model, X, y, names, loss_fn)
    with math_attention():
        return torch.autograd.functional.hessian(loss, theta, vectorize=True)


def test_sdpa_default_backend_has_no_double_backward():
    """Why every HVP enters math_attention(): the fused CPU kernel cannot be differentiated twice."""
    model = transformer()
    X, y = classification_data(4, (5, 4))
    theta, loss = flat_loss(model, X, y)
    theta = theta.requires_grad_()
    (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented|derivative"):
        torch.autograd.grad(g @ torch.ones_like(g), theta)
    with math_attention():
        (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
        (hv,) = torch.autograd.grad(g @ torch.ones_like(g), theta)
    assert torch.isfinite(hv).all() and hv.abs().sum() > 0

"""Shared small models and data for the sharpness tests (no tests here)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quotientsharp import AttentionGL, GLBlock, Piece, Quotient
from quotientsharp.models import MultiHeadSelfAttention


class TinyAttentionClassifier(nn.Module):
    """``n_layers`` residual self-attention layers, mean pool, linear head: ``(B, T, d) -> (B, C)``."""

    def __init__(self, d: int = 8, n_heads: int = 2, n_layers: int = 1, n_classes: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(MultiHeadSelfAttention(d, n_heads) for _ in range(n_layers))
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x.mean(dim=1))


def attention_blocks(model: TinyAttentionClassifier) -> list[GLBlock]:
    """QK and VO GL blocks of every layer, written by hand."""
    blocks = []
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        h, n = layer.head_dim, layer.n_heads
        blocks.append(GLBlock((Piece(p + "q.weight", "rows"), Piece(p + "q.bias", "bias")),
                              (Piece(p + "k.weight", "rows"), Piece(p + "k.bias", "bias")), n, h, f"L{i}.QK"))
        blocks.append(GLBlock((Piece(p + "v.weight", "rows"), Piece(p + "v.bias", "bias")),
                              (Piece(p + "o.weight", "cols"),), n, h, f"L{i}.VO"))
    return blocks


def attention_quotient(model, metric: str = "mix", eps_rel: float = 0.0, **kw) -> Quotient:
    return Quotient.from_model(model, [AttentionGL(attention_blocks(model), metric, eps_rel=eps_rel)], **kw)


def attention_setup(seed: int = 0, n_layers: int = 1, dtype=torch.float64, n_batches: int = 2, batch: int = 6):
    """A random float64 attention classifier and a few fixed batches of random tokens."""
    torch.manual_seed(seed)
    model = TinyAttentionClassifier(n_layers=n_layers).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(batch, 5, 8, generator=g, dtype=torch.float64).to(dtype),
                torch.randint(0, 3, (batch,), generator=g))
               for _ in range(n_batches)]
    return model, batches


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(autouse=False)
def one_thread():
    """Run a test on one intra-op thread (the shared 2-core machine thrashes with more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trust_region_max(g: torch.Tensor, A: torch.Tensor, r: float) -> float:
    """``max_{||d|| <= r} g^T d + 1/2 d^T A d`` (A symmetric), by eigendecomposition and bisection on
    the secular equation ``||(mu I - A)^{-1} g|| = r``, ``mu >= max(lambda_max, 0)`` (float64)."""
    g, A = g.double(), A.double()
    lam, V = torch.linalg.eigh(A)
    gt = V.T @ g

    def value(d):
        return float(g @ d + 0.5 * d @ A @ d)

    if lam[-1] < 0:
        d = -torch.linalg.solve(A, g)
        if d.norm() <= r:
            return value(d)
    lo, hi = max(float(lam[-1]), 0.0), max(float(lam[-1]), 0.0) + float(g.norm()) / r + 1.0
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        if float((gt / (mu - lam)).norm()) > r:
            lo = mu
        else:
            hi = mu
    return value(V @ (gt / (hi - lam)))

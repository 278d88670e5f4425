"""An explicit multi-head attention module, the one quotientsharp's studies use.

Written out with matmuls and softmax (no fused ``scaled_dot_product_attention``) so that
double backward and forward-over-reverse HVPs work on every backend. The four projections are
separate ``nn.Linear`` layers named ``q``, ``k``, ``v`` and ``o``; head ``i`` owns output rows
``[i*head_dim, (i+1)*head_dim)`` of ``q``, ``k`` and ``v`` and input columns of ``o``.
:func:`quotientsharp.adapters.find_symmetries` recognises the module by type.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class MultiHeadSelfAttention(nn.Module):
    """softmax((x Wq + bq)(x Wk + bk)^T / sqrt(d_h)) (x Wv + bv) Wo + bo, per head.

    Input ``x``: ``(batch, tokens, d_model)``; output the same shape. ``mask`` (optional) is a
    boolean ``(batch, tokens)`` key-padding mask, True where a token is padding.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.k = nn.Linear(d_model, d_model, bias=bias)
        self.v = nn.Linear(d_model, d_model, bias=bias)
        self.o = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (b, H, n, d_h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
        attn = self.dropout(scores.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(x.shape)
        return self.o(out)

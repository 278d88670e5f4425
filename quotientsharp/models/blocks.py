"""Pre-LN transformer block shared by :class:`TinyViT` and :class:`TextTransformer`."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from quotientsharp.models.attention import MultiHeadSelfAttention


class TransformerBlock(nn.Module):
    """``x + attn(LN(x))`` then ``x + MLP(LN(x))`` with a GELU MLP ``d_model → mlp_dim → d_model``.

    Input ``x``: ``(batch, tokens, d_model)``; output the same shape. ``mask`` (optional) is the
    boolean ``(batch, tokens)`` key-padding mask of :class:`MultiHeadSelfAttention`.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadSelfAttention(d_model, n_heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict(
            fc1=nn.Linear(d_model, mlp_dim),
            act=nn.GELU(),
            drop=nn.Dropout(dropout),
            fc2=nn.Linear(mlp_dim, d_model),
        ))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), mask))
        return x + self.dropout(self.mlp(self.ln2(x)))

"""A small text-classification transformer over a word vocabulary, trained from scratch."""
from __future__ import annotations

import torch
from torch import nn

from quotientsharp.models.blocks import TransformerBlock


class TextTransformer(nn.Module):
    """Token embedding + learned positions + CLS token, pre-LN blocks, linear head on CLS.

    Input: LongTensor ``(batch, T)`` of token ids with ``T ≤ max_len``, padded with ``pad_id``
    (anywhere; padding positions are masked out as attention keys, so they never reach the CLS
    token). Output logits ``(batch, n_classes)``.
    """

    def __init__(
        self,
        vocab_size: int,
        n_classes: int,
        max_len: int = 32,
        d_model: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        mlp_dim: int = 128,
        dropout: float = 0.0,
        pad_id: int = 0,
    ):
        super().__init__()
        self.max_len, self.pad_id = max_len, pad_id
        self.token_embed = nn.Embedding(vocab_size, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.randn(1, max_len + 1, d_model) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, mlp_dim, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.token_embed(tokens)], dim=1)
        x = self.dropout(x + self.pos_embed[:, : t + 1])
        cls_padding = torch.zeros(b, 1, dtype=torch.bool, device=tokens.device)
        padding = torch.cat([cls_padding, tokens == self.pad_id], dim=1)
        for block in self.blocks:
            x = block(x, padding)
        return self.head(self.norm(x[:, 0]))

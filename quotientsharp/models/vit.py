"""A tiny Vision Transformer trained from scratch (digits, MNIST, Fashion-MNIST)."""
from __future__ import annotations

import torch
from torch import nn

from quotientsharp.models.blocks import TransformerBlock


class TinyViT(nn.Module):
    """Linear patch embedding, CLS token, learned positions, pre-LN blocks, linear head on CLS.

    Input: float ``(batch, in_channels, image_size, image_size)``; output logits
    ``(batch, n_classes)``. The image is cut into ``(image_size / patch_size)²`` non-overlapping
    patches, each flattened (channel-major) and mapped by ``patch_embed`` to ``d_model``.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        n_classes: int = 10,
        d_model: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        mlp_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_channels * patch_size**2, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.randn(1, self.n_patches + 1, d_model) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, mlp_dim, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, n_patches, C·p·p)``, patches in row-major order."""
        b, c, h, w = images.shape
        if (c, h, w) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}), got {tuple(images.shape)}"
            )
        p = self.patch_size
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, self.n_patches, c * p * p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.patchify(images))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.dropout(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))

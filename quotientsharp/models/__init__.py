"""Models used by quotientsharp's studies and tests."""
from quotientsharp.models.attention import MultiHeadSelfAttention
from quotientsharp.models.blocks import TransformerBlock
from quotientsharp.models.diagonal import DiagonalNet
from quotientsharp.models.mlp import MLP
from quotientsharp.models.text import TextTransformer
from quotientsharp.models.vit import TinyViT

__all__ = [
    "MultiHeadSelfAttention",
    "TransformerBlock",
    "TinyViT",
    "TextTransformer",
    "DiagonalNet",
    "MLP",
]

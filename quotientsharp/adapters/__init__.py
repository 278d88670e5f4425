"""Model adapters: find the symmetric blocks of real models and build their quotient."""
from .attention import UnsupportedAttentionError, conv1d_blocks, linear_attention_blocks, mha_blocks
from .discover import attention_blocks, attention_layers, find_symmetries
from .modern import LayerSymmetry, Slot, grouped_attention
from .resolve import default_quotient

__all__ = ["find_symmetries", "default_quotient", "attention_blocks", "linear_attention_blocks", "mha_blocks",
           "conv1d_blocks", "UnsupportedAttentionError", "attention_layers", "LayerSymmetry", "Slot",
           "grouped_attention"]

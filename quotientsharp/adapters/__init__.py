"""Model adapters: find the symmetric blocks of real models and build their quotient."""
from .attention import (UnsupportedAttentionError, conv1d_blocks, linear_attention_blocks,
                        mha_blocks)
from .discover import attention_blocks, find_symmetries
from .resolve import default_quotient

__all__ = ["find_symmetries", "default_quotient", "attention_blocks", "linear_attention_blocks", "mha_blocks",
           "conv1d_blocks", "UnsupportedAttentionError"]

"""Test-only torchvision stub: ``FrozenBatchNorm2d`` placeholder (timm imports it at import time)."""
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Placeholder: raises when constructed."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision.ops.misc.FrozenBatchNorm2d is a test-only stub (tests/stubs/torchvision)")

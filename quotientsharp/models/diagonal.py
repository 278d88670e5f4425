"""Diagonal linear network ``f(x) = xᵀ(u ⊙ v)`` (Pesme et al. 2021; sharpness.md §7)."""
from __future__ import annotations

import math

import torch
from torch import nn


class DiagonalNet(nn.Module):
    """``x @ (u * v)``: input ``(batch, d)``, output ``(batch,)``; parameters ``u, v``: ``(d,)``.

    Initialised as in Pesme et al. (2021): ``u = √2·init_scale·1``, ``v = 0``, so the predictor
    ``β = u ⊙ v`` starts at 0 and ``init_scale`` (α) controls the implicit bias. ``dtype``
    defaults to float64, the dtype of :func:`quotientsharp.data.diagonal_regression`.
    """

    def __init__(self, d: int, init_scale: float = 0.1, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.u = nn.Parameter(torch.full((d,), math.sqrt(2.0) * init_scale, dtype=dtype))
        self.v = nn.Parameter(torch.zeros(d, dtype=dtype))

    @property
    def beta(self) -> torch.Tensor:
        """The linear predictor ``u ⊙ v``, shape ``(d,)``."""
        return self.u * self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.u * self.v)

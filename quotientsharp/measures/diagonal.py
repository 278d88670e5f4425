"""Conveniences for diagonal linear networks ``x^T (u * v)`` (spec part 2 §5, §7).

Use with :func:`~quotientsharp.measures.geodesic_sharpness`, e.g. ::

    q = diagonal_quotient("mix", mixed_domain="extend")
    geodesic_sharpness(DiagonalNet(d), [(X, y)], sum_squared_error, rho, quotient=q,
                       n_iter=100, n_restarts=4)
"""
from __future__ import annotations

import torch

from ..groups.diagonal import DiagonalRescaling
from ..quotient import Quotient


def sum_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's loss ``||X(u * v) - y||^2`` (a sum over the batch, not a mean)."""
    return (outputs - targets).pow(2).sum()


def diagonal_quotient(metric: str = "inv", mixed_domain: str = "restrict", u: str = "u",
                      v: str = "v") -> Quotient:
    """``Quotient([DiagonalRescaling(u, v, metric, mixed_domain)])`` with the closed-form
    (``"exact"``) geodesics."""
    return Quotient([DiagonalRescaling(u, v, metric, mixed_domain)], names=(u, v), order="exact")

"""Synthetic data regenerated from a seed: sparse diagonal-net regression and Gaussian blobs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from quotientsharp.data.common import ClassificationData, tensor_data


@dataclass
class RegressionData:
    """``y = X β* + σξ``: ``X_*`` ``(n, d)``, ``y_*`` ``(n,)``, ``beta_star`` ``(d,)``."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    beta_star: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)


def n_nonzeros(d: int, sparsity: float) -> int:
    """⌈(1 − sparsity)·d⌉, robust to round-off in ``1 − sparsity``."""
    return math.ceil(round((1.0 - sparsity) * d, 9))


def diagonal_regression(
    d: int = 200,
    n_train: int = 100,
    n_test: int = 1000,
    sparsity: float = 0.9,
    noise: float = 0.0,
    seed: int = 0,
    orthonormal: bool = False,
    dtype: torch.dtype = torch.float64,
) -> RegressionData:
    """Sparse linear regression for diagonal nets (data.md, sharpness.md §7).

    Rows of ``X`` are iid ``N(0, I_d)``; ``β*`` has ``⌈(1 − sparsity)·d⌉`` non-zeros at random
    positions with ``N(0, 1)`` values; ``y = Xβ* + noise·ξ``. The test rows are fresh Gaussian
    rows with the same ``β*``. ``orthonormal=True`` (needs ``n_train ≥ d``) replaces ``X_train``
    by the Q factor of a Gaussian ``n_train × d`` matrix, so ``X_trainᵀ X_train = I_d``; the test
    rows stay Gaussian. Everything is drawn in float64 from one ``torch.Generator`` seeded with
    ``seed``, then cast to ``dtype``.
    """
    if orthonormal and n_train < d:
        raise ValueError(f"orthonormal columns need n_train >= d, got n_train={n_train}, d={d}")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    X_train = torch.randn(n_train, d, generator=gen, dtype=f64)
    if orthonormal:
        X_train = torch.linalg.qr(X_train, mode="reduced").Q
    k = n_nonzeros(d, sparsity)
    beta_star = torch.zeros(d, dtype=f64)
    beta_star[torch.randperm(d, generator=gen)[:k]] = torch.randn(k, generator=gen, dtype=f64)
    y_train = X_train @ beta_star + noise * torch.randn(n_train, generator=gen, dtype=f64)
    X_test = torch.randn(n_test, d, generator=gen, dtype=f64)
    y_test = X_test @ beta_star + noise * torch.randn(n_test, generator=gen, dtype=f64)
    meta = dict(source="diagonal_regression", d=d, n_train=n_train, n_test=n_test,
                sparsity=sparsity, n_nonzeros=k, noise=noise, seed=seed, orthonormal=orthonormal,
                loss="sum of squares ||X(u*v) - y||^2")
    tensors = (t.to(dtype) for t in (X_train, y_train, X_test, y_test, beta_star))
    return RegressionData(*tensors, meta=meta)


def blobs(
    n: int = 256,
    d: int = 4,
    n_classes: int = 3,
    n_test: int = 256,
    separation: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ClassificationData:
    """Gaussian blobs: class means ``~ N(0, separation²·I_d)``, points ``mean + N(0, I_d)``.

    Inputs ``(n, d)`` / ``(n_test, d)`` of ``dtype``, labels balanced (``i mod n_classes``, in a
    random order). Train and test are independent draws around the same means.
    """
    gen = torch.Generator().manual_seed(seed)
    means = separation * torch.randn(n_classes, d, generator=gen, dtype=torch.float64)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(m) % n_classes)[torch.randperm(m, generator=gen)]
        x = means[labels] + torch.randn(m, d, generator=gen, dtype=torch.float64)
        return x.to(dtype), labels

    train, test = draw(n), draw(n_test)
    meta = dict(source="blobs", n_train=n, n_test=n_test, d=d, separation=separation, seed=seed)
    return ClassificationData(tensor_data(*train), tensor_data(*test), n_classes, meta)

"""Kendall τ-a between a sharpness measure and generalization, with a bootstrap CI (spec part 2 §8)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np


def _sign_products(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """``S_ij = sign(x_i − x_j)·sign(y_i − y_j)`` (zero diagonal)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("Kendall τ needs at least two points")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("Kendall τ needs finite values")
    return np.sign(x[:, None] - x[None, :]) * np.sign(y[:, None] - y[None, :])


def has_ties(values: Sequence[float]) -> bool:
    """Whether two of ``values`` are equal (then Kendall τ-a cannot reach ±1)."""
    return len(np.unique(np.asarray(values, dtype=float))) < len(values)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """τ-a ``= 2/(M(M−1)) Σ_{i<j} sign(x_i − x_j) sign(y_i − y_j)``.

    Equals scipy's τ-b when neither sequence has ties; warns when one has (then τ-a ≠ τ-b).
    """
    s = _sign_products(x, y)
    if has_ties(x) or has_ties(y):
        warnings.warn("Kendall τ: tied values, τ-a differs from τ-b", RuntimeWarning, stacklevel=2)
    m = len(s)
    return float(s.sum() / (m * (m - 1)))


def _bootstrap_taus(s: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """τ-a of every resample ``idx`` (rows of model indices) from the sign products ``s``,
    counting only pairs of distinct original models."""
    m = s.shape[0]
    pairs = s[idx[:, :, None], idx[:, None, :]].sum(axis=(1, 2)) / 2
    same = (idx[:, :, None] == idx[:, None, :]).sum(axis=(1, 2))  # includes the m diagonal terms
    distinct = m * (m - 1) / 2 - (same - m) / 2
    return np.divide(pairs, distinct, out=np.zeros(len(idx)), where=distinct > 0)


def bootstrap_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of τ-a, resampling models with replacement.

    A resample counts only pairs of distinct original models, so duplicated models do not
    shrink τ toward 0 as spurious ties would.
    """
    s = _sign_products(x, y)
    idx = np.random.default_rng(seed).integers(0, len(s), size=(n_boot, len(s)))
    lo, hi = np.quantile(_bootstrap_taus(s, idx), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_difference_ci(x1: Sequence[float], x2: Sequence[float], y: Sequence[float], n_boot: int = 2000,
                            level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``τ(x1, y) − τ(x2, y)`` and its paired percentile bootstrap CI: both measures on the same
    resampled models, so the CI reflects how much better one measure ranks the *same* population
    (much narrower than comparing two separate intervals)."""
    s1, s2 = _sign_products(x1, y), _sign_products(x2, y)
    m = len(s1)
    idx = np.random.default_rng(seed).integers(0, m, size=(n_boot, m))
    diff = _bootstrap_taus(s1, idx) - _bootstrap_taus(s2, idx)
    lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    point = float((s1.sum() - s2.sum()) / (m * (m - 1)))
    return point, float(lo), float(hi)

"""Rényi spectral entropy and Rényi sharpness (spec §6).

For eigenvalues λ₁..λ_n and a mass ``μ(λ) ≥ 0`` (the normalizer policy), ``p_i = μ(λ_i)/S₁`` and

    H_α = (log S_α − α log S₁) / (1 − α),   S_α = Σ_i μ(λ_i)^α,  S₁ = Σ_i μ(λ_i)  (α > 0, α ≠ 1),
    H_1 = log S₁ − Σ_i μ(λ_i) log μ(λ_i) / S₁                                   (``alpha="shannon"``),

and Rényi sharpness = −H_α. Policies: ``"abs"`` (default) ``μ = |λ|`` (entropy of the spectrum of
``|H|``; 0 ≤ H_α ≤ log n); ``"signed"`` reproduces the paper's code: ``S_α = Σ|λ|^α`` but S₁ = Σ λ
(warns when ``Tr|H| − Tr H > 1% of Tr|H|``, raises when Tr H ≤ 0); ``"clamp"`` μ = max(λ, 0).
From an :class:`~quotientsharp.curvature.slq.SLQResult` every sum is the probe-averaged SLQ
estimate and H_α is formed from those averages (not averaged per probe).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import torch

from quotientsharp.curvature.results import jsonable
from quotientsharp.curvature.slq import SLQResult

NORMALIZERS = ("abs", "signed", "clamp")


@dataclasses.dataclass
class RenyiResult:
    """``estimate`` = H_α (entropy), ``sharpness`` = −H_α; ``s_alpha``/``s_1`` the two sums
    (for Shannon ``s_alpha`` is Σ μ log μ). From SLQ: ``stderr`` is the jackknife over probes and
    ``samples`` ``(P, 2)`` holds the per-probe (s_alpha, s_1) values."""

    estimate: float
    alpha: float | str
    normalizer: str
    s_alpha: float
    s_1: float
    stderr: float | None = None
    samples: torch.Tensor | None = None
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def sharpness(self) -> float:
        """Rényi sharpness ``-H_alpha`` (the negated entropy estimate: larger is sharper)."""
        return -self.estimate

    @property
    def value(self) -> float:
        """The measure's number, the field every result shares: Rényi sharpness ``-H_alpha``
        (``estimate`` is the entropy ``H_alpha``)."""
        return self.sharpness

    def to_dict(self) -> dict:
        """The record as JSON-ready data (:func:`quotientsharp.serialize.jsonable`) plus ``sharpness``."""
        return {**jsonable(self), "sharpness": self.sharpness}


def _mass(normalizer: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda t: t.clamp(min=0)) if normalizer == "clamp" else torch.abs


def _xlogx(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t * torch.log(torch.where(t > 0, t, 1.0)), torch.zeros_like(t))


def _entropy(s_alpha: torch.Tensor, s_1: torch.Tensor, alpha: float | str) -> torch.Tensor:
    if alpha == "shannon":
        return torch.log(s_1) - s_alpha / s_1
    return (torch.log(s_alpha) - alpha * torch.log(s_1)) / (1 - alpha)


def _check_alpha(alpha: float | str) -> None:
    if isinstance(alpha, str):
        if alpha != "shannon":
            raise ValueError(f"alpha must be a positive number or 'shannon', got {alpha!r}")
        return
    if alpha <= 0:
        raise ValueError(f"Rényi order alpha must be > 0, got {alpha}")
    if alpha == 1:
        raise ValueError("alpha = 1 is the Shannon limit of the Rényi entropy; pass alpha='shannon'")


def renyi_entropy(spectrum: torch.Tensor | SLQResult, alpha: float | str = 0.5, normalizer: str = "abs") -> RenyiResult:
    """H_α of exact eigenvalues (1-D tensor) or of an SLQ result; see the module docstring.

    Raises ``ValueError`` for α ≤ 0, α = 1, an unknown normalizer, or S₁ ≤ 0.
    """
    _check_alpha(alpha)
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    mass = _mass(normalizer)
    numerator = (lambda t: _xlogx(mass(t))) if alpha == "shannon" else (lambda t: mass(t) ** alpha)
    denominator = (lambda t: t) if normalizer == "signed" else mass

    if isinstance(spectrum, SLQResult):
        samples = torch.stack([
            spectrum.spectral_sum(numerator).samples, spectrum.spectral_sum(denominator).samples,
        ], 1)
        abs_trace = spectrum.abs_power_trace(1.0).value
        config = {**spectrum.config, "source": "slq"}
    else:
        eigenvalues = spectrum.to(torch.float64).reshape(-1)
        samples = torch.stack([numerator(eigenvalues).sum(), denominator(eigenvalues).sum()])[None]
        abs_trace = float(eigenvalues.abs().sum())
        config = {"source": "eigenvalues", "n": eigenvalues.numel()}
    s_alpha, s_1 = samples.mean(0)
    if s_1 <= 0:
        what = "Tr H" if normalizer == "signed" else f"the {normalizer!r} spectral mass S₁"
        raise ValueError(f"{what} = {float(s_1):.4g} ≤ 0: the Rényi entropy is undefined")
    if normalizer == "signed" and abs_trace - float(s_1) > 0.01 * abs_trace:
        warnings.warn(
            f"normalizer='signed': Tr|H| − Tr H = {abs_trace - float(s_1):.4g} exceeds 1% of Tr|H| "
            f"= {abs_trace:.4g}; p does not sum to 1 and H_α is not a Rényi entropy",
            stacklevel=2,
        )
    return RenyiResult(
        estimate=float(_entropy(s_alpha, s_1, alpha)),
        alpha=alpha,
        normalizer=normalizer,
        s_alpha=float(s_alpha),
        s_1=float(s_1),
        stderr=_jackknife_stderr(samples, alpha) if samples.shape[0] > 1 else None,
        samples=samples if samples.shape[0] > 1 else None,
        config=config,
    )


def _jackknife_stderr(samples: torch.Tensor, alpha: float | str) -> float:
    """Leave-one-probe-out standard error of H_α formed from the probe-averaged sums."""
    p = samples.shape[0]
    leave_one_out = (samples.sum(0, keepdim=True) - samples) / (p - 1)
    values = _entropy(leave_one_out[:, 0], leave_one_out[:, 1], alpha)
    return float(math.sqrt((p - 1) / p * float(((values - values.mean()) ** 2).sum())))

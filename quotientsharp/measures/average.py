"""Average-case sharpness on one batch (spec part 2 §1, §3.4).

``E_zeta[L_S(gamma_xi(1)) - L_S(w0)]`` with ``xi = rho * Pi(whiten(zeta))``, ``zeta ~ N(0, I)``:
a standard Gaussian on the horizontal space with per-coordinate standard deviation ``rho`` in
metric-orthonormal coordinates (``avg_scale="gaussian"``), or that direction rescaled to norm
exactly ``rho`` (``avg_scale="sphere"``). Evaluated under ``no_grad``.

``antithetic=True`` evaluates every draw at ``+xi`` and ``-xi`` and records
``(L(gamma_xi(1)) + L(gamma_{-xi}(1)))/2 - L(w0)`` as its sample: the same expectation (the
distribution of xi is symmetric), with the first-order term ``<grad L, xi>`` cancelled exactly,
which otherwise dominates the variance at small rho (2 loss evaluations per draw).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import tangent as T
from ..quotient import Quotient
from .feasible import (
    MAX_RELATIVE_PERTURBATION,  # noqa: F401  (re-exported)
    HorizontalBall,
    relative_perturbation,
    warn_large_perturbation,
)
from .solver import Endpoint, Objective

SCALES = ("gaussian", "sphere")


@dataclass
class AverageResult:
    base_loss: float
    increases: list[float]  # L_S(gamma_xi_s(1)) - L_S(w0) per sample
    base_error: float | None
    error_increase: float | None  # mean over samples
    max_relative_perturbation: float | None  # max over samples and GL blocks of ||xi_G|| / ||G||

    @property
    def increase(self) -> float:
        return sum(self.increases) / len(self.increases)

    @property
    def stderr(self) -> float:
        """Standard error of :attr:`increase` over the samples (0 for one sample)."""
        n = len(self.increases)
        if n < 2:
            return 0.0
        m = self.increase
        return math.sqrt(sum((x - m) ** 2 for x in self.increases) / (n - 1) / n)


def _nonfinite_message(sample: int, losses: list[float], rel: float | None) -> str:
    where = "" if rel is None else f"; the draw reaches {rel:.3g}× a GL block's norm"
    return (f"average-case loss is not finite at sample {sample} ({losses}){where}. A near-zero or "
            "near-singular block makes the whitened draws explode (the quotient geometry degenerates "
            "there); check the weights, use a smaller rho or another metric")


def average_increase(objective: Objective, quotient: Quotient, w0: Mapping, rho: float, n_samples: int,
                     generator: torch.Generator, order: int | str = 2, rest_order: int | str = 1,
                     avg_scale: str = "gaussian", ode_kw: Mapping | None = None,
                     antithetic: bool = False) -> AverageResult:
    """``n_samples`` draws of the loss increase at ``gamma_xi(1)`` on one batch (no autograd);
    ``antithetic``: each draw is the mean over ``±xi``. A non-finite loss at a draw raises
    ``ValueError`` (an average over it would be a silent NaN)."""
    with torch.no_grad():
        return _average_increase(objective, quotient, w0, rho, n_samples, generator, order, rest_order,
                                 avg_scale, ode_kw, antithetic)


def _average_increase(objective, quotient, w0, rho, n_samples, generator, order, rest_order, avg_scale,
                      ode_kw, antithetic) -> AverageResult:
    if avg_scale not in SCALES:
        raise ValueError(f"avg_scale must be one of {SCALES}, got {avg_scale!r}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    ball = HorizontalBall(quotient, w0, rho)
    endpoint = Endpoint(quotient, ball.w0, order, rest_order, ode_kw)
    loss0, err0 = objective(ball.w0)
    loss0 = float(loss0)
    if not math.isfinite(loss0):
        raise ValueError(f"the loss at the base point is not finite ({loss0})")
    increases, errors, rel = [], [], None
    for _ in range(n_samples):
        u = ball.random_unit(generator) if avg_scale == "sphere" else ball.gaussian(generator)
        xi = quotient.restrict_to_domain(ball.w0, T.scale(u, ball.rho))
        r = relative_perturbation(quotient, ball.w0, xi)
        rel = r if rel is None or r is None else max(rel, r)
        signs = (1.0, -1.0) if antithetic else (1.0,)
        evaluations = [objective(endpoint(xi if sign > 0 else T.scale(xi, sign))) for sign in signs]
        losses = [float(loss) for loss, _ in evaluations]
        if not all(map(math.isfinite, losses)):
            raise ValueError(_nonfinite_message(len(increases), losses, r))
        increases.append(sum(losses) / len(signs) - loss0)
        errors.append(None if err0 is None else sum(err for _, err in evaluations) / len(signs))
    warn_large_perturbation(rel, "average-case", stacklevel=5)
    err_inc = None if err0 is None else sum(errors) / len(errors) - err0
    return AverageResult(loss0, increases, err0, err_inc, rel)

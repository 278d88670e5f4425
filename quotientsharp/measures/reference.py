"""``solver="reference"``: the reference code's adaptive / Euclidean L2 APGD (spec part 2 §3.3).

Reproduces ``eval_APGD_sharpness`` of Andriushchenko et al. (2023) for ``norm="l2"``, zero init:

* step ``delta += eta * grad * c / ||grad||_2`` (``c = |w0|`` adaptive, 1 Euclidean; the norm
  over all parameters, ``+1e-12``);
* projection: Euclidean onto the sphere, adaptive the Euclidean projection onto the ellipsoid
  ``||delta / w0|| <= rho``, ``delta / (1 + 2 lam / w0^2)`` with ``lam`` by bisection (tolerance
  1e-5 on the norm, upper bracket doubled as needed);
* momentum after projection ``delta_{k+1} = a z + (1 - a) delta_{k-1}``;
* the loss is evaluated at each new iterate; on a halving the *gradient point* moves to the best
  iterate while ``delta`` is kept (the reference code reloads the model, not the perturbation).

It is a lower bound on the same maximum as :func:`~quotientsharp.measures.solver.maximize` but
gives slightly different values.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .. import tangent as T
from ..quotient import Quotient
from .solver import AscentConfig, AscentResult, BestPoint, Objective, StepSchedule, value_and_grad

BISECTION_TOL = 1e-5
MAX_BISECTION = 500


def _weighted_norm(d: Mapping, inv_c: Mapping) -> float:
    return math.sqrt(sum(float(((d[n] * inv_c[n]) ** 2).sum()) for n in d))


def _project(d: dict, inv_c: dict, rho: float, ellipsoid: bool) -> dict:
    """The reference projection onto ``||d / c|| <= rho``."""
    norm = _weighted_norm(d, inv_c)
    if norm <= rho:
        return d
    if not ellipsoid:
        return T.scale(d, rho / norm)
    lam, lo, hi, limit = 0.1, 0.0, 10.0, 10.0
    tmp, new = d, norm
    for _ in range(MAX_BISECTION):
        if abs(new - rho) <= BISECTION_TOL:
            break
        tmp = {n: d[n] / (1 + 2 * lam * inv_c[n] ** 2) for n in d}
        new = _weighted_norm(tmp, inv_c)
        if new > rho:
            lam, lo = (lam + hi) / 2, lam
        else:
            lam, hi = (lo + lam) / 2, lam
        if limit - hi < 1e-2:
            limit, hi = 2 * limit, 2 * hi
    return tmp


def maximize_reference(objective: Objective, quotient: Quotient, w0: Mapping, rho: float, cfg: AscentConfig,
                       generator: torch.Generator | None = None) -> AscentResult:
    """Worst-case loss increase on one batch by the reference algorithm (no groups, order 1)."""
    if cfg.n_restarts:
        raise ValueError("solver='reference' has no restarts (its random init is broken upstream)")
    w0 = {n: w0[n] for n in quotient.names}
    adaptive = quotient.rest_kind == "adaptive"
    c = {n: w.abs() if adaptive else torch.ones_like(w) for n, w in w0.items()}
    inv_c = {n: torch.where(t != 0, 1 / torch.where(t != 0, t, 1), 0) for n, t in c.items()}
    endpoint = lambda d: T.add(w0, d)  # noqa: E731
    with torch.no_grad():
        loss0, err0 = objective(w0)
    loss0 = float(loss0)
    if not math.isfinite(loss0):
        raise ValueError(f"the loss at the base point is not finite ({loss0})")
    best = BestPoint(T.zeros_like(w0), loss0, err0)
    steps = StepSchedule(2 * rho * cfg.step_mult, cfg.n_iter, loss0)
    delta = prev = point = T.zeros_like(w0)
    trace: dict[str, list[float]] = {"loss_increase": [], "step": []}
    for k in range(cfg.n_iter):
        _, _, grad = value_and_grad(objective, endpoint, point, False)  # endpoint w0 + d: J = I
        gnorm = math.sqrt(sum(float((g * g).sum()) for g in grad.values()))
        z = _project({n: delta[n] + steps.eta / (gnorm + 1e-12) * grad[n] * c[n] for n in delta}, inv_c, rho,
                     adaptive)
        delta, prev = T.lincomb((cfg.momentum, z), (1 - cfg.momentum, prev)), delta
        point = delta
        with torch.no_grad():
            loss, err = objective(endpoint(delta))
        loss = float(loss)
        trace["loss_increase"].append(loss - loss0)
        trace["step"].append(steps.eta)
        steps.record(best.offer(delta, loss, err))
        if steps.checkpoint(k, best.loss):
            point = best.xi
    return AscentResult(base_loss=loss0, best_loss=best.loss, xi_best=best.xi,
                        xi_norm=_weighted_norm(best.xi, inv_c), n_halvings=steps.halvings, n_nonfinite=0,
                        base_error=err0, best_error=best.err,
                        trace={k: [v] for k, v in trace.items()})

"""The worst-case ascent: modified Auto-PGD on the horizontal ball (spec part 2 §3, Algorithm 1).

One solver serves every measure; only the :class:`~quotientsharp.Quotient` (metric, projection,
domain) and the geodesic orders of its endpoint map change:

* geodesic sharpness: GL groups at ``order`` 2 (or 1, ``"exact"``) + adaptive rest at order 1;
* adaptive sharpness: no groups, adaptive rest at order 1 (``endpoint = w0 + xi``);
* Euclidean sharpness: no groups, Euclidean rest at order 1.

Per batch S it maximises ``L_S(gamma_xi(1)) - L_S(w0)`` over ``xi in S = {xi in H_{w0},
||xi||_{w0} <= rho}``, with

* ``xi`` the autograd leaf: the gradient is ``J^T grad_w L`` with ``J`` the Jacobian of
  ``xi -> gamma_xi(1)`` (``grad_through_geodesic=False``: ``grad_w L`` at the endpoint, an ablation);
* direction ``d = Pi(g^{-1} grad) / ||.||_{w0}`` (a random unit ``d`` if it is exactly 0),
  step ``z = P_S(xi + eta d)``, momentum ``P_S(xi + a(z - xi) + (1 - a)(xi - xi_prev))``;
* ``eta_0 = 2 rho``, ``a = 0.75``, and the checkpoint schedule of :func:`checkpoints`: at a
  checkpoint, if the best loss improved on fewer than 75% of the iterations since the previous
  one, or neither eta nor the best loss changed, halve eta and restart from the best point;
* zero initialisation, optional random restarts at ``rho * u / ||u||``, ``u = Pi(whiten(zeta))``;
* one extra forward at the last iterate.

The metric-normalised step and zero init make every iterate equivariant under the symmetry, so
the value is exactly invariant (spec part 1 §6.7).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import tangent as T
from ..quotient import Quotient
from ..types import Params
from .feasible import HorizontalBall, relative_perturbation, warn_large_perturbation

Objective = Callable[[Params], tuple[torch.Tensor, "float | None"]]


def checkpoints(n_iter: int) -> list[int]:
    """APGD checkpoints ``w_j = ceil(p_j N)``, ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; ``w_0`` dropped; stops once
    ``w_j >= N`` or ``w_j = w_{j-1}``. ``N = 20`` gives ``[5, 9, 12, 15, 16, 18, 19, 20]``."""
    p = [0.0, 0.22]
    out: list[int] = []
    while True:
        w = math.ceil(p[-1] * n_iter)
        if out and w == out[-1]:
            break
        out.append(w)
        if w >= n_iter:
            break
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return out


@dataclass
class AscentConfig:
    """Hyperparameters of :func:`maximize` (defaults: spec part 2 §3.1)."""

    n_iter: int = 20
    n_restarts: int = 0
    momentum: float = 0.75
    step_mult: float = 1.0  # eta_0 = 2 rho step_mult
    grad_through_geodesic: bool = True
    order: int | str = 2  # geodesic order on the quotient's groups
    rest_order: int | str = 1  # geodesic order on the rest
    ode_kw: dict = field(default_factory=dict)  # RK4 options of "exact"/"ode" geodesics (n_steps, tol)

    def __post_init__(self):
        if self.n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {self.n_iter}")
        if self.n_restarts < 0:
            raise ValueError(f"n_restarts must be >= 0, got {self.n_restarts}")


@dataclass
class AscentResult:
    """Outcome of the maximisation on one batch."""

    base_loss: float  # L_S(w0)
    best_loss: float  # L_S(gamma_{xi_best}(1))
    xi_best: dict
    xi_norm: float  # ||xi_best||_{w0}
    n_halvings: int
    n_nonfinite: int  # iterates whose loss or gradient was not finite (treated as a halving)
    base_error: float | None = None
    best_error: float | None = None
    relative_perturbation: float | None = None  # of xi_best: max over GL blocks of ||xi_G|| / ||G||
    trace: dict = field(default_factory=dict)  # per run: "loss_increase" and "step" per iteration

    @property
    def increase(self) -> float:
        """``best_loss - base_loss``: the loss increase at the best perturbation found."""
        return self.best_loss - self.base_loss

    @property
    def error_increase(self) -> float | None:
        """``best_error - base_error`` (classification error), or ``None`` when no error was recorded."""
        return None if self.base_error is None else self.best_error - self.base_error


class Endpoint:
    """The endpoint map ``xi -> gamma_xi(1)`` at the given orders and its vector-Jacobian product
    (``ode_kw``: RK4 options of exact geodesics, spec part 1 §6.5)."""

    def __init__(self, quotient: Quotient, w0: Params, order, rest_order, ode_kw: Mapping | None = None):
        self.quotient, self.w0 = quotient, w0
        self.kw = {"order": order, "rest_order": rest_order, **(ode_kw or {})}

    def __call__(self, xi: Params) -> dict:
        return self.quotient.geodesic(self.w0, xi, **self.kw)

    def vjp(self, xi: Params, cotangent: Params) -> dict:
        return self.quotient.geodesic_vjp(self.w0, xi, cotangent, **self.kw)


def value_and_grad(objective: Objective, endpoint: Endpoint, xi: Params,
                   through_geodesic: bool) -> tuple[float, float | None, dict]:
    """``L(gamma_xi(1))``, the error there, and ``d/dxi L(gamma_xi(1)) = J^T grad_w L`` (or
    ``grad_w L`` at the endpoint when ``through_geodesic`` is False); one forward and one backward
    of the model, plus the endpoint's vector-Jacobian product."""
    with torch.no_grad():
        params = endpoint(xi)
    with torch.enable_grad():
        leaf = {n: t.detach().requires_grad_(True) for n, t in params.items()}
        loss, err = objective(leaf)
        grads = torch.autograd.grad(loss, list(leaf.values()), allow_unused=True)
    g = {n: torch.zeros_like(t) if gr is None else gr for (n, t), gr in zip(leaf.items(), grads)}
    return float(loss.detach()), err, endpoint.vjp(xi, g) if through_geodesic else g


class StepSchedule:
    """APGD step size ``eta`` with checkpoint halving (spec part 2 §3.1): at a checkpoint k, halve
    if the best loss improved on fewer than ``0.75 (k - k_prev)`` iterations since the previous
    checkpoint (c1), or if neither ``eta`` nor the best loss changed since then (c2)."""

    def __init__(self, eta0: float, n_iter: int, best_loss: float):
        self.eta, self.marks = eta0, set(checkpoints(n_iter))
        self.k_prev, self.n_up, self.eta_cp, self.loss_cp, self.halvings = 0, 0, eta0, best_loss, 0

    def record(self, improved: bool) -> None:
        self.n_up += improved

    def halve(self) -> None:
        self.halvings += 1
        self.eta /= 2

    def checkpoint(self, k: int, best_loss: float) -> bool:
        """Apply the rule at iteration ``k``; True when ``eta`` was halved (restart from the best)."""
        if k not in self.marks:
            return False
        c1 = self.n_up < 0.75 * (k - self.k_prev)
        c2 = self.eta == self.eta_cp and best_loss == self.loss_cp
        self.eta_cp, self.loss_cp, self.k_prev, self.n_up = self.eta, best_loss, k, 0
        if c1 or c2:
            self.halve()
        return c1 or c2


class BestPoint:
    """The best iterate so far (starts at ``xi = 0``, which is feasible)."""

    def __init__(self, xi, loss, err):
        self.xi, self.loss, self.err = xi, loss, err

    def offer(self, xi, loss, err) -> bool:
        if loss > self.loss:
            self.xi, self.loss, self.err = xi, loss, err
            return True
        return False


def _apgd_run(objective: Objective, endpoint, ball: HorizontalBall, xi0: dict, base: BestPoint,
              cfg: AscentConfig, generator: torch.Generator) -> tuple[BestPoint, dict, int, int]:
    """One APGD run from ``xi0``; returns its best point, trace, halvings and non-finite count."""
    best = BestPoint(base.xi, base.loss, base.err)
    steps = StepSchedule(2 * ball.rho * cfg.step_mult, cfg.n_iter, best.loss)
    a = cfg.momentum
    xi, xi_prev = xi0, xi0
    trace: dict[str, list[float]] = {"loss_increase": [], "step": []}
    nonfinite = 0
    for k in range(cfg.n_iter):
        loss, err, grad = value_and_grad(objective, endpoint, xi, cfg.grad_through_geodesic)
        trace["loss_increase"].append(loss - base.loss)
        trace["step"].append(steps.eta)
        d = ball.ascent_direction(grad, generator) if math.isfinite(loss) else None
        if d is None and math.isfinite(loss) and _is_zero(xi):
            raise ValueError(_base_gradient_message(grad, ball))
        del grad  # not alive during the next forward/backward: the solver's memory stays ~3 models
        if d is None:  # non-finite loss or gradient: left the loss's domain, back off like a halving
            nonfinite += 1
            steps.halve()
            xi = xi_prev = best.xi
            continue
        steps.record(best.offer(xi, loss, err))
        # d is this iteration's own tensor: z = xi + eta d and the momentum step reuse its memory
        # (a new tensor per iteration costs page faults ~10x the arithmetic for an embedding)
        z = ball.shrink(T.lincomb_(steps.eta, d, (1.0, xi)), owned=True)  # horizontal: P_S only rescales
        if k == 0:
            xi_next = z
        else:  # xi + a (z - xi) + (1 - a)(xi - xi_prev)
            xi_next = ball.shrink(T.lincomb_(a, z, (2 * (1 - a), xi), (a - 1, xi_prev)), owned=True)
        xi_prev, xi = xi, xi_next
        del d, z, xi_next
        if steps.checkpoint(k, best.loss):
            xi = xi_prev = best.xi
    with torch.no_grad():
        loss, err = objective(endpoint(xi))
    best.offer(xi, float(loss), err)
    return best, trace, steps.halvings, nonfinite


def _is_zero(xi: Params) -> bool:
    return not any(bool(t.any()) for t in xi.values())


def _base_gradient_message(grad: Params, ball: HorizontalBall) -> str:
    dt = next(iter(ball.w0.values())).dtype
    finite = all(bool(torch.isfinite(g).all()) for g in grad.values())
    what = ("the ascent direction overflows even in float64" if finite
            else f"the loss's gradient is not finite in {dt}")
    scale = max(float(t.abs().max()) for t in ball.w0.values() if t.numel())
    return (f"at the base point (xi = 0, finite loss) {what} (largest weight {scale:.3g}); the sharpness "
            "would be a meaningless 0. Measure in float64 (model.double()) or rescale the model")


def maximize(objective: Objective, quotient: Quotient, w0: Params, rho: float, cfg: AscentConfig,
             generator: torch.Generator) -> AscentResult:
    """Worst-case loss increase on one batch (spec part 2 §3.2): the zero-init run plus
    ``cfg.n_restarts`` random-init runs; the best of all is kept."""
    ball = HorizontalBall(quotient, w0, rho)
    endpoint = Endpoint(quotient, ball.w0, cfg.order, cfg.rest_order, cfg.ode_kw)
    with torch.no_grad():
        loss0, err0 = objective(ball.w0)
    loss0 = float(loss0)
    if not math.isfinite(loss0):
        raise ValueError(f"the loss at the base point is not finite ({loss0})")
    best = BestPoint(ball.zeros(), loss0, err0)
    traces: dict[str, list] = {"loss_increase": [], "step": []}
    halvings = nonfinite = 0
    for r in range(cfg.n_restarts + 1):
        xi0 = ball.zeros() if r == 0 else ball.shrink(T.scale(ball.random_unit(generator), ball.rho))
        run, trace, h, nf = _apgd_run(objective, endpoint, ball, xi0, BestPoint(ball.zeros(), loss0, err0),
                                      cfg, generator)
        best.offer(run.xi, run.loss, run.err)
        for key in traces:
            traces[key].append(trace[key])
        halvings, nonfinite = halvings + h, nonfinite + nf
    if nonfinite:
        warnings.warn(f"{nonfinite} ascent iterates had a non-finite loss or gradient (rho={rho} may "
                      "leave the loss's domain); the step was halved there", stacklevel=4)
    rel = relative_perturbation(quotient, ball.w0, best.xi)
    warn_large_perturbation(rel, "worst-case", stacklevel=4)
    return AscentResult(base_loss=loss0, best_loss=best.loss, xi_best=best.xi, xi_norm=ball.norm(best.xi),
                        n_halvings=halvings, n_nonfinite=nonfinite, base_error=err0, best_error=best.err,
                        relative_perturbation=rel, trace=traces)

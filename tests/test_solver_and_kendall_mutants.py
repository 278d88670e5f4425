"""Behavioural tests of the ascent solver, its objective and the Kendall statistics, written from
the mutation run of issue 18 (mutants of ``measures/solver.py``, ``objective.py``, ``diagonal.py``,
``result.py`` and ``studies/kendall.py`` that no test killed). float64 throughout.

Ground truths, all written here independently of the library:

* APGD (spec part 2 §3.2) for the Euclidean ball in R^3 (``Π = id``, ``P_S`` rescales onto
  ``‖ξ‖ ≤ ρ``, endpoint ``w0 + ξ``), extended with the documented pieces the spec leaves to the
  code: a start point ``ξ₀`` (random restarts), ``η₀ = 2ρ·step_mult``, any momentum, and the
  non-finite rule of :class:`~quotientsharp.measures.AscentResult` (an iterate whose loss or
  gradient is not finite counts as a halving: ``η ← η/2``, restart from the best point).
* The checkpoint rule by hand (:class:`StepSchedule` on a scripted sequence of improvements).
* Gradients through the geodesic by central finite differences of ``L(γ_ξ(1))``.
* Kendall τ-a against ``scipy.stats.kendalltau`` (no ties) and by explicit loops; the bootstrap
  against explicit loops over resamples and against the *exact* bootstrap distribution
  (all ``m^m`` resamples enumerated), whose quantiles the percentile CI must reproduce.
"""
from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from test_independent_references import gl_problem, rugged_loss, spec_checkpoints
from torch import nn

from quotientsharp import Quotient
from quotientsharp.groups.diagonal import DiagonalRescaling
from quotientsharp.measures import (
    AscentConfig,
    SharpnessResult,
    checkpoints,
    diagonal_quotient,
    maximize,
    sum_squared_error,
)
from quotientsharp.measures.objective import BatchObjective, error_rate, normalize_logits
from quotientsharp.measures.solver import BestPoint, Endpoint, StepSchedule, value_and_grad
from quotientsharp.studies.kendall import _bootstrap_taus, bootstrap_ci, bootstrap_difference_ci, has_ties, kendall_tau

DT = torch.float64
W0 = torch.tensor([0.3, -0.2, 0.5], dtype=DT)


# --------------------------------------------------------------------------------------------
# the APGD reference (Euclidean ball in R^3)
# --------------------------------------------------------------------------------------------
def reference_apgd(loss, err, rho: float, n_iter: int, momentum: float = 0.75, step_mult: float = 1.0,
                   xi0: torch.Tensor | None = None, generator: torch.Generator | None = None):
    """Spec part 2 §3.2 line by line for ``loss(θ)`` at ``θ = W0 + ξ`` (a zero gradient gives the
    direction ``u/‖u‖`` of the generator's next standard Gaussian ``u``). Returns a dict with the
    trace (``steps``, ``increases``), ``halvings``, ``nonfinite``, ``best_loss``, ``xi_best``,
    ``best_err`` and ``base_loss``/``base_err``."""
    def ball(x):
        n = float(x.norm())
        return x * (rho / n) if n > rho else x

    zero = torch.zeros(3, dtype=DT)
    l0, e0 = float(loss(W0)), err(W0)
    xi = xi_prev = zero if xi0 is None else xi0
    xi_best, l_best, e_best = zero, l0, e0          # a run's best starts at the base point
    eta = 2 * rho * step_mult
    marks = set(spec_checkpoints(n_iter))
    k_prev, n_up, eta_cp, l_cp = 0, 0, eta, l0
    steps, increases, halvings, nonfinite = [], [], 0, 0
    for k in range(n_iter):
        theta = (W0 + xi).detach().requires_grad_()
        value = loss(theta)
        l_k = float(value.detach())
        grad = torch.autograd.grad(value, theta)[0] if math.isfinite(l_k) else None
        steps.append(eta)
        increases.append(l_k - l0)
        if grad is None or not bool(torch.isfinite(grad).all()):
            nonfinite += 1
            halvings += 1
            eta /= 2
            xi = xi_prev = xi_best
            continue
        if l_k > l_best:
            l_best, xi_best, e_best, n_up = l_k, xi, err(W0 + xi), n_up + 1
        if not bool(grad.any()):
            grad = torch.randn(3, generator=generator, dtype=DT)
        z = ball(xi + eta * grad / grad.norm())
        xi_next = z if k == 0 else ball(xi + momentum * (z - xi) + (1 - momentum) * (xi - xi_prev))
        xi_prev, xi = xi, xi_next
        if k in marks:
            c1 = n_up < 0.75 * (k - k_prev)
            c2 = eta == eta_cp and l_best == l_cp
            eta_cp, l_cp, k_prev, n_up = eta, l_best, k, 0
            if c1 or c2:
                halvings += 1
                eta, xi, xi_prev = eta / 2, xi_best, xi_best
    l_n = float(loss(W0 + xi))
    if l_n > l_best:
        l_best, xi_best, e_best = l_n, xi, err(W0 + xi)
    return {"steps": steps, "increases": increases, "halvings": halvings, "nonfinite": nonfinite,
            "best_loss": l_best, "xi_best": xi_best, "best_err": e_best, "base_loss": l0, "base_err": e0}


def first_coordinate(theta: torch.Tensor) -> float:
    """A stand-in for the classification error: it identifies the point it was measured at."""
    return float(theta[0].detach())


def euclidean_quotient() -> Quotient:
    return Quotient([], ("theta",), rest="euclidean", order=1, rest_order=1)


def run_maximize(loss, rho, cfg: AscentConfig, seed: int = 0, quotient: Quotient | None = None):
    def objective(p):
        return loss(p["theta"]), first_coordinate(p["theta"])

    return maximize(objective, quotient or euclidean_quotient(), {"theta": W0.clone()}, rho, cfg,
                    torch.Generator().manual_seed(seed))


def assert_matches_reference(result, ref, run: int = 0):
    assert result.trace["step"][run] == ref["steps"]  # exact: powers of two times 2ρ step_mult
    got = result.trace["loss_increase"][run]
    assert len(got) == len(ref["increases"])
    assert all((math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12 for a, b in zip(got, ref["increases"]))


def assert_best_matches(result, ref):
    assert result.base_loss == pytest.approx(ref["base_loss"], abs=1e-14)
    assert result.base_error == ref["base_err"]
    assert result.best_loss == pytest.approx(ref["best_loss"], abs=1e-12)
    assert result.increase == pytest.approx(ref["best_loss"] - ref["base_loss"], abs=1e-12)
    # the point to 1e-8 only: near a maximum, rounding moves it much more than the loss
    assert torch.allclose(result.xi_best["theta"], ref["xi_best"], atol=1e-8, rtol=0)
    assert result.xi_norm == pytest.approx(float(ref["xi_best"].norm()), abs=1e-8)
    assert result.best_error == pytest.approx(ref["best_err"], abs=1e-8)
    assert result.error_increase == pytest.approx(ref["best_err"] - ref["base_err"], abs=1e-8)


# (seed, frequency, rho, n_iter, momentum, step_mult): rugged problems on which the schedule both
# halves and keeps the step, with ρ ≠ 1 and step_mult ≠ 1 so that 2ρ·m differs from 2/ρ·m, 2ρ/m, 3ρ·m
SCHEDULE_CASES = [
    (13, 1.5, 1.0, 20, 0.75, 1.0),
    (13, 1.5, 0.7, 20, 0.75, 1.5),
    (3, 2.0, 0.8, 50, 0.6, 1.0),
    (5, 1.0, 1.3, 100, 0.75, 0.7),
    (7, 2.5, 0.6, 33, 0.9, 1.25),
    (11, 1.5, 1.1, 20, 0.3, 1.0),
]


def test_ascent_matches_the_reference_apgd_step_for_step():
    """Every iterate's loss, every step size, the halvings and the best point agree with the
    reference on problems where the step halves at some checkpoints and not at others."""
    n_kept = n_halved = 0
    for seed, freq, rho, n_iter, momentum, step_mult in SCHEDULE_CASES:
        loss = rugged_loss(seed, freq)
        ref = reference_apgd(loss, first_coordinate, rho, n_iter, momentum, step_mult)
        cfg = AscentConfig(n_iter=n_iter, momentum=momentum, step_mult=step_mult)
        result = run_maximize(loss, rho, cfg)
        assert_matches_reference(result, ref)
        assert_best_matches(result, ref)
        assert result.n_halvings == ref["halvings"] and result.n_nonfinite == 0
        assert result.relative_perturbation is None  # no group has a scale to compare with
        n_halved += ref["halvings"]
        n_kept += len(spec_checkpoints(n_iter)) - ref["halvings"]
    assert n_halved >= 6 and n_kept >= 6  # the cases exercise both outcomes of the rule


def test_final_forward_at_the_last_iterate_can_be_the_best_point():
    """``N = 1``: the only iterate is ξ = 0 (no increase); the extra forward at ``z = ρ ĝ`` is the
    maximum of a linear loss, with its error recorded there."""
    a = torch.tensor([1.0, -2.0, 2.0], dtype=DT)
    for n_iter in (1, 2):
        result = run_maximize(lambda t: t @ a, 0.5, AscentConfig(n_iter=n_iter))
        xi = 0.5 * a / a.norm()
        assert result.trace["loss_increase"][0][0] == 0.0
        assert result.increase == pytest.approx(0.5 * 3.0, abs=1e-14)
        assert torch.allclose(result.xi_best["theta"], xi, atol=1e-15)
        assert result.xi_norm == pytest.approx(0.5, abs=1e-15)
        assert result.best_error == pytest.approx(float(W0[0] + xi[0]), abs=1e-15)


def test_no_increase_at_a_strict_maximum_keeps_the_base_point():
    """At a strict local maximum every perturbation lowers the loss: the result is the base point
    itself, with its loss and error, whatever the halvings and restarts did."""
    def loss(t):
        return -((t - W0) ** 2).sum()

    result = run_maximize(loss, 0.4, AscentConfig(n_iter=12, n_restarts=2))
    assert result.increase == 0.0 and result.best_loss == result.base_loss == 0.0
    assert result.xi_norm == 0.0 and not bool(result.xi_best["theta"].any())
    assert result.best_error == result.base_error == pytest.approx(0.3)
    assert result.error_increase == 0.0
    assert len(result.trace["step"]) == 3 and all(len(s) == 12 for s in result.trace["step"])
    # N = 12: checkpoints 3, 5, 7, 9, 10, 11 (12 is never reached); without an improvement each
    # one halves, in each of the 3 runs
    assert spec_checkpoints(12) == [3, 5, 7, 9, 10, 11, 12]
    assert result.n_halvings == 3 * 6


def test_a_zero_gradient_gives_a_random_direction_drawn_from_the_seeded_generator():
    """At a saddle (zero gradient at the base point) the first direction is random, drawn from the
    measure's generator: the run follows the reference with the same draws, and another seed gives
    another ascent (the global torch RNG plays no part)."""
    def loss(t):
        d = t - W0
        return d[0] ** 2 - d[1] ** 2 + 0.5 * d[2] ** 2 + d[0] * d[1] * d[2]

    results = []
    for seed in (1, 2):
        torch.manual_seed(100 + seed)
        result = run_maximize(loss, 0.6, AscentConfig(n_iter=10), seed=seed)
        ref = reference_apgd(loss, first_coordinate, 0.6, 10, generator=torch.Generator().manual_seed(seed))
        assert_matches_reference(result, ref)
        assert_best_matches(result, ref)
        results.append(result)
    assert not torch.allclose(results[0].xi_best["theta"], results[1].xi_best["theta"])


def test_random_restarts_start_on_the_sphere_and_keep_the_best_run():
    """Restart r ≥ 1 starts at ``ρ u/‖u‖`` with ``u`` the generator's next standard Gaussian
    (Euclidean whitening and projection are the identity); each run follows the reference from
    there, the result is the best of all runs and the halvings add up."""
    loss = rugged_loss(13, 1.5)
    rho, n_iter, n_restarts, seed = 0.9, 20, 3, 4
    result = run_maximize(loss, rho, AscentConfig(n_iter=n_iter, n_restarts=n_restarts), seed=seed)
    g = torch.Generator().manual_seed(seed)
    refs = [reference_apgd(loss, first_coordinate, rho, n_iter)]
    for _ in range(n_restarts):
        u = torch.randn(3, generator=g, dtype=DT)
        refs.append(reference_apgd(loss, first_coordinate, rho, n_iter, xi0=rho * u / u.norm()))
    assert len(result.trace["step"]) == len(result.trace["loss_increase"]) == n_restarts + 1
    for r, ref in enumerate(refs):
        assert_matches_reference(result, ref, run=r)
    best = max(refs, key=lambda ref: ref["best_loss"])
    assert best is not refs[0]  # a restart wins here, so the runs are really combined
    assert_best_matches(result, best)
    assert result.n_halvings == sum(ref["halvings"] for ref in refs)


class _NanGradOutside(torch.autograd.Function):
    """Identity on θ whose backward is NaN where ``‖θ − W0‖ > radius`` (the loss stays finite)."""

    @staticmethod
    def forward(ctx, theta, radius):
        ctx.save_for_backward(theta)
        ctx.radius = radius
        return theta.clone()

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        bad = float((theta - W0).norm()) > ctx.radius
        return (grad * float("nan") if bad else grad), None


def test_non_finite_gradients_away_from_the_base_point_halve_and_restart():
    """A finite loss whose gradient is NaN outside ``‖ξ‖ ≤ 0.45``: those iterates are counted in
    ``n_nonfinite`` and ``n_halvings``, restart from the best point, and the run goes on (no
    error: only the base point's gradient must be finite); a warning says so."""
    wave = rugged_loss(13, 1.5)

    def loss(t):
        return wave(_NanGradOutside.apply(t, 0.45))

    ref = reference_apgd(loss, first_coordinate, 1.0, 20)
    assert ref["nonfinite"] >= 2
    with pytest.warns(UserWarning, match="ascent iterates had a non-finite loss or gradient"):
        result = run_maximize(loss, 1.0, AscentConfig(n_iter=20))
    assert_matches_reference(result, ref)
    assert_best_matches(result, ref)
    assert result.n_nonfinite == ref["nonfinite"]
    assert result.n_halvings == ref["halvings"]


def test_non_finite_losses_halve_and_are_traced():
    """``−log(0.35 − ξ·e)`` leaves its domain (NaN/inf) where the ascent overshoots; the trace
    records those losses, the step halves, and the best point stays inside the domain."""
    e = torch.tensor([0.6, 0.0, 0.8], dtype=DT)

    def loss(t):
        return -torch.log(0.35 - (t - W0) @ e) + 0.1 * torch.sin(3 * t).sum()

    ref = reference_apgd(loss, first_coordinate, 1.0, 20)
    assert ref["nonfinite"] >= 2
    with pytest.warns(UserWarning, match="non-finite"):
        result = run_maximize(loss, 1.0, AscentConfig(n_iter=20))
    assert_matches_reference(result, ref)
    assert_best_matches(result, ref)
    assert result.n_nonfinite == ref["nonfinite"] and result.n_halvings == ref["halvings"]
    assert not all(math.isfinite(v) for v in result.trace["loss_increase"][0])


def test_finite_ascent_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_maximize(rugged_loss(13, 1.5), 0.3, AscentConfig(n_iter=8))
    assert result.n_nonfinite == 0


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta):
        return theta.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _HugeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta):
        return theta.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, 1e308)


def test_a_useless_gradient_at_the_base_point_is_an_error_naming_the_cause():
    """At ξ = 0 the loss is finite but no ascent direction exists: a ValueError says whether the
    gradient is not finite (and in which dtype) or its direction overflows, and names the largest
    weight (0.5 here)."""
    def nan_loss(t):
        return _NanGrad.apply(t).sum()

    def huge_loss(t):
        return _HugeGrad.apply(t).sum()

    with pytest.raises(ValueError, match=r"the loss's gradient is not finite in torch\.float64 "
                                         r"\(largest weight 0\.5\)"):
        run_maximize(nan_loss, 0.5, AscentConfig(n_iter=3))
    with pytest.raises(ValueError, match=r"the ascent direction overflows even in float64 \(largest weight 0\.5\)"):
        run_maximize(huge_loss, 0.5, AscentConfig(n_iter=3))


def test_a_non_finite_base_loss_is_an_error():
    with pytest.raises(ValueError, match=r"the loss at the base point is not finite \(nan\)"):
        run_maximize(lambda t: t.sum() * float("nan"), 0.5, AscentConfig(n_iter=3))


def test_ascent_config_rejects_empty_budgets_only():
    assert AscentConfig(n_iter=1, n_restarts=0).n_iter == 1
    with pytest.raises(ValueError, match="n_iter must be >= 1, got 0"):
        AscentConfig(n_iter=0)
    with pytest.raises(ValueError, match="n_restarts must be >= 0, got -1"):
        AscentConfig(n_restarts=-1)


# --------------------------------------------------------------------------------------------
# the checkpoint schedule and the best point, by hand
# --------------------------------------------------------------------------------------------
def test_checkpoints_are_the_spec_formula():
    for n_iter in range(1, 121):
        assert checkpoints(n_iter) == spec_checkpoints(n_iter), n_iter
    # by hand: p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99; in floats p₄·20 is
    # 14.000000000000002, so w₄ = 15 as in the reference code (exact arithmetic would give 14; spec
    # part 2 §3.1 lists this N = 20 schedule). N = 1: ⌈0.22⌉ = 1 = N at once
    assert checkpoints(20) == [5, 9, 12, 15, 16, 18, 19, 20]
    assert checkpoints(1) == [1]


def test_step_schedule_applies_the_checkpoint_rule_by_hand():
    """N = 20 (checkpoints 5, 9, 12, 15, 16, 18, 19, 20), η₀ = 1, best loss 0 at the start. A
    scripted sequence of improvements; at each checkpoint the rule is evaluated by hand:
    c1 = n_up < 0.75 (k − k_prev), c2 = η and best loss unchanged since the previous one."""
    schedule = StepSchedule(1.0, 20, 0.0)
    improved = {1, 3, 5,        # 3 of the 6 iterations 0..5:  3 < 3.75 → halve (η 1 → 0.5)
                6, 8, 9,        # 3 of 4 (6..9):     3 < 3.0 no; η changed → keep
                10, 11, 12,     # 3 of 3:            3 < 2.25 no; best changed → keep
                                # 0 of 3 (13..15):   0 < 2.25 → halve (η 0.5 → 0.25)
                16,             # 1 of 1:            1 < 0.75 no; η changed → keep
                17, 18}         # 2 of 2:            2 < 1.5 no; best changed → keep
    #                             0 of 1 (19):       0 < 0.75 → halve (η 0.25 → 0.125)
    expected = {5: True, 9: False, 12: False, 15: True, 16: False, 18: False, 19: True}
    best, decisions, etas = 0.0, {}, []
    for k in range(20):
        if k in improved:
            best += 1.0
        schedule.record(k in improved)
        halved = schedule.checkpoint(k, best)
        if k in expected:
            decisions[k] = halved
        else:
            assert halved is False, k
        etas.append(schedule.eta)
    assert decisions == expected
    assert schedule.halvings == 3
    assert etas == [1.0] * 5 + [0.5] * 10 + [0.25] * 4 + [0.125]


def test_step_schedule_halves_when_nothing_changed_since_the_last_checkpoint():
    """No improvement at all: every checkpoint halves (condition 1, and condition 2 where η did
    not change, i.e. never after the first halving)."""
    schedule = StepSchedule(2.0, 12, -1.0)
    marks = spec_checkpoints(12)
    for k in range(12):
        schedule.record(False)
        assert schedule.checkpoint(k, -1.0) == (k in marks)
    assert schedule.halvings == len([k for k in marks if k < 12])
    assert schedule.eta == 2.0 / 2 ** schedule.halvings


def test_best_point_keeps_the_first_of_equal_losses():
    """``ℓ_k > ℓ_best`` (strict): an equal loss neither replaces the best point nor counts as an
    improvement."""
    first, second = {"theta": torch.ones(1, dtype=DT)}, {"theta": torch.zeros(1, dtype=DT)}
    best = BestPoint(first, 1.0, 0.25)
    assert best.offer(second, 1.0, 0.5) is False
    assert (best.xi, best.loss, best.err) == (first, 1.0, 0.25)
    assert best.offer(second, 0.5, 0.5) is False
    assert best.offer(second, 2.0, 0.75) is True
    assert (best.xi, best.loss, best.err) == (second, 2.0, 0.75)


# --------------------------------------------------------------------------------------------
# the endpoint map and the gradient through it
# --------------------------------------------------------------------------------------------
def diagonal_problem():
    """A diagonal net ``(u, v)`` in R^3 under the inverse metric, with an extra adaptive-rest
    parameter ``b`` and a parameter ``unused`` that the loss never reads."""
    g = torch.Generator().manual_seed(2)
    w0 = {"u": 1 + torch.rand(3, generator=g, dtype=DT), "v": -1 - torch.rand(3, generator=g, dtype=DT),
          "b": torch.tensor([0.7, -1.2], dtype=DT), "unused": torch.tensor([2.0], dtype=DT)}
    quotient = Quotient([DiagonalRescaling("u", "v", "inv")], tuple(w0), rest="adaptive", order=2, rest_order=1)
    x = torch.randn(5, 3, generator=g, dtype=DT)

    def objective(p):
        out = x @ (p["u"] * p["v"]) + torch.sin(p["b"]).sum() * p["b"].prod()
        return (out ** 2).mean(), 0.125

    xi = {"u": 0.2 * w0["u"], "v": -0.2 * w0["v"], "b": torch.tensor([0.3, 0.4], dtype=DT),
          "unused": torch.tensor([0.5], dtype=DT)}
    return quotient, w0, objective, xi


def central_difference(f, xi: dict, h: float = 1e-5) -> dict:
    out = {}
    for n, t in xi.items():
        g = torch.zeros_like(t)
        for i in range(t.numel()):
            e = torch.zeros_like(t).view(-1)
            e[i] = h
            plus = {**xi, n: t + e.view_as(t)}
            minus = {**xi, n: t - e.view_as(t)}
            g.view(-1)[i] = (f(plus) - f(minus)) / (2 * h)
        out[n] = g
    return out


def test_endpoint_uses_the_requested_orders_and_ode_options():
    """The endpoint is the quotient's geodesic at the orders (and RK4 options) it was given, not
    at the quotient's defaults; the cases are chosen so that the orders give different points."""
    quotient, w0, _, xi = diagonal_problem()
    cases = [(1, 1, None), (2, 2, None), ("ode", 1, {"n_steps": 1, "tol": None}), ("ode", 1, None)]
    points = []
    for order, rest_order, ode_kw in cases:
        endpoint = Endpoint(quotient, w0, order, rest_order, ode_kw)
        want = quotient.geodesic(w0, xi, order=order, rest_order=rest_order, **(ode_kw or {}))
        got = endpoint(xi)
        assert all(torch.equal(got[n], want[n]) for n in w0)
        points.append(got)
    # first order is w0 + ξ everywhere; the others move u, v (order 2, ODE) or b (rest order 2)
    assert all(torch.equal(points[0][n], w0[n] + xi[n]) for n in w0)
    for a, b in itertools.combinations(points, 2):
        assert max(float((a[n] - b[n]).abs().max()) for n in w0) > 1e-6


def test_gradient_through_the_geodesic_is_the_derivative_of_the_endpoint_loss():
    """``value_and_grad`` returns ``L(γ_ξ(1))``, the error there and ``d/dξ L(γ_ξ(1))`` (central
    differences), or with ``through_geodesic=False`` the plain gradient ``∇_w L`` at the endpoint;
    a parameter the loss does not read gets a zero gradient."""
    quotient, w0, objective, xi = diagonal_problem()
    for order, rest_order in ((2, 1), ("exact", 2)):
        endpoint = Endpoint(quotient, w0, order, rest_order)
        loss, err, grad = value_and_grad(objective, endpoint, xi, True)
        assert loss == pytest.approx(float(objective(quotient.geodesic(w0, xi, order=order,
                                                                       rest_order=rest_order))[0]), abs=1e-14)
        assert err == 0.125

        def along(z):
            return float(objective(quotient.geodesic(w0, z, order=order, rest_order=rest_order))[0])

        fd = central_difference(along, xi)
        for n in w0:
            assert torch.allclose(grad[n], fd[n], atol=1e-7, rtol=1e-6), (order, n)
        assert not bool(grad["unused"].any())

        _, _, plain = value_and_grad(objective, endpoint, xi, False)
        at = endpoint(xi)
        fd_w = central_difference(lambda p: float(objective(p)[0]), at)
        for n in w0:
            assert torch.allclose(plain[n], fd_w[n], atol=1e-7, rtol=1e-6), (order, n)
        # the two differ on the geodesic's curved blocks
        assert float((plain["u"] - grad["u"]).abs().max()) > 1e-4


def test_maximize_uses_the_configured_orders_and_gradient():
    """Through :func:`maximize`: ``order``/``rest_order``/``grad_through_geodesic`` of the config
    change the value, and the best loss is the loss at the endpoint of ``xi_best`` at those orders."""
    quotient, w0, objective, _ = diagonal_problem()
    values = []
    for kw in ({"order": 1, "rest_order": 1}, {"order": 2, "rest_order": 1}, {"order": 2, "rest_order": 2},
               {"order": 2, "rest_order": 1, "grad_through_geodesic": False},
               {"order": "ode", "rest_order": 1, "ode_kw": {"n_steps": 1, "tol": None}}):
        cfg = AscentConfig(n_iter=6, **kw)
        r = maximize(objective, quotient, w0, 0.3, cfg, torch.Generator().manual_seed(0))
        at = quotient.geodesic(w0, r.xi_best, order=cfg.order, rest_order=cfg.rest_order, **cfg.ode_kw)
        assert r.best_loss == pytest.approx(float(objective(at)[0]), abs=1e-13)
        assert r.xi_norm == pytest.approx(float(quotient.norm(w0, r.xi_best)), abs=1e-13)
        assert r.xi_norm <= 0.3 + 1e-12
        assert not bool(r.xi_best["unused"].any())
        values.append(r.best_loss)
    assert len({round(v, 9) for v in values}) == len(values)


def test_relative_perturbation_of_gl_blocks_and_its_warning():
    """With GL heads, ``relative_perturbation`` is ``max_heads max(‖ξ_G‖_F/‖G‖_F, ‖ξ_H‖_F/‖H‖_F)``
    at ``xi_best`` (head i in columns 2i, 2i+1); above 0.5 a warning names the worst case."""
    group, w0, _ = gl_problem("inv", seed=1)
    quotient = Quotient([group], ("G", "H"), order=2)

    def objective(p):
        return torch.sin(p["G"] @ p["H"].T).sum() + (p["G"] ** 3).sum(), None

    def expected(xi):
        ratios = [float(xi[n][:, 2 * i:2 * i + 2].norm() / w0[n][:, 2 * i:2 * i + 2].norm())
                  for n in ("G", "H") for i in range(2)]
        return max(ratios)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = maximize(objective, quotient, w0, 0.2, AscentConfig(n_iter=5), torch.Generator().manual_seed(0))
    assert small.relative_perturbation == pytest.approx(expected(small.xi_best), rel=1e-12)
    assert 0 < small.relative_perturbation < 0.5
    assert small.base_error is None and small.error_increase is None
    with pytest.warns(UserWarning, match=r"^worst-case perturbation reaches \d"):
        large = maximize(objective, quotient, w0, 3.0, AscentConfig(n_iter=5), torch.Generator().manual_seed(0))
    assert large.relative_perturbation == pytest.approx(expected(large.xi_best), rel=1e-12)
    assert large.relative_perturbation > 0.5


# --------------------------------------------------------------------------------------------
# the batch objective
# --------------------------------------------------------------------------------------------
def test_normalize_logits_centres_and_normalises_the_last_axis():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g, dtype=DT)
    x[1, 2] = 7.0  # a constant row: centred to 0, stays 0 (no 0/0)
    out = normalize_logits(x)
    assert out.shape == x.shape
    for i, j in itertools.product(range(2), range(3)):
        row = x[i, j] - x[i, j].sum() / 4
        want = row / row.norm() if (i, j) != (1, 2) else torch.zeros(4, dtype=DT)
        assert torch.allclose(out[i, j], want, atol=1e-15)
    # a (batch, classes) input with as many rows as classes
    sq = torch.randn(3, 3, generator=g, dtype=DT)
    c = sq - sq.mean(dim=1, keepdim=True)
    assert torch.allclose(normalize_logits(sq), c / c.norm(dim=1, keepdim=True), atol=1e-15)


def test_error_rate_is_the_top1_error_of_classification_outputs_only():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]], dtype=DT)  # predictions 0, 1, 0
    targets = torch.tensor([0, 0, 0])
    assert error_rate(logits, targets) == pytest.approx(1 / 3)
    wide = torch.tensor([[0.1, 0.9, 0.0, 0.2], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]], dtype=DT)
    assert error_rate(wide, torch.tensor([1, 0, 2])) == pytest.approx(1 / 3)  # 3 rows, 4 classes
    # not a classification task: no error
    assert error_rate(torch.zeros(3, dtype=DT), torch.tensor([0, 0, 0])) is None        # 1-D outputs
    assert error_rate(torch.zeros(3, 1, dtype=DT), torch.tensor([0, 0, 0])) is None     # one output
    assert error_rate(logits, torch.tensor([0.0, 1.0, 0.0], dtype=DT)) is None          # float targets
    assert error_rate(logits, torch.zeros(3, 2, dtype=torch.long)) is None              # 2-D targets
    assert error_rate(logits, torch.tensor([0, 1])) is None                             # other batch
    assert error_rate(torch.zeros(2, 3, 4, dtype=DT), torch.tensor([0, 1])) is None     # 3-D outputs


def test_batch_objective_evaluates_the_given_parameters_without_touching_the_module():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 3, dtype=torch.float32)  # float32 inputs are cast to the model's float64
    y = torch.tensor([0, 1, 1, 0])
    seen = []

    def loss_fn(out, targets):
        seen.append(out)
        return nn.functional.cross_entropy(out, targets)

    obj = BatchObjective(model, (x, y), loss_fn)
    weight = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]], dtype=DT)
    loss, err = obj({"weight": weight})  # the bias is the module's own
    logits = x.double() @ weight.T + before["bias"]  # before: detached copies
    assert seen[-1].dtype == DT and torch.allclose(seen[-1], logits, atol=1e-12)  # not normalised by default
    assert float(loss.detach()) == pytest.approx(float(nn.functional.cross_entropy(logits, y).detach()), abs=1e-12)
    assert err == pytest.approx(float((logits.argmax(1) != y).double().mean()))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    normalised = BatchObjective(model, (x, y), loss_fn, logit_normalization=True)
    normalised({"weight": weight})
    c = logits - logits.mean(dim=1, keepdim=True)
    assert torch.allclose(seen[-1], c / c.norm(dim=1, keepdim=True), atol=1e-12)

    # a plain callable model(params, inputs), inputs passed as they are
    calls = BatchObjective(lambda p, inp: inp @ p["w"], (x.double(), y), loss_fn)
    w = torch.randn(3, 2, dtype=DT)
    loss, err = calls({"w": w})
    assert torch.allclose(seen[-1], x.double() @ w, atol=1e-12)
    assert err == pytest.approx(float(((x.double() @ w).argmax(1) != y).double().mean()))


def test_batch_objective_errors_name_the_problem():
    model = nn.Linear(3, 2).to(DT)
    y = torch.tensor([0, 1])
    per_example = BatchObjective(model, (torch.randn(2, 3, dtype=DT), y),
                                 lambda out, t: nn.functional.cross_entropy(out, t, reduction="none"))
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor \(mean over the batch\), got \(2,\)"):
        per_example({})
    as_float = BatchObjective(model, (torch.randn(2, 3, dtype=DT), y), lambda out, t: 1.5)
    with pytest.raises(ValueError, match=r"scalar tensor \(mean over the batch\), got float"):
        as_float({})
    with pytest.raises(TypeError, match=r"^sharpness: the batch: inputs is on device meta"):
        BatchObjective(model, (torch.empty(2, 3, device="meta"), y), nn.functional.cross_entropy)


# --------------------------------------------------------------------------------------------
# diagonal nets and the result
# --------------------------------------------------------------------------------------------
def test_sum_squared_error_and_the_default_diagonal_quotient():
    out, target = torch.tensor([1.0, -2.0, 0.5], dtype=DT), torch.tensor([0.0, 1.0, 0.5], dtype=DT)
    assert float(sum_squared_error(out, target)) == 1.0 + 9.0 + 0.0
    g = torch.Generator().manual_seed(0)
    w = {"u": 1 + torch.rand(3, generator=g, dtype=DT), "v": 1 + torch.rand(3, generator=g, dtype=DT)}
    group = DiagonalRescaling("u", "v", "inv")
    xi = group.from_b(w, 0.3 * torch.randn(3, generator=g, dtype=DT))
    default, inv, mix = diagonal_quotient(), diagonal_quotient("inv"), diagonal_quotient("mix")
    assert float(default.norm(w, xi)) == float(inv.norm(w, xi))
    assert float(default.norm(w, xi)) != pytest.approx(float(mix.norm(w, xi)), rel=1e-3)


def test_sharpness_result_to_dict_is_json_with_non_finite_as_null():
    result = SharpnessResult(value=float("nan"), per_batch=[0.5, float("inf")], stderr=None, base_loss=[1.0, 2.0],
                             error_increase=0.25, extras=[{"n_halvings": 2}], traces=[], config={"rho": 0.1})
    d = result.to_dict()
    assert d == {"value": None, "per_batch": [0.5, None], "stderr": None, "base_loss": [1.0, 2.0],
                 "error_increase": 0.25, "extras": [{"n_halvings": 2}], "traces": [], "config": {"rho": 0.1}}
    assert json.loads(json.dumps(d, allow_nan=False)) == d


# --------------------------------------------------------------------------------------------
# Kendall τ-a and the bootstrap
# --------------------------------------------------------------------------------------------
def tau_a_by_loops(x, y) -> float:
    m = len(x)
    total = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in range(m) for j in range(i + 1, m))
    return 2 * total / (m * (m - 1))


def resample_tau_by_loops(x, y, rows) -> float:
    """τ-a of the resample ``rows`` over the pairs of positions holding distinct original models
    (0 when there is none)."""
    num = den = 0
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            i, j = rows[a], rows[b]
            if i != j:
                num += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
                den += 1
    return num / den if den else 0.0


def test_kendall_tau_a_equals_scipy_without_ties_and_the_loops_with_ties():
    rng = np.random.default_rng(0)
    for m in (2, 3, 7, 12):
        x, y = rng.normal(size=m), rng.normal(size=m) + rng.normal(size=m)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ties, no warning
            tau = kendall_tau(x, y)
        assert tau == pytest.approx(scipy.stats.kendalltau(x, y)[0], abs=1e-14)
    assert kendall_tau([1.0, 2.0], [3.0, 5.0]) == 1.0 and kendall_tau([1.0, 2.0], [5.0, 3.0]) == -1.0
    x, y = [1.0, 1.0, 2.0, 3.0, 0.5], [0.1, 0.4, 0.3, 0.9, -0.2]  # a tie in x only
    with pytest.warns(RuntimeWarning, match="tied values"):
        assert kendall_tau(x, y) == pytest.approx(tau_a_by_loops(x, y), abs=1e-15)
    with pytest.warns(RuntimeWarning, match="tied values"):
        assert kendall_tau(y, x) == pytest.approx(tau_a_by_loops(y, x), abs=1e-15)  # a tie in y only
    # large integers: differences taken in floating point, not wrapping int64
    big, other = [2 ** 62, -(2 ** 62), 1, 3], [4.0, 1.0, 2.0, 3.0]
    assert kendall_tau(big, other) == kendall_tau(other, big) == tau_a_by_loops(np.array(big, dtype=float), other)
    assert kendall_tau(big, other) == 1.0  # the same ranking 4, 1, 2, 3


def test_has_ties():
    assert has_ties([1.0, 2.0, 1.0]) and not has_ties([1.0, 2.0, 3.0])


def test_kendall_inputs_are_checked():
    with pytest.raises(ValueError, match="1-D of equal length"):
        kendall_tau([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D of equal length"):
        kendall_tau([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [4.0, 3.0]])
    with pytest.raises(ValueError, match="at least two points"):
        kendall_tau([1.0], [2.0])
    for bad in ([1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0]):
        with pytest.raises(ValueError, match="finite values"):
            kendall_tau(bad, [1.0, 2.0, 3.0])
        with pytest.raises(ValueError, match="finite values"):
            kendall_tau([1.0, 2.0, 3.0], bad)
        with pytest.raises(ValueError, match="finite values"):
            bootstrap_ci(bad, [1.0, 2.0, 3.0])


def test_bootstrap_taus_count_only_distinct_original_pairs():
    """Each resample's τ-a from the loops, including resamples with repeated models, one distinct
    pair (m = 2) and no distinct pair at all (τ = 0)."""
    from quotientsharp.studies.kendall import _sign_products

    rng = np.random.default_rng(1)
    for m in (2, 3, 5):
        x, y = rng.normal(size=m), rng.normal(size=m)
        idx = np.vstack([rng.integers(0, m, size=(40, m)), np.zeros((1, m), dtype=int),
                         np.full((1, m), m - 1), np.arange(m)[None]])
        got = _bootstrap_taus(_sign_products(x, y), idx)
        want = [resample_tau_by_loops(x, y, row) for row in idx]
        assert np.allclose(got, want, atol=1e-15, rtol=0), m
        assert got[-1] == pytest.approx(tau_a_by_loops(x, y))  # the identity resample


def exact_bootstrap(stat_of_rows, m: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``m^m`` resamples (equally likely): the sorted atoms of the statistic and their CDF."""
    values = np.array([stat_of_rows(rows) for rows in itertools.product(range(m), repeat=m)])
    atoms, counts = np.unique(np.round(values, 12), return_counts=True)
    return atoms, np.cumsum(counts) / counts.sum()


def quantile_of(atoms, cdf, p: float, margin: float = 0.02) -> float:
    """The p-quantile of the exact distribution, asserting that p is away from every CDF jump, so
    that the percentile of a large bootstrap sample equals it with overwhelming probability."""
    assert np.abs(cdf - p).min() > margin, (p, cdf)
    return pytest.approx(float(atoms[np.searchsorted(cdf, p)]), abs=1e-9)


def test_bootstrap_ci_is_the_percentile_interval_of_the_bootstrap_distribution():
    """On 5 models the exact bootstrap distribution of τ-a is enumerated; for each level the CI's
    ends are its ``(1 ∓ level)/2`` quantiles (20000 resamples). Levels where those quantiles and
    the ones of nearby formulas (``1 − level``, ``(1 − level)/3``, ...) differ."""
    x = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    y = np.array([1.0, 2.5, 2.0, 1.8, 3.0])
    atoms, cdf = exact_bootstrap(lambda rows: resample_tau_by_loops(x, y, rows), 5)
    for level in (0.5, 0.6):
        lo, hi = bootstrap_ci(x, y, n_boot=20000, level=level, seed=3)
        assert lo == quantile_of(atoms, cdf, (1 - level) / 2)
        assert hi == quantile_of(atoms, cdf, (1 + level) / 2)
        assert lo < hi
    # the same seed gives the same interval, another seed another one (30 models: many atoms)
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=30), rng.normal(size=30)
    assert bootstrap_ci(xs, ys, n_boot=300, seed=7) == bootstrap_ci(xs, ys, n_boot=300, seed=7)
    assert bootstrap_ci(xs, ys, n_boot=300, seed=7) != bootstrap_ci(xs, ys, n_boot=300, seed=8)
    # the default level is 95% (ends at 2.5% and 97.5%)
    lo95, hi95 = bootstrap_ci(x, y, level=0.95, seed=7)
    assert lo95 <= tau_a_by_loops(x, y) <= hi95
    # two models: half the resamples hold both (τ = 1), half one of them twice (τ = 0)
    assert bootstrap_ci([1.0, 2.0], [3.0, 4.0], n_boot=4000, level=0.9, seed=0) == (0.0, 1.0)


def test_paired_bootstrap_difference_uses_the_same_resamples():
    """``τ(x1, y) − τ(x2, y)``: the point value from two τ-a's, the CI from the exact distribution
    of the paired difference (the same resample for both measures); a measure compared with itself
    gives exactly (0, 0, 0)."""
    y = np.array([1.0, 2.5, 2.0, 1.8, 3.0])
    x1 = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    x2 = np.array([0.4, 0.2, 0.8, 0.6, 0.9])
    point, lo, hi = bootstrap_difference_ci(x1, x2, y, n_boot=20000, level=0.5, seed=1)
    assert point == pytest.approx(tau_a_by_loops(x1, y) - tau_a_by_loops(x2, y), abs=1e-15)
    atoms, cdf = exact_bootstrap(lambda rows: resample_tau_by_loops(x1, y, rows)
                                 - resample_tau_by_loops(x2, y, rows), 5)
    assert lo == quantile_of(atoms, cdf, 0.25)
    assert hi == quantile_of(atoms, cdf, 0.75)
    assert bootstrap_difference_ci(x1, x1, y, seed=5) == (0.0, 0.0, 0.0)
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=30), rng.normal(size=30), rng.normal(size=30)
    assert bootstrap_difference_ci(a, b, c, n_boot=300, seed=5) == bootstrap_difference_ci(a, b, c, n_boot=300, seed=5)
    assert bootstrap_difference_ci(a, b, c, n_boot=300, seed=5) != bootstrap_difference_ci(a, b, c, n_boot=300, seed=6)


def test_bootstrap_defaults_are_2000_resamples_at_level_095_and_seed_0():
    """The documented defaults (``n_boot=2000, level=0.95, seed=0``) are what a call without them
    uses: a study that relies on them reproduces its CIs. 30 models make the bootstrap τ nearly
    continuous, so one resample more or another seed moves the quantiles."""
    rng = np.random.default_rng(3)
    y = rng.normal(size=30)
    x1, x2 = y + rng.normal(size=30), y + 2 * rng.normal(size=30)
    assert bootstrap_ci(x1, y) == bootstrap_ci(x1, y, n_boot=2000, level=0.95, seed=0)
    assert bootstrap_ci(x1, y) != bootstrap_ci(x1, y, n_boot=2001, seed=0)
    assert bootstrap_difference_ci(x1, x2, y) == bootstrap_difference_ci(x1, x2, y, n_boot=2000, level=0.95, seed=0)
    assert bootstrap_difference_ci(x1, x2, y) != bootstrap_difference_ci(x1, x2, y, n_boot=2001, seed=0)

"""The ascent solver: schedule, first-order limit, optimality on exact oracles, geodesic orders."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from test_sharpness_common import attention_quotient, attention_setup, one_thread, trust_region_max  # noqa: F401
from torch import nn

from quotientsharp import tangent as T
from quotientsharp.functional import batch_loss
from quotientsharp.measures import adaptive_sharpness, checkpoints, euclidean_sharpness, geodesic_sharpness
from quotientsharp.measures.feasible import HorizontalBall
from quotientsharp.measures.reference import _project

pytestmark = pytest.mark.usefixtures("one_thread")


def test_checkpoint_schedule_matches_reference():
    # The pin is deliberate: it reproduces the reference implementation's floating-point rounding.
    # In floats p_4 * 20 = 0.7000000000000001 * 20 rounds up to 15; exact arithmetic of the formula
    # gives ceil(0.70 * 20) = 14 (checked below), which the reference code never uses.
    assert checkpoints(20) == [5, 9, 12, 15, 16, 18, 19, 20]
    p = [Fraction(0), Fraction(22, 100)]
    for _ in range(3):
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    assert [math.ceil(x * 20) for x in p[1:]] == [5, 9, 12, 14]
    assert checkpoints(100)[:4] == [22, 41, 58, 70]
    assert checkpoints(1) == [1]


def _slope(xs, ys):
    lx = torch.log(torch.tensor(xs, dtype=torch.float64))
    ly = torch.log(torch.tensor(ys, dtype=torch.float64))
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_first_order_limit_is_horizontal_gradient_norm(metric):
    model, batches = attention_setup(seed=11, n_batches=1)
    q = attention_quotient(model, metric)
    w0 = {n: p.detach() for n, p in model.named_parameters()}
    wl = {n: t.clone().requires_grad_(True) for n, t in w0.items()}
    grads = torch.autograd.grad(batch_loss(model, wl, batches[0], F.cross_entropy), list(wl.values()))
    gnorm = float(q.norm(w0, q.riemannian_gradient(w0, dict(zip(wl, grads)))))
    rhos = [1e-2, 1e-3, 1e-4]
    errs = [abs(geodesic_sharpness(model, batches, F.cross_entropy, rho, quotient=q, n_iter=5,
                                   progress=False).value / rho / gnorm - 1) for rho in rhos]
    assert errs[-1] < 1e-3
    assert 0.8 < _slope(rhos, errs) < 1.2  # the error of S / rho is O(rho)


def test_worst_case_dominates_random_feasible_points():
    model, batches = attention_setup(seed=2, n_batches=1)
    q = attention_quotient(model, "mix")
    rho = 0.1
    s = geodesic_sharpness(model, batches, F.cross_entropy, rho, quotient=q, progress=False).value
    w0 = {n: p.detach() for n, p in model.named_parameters()}
    ball = HorizontalBall(q, w0, rho)
    g = torch.Generator().manual_seed(0)
    loss0 = float(batch_loss(model, w0, batches[0], F.cross_entropy))
    with torch.no_grad():
        for i in range(100):
            r = rho if i % 2 else rho * float(torch.rand((), generator=g, dtype=torch.float64))
            xi = T.scale(ball.random_unit(g), r)
            inc = float(batch_loss(model, q.geodesic(w0, xi), batches[0], F.cross_entropy)) - loss0
            assert inc <= s
    # the maximiser is on the sphere and strictly better than the best random point
    assert s > 0


class Quadratic(nn.Module):
    """``forward`` returns the parameter; the loss is ``1/2 t^T A t + b^T t`` (targets ignored)."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self, x):
        return self.theta


def _quadratic(seed=0, d=12):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = 0.5 * (M + M.T)  # indefinite
    b = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)

    def loss_fn(t, _):
        return 0.5 * t @ A @ t + b @ t

    return Quadratic(theta), [(torch.zeros(1), torch.zeros(1))], loss_fn, A, b, theta


@pytest.mark.parametrize("measure", ["euclidean", "adaptive"])
@pytest.mark.parametrize("solver", ["riemannian", "reference"])
def test_quadratic_worst_case_matches_trust_region(measure, solver):
    model, batches, loss_fn, A, b, theta = _quadratic()
    rho = 0.3
    grad = A @ theta + b
    if measure == "euclidean":
        exact = trust_region_max(grad, A, rho)
        fn = euclidean_sharpness
    else:  # delta = theta * e, ||e|| <= rho
        exact = trust_region_max(grad * theta, theta[:, None] * A * theta[None, :], rho)
        fn = adaptive_sharpness
    s = fn(model, batches, loss_fn, rho, solver=solver, progress=False).value
    assert s <= exact + 1e-10
    assert s >= (0.99 if solver == "riemannian" else 0.95) * exact


def test_quadratic_plain_callable_model_and_restarts():
    _, batches, loss_fn, A, b, theta = _quadratic(seed=1)
    rho = 0.3
    exact = trust_region_max(A @ theta + b, A, rho)
    s = euclidean_sharpness(lambda p, x: p["theta"], batches, loss_fn, rho, params={"theta": theta},
                            n_iter=40, n_restarts=3, progress=False)
    assert exact * (1 - 1e-3) <= s.value <= exact + 1e-10
    assert len(s.traces[0]["loss_increase"]) == 4


def test_reference_ellipsoid_projection():
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(30, generator=g, dtype=torch.float64)}
    inv_c = {"a": 1 / w["a"].abs()}
    d = {"a": torch.randn(30, generator=g, dtype=torch.float64)}
    p = _project(d, inv_c, 0.1, ellipsoid=True)
    assert abs(float((p["a"] * inv_c["a"]).norm()) - 0.1) <= 1e-5
    # Euclidean projection onto the ellipsoid: d - p is normal to it, i.e. parallel to p / c^2
    n = p["a"] * inv_c["a"] ** 2
    r = d["a"] - p["a"]
    assert float((r - (r @ n) / (n @ n) * n).norm()) <= 1e-6 * float(r.norm())


def test_exact_and_second_order_geodesics_agree_to_third_order():
    model, batches = attention_setup(seed=4, n_batches=1)
    q = attention_quotient(model, "mix", eps_rel=1e-6)
    rhos = [0.04, 0.02, 0.01]
    kw = dict(quotient=q, n_iter=4, ode_steps=8, ode_tol=None, progress=False)
    diffs = []
    for rho in rhos:
        s2 = geodesic_sharpness(model, batches, F.cross_entropy, rho, geodesic="second", **kw).value
        se = geodesic_sharpness(model, batches, F.cross_entropy, rho, geodesic="exact", **kw).value
        diffs.append(abs(se - s2))
    assert 2.6 < _slope(rhos, diffs) < 3.4, diffs


def test_gradient_through_geodesic_ablation_is_a_lower_bound_too():
    model, batches = attention_setup(seed=6, n_batches=1)
    q = attention_quotient(model, "inv")
    kw = dict(quotient=q, progress=False)
    through = geodesic_sharpness(model, batches, F.cross_entropy, 0.1, **kw)
    direct = geodesic_sharpness(model, batches, F.cross_entropy, 0.1, grad_through_geodesic=False, **kw)
    assert through.config["grad_through_geodesic"] and not direct.config["grad_through_geodesic"]
    assert direct.value > 0 and math.isfinite(direct.value)
    assert through.value != direct.value


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_closed_form_endpoint_vjp_matches_autograd(metric):
    model, _ = attention_setup(seed=8)
    q = attention_quotient(model, metric, eps_rel=1e-6)
    w0 = {n: p.detach() for n, p in model.named_parameters()}
    xi = T.randn_like(w0, torch.Generator().manual_seed(0))
    c = T.randn_like(w0, torch.Generator().manual_seed(1))
    fast = q.geodesic_vjp(w0, xi, c, order=2, rest_order=2)
    leaf = {n: t.clone().requires_grad_(True) for n, t in xi.items()}
    end = q.geodesic(w0, leaf, order=2, rest_order=2)
    slow = torch.autograd.grad([end[n] for n in q.names], [leaf[n] for n in q.names], [c[n] for n in q.names])
    for n, s in zip(q.names, slow):
        assert torch.allclose(fast[n], s, rtol=1e-12, atol=1e-12 * float(s.abs().max()))
    assert any(not torch.allclose(fast[n], c[n]) for n in q.groups[0].names)  # Gamma contributes

"""Diagonal nets and the scalar toy: the solver against exact oracles (spec part 1 §8 items 12-14)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from test_sharpness_common import one_thread, trust_region_max  # noqa: F401

from quotientsharp.measures import diagonal_quotient, geodesic_sharpness, sum_squared_error
from quotientsharp.models import DiagonalNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(u, v):
    net = DiagonalNet(len(u))
    with torch.no_grad():
        net.u.copy_(u)
        net.v.copy_(v)
    return net


def _sharp(net, X, y, rho, metric, domain="restrict", n_iter=100, n_restarts=0):
    return geodesic_sharpness(net, [(X, y)], sum_squared_error, rho, quotient=diagonal_quotient(metric, domain),
                              n_iter=n_iter, n_restarts=n_restarts, progress=False).value


# ---------------------------------------------------------------- item 12: scalar toy
G0, H0, X0, Y0, RHO0 = 1.3, -0.7, 0.9, -0.5, 0.1


def _toy_formula(b, y0):
    return y0 ** 2 * (np.exp(4 * b) - 1) - 2 * Y0 * y0 * (np.exp(2 * b) - 1)


def _toy_grid_max(y0):
    b = np.linspace(-RHO0 / math.sqrt(2), RHO0 / math.sqrt(2), 2_000_001)
    return float(_toy_formula(b, y0).max())


def test_scalar_toy_reference_numbers_and_objective():
    y0 = G0 * H0 * X0
    assert abs(_toy_grid_max(y0) - 0.09485517) < 5e-9
    assert abs(2 * math.sqrt(2) * RHO0 * abs(y0 * (y0 - Y0)) - 0.07389577) < 5e-9
    # the library's objective along the exact geodesic is the formula
    net = _net(torch.tensor([G0], dtype=torch.float64), torch.tensor([H0], dtype=torch.float64))
    q = diagonal_quotient("inv")
    w0 = {"u": net.u.detach(), "v": net.v.detach()}
    X, y = torch.tensor([[X0]], dtype=torch.float64), torch.tensor([Y0], dtype=torch.float64)
    loss = lambda w: float(sum_squared_error(X @ (w["u"] * w["v"]), y))  # noqa: E731
    for b in (-0.07, 0.01, 0.05):
        xi = {"u": w0["u"] * b, "v": w0["v"] * b}
        assert abs(loss(q.geodesic(w0, xi)) - loss(w0) - _toy_formula(b, y0)) < 1e-12


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_scalar_toy_solver_equals_grid_max_on_the_orbit(alpha):
    y0 = G0 * H0 * X0
    net = _net(torch.tensor([G0 / alpha], dtype=torch.float64), torch.tensor([alpha * H0], dtype=torch.float64))
    X, y = torch.tensor([[X0]], dtype=torch.float64), torch.tensor([Y0], dtype=torch.float64)
    s = _sharp(net, X, y, RHO0, "inv", n_iter=20)
    assert abs(s - _toy_grid_max(y0)) < 1e-8


# ---------------------------------------------------------------- item 13: X^T X = I
def _orthonormal_problem(d=8, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    y = torch.randn(n, generator=g, dtype=torch.float64)
    u = (0.5 + torch.rand(d, generator=g, dtype=torch.float64)) * torch.sign(torch.randn(d, generator=g))
    v = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    return X, y, u, v


@pytest.mark.parametrize("domain", ["restrict", "extend"])
def test_diagonal_mixed_exact_formula(domain):
    X, y, u, v = _orthonormal_problem()
    rho = 0.05
    beta, beta_star = u * v, X.T @ y
    exact = 2 * math.sqrt(2) * rho * float((beta - beta_star).norm()) + 2 * rho ** 2
    s = _sharp(_net(u, v), X, y, rho, "mix", domain)
    assert exact * (1 - 1e-3) <= s <= exact + 1e-10


def test_diagonal_inverse_matches_multistart_oracle():
    X, y, u, v = _orthonormal_problem(seed=1)
    rho = 0.05
    beta, bstar = (u * v).numpy(), (X.T @ y).numpy()

    def neg(b):
        return -float(np.sum(beta ** 2 * (np.exp(4 * b) - 1) - 2 * beta * bstar * (np.exp(2 * b) - 1)))

    r = rho / math.sqrt(2)

    def on_sphere(z):  # the maximum of this convex-ish objective lies on the sphere ||b|| = r
        return neg(r * z / np.linalg.norm(z))

    rng = np.random.default_rng(0)
    values = [-minimize(on_sphere, x0, method="BFGS", options={"gtol": 1e-12}).fun
              for x0 in rng.standard_normal((10, len(beta)))]
    oracle = max(values)
    s = _sharp(_net(u, v), X, y, rho, "inv")
    assert oracle * (1 - 1e-3) <= s <= oracle + 1e-10


# ---------------------------------------------------------------- item 14: any X, mixed, extend
def test_diagonal_mixed_extend_trust_region_oracle_200d():
    g = torch.Generator().manual_seed(3)
    n, d = 100, 200
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    rho = 0.05
    beta = u * v
    # max_{||delta|| <= sqrt2 rho} 2 delta^T X^T (X beta - y) + delta^T X^T X delta
    exact = trust_region_max(2 * X.T @ (X @ beta - y), 2 * X.T @ X, math.sqrt(2) * rho)
    s = _sharp(_net(u, v), X, y, rho, "mix", "extend")
    assert exact * (1 - 1e-3) <= s <= exact + 1e-10

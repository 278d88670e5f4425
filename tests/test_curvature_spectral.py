"""Lanczos, power iteration, Hutchinson/Hutch++ and SLQ against exact spectra (spec §8)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_curvature_models import classification_data, single_thread, transformer  # noqa: F401

from quotientsharp.curvature import (
    FunctionOperator,
    HessianOperator,
    MatrixOperator,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    lanczos_tridiagonal,
    power_iteration,
    sample_probes,
    slq,
)
from quotientsharp.curvature.lanczos import tridiagonal


@pytest.fixture(scope="module")
def transformer_hessian():
    """Dense Hessian of a ≈2.4k-parameter SDPA transformer (validated HVPs, double backward)."""
    model = transformer(d_model=16)
    X, y = classification_data(16, (5, 4))
    H = HessianOperator(model, [(X, y)], F.cross_entropy).to_dense()
    return (H + H.T) / 2


def test_lanczos_top5_matches_eigvalsh(transformer_hessian):
    H = transformer_hessian
    assert 2000 < H.shape[0] < 3000
    exact = torch.linalg.eigvalsh(H)
    result = lanczos(MatrixOperator(H), k=5, m=60, tol=1e-12, progress=False)
    top = exact.flip(0)[:5]
    assert ((result.eigenvalues - top).abs() / top.abs()).max() < 1e-8
    assert result.residuals.max() < 1e-6 * top[0]
    vectors = result.eigenvectors
    assert (vectors.T @ vectors - torch.eye(5, dtype=torch.float64)).abs().max() < 1e-10


def test_lanczos_which_and_early_stop():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64)).Q
    eigenvalues = torch.linspace(-3, 1, 200, dtype=torch.float64)
    eigenvalues[-1] = 10.0
    eigenvalues[0] = -20.0
    A = Q @ torch.diag(eigenvalues) @ Q.T
    la = lanczos(A, k=1, which="LA", progress=False)
    assert abs(la.eigenvalues[0] - 10) < 1e-6 and la.config["steps"] < la.config["m"] and la.converged
    sa = lanczos(A, k=2, which="SA", m=120, progress=False)
    assert abs(sa.eigenvalues[0] + 20) < 1e-8 and abs(sa.eigenvalues[1] - eigenvalues[1]) < 1e-3
    lm = lanczos(A, k=2, which="LM", progress=False)
    assert torch.allclose(lm.eigenvalues, torch.tensor([-20.0, 10.0], dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="which"):
        lanczos(A, which="BE", progress=False)
    json.dumps(la.to_dict())


def test_lanczos_breakdown_restarts_and_deflation():
    """3 distinct eigenvalues: the Krylov space is exhausted after 3 steps (β₃ = 0, restart)."""
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64)).Q
    eigenvalues = torch.tensor([5.0] * 10 + [2.0] * 10 + [-1.0] * 10, dtype=torch.float64)
    A = MatrixOperator(Q @ torch.diag(eigenvalues) @ Q.T)
    basis, alpha, beta = lanczos_tridiagonal(A, torch.ones(30, dtype=torch.float64), 9, g)
    assert basis.shape == (30, 9) and beta[2] == 0 and (beta[:2] > 0.1).all()
    assert (basis.T @ basis - torch.eye(9, dtype=torch.float64)).abs().max() < 1e-12
    ritz = torch.linalg.eigvalsh(tridiagonal(alpha, beta))
    assert torch.min((ritz[:, None] - torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64)).abs(), 1).values.max() < 1e-8

    found = lanczos(A, k=3, tol=1e-12, progress=False)  # one start vector sees each eigenvalue once
    assert torch.allclose(found.eigenvalues, torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64), atol=1e-10)
    assert found.config["steps"] == 3
    deflated = lanczos(A, k=1, deflate=found.eigenvectors, tol=1e-12, progress=False)
    assert abs(deflated.eigenvalues[0] - 5.0) < 1e-10  # 9 more vectors remain in the λ=5 eigenspace
    assert (found.eigenvectors.T @ deflated.eigenvectors).abs().max() < 1e-10


def test_lanczos_in_a_metric_inner_product():
    """A = M⁻¹B is self-adjoint in ⟨u, v⟩_M = uᵀMv; its eigenvalues solve B x = λ M x."""
    g = torch.Generator().manual_seed(2)
    R = torch.randn(40, 40, generator=g, dtype=torch.float64)
    B = R @ R.T
    M = torch.diag(torch.rand(40, generator=g, dtype=torch.float64) + 0.5)
    op = FunctionOperator(40, lambda v: torch.linalg.solve(M, B @ v), inner=lambda u, v: (u.mT if u.ndim == 2 else u) @ (M @ v))
    exact = torch.linalg.eigvalsh(torch.diag(M.diag() ** -0.5) @ B @ torch.diag(M.diag() ** -0.5))
    result = lanczos(op, k=3, m=40, tol=1e-12, progress=False)
    assert ((result.eigenvalues - exact.flip(0)[:3]).abs() / exact[-1]).max() < 1e-10
    Y = result.eigenvectors
    assert (Y.T @ M @ Y - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-10


def test_lanczos_on_the_model_operator_directly():
    model = transformer()
    X, y = classification_data(16, (5, 4))
    op = HessianOperator(model, [(X, y)], F.cross_entropy)
    exact = torch.linalg.eigvalsh(op.to_dense())
    result = lanczos(op, k=2, m=op.n, tol=1e-10, progress=False)
    assert ((result.eigenvalues - exact.flip(0)[:2]).abs() / exact[-1]).max() < 1e-8


def test_power_iteration_top3_by_magnitude(transformer_hessian):
    H = transformer_hessian
    exact = torch.linalg.eigvalsh(H)
    by_magnitude = exact[exact.abs().argsort(descending=True)][:3]
    result = power_iteration(MatrixOperator(H), k=3, tol=1e-6, max_iter=1000, progress=False)
    assert ((result.eigenvalues - by_magnitude).abs() / by_magnitude.abs()).max() < 1e-4


def test_power_iteration_converges_to_largest_magnitude():
    A = torch.diag(torch.tensor([-6.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    result = power_iteration(A, k=1, tol=1e-10, max_iter=1000, progress=False)
    assert abs(result.eigenvalues[0] + 6) < 1e-8  # the most negative, not the largest


def test_hutchinson_within_4_stderr(transformer_hessian):
    H = transformer_hessian
    result = hutchinson(H, n_probes=1000, seed=3, progress=False)
    assert abs(result.value - float(H.trace())) < 4 * result.stderr
    assert result.samples.shape == (1000,)
    # Rademacher variance theory 2(‖H‖_F² − Σ H_ii²) within 15% of the empirical one
    theory = 2 * (float((H**2).sum()) - float((H.diag() ** 2).sum()))
    assert abs(float(result.samples.var()) / theory - 1) < 0.15
    gaussian = hutchinson(H, n_probes=200, distribution="gaussian", seed=3, progress=False)
    assert abs(gaussian.value - float(H.trace())) < 4 * gaussian.stderr


def test_hutchinson_stops_on_relative_stderr():
    A = torch.diag(torch.linspace(1, 2, 100, dtype=torch.float64)) + 0.01
    result = hutchinson(A, n_probes=1000, rtol=0.01, progress=False)
    assert result.samples.numel() < 1000 and result.stderr <= 0.01 * abs(result.value)


def test_hutch_plus_plus_exact_on_low_rank():
    g = torch.Generator().manual_seed(4)
    U = torch.randn(300, 10, generator=g, dtype=torch.float64)
    A = U @ U.T  # rank 10 < 33 sketch vectors: Hutch++ is exact
    result = hutch_plus_plus(A, budget=99, progress=False)
    assert abs(result.value - float(A.trace())) < 1e-8 * float(A.trace())
    plain = hutchinson(A, n_probes=99, progress=False)
    assert abs(plain.value - float(A.trace())) > 1e-3


def test_slq_identity_equals_hutchinson_on_same_probes(transformer_hessian):
    op = MatrixOperator(transformer_hessian)
    probes = sample_probes(op.shape[0], 5, generator=torch.Generator().manual_seed(5))
    slq_trace = slq(op, m=10, probes=probes, progress=False).trace()
    hutch = hutchinson(op, probes=probes, progress=False)
    assert (slq_trace.samples - hutch.samples).abs().max() < 1e-10 * hutch.samples.abs().max()


def test_full_lanczos_reproduces_quadratic_form():
    g = torch.Generator().manual_seed(6)
    Q = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64)).Q
    eigenvalues = torch.rand(50, generator=g, dtype=torch.float64) * 4 + 0.1
    A = Q @ torch.diag(eigenvalues) @ Q.T
    z = sample_probes(50, 1, generator=g)
    result = slq(A, m=50, probes=z, progress=False)
    v = z[:, 0] / z[:, 0].norm()
    for f in (torch.log, torch.sqrt, lambda t: t**3):
        exact = float(v @ (Q @ torch.diag(f(eigenvalues)) @ Q.T) @ v)
        quadrature = float((result.weights[0] * f(result.nodes[0])).sum())
        assert abs(quadrature - exact) < 1e-8


def test_slq_density_and_weights_normalised(transformer_hessian):
    result = slq(transformer_hessian, m=30, n_probes=3, progress=False)
    assert (result.weights.sum(1) - 1).abs().max() < 1e-6
    assert torch.allclose(result.probe_norms_sq, torch.full((3,), float(result.n), dtype=torch.float64))
    density = result.density()
    assert density.grid.numel() == 10_000
    assert abs(float(torch.trapezoid(density.density, density.grid)) - 1) < 1e-6
    assert density.variance == pytest.approx(1e-5 * max(1.0, float(density.grid[-1] - density.grid[0])))
    assert float(density.grid[0]) == pytest.approx(float(result.nodes.min()) - 0.01)
    json.dumps(result.to_dict())


def test_slq_log_det():
    g = torch.Generator().manual_seed(7)
    Q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64)).Q
    eigenvalues = torch.rand(60, generator=g, dtype=torch.float64) + 0.5
    A = Q @ torch.diag(eigenvalues) @ Q.T
    result = slq(A, m=20, n_probes=50, progress=False).log_det()
    assert abs(result.value - float(eigenvalues.log().sum())) < 4 * result.stderr + 1e-6
    eigenvalues[0] = -1.0
    indefinite = slq(Q @ torch.diag(eigenvalues) @ Q.T, m=20, n_probes=5, progress=False)
    with pytest.raises(ValueError, match="log det is undefined"):
        indefinite.log_det()
    assert math.isfinite(indefinite.log_det(clamp_min=1e-3).value)

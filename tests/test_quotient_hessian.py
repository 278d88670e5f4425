"""The quotient Hessian A = Π M⁻¹(H − C)Π (float64, a one-layer d=8, 2-head attention model)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from geometry_cases import PooledAttention
from torch import nn

from quotientsharp.adapters import find_symmetries
from quotientsharp.curvature import (
    HessianOperator,
    QuotientHessianOperator,
    RenyiResult,
    hutchinson,
    quotient_hessian_top_eigenvalues,
    quotient_hessian_trace,
    quotient_renyi_sharpness,
    renyi_entropy,
)
from quotientsharp.curvature.slq import slq
from quotientsharp.models import MLP

DT = torch.float64


def mse(out, target):
    return ((out - target) ** 2).mean()


@functools.lru_cache
def problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = PooledAttention().to(DT)
    with torch.no_grad():  # nonzero biases, so the bias rows of the GL blocks matter
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT))
    x, y = torch.randn(6, 5, 8, generator=g, dtype=DT), torch.randn(6, 8, generator=g, dtype=DT)
    return model, [(x, y)]


@functools.lru_cache
def operator(metric: str, transformed: bool = False):
    """The exact (eps_rel = 0) operator at w, or at ψ(A, w) for a random A ∈ GL(h) per head."""
    model, loader = problem()
    if transformed:
        op = operator(metric)
        elements = op.quotient.random_element(op.point, generator=torch.Generator().manual_seed(1), max_cond=30)
        model = copy.deepcopy(model)
        model.load_state_dict(op.quotient.action(op.point, elements), strict=False)
    return QuotientHessianOperator(model, loader, mse, metric=metric, eps_rel=0.0)


@functools.lru_cache
def dense(metric: str, transformed: bool = False):
    """``(A, M)`` as dense matrices."""
    op = operator(metric, transformed)
    eye = torch.eye(op.n, dtype=DT)
    return op.to_dense(), torch.stack([op.metric_matvec(eye[:, i]) for i in range(op.n)], 1)


def horizontal_spectrum(A, M, kernel_dim):
    """Eigenvalues of A (generalized eigenproblem MA x = λ M x), the kernel_dim of smallest |λ|
    removed (and checked to be 0), sorted ascending."""
    L = torch.linalg.cholesky(M)
    C = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, M @ A, upper=False).T, upper=False)
    values = torch.linalg.eigvalsh((C + C.T) / 2)  # L⁻¹(MA)L⁻ᵀ, similar to A
    order = values.abs().argsort()
    scale = values.abs().max()
    # round-off of the Cholesky-whitened problem grows with cond(M) (~1e7 after a GL action)
    kernel_tol = max(1e-12, torch.finfo(M.dtype).eps * float(torch.linalg.cond(M)))
    assert values[order[:kernel_dim]].abs().max() <= kernel_tol * scale
    assert values[order[kernel_dim]].abs() > 1e-8 * scale  # generic: no further zeros
    return values[order[kernel_dim:]].sort().values


def random_horizontal(op, seed):
    xi = op.project(torch.randn(op.n, generator=torch.Generator().manual_seed(seed), dtype=DT))
    return xi / xi.abs().max()


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_bilinear_form_is_second_derivative_along_exact_geodesic(metric):
    op = operator(metric)
    xi = random_horizontal(op, seed=2)
    form = float(op.inner(xi, op.matvec(xi)))  # ⟨ξ, Aξ⟩_M = ξᵀ(H − C)ξ for horizontal ξ

    def loss_on_geodesic(t):  # RK4 on the GL blocks, closed form on the adaptive rest
        end = op.quotient.geodesic(op.point, op.to_dict(xi), t, order="exact", rest_order="exact",
                                   n_steps=4, tol=None)
        return op.hessian.loss_and_gradient(op.to_flat(end) - op.to_flat(op.point))[0]

    def second_difference(h):
        return (loss_on_geodesic(h) - 2 * op.hessian.loss + loss_on_geodesic(-h)) / h**2

    h = 2e-3
    richardson = (4 * second_difference(h / 2) - second_difference(h)) / 3
    assert form == pytest.approx(richardson, rel=1e-8)
    plain = float(xi @ op.hessian.matvec(xi))  # the Christoffel term matters here
    assert abs(plain - richardson) > 0.1 * abs(richardson)


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_dense_operator_is_metric_self_adjoint_with_vertical_kernel(metric):
    op = operator(metric)
    A, M = dense(metric)
    assert op.kernel_dim == 2 * 2 * 4**2  # 2 heads × (QK, VO) × h²
    assert torch.allclose(M, M.T, atol=0) and bool((torch.linalg.eigvalsh(M) > 0).all())
    B = M @ A
    assert (B - B.T).abs().max() <= 1e-12 * B.abs().max()
    vertical = op.to_flat(op.quotient.random_vertical(op.point, torch.Generator().manual_seed(3)))
    assert op.matvec(vertical).abs().max() <= 1e-12 * A.abs().max() * vertical.abs().max()
    assert (torch.stack([op.project(A[:, j]) for j in range(0, op.n, 7)], 1) - A[:, ::7]).abs().max() \
        <= 1e-12 * A.abs().max()  # the range is horizontal
    u, v = torch.randn(2, op.n, generator=torch.Generator().manual_seed(4), dtype=DT)
    assert float(op.inner(u, v)) == pytest.approx(float(op.quotient.inner(op.point, op.to_dict(u), op.to_dict(v))),
                                                  rel=1e-13)


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_spectrum_invariant_under_gl_action_unlike_plain_hessian(metric):
    op, op_t = operator(metric), operator(metric, transformed=True)
    spectrum = horizontal_spectrum(*dense(metric), op.kernel_dim)
    spectrum_t = horizontal_spectrum(*dense(metric, True), op_t.kernel_dim)
    assert op_t.kernel_dim == op.kernel_dim and len(spectrum) == op.n_horizontal
    assert (spectrum - spectrum_t).abs().max() <= 1e-11 * spectrum.abs().max()
    plain = torch.linalg.eigvalsh(op.hessian.to_dense())
    plain_t = torch.linalg.eigvalsh(op_t.hessian.to_dense())
    assert (plain - plain_t).abs().max() > 0.1 * plain.abs().max()
    # equivariance of the operator itself: A' dψ ξ = dψ A ξ with ψ the same group element
    elements = op.quotient.random_element(op.point, generator=torch.Generator().manual_seed(1), max_cond=30)
    xi = torch.randn(op.n, generator=torch.Generator().manual_seed(5), dtype=DT)
    push = lambda v: op.to_flat(op.quotient.pushforward(op.point, elements, op.to_dict(v)))  # noqa: E731
    lhs, rhs = op_t.matvec(push(xi)), push(op.matvec(xi))
    assert (lhs - rhs).abs().max() <= 1e-9 * rhs.abs().max()


def test_no_symmetry_euclidean_rest_is_the_hessian():
    torch.manual_seed(0)
    model = MLP([3, 5, 2], activation="tanh").to(DT)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT))]
    op = QuotientHessianOperator(model, loader, mse, rest="euclidean")
    assert op.kernel_dim == 0 and op.n_horizontal == op.n
    H = HessianOperator(model, loader, mse).to_dense()
    assert (op.to_dense() - H).abs().max() <= 1e-13 * H.abs().max()
    v = torch.randn(op.n, generator=g, dtype=DT)
    assert float(op.inner(v, v)) == pytest.approx(float(v @ v), rel=1e-14)


def test_hvp_modes_agree():
    model, loader = problem()
    v = torch.randn(288, generator=torch.Generator().manual_seed(6), dtype=DT)
    a = QuotientHessianOperator(model, loader, mse, mode="reverse_over_reverse").matvec(v)
    b = QuotientHessianOperator(model, loader, mse, mode="forward_over_reverse").matvec(v)
    assert (a - b).abs().max() <= 1e-11 * a.abs().max()


def test_zero_weight_masked_by_adaptive_metric_joins_the_kernel():
    model, loader = problem()
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.att.o.bias[0] = 0.0
    op = QuotientHessianOperator(model, loader, mse, eps_rel=0.0)
    assert op.kernel_dim == 64 + 1
    e = op.to_flat({n: torch.zeros_like(t) for n, t in op.point.items()})
    e[op.to_flat({n: t.new_full(t.shape, float(n == "att.o.bias")) for n, t in op.point.items()}).argmax()] = 1.0
    assert op.matvec(e).abs().max() == 0


def test_estimators_agree_with_dense_ground_truth():
    op = operator("mix")
    spectrum = horizontal_spectrum(*dense("mix"), op.kernel_dim)
    top = op.top_eigenvalues(k=3, m=60, progress=False)
    assert torch.allclose(top.eigenvalues, spectrum.flip(0)[:3], rtol=1e-8, atol=0)
    assert bool((op.project(top.eigenvectors[:, 0]) - top.eigenvectors[:, 0]).abs().max()
                <= 1e-10 * top.eigenvectors[:, 0].abs().max())

    trace = op.hutchinson(n_probes=10, seed=0)
    assert abs(trace.value - float(spectrum.sum())) <= 4 * trace.stderr
    euclidean = hutchinson(op, n_probes=10, progress=False)  # the generic estimator, unbiased for Tr A
    assert abs(euclidean.value - float(spectrum.sum())) <= 4 * euclidean.stderr

    result = op.slq(m=30, n_probes=10, seed=0, progress=False)
    assert result.n == op.n_horizontal == 224
    assert torch.allclose(result.trace().samples, trace.samples, rtol=1e-10, atol=0)  # same probes
    assert result.density(n_grid=2000).mass_before_normalisation == pytest.approx(1, abs=0.05)
    for alpha in (0.5, 1.5):  # (m = 15 is biased by ~0.1-0.2 here: indefinite spectrum, mass near 0)
        exact = renyi_entropy(spectrum, alpha)
        assert renyi_entropy(result, alpha).estimate == pytest.approx(exact.estimate, abs=0.1)

    # m Lanczos steps integrate degree ≤ 2m − 1 exactly: the rule gives ⟨z, A⁵ z⟩_M with ‖z‖²_M = n_h
    z = op.sample_probes(1, seed=7)[:, 0]
    A, M = dense("mix")
    exact = float(z @ M @ torch.linalg.matrix_power(A, 5) @ z)
    rule = op.slq(m=3, n_probes=1, seed=7, progress=False).spectral_sum(lambda t: t**5).value
    assert rule == pytest.approx(exact, rel=1e-9)
    assert float(op.inner(z, z)) == pytest.approx(op.n_horizontal, rel=1e-12)


def test_model_level_functions():
    model, loader = problem()
    kw = dict(metric="mix", eps_rel=0.0)
    top = quotient_hessian_top_eigenvalues(model, loader, mse, k=1, progress=False, **kw)
    spectrum = horizontal_spectrum(*dense("mix"), operator("mix").kernel_dim)
    assert float(top.eigenvalues[0]) == pytest.approx(float(spectrum[-1]), rel=1e-6)
    trace = quotient_hessian_trace(model, loader, mse, method="slq", m=4, n_probes=3, progress=False, **kw)
    assert trace.config["n"] == 224 and trace.config["kernel_dim"] == 64
    values = quotient_renyi_sharpness(model, loader, mse, alpha=[0.5, 1.5], m=4, n_probes=3, progress=False, **kw)
    assert set(values) == {0.5, 1.5} and all(isinstance(v, RenyiResult) for v in values.values())
    direct = renyi_entropy(operator("mix").slq(m=4, n_probes=3, seed=0, progress=False), 0.5)
    generic = slq(operator("mix"), m=4, n_probes=3, seed=0, progress=False)  # delegates: horizontal probes
    assert generic.n == 224 and renyi_entropy(generic, 0.5).estimate == pytest.approx(direct.estimate, rel=1e-12)
    assert values[0.5].estimate == pytest.approx(direct.estimate, rel=1e-12)
    record = values[0.5].to_dict()
    assert record["sharpness"] == -record["estimate"] and record["config"]["n"] == 224


def test_bad_inputs():
    model, loader = problem()
    op = operator("mix")
    with pytest.raises(ValueError, match="metric"):
        QuotientHessianOperator(model, loader, mse, metric="euclid")
    with pytest.raises(ValueError, match="rest"):
        QuotientHessianOperator(model, loader, mse, rest="flat")
    with pytest.raises(ValueError, match="quotient="):
        QuotientHessianOperator(model, loader, mse, quotient=op.quotient, metric="inv")
    partial = find_symmetries(nn.Linear(2, 2).to(DT))
    with pytest.raises(ValueError, match="exactly the trainable parameters"):
        QuotientHessianOperator(model, loader, mse, quotient=partial)
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(op.n + 1, dtype=DT))
    with pytest.raises(ValueError, match="method"):
        op.top_eigenvalues(method="arnoldi")
    with pytest.raises(ValueError, match="method"):
        quotient_hessian_trace(model, loader, mse, method="hutch++")
    with pytest.raises(ValueError, match="alpha"):
        renyi_entropy(op.slq(m=2, n_probes=2, progress=False), alpha=0.0)

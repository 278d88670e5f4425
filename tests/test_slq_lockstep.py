"""Lockstep SLQ (all probes advance together, one matmat per Lanczos step) against the sequential
algorithm (probe after probe) and against dense eigendecompositions, float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from geometry_cases import PooledAttention
from test_curvature_models import classification_data, single_thread  # noqa: F401
from torch import nn

from quotientsharp.curvature import FunctionOperator, HessianOperator, MatrixOperator, QuotientHessianOperator
from quotientsharp.curvature.lanczos import lanczos_tridiagonal, lanczos_tridiagonal_lockstep, tridiagonal
from quotientsharp.curvature.slq import slq

DT = torch.float64


def assert_same_rules(a, b, rtol=1e-10):
    """Two SLQ results with equal nodes, weights and probe norms (up to rounding)."""
    scale = a.nodes.abs().max()
    assert a.nodes.shape == b.nodes.shape
    assert (a.nodes - b.nodes).abs().max() <= rtol * scale
    assert (a.weights - b.weights).abs().max() <= 1e-9
    assert torch.allclose(a.probe_norms_sq, b.probe_norms_sq, rtol=1e-12, atol=0)
    assert a.n == b.n and a.config == b.config


def random_symmetric(n: int, seed: int) -> torch.Tensor:
    R = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return (R + R.T) / 2


class CountingOperator(MatrixOperator):
    """A dense operator that records the number of columns of every product."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls = []

    def matvec(self, v):
        self.calls.append(1)
        return super().matvec(v)

    def matmat(self, V):
        self.calls.append(V.shape[1])
        return super().matmat(V)


def test_lockstep_equals_sequential_on_a_matrix_with_one_product_per_step():
    A = random_symmetric(80, 0)
    sequential = slq(CountingOperator(A), m=15, n_probes=7, seed=3, progress=False, lockstep=False)
    op = CountingOperator(A)
    lockstep = slq(op, m=15, n_probes=7, seed=3, progress=False)
    assert_same_rules(sequential, lockstep)
    assert op.calls == [7] * 15  # one 7-column product per Lanczos step
    for block in (1, 3):  # probes in blocks: same rules, ceil(7/block) products per step
        op = CountingOperator(A)
        assert_same_rules(sequential, slq(op, m=15, n_probes=7, seed=3, progress=False, probe_block=block))
        assert len(op.calls) == 15 * -(-7 // block)
    # and the tridiagonals themselves
    Z = torch.randn(80, 2, generator=torch.Generator().manual_seed(5), dtype=DT)
    alpha, beta, basis = lanczos_tridiagonal_lockstep(MatrixOperator(A), Z, 10, torch.Generator())
    for p in range(2):
        Q, a, b = lanczos_tridiagonal(MatrixOperator(A), Z[:, p], 10, torch.Generator())
        assert torch.allclose(alpha[p], a, rtol=0, atol=1e-12) and torch.allclose(beta[p], b, rtol=0, atol=1e-12)
        assert torch.allclose(basis[p].T, Q, rtol=0, atol=1e-12)
        assert (basis[p] @ basis[p].T - torch.eye(10, dtype=DT)).abs().max() < 1e-12


def test_lockstep_in_a_metric_inner_product_batched_and_column_by_column():
    """A = M⁻¹B, self-adjoint in uᵀMv: the same rules with a batched metric, with ``inner`` only,
    and sequentially; with m = n each rule reproduces ⟨z, f(A) z⟩_M exactly."""
    g = torch.Generator().manual_seed(2)
    B = random_symmetric(40, 1)
    M = torch.diag(torch.rand(40, generator=g, dtype=DT) + 0.5)
    solve = lambda V: torch.linalg.solve(M, B @ V)  # noqa: E731
    inner_only = FunctionOperator(40, solve, solve, inner=lambda u, v: (u.mT if u.ndim == 2 else u) @ (M @ v))
    batched = FunctionOperator(40, solve, solve, metric_matmat=lambda V: M @ V)
    probes = torch.randn(40, 4, generator=g, dtype=DT)
    sequential = slq(inner_only, m=12, probes=probes, progress=False, lockstep=False)
    assert_same_rules(sequential, slq(inner_only, m=12, probes=probes, progress=False))
    assert_same_rules(sequential, slq(batched, m=12, probes=probes, progress=False))

    full = slq(batched, m=40, probes=probes, progress=False)
    # exact ⟨z, |A|^0.5 z⟩_M through C = M^{1/2} A M^{-1/2} = M^{-1/2} B M^{-1/2}
    root = M.diag().sqrt()
    values, vectors = torch.linalg.eigh(B / root[:, None] / root[None, :])
    Y = vectors.T @ (root[:, None] * probes)
    exact = (Y**2 * values.abs()[:, None] ** 0.5).sum(0)
    assert torch.allclose(full.spectral_sum(lambda t: t.abs() ** 0.5).samples, exact, rtol=1e-8, atol=0)


def test_breakdown_restarts_give_the_same_spectral_sums():
    """Three distinct eigenvalues: every probe's Krylov space is exhausted after 3 steps."""
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DT)).Q
    eigenvalues = torch.tensor([5.0] * 10 + [2.0] * 10 + [-1.0] * 10, dtype=DT)
    A = MatrixOperator(Q @ torch.diag(eigenvalues) @ Q.T)
    alpha, beta, _ = lanczos_tridiagonal_lockstep(A, torch.randn(30, 4, generator=g, dtype=DT), 9, g)
    assert (beta[:, 2] == 0).all() and (beta[:, :2] > 0.1).all()
    for p in range(4):
        ritz = torch.linalg.eigvalsh(tridiagonal(alpha[p], beta[p]))
        assert torch.min((ritz[:, None] - eigenvalues.unique()).abs(), 1).values.max() < 1e-8
    sequential = slq(A, m=9, n_probes=4, seed=1, progress=False, lockstep=False)
    lockstep = slq(A, m=9, n_probes=4, seed=1, progress=False)
    for f in (lambda t: t, lambda t: t**2, lambda t: t.abs() ** 0.5):
        assert torch.allclose(lockstep.spectral_sum(f).samples, sequential.spectral_sum(f).samples, rtol=1e-10)
    assert (lockstep.probe_norms_sq == 30).all()  # Rademacher: ‖z‖² = n
    Z = A.sample_probes(4, seed=1)
    for k in (1, 2, 5):  # the Krylov space is invariant: each rule is exact for every polynomial
        exact = (Z * (torch.linalg.matrix_power(A.matrix, k) @ Z)).sum(0)
        assert torch.allclose(lockstep.spectral_sum(lambda t, k=k: t**k).samples, exact, rtol=1e-10, atol=0)


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).to(DT)


def test_lockstep_on_a_model_hessian_against_dense_eigendecomposition():
    model = small_mlp()
    X, y = classification_data(20, (4,))
    X = X.to(DT)
    loader = [(X[:7], y[:7]), (X[7:], y[7:])]  # two batches, size-weighted
    op = HessianOperator(model, loader, F.cross_entropy)
    sequential = slq(op, m=10, n_probes=5, seed=4, progress=False, lockstep=False)
    assert_same_rules(sequential, slq(op, m=10, n_probes=5, seed=4, progress=False), rtol=1e-9)

    H = op.to_dense()
    values, vectors = torch.linalg.eigh((H + H.T) / 2)
    full = slq(op, m=op.n, n_probes=3, seed=4, progress=False)  # m = n: exact per probe
    Z = op.sample_probes(3, 4)
    Y = vectors.T @ Z
    for f in (lambda t: t, lambda t: t.abs() ** 0.5, lambda t: t.abs() ** 1.5):
        exact = (Y**2 * f(values)[:, None]).sum(0)
        assert torch.allclose(full.spectral_sum(f).samples, exact, rtol=1e-8, atol=1e-10 * float(values.abs().max()))


@pytest.fixture(scope="module")
def quotient_operator():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = PooledAttention().to(DT)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT))
    x, y = torch.randn(6, 5, 8, generator=g, dtype=DT), torch.randn(6, 8, generator=g, dtype=DT)
    return QuotientHessianOperator(model, [(x[:4], y[:4]), (x[4:], y[4:])], lambda o, t: ((o - t) ** 2).mean(),
                                   metric="mix", eps_rel=0.0)


def test_quotient_geometry_batched_over_columns_equals_column_by_column(quotient_operator):
    op = quotient_operator
    V = torch.randn(op.n, 5, generator=torch.Generator().manual_seed(3), dtype=DT)
    single = {
        op._project: op.project, op._riemannian_gradient: op.riemannian_gradient,
        op._metric: op.metric_matvec, op._christoffel: op.christoffel_matvec,
    }
    for dict_map, vector_map in single.items():
        batched = op.map_columns(dict_map, V)
        looped = torch.stack([vector_map(V[:, j]) for j in range(5)], 1)
        assert torch.allclose(batched, looped, rtol=1e-11, atol=1e-11 * float(looped.abs().max()))
    assert op.vmap_failures == {}  # the attention GL geometry vmaps: no column loop was used
    # the vmapped torch.func metric and Christoffel maps against their definitions by autograd.grad
    xi = op.to_dict(V[:, 0])
    with torch.enable_grad():
        zeta = {n: torch.zeros_like(t, requires_grad=True) for n, t in op.point.items()}
        metric = torch.autograd.grad(op.quotient.inner(op.point, xi, zeta), list(zeta.values()))
        leaf = {n: t.clone().requires_grad_() for n, t in xi.items()}
        gamma = op.quotient.christoffel(op.point, leaf)
        value = 0.5 * sum((op._gradient[n] * gamma[n]).sum() for n in op.param_names)
        christoffel = torch.autograd.grad(value, list(leaf.values()))
    batched_metric, batched_christoffel = op.metric_matmat(V)[:, 0], op.map_columns(op._christoffel, V)[:, 0]
    assert torch.allclose(batched_metric, op.to_flat(dict(zip(op.param_names, metric))), rtol=1e-12, atol=0)
    assert torch.allclose(batched_christoffel, op.to_flat(dict(zip(op.param_names, christoffel))),
                          rtol=1e-11, atol=1e-13 * float(batched_christoffel.abs().max()))
    # a map with data-dependent control flow does not vmap: served column by column, remembered
    def scaled_by_sign_of_sum(xi):
        return {n: t * (1.0 if float(t.sum()) > 0 else -1.0) for n, t in xi.items()}

    looped = torch.stack([op.to_flat(scaled_by_sign_of_sum(op.to_dict(V[:, j]))) for j in range(5)], 1)
    assert torch.equal(op.map_columns(scaled_by_sign_of_sum, V), looped)
    assert "scaled_by_sign_of_sum" in op.vmap_failures
    # matmat equals the operator applied column by column
    AV = op.matmat(V)
    assert torch.allclose(AV[:, 2], op.matvec(V[:, 2]), rtol=1e-10, atol=1e-10 * float(AV.abs().max()))


def test_quotient_slq_lockstep_equals_sequential_and_dense(quotient_operator):
    op = quotient_operator
    sequential = op.slq(m=12, n_probes=4, seed=2, progress=False, lockstep=False)
    lockstep = op.slq(m=12, n_probes=4, seed=2, progress=False)
    assert_same_rules(sequential, lockstep, rtol=1e-8)
    probes = op.sample_probes(4, seed=2)
    assert torch.allclose(lockstep.probe_norms_sq, torch.full((4,), float(op.n_horizontal), dtype=DT), rtol=1e-12)
    assert (op.map_columns(op._project, probes) - probes).abs().max() <= 1e-10 * probes.abs().max()  # horizontal

    # m = 5 Lanczos steps integrate t^k, k ≤ 9, exactly: ⟨z, A^k z⟩_M from the dense operator
    A = op.to_dense()
    MZ = op.metric_matmat(probes)
    short = op.slq(m=5, n_probes=4, seed=2, progress=False)
    power = probes.clone()
    for k in range(1, 10):
        power = A @ power
        exact = (MZ * power).sum(0)
        assert torch.allclose(short.spectral_sum(lambda t, k=k: t**k).samples, exact, rtol=1e-8, atol=0)


def test_bad_inputs():
    A = MatrixOperator(random_symmetric(10, 0))
    with pytest.raises(ValueError, match="probe_block"):
        slq(A, m=3, n_probes=2, probe_block=0, progress=False)
    with pytest.raises(ValueError, match="probes must have shape"):
        slq(A, m=3, probes=torch.ones(9, 2, dtype=DT), progress=False)


def test_reused_batch_products_give_identical_products_within_the_cap():
    model = small_mlp()
    X, y = classification_data(20, (4,))
    op = HessianOperator(model, [(X[:7].to(DT), y[:7]), (X[7:].to(DT), y[7:])], F.cross_entropy)
    built = []
    original = op.batch_product
    op.batch_product = lambda batch: built.append(1) or original(batch)
    V = torch.randn(op.n, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    reference = op.matmat(V)
    assert len(built) == 2
    with op.reuse_batch_products():
        with op.reuse_batch_products():  # nested: shares the outer cache
            first = op.matmat(V)
        second = op.matmat(V)
        assert len(built) == 4 and sorted(op._product_cache) == [0, 1]  # built once per batch
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert op._product_cache is None  # released
    with op.reuse_batch_products(max_batches=1):  # only the first batch is kept
        op.matmat(V)
        op.matmat(V)
    assert len(built) == 7


def test_products_built_by_torch_func_are_kept_and_still_right():
    """The GGN builds its per-batch product with torch.func.vjp: kept and reused alike."""
    from quotientsharp.curvature import GGNOperator

    model = small_mlp()
    X, y = classification_data(20, (4,))
    op = GGNOperator(model, [(X[:7].to(DT), y[:7]), (X[7:].to(DT), y[7:])], F.cross_entropy)
    V = torch.randn(op.n, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    reference = op.matmat(V)
    with op.reuse_batch_products():
        assert torch.equal(op.matmat(V), reference) and torch.equal(op.matmat(V), reference)
        assert sorted(op._product_cache) == [0, 1]
    assert_same_rules(slq(op, m=6, n_probes=3, seed=0, progress=False, lockstep=False),
                      slq(op, m=6, n_probes=3, seed=0, progress=False), rtol=1e-9)


def test_kept_gradient_graphs_are_freed():
    """Every activation saved by the per-batch gradient graphs is released after the run (a
    saved-tensor pack hook returning the tensor made graph cycles that leaked ~25 MB per SLQ run)."""
    import gc
    import weakref

    model = small_mlp()
    X, y = classification_data(20, (4,))
    alive = []
    handles = [m.register_forward_hook(lambda mod, inp, out: alive.append(weakref.ref(out)))
               for m in model.modules() if not list(m.children())]
    op = HessianOperator(model, [(X[:7].to(DT), y[:7]), (X[7:].to(DT), y[7:])], F.cross_entropy)
    with op.reuse_batch_products():
        slq(op, m=4, n_probes=3, seed=0, progress=False)
        assert len(op._product_cache) == 2
    del op
    gc.collect()
    for h in handles:
        h.remove()
    assert alive and all(ref() is None for ref in alive)

"""Survivors of the mutation run on quotientsharp/curvature/lanczos.py: the breakdown threshold,
restarts and their generator, deflation, early stopping, the metric applications of the lockstep
runs, the defaults, progress bars, devices, and the EigenResult records of Lanczos and power iteration.

Ground truth is dense float64 linear algebra on small explicit matrices: Ritz values of ``A`` on a
Krylov space built densely (QR of ``[v, Av, A²v, …]``), ``torch.linalg.eigh``, Rayleigh quotients
``vᵀA^{2i+1}v / vᵀA^{2i}v`` of power iteration in closed form, the start and restart vectors
re-drawn by hand from ``torch.Generator().manual_seed(seed)``, tridiagonal matrices whose Lanczos
run from ``e₀`` is the matrix itself (so β sits exactly at the breakdown boundary), counted
operator/metric applications, and the documented contracts (defaults, ``desc`` of the bars,
record keys).
"""
from __future__ import annotations

import inspect
import re

import pytest
import torch
from tensor_checks import DT, DeviceProbe, gen, meta_operator, randn

from quotientsharp.curvature import FunctionOperator, MatrixOperator
from quotientsharp.curvature.lanczos import (
    EigenResult,
    _project_out,
    lanczos,
    lanczos_tridiagonal,
    lanczos_tridiagonal_lockstep,
    power_iteration,
    tridiagonal,
)

REPEATED = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=DT))


def sym(n: int, seed: int) -> torch.Tensor:
    R = randn(n, n, seed=seed)
    return (R + R.T) / 2


def krylov(A: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
    """Orthonormal basis of ``span(v, Av, …, A^{j-1} v)`` (QR of normalised powers)."""
    cols = [v / v.norm()]
    for _ in range(j - 1):
        w = A @ cols[-1]
        cols.append(w / w.norm())
    return torch.linalg.qr(torch.stack(cols, 1)).Q


def ritz_pairs(A: torch.Tensor, v: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    K = krylov(A, v, j)
    theta, U = torch.linalg.eigh(K.T @ A @ K)
    return theta, K @ U


def orthogonalise(q: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    q = q - B @ (B.T @ q)
    q = q - B @ (B.T @ q)
    return q / q.norm()


def tridiagonal_matrix(alpha: list[float], beta: list[float]) -> torch.Tensor:
    a, b = torch.tensor(alpha, dtype=DT), torch.tensor(beta, dtype=DT)
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def e(n: int, i: int) -> torch.Tensor:
    v = torch.zeros(n, dtype=DT)
    v[i] = 1.0
    return v


# --- lockstep: metric applications and agreement with the dense Ritz values in a metric ---------


def metric_problem(n: int = 8):
    """``A = M⁻¹B`` (self-adjoint in ``⟨u, v⟩ = uᵀMv``) with a counter of metric applications."""
    B = sym(n, 1) + 3 * torch.eye(n, dtype=DT)
    d = torch.linspace(0.5, 2.0, n, dtype=DT)
    calls = []

    def metric_matmat(V):
        calls.append(V.shape[1])
        return d[:, None] * V

    op = FunctionOperator(
        n, lambda v: (B @ v) / d, matmat=lambda V: (B @ V) / d[:, None], metric_matmat=metric_matmat
    )
    return op, B, torch.diag(d), calls


def test_lockstep_applies_the_metric_three_times_per_step_and_matches_dense_ritz_values():
    """Per step: ``M W`` once (shared by ``⟨q, Aq⟩`` and the first Gram–Schmidt pass), once for
    the second pass, once for the norm; plus the initial normalisation. Run ``p``'s T has the
    Ritz values of ``B x = θ M x`` on the Krylov space of ``A`` from ``V0[:, p]``."""
    op, B, M, calls = metric_problem()
    V0 = randn(8, 3, seed=2)
    m = 4
    alpha, beta, Q = lanczos_tridiagonal_lockstep(op, V0, m, gen(5))
    assert len(calls) == 3 * m - 1 and set(calls) == {3}
    A = torch.linalg.solve(M, B)
    for p in range(3):
        K = torch.stack([torch.linalg.matrix_power(A, i) @ V0[:, p] for i in range(m)], 1)
        L = torch.linalg.cholesky(K.T @ M @ K)
        Li = torch.linalg.inv(L)
        expected = torch.linalg.eigvalsh(Li @ K.T @ B @ K @ Li.T)
        got = torch.linalg.eigvalsh(tridiagonal(alpha[p], beta[p]))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(Q[p] @ M @ Q[p].T, torch.eye(m, dtype=DT), rtol=0, atol=1e-12)
        v = V0[:, p]
        assert alpha[p, 0].item() == pytest.approx((v @ B @ v / (v @ M @ v)).item(), rel=1e-13)


def test_project_out_is_two_gram_schmidt_passes():
    n, calls = 6, []

    def inner(u, v):
        calls.append(1)
        return u.mT @ v if u.ndim == 2 else u @ v

    op = FunctionOperator(n, lambda v: v, inner=inner)
    B = torch.linalg.qr(randn(n, 2, seed=3)).Q
    w = randn(n, seed=4)
    out = _project_out(op, B, w)
    assert len(calls) == 2
    torch.testing.assert_close(out, w - B @ (B.T @ w), rtol=0, atol=1e-14)
    assert _project_out(op, B[:, :0], w) is w and len(calls) == 2


# --- breakdown at its threshold β ≤ 1e-10·max(|α|, β) -----------------------------------------

BREAKDOWN_CASES = {
    # name: (alpha, beta, index of the breakdown or None)
    "beta equal to the threshold breaks down": ([1.0] * 4, [1e-10, 1.0, 1.0], 0),
    "threshold scales with |alpha|": ([4.0] * 4, [1e-10, 1.0, 1.0], 0),
    "small |alpha| lowers the threshold": ([0.1] * 4, [5e-11, 1.0, 1.0], None),
    "earlier betas raise the threshold": ([0.1] * 4, [1.0, 5e-11, 1.0], 1),
}


@pytest.mark.parametrize("lockstep", [False, True])
@pytest.mark.parametrize("case", list(BREAKDOWN_CASES))
def test_breakdown_threshold_on_a_tridiagonal_matrix(case, lockstep):
    """From ``e₀`` Lanczos on a tridiagonal matrix returns the matrix itself (``q_j = e_j``) until
    a β is at or below ``1e-10·max(|α|, β)``: that β is stored as 0 and the run restarts from
    ``randn`` (the passed generator) made orthogonal to the basis."""
    alpha_in, beta_in, broken = BREAKDOWN_CASES[case]
    A = tridiagonal_matrix(alpha_in, beta_in)
    if lockstep:
        alpha, beta, Q = lanczos_tridiagonal_lockstep(MatrixOperator(A), e(4, 0)[:, None], 4, gen(7))
        alpha, beta, Q = alpha[0], beta[0], Q[0].T
    else:
        Q, alpha, beta = lanczos_tridiagonal(MatrixOperator(A), e(4, 0), 4, gen(7))
    expected_beta = torch.tensor(beta_in, dtype=DT)
    if broken is None:
        torch.testing.assert_close(beta, expected_beta, rtol=1e-12, atol=0)
        torch.testing.assert_close(alpha, torch.tensor(alpha_in, dtype=DT), rtol=1e-12, atol=0)
        return
    assert beta[broken] == 0.0
    torch.testing.assert_close(beta[:broken], expected_beta[:broken], rtol=1e-12, atol=0)
    basis = torch.eye(4, dtype=DT)[:, : broken + 1]
    restart = orthogonalise(torch.randn(4, generator=gen(7), dtype=DT), basis)
    torch.testing.assert_close(Q[:, broken + 1], restart, rtol=0, atol=1e-12)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=DT), rtol=0, atol=1e-12)


def test_lockstep_breakdown_scale_is_each_runs_own():
    """Two runs on decoupled blocks: run 0 (|α| = 0.1, β₀ = 0.1, β₁ = 5e-11) must not break down
    although run 1 has |α| = 100 and β = 50."""
    X = tridiagonal_matrix([0.1] * 4, [0.1, 5e-11, 0.1])
    Y = tridiagonal_matrix([100.0] * 4, [50.0, 50.0, 50.0])
    A = torch.block_diag(X, Y)
    V0 = torch.stack([e(8, 0), e(8, 4)], 1)
    alpha, beta, _ = lanczos_tridiagonal_lockstep(MatrixOperator(A), V0, 4, gen(0))
    torch.testing.assert_close(beta[0], torch.tensor([0.1, 5e-11, 0.1], dtype=DT), rtol=1e-12, atol=0)
    torch.testing.assert_close(beta[1], torch.tensor([50.0, 50.0, 50.0], dtype=DT), rtol=1e-12, atol=0)
    torch.testing.assert_close(alpha, torch.tensor([[0.1] * 4, [100.0] * 4], dtype=DT), rtol=1e-12, atol=0)


# --- lanczos(): convergence flag, seeds and restarts, early stop, defaults ---------------------


@pytest.mark.parametrize(
    ("A", "tol", "converged"),
    [
        ([[2.0, 1.0], [1.0, 2.0]], 0.5, True),  # residual ‖Ae₀ − 2e₀‖ = 1 = tol·|θ|
        ([[2.0, 1.0], [1.0, 2.0]], 0.25, False),  # residual 1 > 0.5
        ([[2.0, 0.0], [0.0, 3.0]], 0.0, True),  # exact eigenvector: residual 0 ≤ 0
    ],
)
def test_lanczos_converged_flag_is_residual_at_most_tol_times_value(A, tol, converged):
    result = lanczos(torch.tensor(A, dtype=DT), k=1, m=1, v0=e(2, 0), tol=tol, progress=False)
    assert result.eigenvalues.tolist() == [2.0]
    assert result.residuals.tolist() == [1.0 if A[0][1] else 0.0]
    assert result.converged is converged


@pytest.mark.parametrize("seed", [0, 4])
def test_lanczos_start_and_restart_vectors_come_from_the_seed(seed):
    """On diag(1,1,2,2,3,3) the start vector's Krylov space is 3-dimensional: T holds 1, 2, 3 and
    the Ritz values of A on span(q, Aq), q the second draw made orthogonal to that space."""
    g = gen(seed)
    v = torch.randn(6, generator=g, dtype=DT)
    q = orthogonalise(torch.randn(6, generator=g, dtype=DT), krylov(REPEATED, v, 3))
    theta = torch.cat([torch.tensor([1.0, 2.0, 3.0], dtype=DT), ritz_pairs(REPEATED, q, 2)[0]])
    expected = theta.sort(descending=True).values[:4]
    torch.manual_seed(12345)  # the global generator must play no part
    kwargs = {} if seed == 0 else {"seed": seed}
    result = lanczos(REPEATED, k=4, m=5, tol=0.0, progress=False, **kwargs)
    assert result.config["steps"] == 5 and result.config["seed"] == seed
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-10, atol=1e-10)


def test_lanczos_stops_once_the_exact_residual_is_zero():
    """With tol = 0 a zero Lanczos residual (v0 an eigenvector) still satisfies ``≤ tol·|θ|``."""
    A = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=DT))
    result = lanczos(A, k=1, m=4, v0=e(4, 0), tol=0.0, progress=False)
    assert result.config["steps"] == 1 and result.n_matvecs == 2
    assert result.eigenvalues.tolist() == [3.0] and result.converged


def test_lanczos_early_stop_is_relative_to_the_ritz_value():
    """Stop at the first j ≥ k whose Ritz pair has ‖Ay − θy‖ ≤ tol·|θ| (dense Krylov spaces);
    n_matvecs = steps + k; residuals are the explicit ‖Ay − θy‖."""
    A = torch.diag(torch.linspace(100.0, 200.0, 12, dtype=DT)) + sym(12, 8)
    v0 = randn(12, seed=9)
    tol = 1e-2
    ratios = []
    for j in range(1, 13):
        theta, Y = ritz_pairs(A, v0, j)
        ratios.append(((A @ Y[:, -1] - theta[-1] * Y[:, -1]).norm() / theta[-1]).item())
    steps = next(j for j, r in enumerate(ratios, 1) if r <= tol)
    assert steps < 12 and all(abs(r / tol - 1) > 0.2 for r in ratios[:steps])  # no tie
    result = lanczos(A, k=1, m=12, v0=v0, tol=tol, progress=False)
    assert result.config["steps"] == steps and result.n_matvecs == steps + 1
    theta, Y = ritz_pairs(A, v0, steps)
    assert result.eigenvalues[0].item() == pytest.approx(theta[-1].item(), rel=1e-10)
    y = result.eigenvectors[:, 0]
    assert result.residuals[0].item() == pytest.approx((A @ y - result.eigenvalues[0] * y).norm().item(), rel=1e-8)


def test_lanczos_counts_every_matvec():
    calls = []
    A = sym(7, 10)

    def matvec(v):
        calls.append(1)
        return A @ v

    result = lanczos(FunctionOperator(7, matvec), k=3, m=5, tol=0.0, progress=False)
    assert result.config["steps"] == 5 and result.n_matvecs == len(calls) == 8


def test_lanczos_accepts_k_equal_to_m_and_rejects_more():
    A = sym(4, 11)
    result = lanczos(A, k=4, progress=False)
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(A).flip(0), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"^k=5 eigenpairs need at least k Lanczos steps, got m=4$"):
        lanczos(A, k=5, progress=False)


@pytest.mark.parametrize("k", [1, 15])
def test_lanczos_default_krylov_dimension(k):
    """Documented default ``m = min(n, max(2k + 20, 40))``; 16 distinct eigenvalues keep it short."""
    d = torch.arange(1.0, 17.0, dtype=DT).repeat(4)[:60]
    op = FunctionOperator(60, lambda v: d * v)
    result = lanczos(op, k=k, progress=False)
    assert result.config["m"] == min(60, max(2 * k + 20, 40))
    torch.testing.assert_close(result.eigenvalues, torch.arange(16.0, 16.0 - k, -1, dtype=DT), rtol=1e-8, atol=1e-8)


def test_lanczos_defaults_and_progress_bar(capsys):
    params = inspect.signature(lanczos).parameters
    defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {"k": 6, "which": "LA", "m": None, "tol": 1e-4, "seed": 0, "v0": None, "deflate": None, "progress": True}
    A = sym(12, 12)
    capsys.readouterr()
    result = lanczos(A)
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)Lanczos: ", err) and "\n" not in err  # shown, then cleared
    assert result.config == {"method": "lanczos", "k": 6, "which": "LA", "m": 12, "steps": result.config["steps"],
                             "tol": 1e-4, "seed": 0, "n": 12}
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:6], rtol=0, atol=1e-5)


# --- lanczos_tridiagonal: dtype, deflation, m = 0 ----------------------------------------------


def test_float32_start_vector_runs_in_float64():
    A = sym(8, 13)
    v0 = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.75])
    Q, alpha, beta = lanczos_tridiagonal(MatrixOperator(A), v0, 4, gen(0))
    assert Q.dtype == alpha.dtype == DT
    expected = ritz_pairs(A, v0.to(DT), 4)[0]
    torch.testing.assert_close(torch.linalg.eigvalsh(tridiagonal(alpha, beta)), expected, rtol=1e-12, atol=1e-12)
    assert alpha[0].item() == pytest.approx((v0.to(DT) @ A @ v0.to(DT) / (v0.to(DT) @ v0.to(DT))).item(), rel=1e-14)


def test_deflation_keeps_the_basis_orthogonal_and_caps_the_steps():
    """With d deflated columns at most n − d steps; the basis stays orthogonal to them and T has
    the eigenvalues of A compressed to their orthogonal complement."""
    A = sym(8, 14)
    D = torch.linalg.qr(randn(8, 2, seed=15)).Q
    Q, alpha, beta = lanczos_tridiagonal(MatrixOperator(A), randn(8, seed=16), 8, gen(0), deflate=D)
    assert Q.shape == (8, 6) and alpha.shape == (6,) and beta.shape == (5,)
    assert (D.T @ Q).abs().max() < 1e-12
    torch.testing.assert_close(Q.T @ Q, torch.eye(6, dtype=DT), rtol=0, atol=1e-12)
    C = torch.linalg.qr(torch.cat([D, torch.eye(8, dtype=DT)], 1)).Q[:, 2:]
    torch.testing.assert_close(
        torch.linalg.eigvalsh(tridiagonal(alpha, beta)), torch.linalg.eigvalsh(C.T @ A @ C), rtol=1e-10, atol=1e-10
    )


def test_zero_steps_return_empty_factors():
    Q, alpha, beta = lanczos_tridiagonal(MatrixOperator(sym(5, 17)), randn(5, seed=18), 0, gen(0))
    assert Q.shape == (5, 0) and alpha.shape == (0,) and beta.shape == (0,)


def test_tridiagonal_is_symmetric_with_beta_off_the_diagonal():
    T = tridiagonal(torch.tensor([1.0, 2.0, 3.0], dtype=DT), torch.tensor([4.0, 5.0], dtype=DT))
    assert T.tolist() == [[1.0, 4.0, 0.0], [4.0, 2.0, 5.0], [0.0, 5.0, 3.0]]


# --- progress bars -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "desc"),
    [
        (lambda A, **kw: lanczos_tridiagonal(MatrixOperator(A), torch.ones(6, dtype=DT), 3, gen(0), **kw), "Lanczos"),
        (lambda A, **kw: lanczos_tridiagonal_lockstep(MatrixOperator(A), torch.ones(6, 2, dtype=DT), 3, gen(0), **kw),
         "Lanczos (lockstep)"),
        (lambda A, **kw: power_iteration(A, k=2, max_iter=3, **kw), "power iteration"),
    ],
)
def test_progress_bars_are_named_and_cleared(capsys, run, desc):
    A = REPEATED + torch.diag(torch.arange(6, dtype=DT) / 7)
    capsys.readouterr()
    run(A, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)" + re.escape(desc) + ": ", err), err
    assert "\n" not in err and err.endswith("\r")  # leave=False: the bar is wiped
    run(A, progress=False)
    assert capsys.readouterr().err == ""


def test_lockstep_is_quiet_by_default(capsys):
    assert inspect.signature(lanczos_tridiagonal_lockstep).parameters["progress"].default is False
    capsys.readouterr()
    lanczos_tridiagonal_lockstep(MatrixOperator(REPEATED), torch.ones(6, 2, dtype=DT), 3, gen(0))
    assert capsys.readouterr().err == ""


# --- devices (the meta device stands in for a GPU) -----------------------------------------------


@pytest.mark.parametrize("method", [lambda op: lanczos(op, k=1, progress=False),
                                    lambda op: power_iteration(op, progress=False)])
def test_start_vectors_reach_the_operator_on_its_device(method):
    op, seen = meta_operator(6)
    with pytest.raises(DeviceProbe):
        method(op)
    assert seen == [torch.device("meta")]


def test_lockstep_runs_on_the_operator_device():
    """Up to the second Gram–Schmidt pass of step 0, everything the lockstep run touches lives on
    the operator's device (storing a meta tensor in a CPU buffer would fail earlier)."""
    seen = []

    def record(V):
        seen.append(V.device)
        if len(seen) == 4:
            raise StopIteration
        return V

    op = FunctionOperator(6, lambda v: v, matmat=record, metric_matmat=record, device="meta")
    with pytest.raises(StopIteration):
        lanczos_tridiagonal_lockstep(op, torch.ones(6, 2, dtype=DT), 2, gen(0))
    assert seen == [torch.device("meta")] * 4


def test_lockstep_float32_probes_run_in_float64():
    A = sym(6, 19)
    V0 = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0, 0.25], [2.0, 1.0, -1.0, 0.5, 0.0, 1.0]]).T
    alpha, beta, Q = lanczos_tridiagonal_lockstep(MatrixOperator(A), V0, 3, gen(0))
    assert alpha.dtype == Q.dtype == DT
    for p in range(2):
        expected = ritz_pairs(A, V0[:, p].to(DT), 3)[0]
        torch.testing.assert_close(torch.linalg.eigvalsh(tridiagonal(alpha[p], beta[p])), expected, rtol=1e-12, atol=1e-12)


# --- power iteration -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 2])
def test_power_iteration_single_step_pairs_by_hand(seed):
    """max_iter = 1: each pair is the (deflated) start vector and its Rayleigh quotient."""
    A = sym(6, 20)
    g = gen(seed)
    v1 = torch.randn(6, generator=g, dtype=DT)
    v1 = v1 / v1.norm()
    v2 = orthogonalise(torch.randn(6, generator=g, dtype=DT), v1[:, None])
    theta = torch.stack([v1 @ A @ v1, v2 @ A @ v2])
    torch.manual_seed(999)  # the global generator must play no part
    result = power_iteration(A, k=2, max_iter=1, tol=0.0, seed=seed, progress=False)
    assert result.eigenvalues.dtype == result.residuals.dtype == DT
    torch.testing.assert_close(result.eigenvalues, theta, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(result.eigenvectors, torch.stack([v1, v2], 1), rtol=0, atol=1e-13)
    residuals = torch.stack([(A @ v1 - theta[0] * v1).norm(), (A @ v2 - theta[1] * v2).norm()])
    torch.testing.assert_close(result.residuals, residuals, rtol=1e-12, atol=1e-13)
    assert result.n_matvecs == 2 and result.converged is False
    assert result.config == {"method": "power_iteration", "k": 2, "tol": 0.0, "max_iter": 1, "seed": seed, "n": 6}


def rayleigh_sequence(lams: torch.Tensor, z: torch.Tensor, count: int) -> list[float]:
    """θ_i = zᵀA^{2i+1}z / zᵀA^{2i}z for A = diag(lams), i = 0..count-1."""
    return [float((lams ** (2 * i + 1) * z**2).sum() / (lams ** (2 * i) * z**2).sum()) for i in range(count)]


@pytest.mark.parametrize("defaults", [True, False])
def test_power_iteration_stops_on_a_small_relative_change(defaults):
    """Stop at the first i ≥ 1 with |θ_i − θ_{i−1}| < tol·|θ_{i−1}| (i + 1 matvecs), else max_iter."""
    lams = torch.tensor([100.0, 90.0, 60.0, 30.0, 10.0, 5.0], dtype=DT)
    tol, seed = (1e-3, 0) if defaults else (1e-5, 3)
    z = torch.randn(6, generator=gen(seed), dtype=DT)
    thetas = rayleigh_sequence(lams, z, 100)
    changes = [abs(b - a) / abs(a) for a, b in zip(thetas, thetas[1:])]
    i = next(i for i, c in enumerate(changes, 1) if c < tol)
    assert i < 50 and all(abs(c / tol - 1) > 0.05 for c in changes[:i])  # no tie
    if defaults:
        params = inspect.signature(power_iteration).parameters
        assert {n: params[n].default for n in ("k", "tol", "max_iter", "seed", "progress")} == {
            "k": 1, "tol": 1e-3, "max_iter": 100, "seed": 0, "progress": True}
        result = power_iteration(torch.diag(lams), progress=False)
    else:
        result = power_iteration(torch.diag(lams), k=1, tol=tol, max_iter=100, seed=seed, progress=False)
    assert result.n_matvecs == i + 1 and result.converged is True
    assert result.eigenvalues.tolist() == pytest.approx([thetas[i]], rel=1e-12)


def test_power_iteration_needs_a_strict_decrease():
    """n = 1: θ never changes, and 0 < tol·|θ| fails for tol = 0, so it runs max_iter matvecs."""
    result = power_iteration(torch.tensor([[3.0]], dtype=DT), k=1, tol=0.0, max_iter=4, progress=False)
    assert result.n_matvecs == 4 and result.converged is False and result.eigenvalues.tolist() == [3.0]


def test_power_iteration_converged_only_if_every_pair_did():
    """diag(2, 1): the first pair is not converged after 3 matvecs (tol 1e-12); the second lives in
    a 1-dimensional complement, so its θ repeats and it converges after 2."""
    result = power_iteration(torch.diag(torch.tensor([2.0, 1.0], dtype=DT)), k=2, tol=1e-12, max_iter=3, progress=False)
    assert result.n_matvecs == 5 and result.converged is False
    assert result.eigenvalues[1].item() == pytest.approx(3.0 - result.eigenvalues[0].item(), rel=1e-12)  # trace


def test_power_iteration_default_progress_bar(capsys):
    capsys.readouterr()
    power_iteration(torch.diag(torch.tensor([2.0, 1.0], dtype=DT)), max_iter=2)
    assert re.search(r"(^|\r)power iteration: ", capsys.readouterr().err)


# --- records -------------------------------------------------------------------------------------


def test_eigen_result_record_leaves_out_the_eigenvectors():
    record = EigenResult(
        eigenvalues=torch.tensor([2.0, -1.0], dtype=DT),
        eigenvectors=torch.eye(3, 2, dtype=DT),
        residuals=torch.tensor([0.5, 0.25], dtype=DT),
        n_matvecs=7,
        converged=False,
        config={"method": "lanczos", "k": 2},
    )
    assert record.to_dict() == {
        "eigenvalues": [2.0, -1.0],
        "residuals": [0.5, 0.25],
        "n_matvecs": 7,
        "converged": False,
        "config": {"method": "lanczos", "k": 2},
    }

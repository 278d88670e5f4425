"""Extreme eigenpairs of a symmetric operator: Lanczos (default) and power iteration.

All arithmetic is float64 and uses the operator's inner product ``⟨u, v⟩`` (see
:class:`~quotientsharp.curvature.operators.LinearOperator`), so the same code runs Lanczos for an
operator that is self-adjoint in a metric.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from quotientsharp.curvature.operators import LinearOperator, as_operator
from quotientsharp.curvature.results import jsonable

WHICH = ("LA", "SA", "LM")


@dataclasses.dataclass
class EigenResult:
    """``k`` eigenpairs: ``eigenvalues`` ``(k,)``, ``eigenvectors`` ``(n, k)`` (orthonormal in the
    operator's inner product), ``residuals`` ``(k,)`` = ‖A y − θ y‖, and the matvec count."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    n_matvecs: int
    converged: bool
    config: dict

    def to_dict(self) -> dict:
        """JSON record without the (large) eigenvectors."""
        return jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "eigenvectors"})


def _project_out(op: LinearOperator, basis: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """``w − B ⟨B, w⟩`` twice (classical Gram–Schmidt with reorthogonalisation)."""
    if basis is None or basis.shape[1] == 0:
        return w
    for _ in range(2):
        w = w - basis @ op.inner(basis, w)
    return w


def metric_norm(op: LinearOperator, w: torch.Tensor) -> torch.Tensor:
    """``sqrt(<w, w>_op)``: the norm of ``w`` in the operator's inner product (Euclidean or ``uᵀMv``)."""
    return torch.sqrt(torch.clamp(op.inner(w, w), min=0.0))


def random_unit_vector(
    op: LinearOperator, generator: torch.Generator, basis: torch.Tensor | None = None
) -> torch.Tensor:
    """A Gaussian vector, orthogonalised against ``basis`` and normalised in the inner product."""
    v = torch.randn(op.shape[0], generator=generator, dtype=torch.float64).to(op.device)
    v = _project_out(op, basis, v)
    return v / metric_norm(op, v)


def lanczos_tridiagonal(
    op: LinearOperator,
    v0: torch.Tensor,
    m: int,
    generator: torch.Generator,
    deflate: torch.Tensor | None = None,
    should_stop: Callable[[torch.Tensor, torch.Tensor, float], bool] | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``j ≤ m`` Lanczos steps from ``v0`` with full reorthogonalisation.

    Returns the basis ``Q`` ``(n, j)``, ``α`` ``(j,)`` (diagonal of T) and ``β`` ``(j−1,)``
    (off-diagonal). Every new vector is Gram–Schmidt-ed twice against all previous ones and
    against the columns of ``deflate``. On breakdown (β_j ≤ 1e-10·‖T‖) the process restarts
    from a random vector orthogonal to the basis and stores β_j = 0. ``should_stop(α, β, β_next)``
    is asked after each step whether to stop early.
    """
    n = op.shape[0]
    m = min(m, n - (0 if deflate is None else deflate.shape[1]))
    Q = torch.zeros(n, m, dtype=torch.float64, device=op.device)
    alpha = torch.zeros(m, dtype=torch.float64)
    beta = torch.zeros(max(m - 1, 0), dtype=torch.float64)
    q = _project_out(op, deflate, v0.to(torch.float64))
    q = q / metric_norm(op, q)
    steps = m
    for j in tqdm(range(m), desc="Lanczos", disable=not progress, leave=False):
        Q[:, j] = q
        w = op.matvec(q)
        alpha[j] = op.inner(q, w)
        basis = Q[:, : j + 1] if deflate is None else torch.cat([deflate, Q[:, : j + 1]], 1)
        w = _project_out(op, basis, w)
        b = float(metric_norm(op, w))
        if j == m - 1 or (should_stop is not None and should_stop(alpha[: j + 1], beta[:j], b)):
            steps = j + 1
            break
        scale = max(float(alpha[: j + 1].abs().max()), float(beta[:j].max()) if j else 0.0)
        if b <= 1e-10 * scale:
            q = random_unit_vector(op, generator, basis)  # invariant subspace found: restart
        else:
            beta[j], q = b, w / b
    return Q[:, :steps], alpha[:steps], beta[: steps - 1]


class ColumnInner:
    """Column-wise inner products of an operator, batched over ``P`` columns.

    With :meth:`LinearOperator.metric_matmat` (``M W`` for a block ``W``) every product is one
    metric application and a batched contraction; an operator that only defines :meth:`inner`
    (e.g. a :class:`FunctionOperator` with ``inner=``) is served column by column.
    """

    def __init__(self, op: LinearOperator):
        self.op = op
        self.batched = op.has_metric_matmat

    def metric(self, W: torch.Tensor) -> torch.Tensor | None:
        """``M W`` ``(n, P)``, or ``None`` without a batched metric."""
        return self.op.metric_matmat(W) if self.batched else None

    def pairs(self, U: torch.Tensor, W: torch.Tensor, MW: torch.Tensor | None = None) -> torch.Tensor:
        """``(⟨u_p, w_p⟩)_p`` ``(P,)`` for ``U, W`` ``(n, P)``; ``MW = M W`` if already known."""
        if not self.batched:
            return torch.stack([self.op.inner(U[:, p], W[:, p]) for p in range(W.shape[1])])
        return (U * (self.op.metric_matmat(W) if MW is None else MW)).sum(0)

    def norms(self, W: torch.Tensor) -> torch.Tensor:
        """Column norms ``sqrt(⟨w_p, w_p⟩)`` ``(P,)``."""
        return torch.sqrt(torch.clamp(self.pairs(W, W), min=0.0))

    def project_out(self, basis: torch.Tensor, W: torch.Tensor, MW: torch.Tensor | None = None) -> torch.Tensor:
        """Per column ``p``: ``w_p − B_p ⟨B_p, w_p⟩`` twice (classical Gram–Schmidt with
        reorthogonalisation against that column's own basis). ``basis`` ``(P, j, n)`` (row ``i``
        of ``basis[p]`` is the i-th basis vector of column p), ``W`` ``(n, P)``; ``MW = M W``
        may be passed for the first pass."""
        for _ in range(2):
            if self.batched:
                MW = self.op.metric_matmat(W) if MW is None else MW
                coef = torch.bmm(basis, MW.T[:, :, None])  # (P, j, 1) = ⟨B_p, w_p⟩
            else:
                coef = torch.stack([self.op.inner(basis[p].T, W[:, p]) for p in range(W.shape[1])])[:, :, None]
            W = W - torch.bmm(basis.transpose(1, 2), coef)[:, :, 0].T
            MW = None
        return W


def lanczos_tridiagonal_lockstep(
    op: LinearOperator,
    V0: torch.Tensor,
    m: int,
    generator: torch.Generator,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``m`` Lanczos steps from each column of ``V0`` ``(n, P)``, all ``P`` runs in lockstep.

    Every step applies the operator once to a block of ``P`` columns (:meth:`LinearOperator.matmat`:
    one gradient graph per batch serves all columns) and does each run's full
    reorthogonalisation batched over the runs (``bmm`` over ``(P, j, n)`` bases, inner products
    through :meth:`LinearOperator.metric_matmat`). Run ``p`` is the same recurrence as
    :func:`lanczos_tridiagonal` from ``V0[:, p]`` (equal to rounding): Gram–Schmidt twice against
    its own basis, and on breakdown (β_j ≤ 1e-10·‖T_p‖) a restart from a random vector
    orthogonal to its basis with β_j = 0. Restart vectors are drawn from ``generator`` in step
    order, then column order (the sequential runs draw them probe by probe, so the two agree
    exactly unless more than one run restarts).

    Returns ``α`` ``(P, m)``, ``β`` ``(P, m−1)`` (each run's tridiagonal) and the bases ``(P, m, n)``.
    """
    n, P = V0.shape
    m = min(m, n)
    columns = ColumnInner(op)
    Q = torch.zeros(P, m, n, dtype=torch.float64, device=op.device)
    alpha = torch.zeros(P, m, dtype=torch.float64, device=op.device)
    beta = torch.zeros(P, max(m - 1, 0), dtype=torch.float64, device=op.device)
    V = V0.to(device=op.device, dtype=torch.float64)
    V = V / columns.norms(V)
    for j in tqdm(range(m), desc="Lanczos (lockstep)", disable=not progress, leave=False):
        Q[:, j] = V.T
        W = op.matmat(V)
        MW = columns.metric(W)
        alpha[:, j] = columns.pairs(V, W, MW)  # ⟨q_j, A q_j⟩
        if j == m - 1:
            break
        basis = Q[:, : j + 1]
        W = columns.project_out(basis, W, MW)
        b = columns.norms(W)
        scale = alpha[:, : j + 1].abs().amax(1)
        if j:
            scale = torch.maximum(scale, beta[:, :j].amax(1))
        broken = (b <= 1e-10 * scale).tolist()
        V = W / torch.where(b > 0, b, torch.ones_like(b))
        beta[:, j] = b
        for p in [p for p, is_broken in enumerate(broken) if is_broken]:  # invariant subspace: restart
            V[:, p] = random_unit_vector(op, generator, basis[p].T)
            beta[p, j] = 0.0
    return alpha.cpu(), beta.cpu(), Q


def tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The symmetric tridiagonal matrix T with diagonal ``α`` and off-diagonal ``β``."""
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted Ritz values (``theta`` ascending), most extreme first."""
    if which == "LA":
        return torch.arange(len(theta) - 1, len(theta) - 1 - min(k, len(theta)), -1)
    if which == "SA":
        return torch.arange(min(k, len(theta)))
    return torch.argsort(theta.abs(), descending=True)[:k]


def lanczos(
    op,
    k: int = 6,
    which: str = "LA",
    m: int | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    v0: torch.Tensor | None = None,
    deflate: torch.Tensor | None = None,
    progress: bool = True,
) -> EigenResult:
    """Top-``k`` eigenpairs by Lanczos with full reorthogonalisation (spec §3).

    ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest, ``"LM"`` largest magnitude.
    ``m`` (default ``min(n, max(2k+20, 40))``) steps from a Gaussian start (or ``v0``); stops early
    once every wanted Ritz pair has Lanczos residual ``|β_j u_{j,i}| ≤ tol·|θ_i|``. Reported
    residuals are recomputed explicitly (k extra matvecs). ``deflate``: ``(n, d)`` vectors,
    orthonormal in the inner product (e.g. locked eigenvectors), to stay orthogonal to.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    op = as_operator(op)
    n = op.shape[0]
    m = min(n, m or max(2 * k + 20, 40))
    if k > m:
        raise ValueError(f"k={k} eigenpairs need at least k Lanczos steps, got m={m}")
    generator = torch.Generator().manual_seed(seed)
    start = v0 if v0 is not None else random_unit_vector(op, generator)

    def converged(alpha, beta, beta_next):
        if len(alpha) < k:
            return False
        theta, U = torch.linalg.eigh(tridiagonal(alpha, beta))
        idx = _select(theta, k, which)
        return bool((beta_next * U[-1, idx].abs() <= tol * theta[idx].abs()).all())

    Q, alpha, beta = lanczos_tridiagonal(op, start, m, generator, deflate, converged, progress)
    theta, U = torch.linalg.eigh(tridiagonal(alpha, beta))
    idx = _select(theta, k, which)
    values, vectors = theta[idx], Q @ U[:, idx].to(Q.device)
    R = op.matmat(vectors) - vectors * values.to(Q.device)
    residuals = torch.stack([metric_norm(op, R[:, i]) for i in range(R.shape[1])]).cpu()
    return EigenResult(
        eigenvalues=values,
        eigenvectors=vectors,
        residuals=residuals,
        n_matvecs=len(alpha) + len(idx),
        converged=bool((residuals <= tol * values.abs() + 1e-300).all()),
        config={"method": "lanczos", "k": k, "which": which, "m": m, "steps": len(alpha), "tol": tol, "seed": seed, "n": n},
    )


def power_iteration(
    op,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> EigenResult:
    """Top-``k`` eigenpairs by power iteration with deflation (PyHessian semantics, spec §3).

    For each pair: start from a Gaussian vector; repeat ``w = A v`` Gram–Schmidt-ed against the
    pairs already found, Rayleigh quotient ``θ = ⟨v, A v⟩``, ``v ← w/‖w‖``; stop when θ changes by
    less than ``tol·|θ_prev|`` or after ``max_iter`` matvecs. It converges to the **largest |λ|**
    (so possibly the most negative eigenvalue), not the largest λ; eigenvalues come in the order
    found. The returned vector is the one whose Rayleigh quotient is reported.
    """
    op = as_operator(op)
    n = op.shape[0]
    generator = torch.Generator().manual_seed(seed)
    found_values, found_vectors, residuals, total, all_converged = [], [], [], 0, True
    for _ in tqdm(range(k), desc="power iteration", disable=not progress, leave=False):
        basis = torch.stack(found_vectors, 1) if found_vectors else None
        v = random_unit_vector(op, generator, basis)
        previous, is_converged = None, False
        for _ in range(max_iter):
            w = op.matvec(v)
            total += 1
            theta = float(op.inner(v, w))
            pair = (theta, v, float(metric_norm(op, w - theta * v)))
            if previous is not None and abs(theta - previous) < tol * abs(previous):
                is_converged = True
                break
            w = _project_out(op, basis, w)
            v, previous = w / metric_norm(op, w), theta
        found_values.append(pair[0])
        found_vectors.append(pair[1])
        residuals.append(pair[2])
        all_converged &= is_converged
    return EigenResult(
        eigenvalues=torch.tensor(found_values, dtype=torch.float64),
        eigenvectors=torch.stack(found_vectors, 1),
        residuals=torch.tensor(residuals, dtype=torch.float64),
        n_matvecs=total,
        converged=all_converged,
        config={"method": "power_iteration", "k": k, "tol": tol, "max_iter": max_iter, "seed": seed, "n": n},
    )


"""Residual subgroups of GL(h) in modern attention (spec part 6) and their horizontal projection.

Rotary position embeddings leave on QK only the matrices that commute with every rotation: one
complex scalar ``a I_2 + b J`` per rotation plane (the group ``(C*)^{r/2}``); partial rotary adds
a full GL on the unrotated coordinates. :class:`SubAlgebra` describes such a Lie sub-algebra
``g = span(E_1..E_k1) (+) gl(S)`` of ``gl(h)``: ``k1`` sparse basis matrices (two scale/rotation
generators per plane) plus all matrices supported on ``S x S`` (``S`` the free coordinates).

The metric, the Christoffel term and the geodesics of a GL block stay those of part 1; only the
vertical space shrinks to ``nu(g)``, ``nu(Omega) = (-G Omega, H Omega^T)``. The projection
``xi + nu(Lam)``, ``Lam in g``, solves ``<xi + nu(Lam), nu(Omega)> = 0`` for all ``Omega in g``.
In matrix form, with the metric weights ``(aG, aH) = (P^{-1}, Q^{-1})`` (inv) or ``(Q, P)``
(mix) and the Gram matrices ``SG = G^T G``, ``SH = H^T H``:

    <nu(Lam), nu(Omega)> = <K(Lam), Omega>_F,   K(Lam) = SG Lam aG + aH Lam SH,
    <xi, nu(Omega)>      = <R, Omega>_F,        R = aH xi_H^T H - G^T xi_G aG,

so ``Lam`` solves ``proj_g(K(Lam) + R) = 0``. The ``gl(S)`` part is a generalised Sylvester
equation on the ``S x S`` block (solved in a cached eigenbasis); eliminating it leaves the
``k1 x k1`` system ``Kt c = -<Et_a, R>`` with ``Et_a = E_a + X_a``, ``X_a`` the ``gl(S)``
correction of ``E_a`` (a Schur complement, symmetric positive definite). With ``S`` empty this is
exactly the ``K c = -r`` solve of spec §1; with ``k1 = 0`` and ``S`` everything it is part 1's
full-GL projection (tested against the closed forms).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .gl_math import GLFactors

ROTARY_LAYOUTS = ("half", "interleaved")


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


@dataclass(frozen=True)
class SubAlgebra:
    """A Lie sub-algebra ``span(planes) (+) gl(free) (+) span(extra)`` of ``gl(head_dim)``.

    * ``planes``: pairs ``(j, j')``; each contributes the scale ``e_j e_j^T + e_j' e_j'^T`` and
      the rotation ``e_j' e_j^T - e_j e_j'^T`` (one complex scalar per plane);
    * ``free``: coordinates carrying a full ``gl`` block (no mixing with the planes);
    * ``extra``: further sparse basis matrices, each a tuple of ``(row, col, value)`` entries.

    Lie-algebra elements are coefficient vectors ``(B, dim)``: plane coefficients (scale,
    rotation per plane), then ``extra``, then the ``|free| x |free|`` block row-major.
    """

    head_dim: int
    planes: tuple[tuple[int, int], ...] = ()
    free: tuple[int, ...] = ()
    extra: tuple[tuple[tuple[int, int, float], ...], ...] = ()
    name: str = ""

    def __post_init__(self):
        used = [i for p in self.planes for i in p] + list(self.free)
        if len(set(used)) != len(used) or any(not 0 <= i < self.head_dim for i in used):
            raise ValueError(f"SubAlgebra: planes {self.planes} and free coordinates {self.free} must be "
                             f"disjoint indices in [0, {self.head_dim})")

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def full(head_dim: int) -> SubAlgebra:
        """``gl(h)`` itself, through the generic path (a test oracle of the closed forms)."""
        return SubAlgebra(head_dim, free=tuple(range(head_dim)), name=f"GL({head_dim})")

    @staticmethod
    def rotary(head_dim: int, rotary_dim: int | None = None,
               layout: Literal["half", "interleaved"] = "half") -> SubAlgebra:
        """Commutant of rotary embeddings on the first ``rotary_dim`` coordinates (all if None):
        ``layout="half"`` (HF ``rotate_half``) pairs ``j`` with ``j + rotary_dim/2``;
        ``"interleaved"`` (GPT-J) pairs ``2j`` with ``2j+1``. The other coordinates get ``gl``."""
        r = head_dim if rotary_dim is None else int(rotary_dim)
        if layout not in ROTARY_LAYOUTS:
            raise ValueError(f"rotary layout must be one of {ROTARY_LAYOUTS}, got {layout!r}")
        if r % 2 or not 0 < r <= head_dim:
            raise ValueError(f"rotary dimension {r} must be even and in (0, head_dim={head_dim}]")
        half = r // 2
        planes = (tuple((j, j + half) for j in range(half)) if layout == "half"
                  else tuple((2 * j, 2 * j + 1) for j in range(half)))
        rest = head_dim - r
        name = f"rotary ℂ*^{half}" + (f" ⊕ GL({rest})" if rest else "") + f" [{layout}]"
        return SubAlgebra(head_dim, planes, tuple(range(r, head_dim)), name=name)

    @staticmethod
    def from_basis(basis: torch.Tensor, name: str = "") -> SubAlgebra:
        """Any sub-algebra given by a basis tensor ``(k, h, h)`` (entries read off exactly)."""
        extra = tuple(tuple((int(i), int(j), float(E[i, j])) for i, j in E.nonzero().tolist()) for E in basis)
        return SubAlgebra(basis.shape[-1], extra=extra, name=name or f"span of {basis.shape[0]} matrices")

    # ------------------------------------------------------------------ structure
    @property
    def n_sparse(self) -> int:
        """``k1``: the number of sparse basis matrices (planes and extra)."""
        return 2 * len(self.planes) + len(self.extra)

    @property
    def dim(self) -> int:
        """Dimension ``k`` of the sub-algebra: the sparse basis matrices plus ``|free|²``."""
        return self.n_sparse + len(self.free) ** 2

    def describe(self) -> str:
        """Its name, or ``sub-algebra of gl(h) of dimension k``."""
        return self.name or f"sub-algebra of gl({self.head_dim}) of dimension {self.dim}"

    def sparse_entries(self) -> list[list[tuple[int, int, float]]]:
        """The ``k1`` sparse basis matrices as lists of ``(row, col, value)``."""
        out = []
        for j, k in self.planes:
            out.append([(j, j, 1.0), (k, k, 1.0)])      # scale
            out.append([(k, j, 1.0), (j, k, -1.0)])     # rotation
        out.extend([list(e) for e in self.extra])
        return out

    def sparse_basis(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """Dense ``(k1, h, h)`` tensor of the sparse basis matrices."""
        h = self.head_dim
        E = torch.zeros(self.n_sparse, h, h, dtype=dtype, device=device)
        for a, ents in enumerate(self.sparse_entries()):
            for i, j, v in ents:
                E[a, i, j] += v
        return E

    def matrix(self, coef: torch.Tensor) -> torch.Tensor:
        """``Omega = sum_a c_a E_a + embed(c_free)``: coefficients ``(B, dim)`` to ``(B, h, h)``."""
        k1, s = self.n_sparse, len(self.free)
        E = self.sparse_basis(coef.dtype, coef.device)
        out = torch.einsum("ba,aij->bij", coef[:, :k1], E)
        if s:
            idx = torch.tensor(self.free, device=coef.device)
            blk = coef[:, k1:].reshape(-1, s, s)
            out = _embed(out, blk, idx)
        return out

    def random_element(self, batch: int, generator: torch.Generator | None = None,
                       max_cond: float | None = None, dtype=torch.float64, device=None) -> torch.Tensor:
        """Random group elements ``(B, h, h)``: per plane ``m (cos t I + sin t J)`` with modulus
        ``m`` log-uniform in ``[1, max_cond]`` (``N(0, 1)``-sized ``exp`` without ``max_cond``) and
        a uniform angle; a random ``GL(|free|)`` (singular values log-uniform in ``[1, max_cond]``)
        on the free block; ``exp`` of a random combination of ``extra``."""
        h = self.head_dim
        gdev = generator.device if generator is not None else "cpu"

        def rnd(*shape):
            return torch.rand(*shape, generator=generator, dtype=torch.float64, device=gdev)

        logc = math.log(max_cond) if max_cond is not None else 1.0
        covered = {c for p in self.planes for c in p} | set(self.free)
        rest = torch.tensor([c for c in range(h) if c not in covered], dtype=torch.long, device=gdev)
        A = torch.zeros(batch, h, h, dtype=torch.float64, device=gdev)
        A[:, rest, rest] = 1.0  # identity where neither planes nor the free block act
        if self.planes:
            j = torch.tensor([p[0] for p in self.planes], device=gdev)
            k = torch.tensor([p[1] for p in self.planes], device=gdev)
            mod = torch.exp(logc * rnd(batch, len(self.planes)))
            ang = 2 * math.pi * rnd(batch, len(self.planes))
            a, b = mod * torch.cos(ang), mod * torch.sin(ang)
            bi = torch.arange(batch, device=gdev)[:, None]
            A[bi, j, j], A[bi, k, k], A[bi, k, j], A[bi, j, k] = a, a, b, -b
        if self.free:
            s = len(self.free)
            X = torch.randn(batch, s, s, generator=generator, dtype=torch.float64, device=gdev)
            U, _, Vh = torch.linalg.svd(X)
            sv = torch.exp(logc * rnd(batch, s))
            A = _embed(A, U @ torch.diag_embed(sv) @ Vh, torch.tensor(self.free, device=gdev))
        if self.extra:
            c = torch.randn(batch, len(self.extra), generator=generator, dtype=torch.float64, device=gdev)
            E = self.sparse_basis(torch.float64, gdev)[2 * len(self.planes):]
            ex = torch.linalg.matrix_exp(torch.einsum("ba,aij->bij", c, E))
            A = ex if not (self.planes or self.free) else A @ ex
        return A.to(dtype=dtype, device=device if device is not None else gdev)


def _embed(out: torch.Tensor, blk: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out`` with ``blk`` added on the ``idx x idx`` block (functional)."""
    full = torch.zeros_like(out)
    full[:, idx[:, None], idx[None, :]] = blk.to(out.dtype)
    return out + full


@dataclass
class SubAlgebraFactors:
    """Base-point quantities of the sub-algebra projection of one stack (float64).

    ``aG, aH``: metric weights ``(B, h, h)``. Sparse basis as index tensors ``rows, cols, vals``
    ``(k1, t)``; ``free`` the ``S`` indices; Sylvester eigenbasis ``L, Rm, denom`` of the
    ``S x S`` block; ``U1, V1, U2, V2`` the gathered rows/columns ``SG[S, r_at]``,
    ``aG[c_at, S]``, ``aH[S, r_at]``, ``SH[c_at, S]`` that give ``K_a = [K(E_a)]_SS`` as a sum
    of outer products (``(B, s, k1, t)`` / ``(B, k1, t, s)``: no ``(B, k1, s, s)`` tensor is
    kept); ``chol`` ``(B, k1, k1)`` the Cholesky factor of the Schur complement ``Kt``."""

    aG: torch.Tensor
    aH: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    free: torch.Tensor
    L: torch.Tensor | None = None
    Rm: torch.Tensor | None = None
    denom: torch.Tensor | None = None
    U1: torch.Tensor | None = None
    V1: torch.Tensor | None = None
    U2: torch.Tensor | None = None
    V2: torch.Tensor | None = None
    chol: torch.Tensor | None = None


def _sym_pow(M: torch.Tensor, p: float) -> torch.Tensor:
    ev, V = torch.linalg.eigh(M)
    return (V * ev.pow(p)[..., None, :]) @ _t(V)


def _sparse_inner(f: SubAlgebraFactors, R: torch.Tensor) -> torch.Tensor:
    """``<E_a, R>_F`` for the sparse basis, ``(B, k1)``."""
    return (R[:, f.rows, f.cols] * f.vals).sum(-1)


def _sparse_combine(f: SubAlgebraFactors, c: torch.Tensor, h: int) -> torch.Tensor:
    """``sum_a c_a E_a``, ``(B, h, h)``."""
    B = c.shape[0]
    out = torch.zeros(B, h * h, dtype=c.dtype, device=c.device)
    flat = (f.rows * h + f.cols).reshape(-1)
    out.index_add_(1, flat, (c[:, :, None] * f.vals).reshape(B, -1))
    return out.reshape(B, h, h)


def sylvester_solve(f: SubAlgebraFactors, E: torch.Tensor) -> torch.Tensor:
    """The ``X`` on ``S x S`` with ``SG_SS X aG_SS + aH_SS X SH_SS = E`` (``E`` ``(B, ..., s, s)``).
    The operator is self-adjoint in the Frobenius product, hence so is this solve."""
    L, Rm = f.L, f.Rm
    extra = E.ndim - 3
    for _ in range(extra):
        L, Rm = L[:, None], Rm[:, None]
    den = f.denom.reshape(f.denom.shape[:1] + (1,) * extra + f.denom.shape[1:])
    return L @ ((_t(L) @ E @ _t(Rm)) / den) @ Rm


def _K_inner(f: SubAlgebraFactors, Y: torch.Tensor) -> torch.Tensor:
    """``<K_a, Y_c>_F`` for ``Y`` ``(B, c, s, s)``: ``(B, k1, c)``, with
    ``K_a = sum_t v_at (SG[S, r_at] aG[c_at, S] + aH[S, r_at] SH[c_at, S])``."""
    out = 0
    for U, V in ((f.U1, f.V1), (f.U2, f.V2)):
        YV = torch.einsum("bcij,batj->bciat", Y, V)           # (B, c, s, k1, t)
        out = out + torch.einsum("biat,at,bciat->bac", U, f.vals, YV)
    return out


def _K_combine(f: SubAlgebraFactors, c: torch.Tensor) -> torch.Tensor:
    """``sum_a c_a K_a``, ``(B, s, s)`` (``c`` ``(B, k1)``)."""
    B, s = c.shape[0], f.U1.shape[1]
    out = 0
    for U, V in ((f.U1, f.V1), (f.U2, f.V2)):
        Uc = U * (f.vals * c[:, :, None])[:, None]           # (B, s, k1, t)
        out = out + Uc.reshape(B, s, -1) @ V.reshape(B, -1, s)
    return out


def _K_dense(f: SubAlgebraFactors, idx: torch.Tensor) -> torch.Tensor:
    """``K_a`` for the basis elements ``idx``, dense ``(B, len(idx), s, s)``."""
    out = 0
    for U, V in ((f.U1, f.V1), (f.U2, f.V2)):
        out = out + torch.einsum("biat,at,batj->baij", U[:, :, idx], f.vals[idx], V[:, idx])
    return out


def subalgebra_factors(metric: str, f: GLFactors, G: torch.Tensor, H: torch.Tensor,
                       alg: SubAlgebra, chunk_bytes: int = 2 ** 27) -> SubAlgebraFactors:
    """Cache the projection's base-point quantities for the blocks ``(G, H)`` of one stack
    (transient memory of the Schur complement capped near ``chunk_bytes``)."""
    G, H = G.double(), H.double()
    aG, aH = (f.P_inv, f.Q_inv) if metric == "inv" else (f.Q, f.P)
    SG, SH = _t(G) @ G, _t(H) @ H
    dev = G.device
    ents = alg.sparse_entries()
    k1 = len(ents)
    width = max([len(e) for e in ents] + [1])
    rows = torch.zeros(k1, width, dtype=torch.long, device=dev)
    cols = torch.zeros(k1, width, dtype=torch.long, device=dev)
    vals = torch.zeros(k1, width, dtype=torch.float64, device=dev)
    for a, e in enumerate(ents):
        for t, (i, j, v) in enumerate(e):
            rows[a, t], cols[a, t], vals[a, t] = i, j, v
    free = torch.tensor(alg.free, dtype=torch.long, device=dev)
    out = SubAlgebraFactors(aG, aH, rows, cols, vals, free)
    s = len(alg.free)
    if s:
        ix = (slice(None), free[:, None], free[None, :])
        A1, B1, A2, B2 = SG[ix], aG[ix], aH[ix], SH[ix]
        A2ih, B1ih = _sym_pow(A2, -0.5), _sym_pow(B1, -0.5)
        al, V = torch.linalg.eigh(A2ih @ A1 @ A2ih)
        be, W = torch.linalg.eigh(B1ih @ B2 @ B1ih)
        out.L, out.Rm = A2ih @ V, _t(W) @ B1ih
        out.denom = al[..., :, None] + be[..., None, :]
    if k1:
        # K_ab = <E_a, SG E_b aG + aH E_b SH>_F from the sparse entries (no (k1, h, h) tensors):
        # sum_{t,u} v_at v_bu (SG[r_at, r_bu] aG[c_bu, c_at] + aH[r_at, r_bu] SH[c_bu, c_at])
        ra, ca = rows[:, :, None, None], cols[:, :, None, None]
        rb, cb = rows[None, None], cols[None, None]
        vv = vals[:, :, None, None] * vals[None, None]
        Kt = ((SG[:, ra, rb] * aG[:, cb, ca] + aH[:, ra, rb] * SH[:, cb, ca]) * vv).sum((2, 4))
        if s:
            out.U1, out.V1 = SG[:, free[:, None, None], rows[None]], aG[:, cols[:, :, None], free[None, None]]
            out.U2, out.V2 = aH[:, free[:, None, None], rows[None]], SH[:, cols[:, :, None], free[None, None]]
            # Schur complement: Kt_ab += <K_a, X_b>, X_b = -S(K_b), a few basis elements at a time
            B = G.shape[0]
            step = max(1, chunk_bytes // (8 * B * s * max(s, k1 * width)))
            cols_out = []
            for lo in range(0, k1, step):
                idx = torch.arange(lo, min(k1, lo + step), device=dev)
                cols_out.append(-_K_inner(out, sylvester_solve(out, _K_dense(out, idx))))
            Kt = Kt + torch.cat(cols_out, dim=2)
        Kt = 0.5 * (Kt + _t(Kt))
        out.chol = torch.linalg.cholesky(Kt)
    return out


def subalgebra_project(f: SubAlgebraFactors, G, H, xG, xH):
    """Horizontal projection ``xi + nu(Lam) = (xG - G Lam, xH + H Lam^T)``, ``Lam in g``
    (module docstring), batched over the stack. With ``X_R = -S(R_SS)`` and ``X_a = -S(K_a)``
    (``S`` self-adjoint): ``Kt c = -(<E_a, R> + <K_a, X_R>)`` and
    ``Lam = sum_a c_a E_a + X_R - S(sum_a c_a K_a)`` on ``S x S``."""
    dt = xG.dtype
    G, H, xG, xH = G.double(), H.double(), xG.double(), xH.double()
    h = G.shape[-1]
    R = f.aH @ (_t(xH) @ H) - (_t(G) @ xG) @ f.aG  # Gram matrices first (also on gl_math.Blocks)
    lam = torch.zeros_like(R)
    s = f.free.numel()
    if s:
        XR = -sylvester_solve(f, R[:, f.free[:, None], f.free[None, :]])
    if f.chol is not None:
        rhs = _sparse_inner(f, R)
        if s:
            rhs = rhs + _K_inner(f, XR[:, None])[..., 0]
        c = torch.cholesky_solve(-rhs[..., None], f.chol)[..., 0]
        lam = _sparse_combine(f, c, h)
        if s:
            XR = XR - sylvester_solve(f, _K_combine(f, c))
    if s:
        lam = _embed(lam, XR, f.free)
    return (xG - G @ lam).to(dt), (xH + H @ _t(lam)).to(dt)

"""Closed-form geometry of GL(h) blocks ``(G, H) -> (G A^{-1}, H A^T)`` (spec part 1 §4.1, §6.2-6.3).

Pure functions on batched blocks: ``G`` is ``(B, n, h)``, ``H`` is ``(B, m, h)``, tangent
components have the same shapes and Lie-algebra elements / group elements are ``(B, h, h)``.
``P = G^T G + eps_P I`` and ``Q = H^T H + eps_Q I`` (regularised everywhere, §4.3). Base-point
factors are computed once by :func:`gl_factors` in float64.

Every formula is written as ``h x h`` algebra on Gram matrices (``X^T Y``, ``(B, h, h)``) plus
"tall" products ``X C`` of a factor by an ``h x h`` coefficient, and runs on two kinds of input:

* plain tensors ``(B, n, h)``: promoted to float64, the result cast back (the reference path,
  and the one autograd and ``torch.func`` transforms go through);
* :class:`Blocks`: lazy linear combinations ``sum_k X_k C_k`` of factors held as views into the
  parameter tensors (:class:`Views`, never copied). A Gram matrix of two such combinations is
  ``sum C_i^T (X_i^T Y_j) D_j``, with ``X_i^T Y_j`` accumulated in the weights' dtype (float32
  or float64, at least float32) and everything ``h x h`` in float64; :meth:`Blocks.write`
  evaluates a combination straight into views of the output tensors (one batched matmul per
  view and distinct factor, coefficients cast to the weights' dtype). This is the fast path of
  :class:`~quotientsharp.groups.attention.AttentionGL`: no float64 copy of a weight matrix, no
  extraction or insertion copies, and a chain such as ``Pi(g^{-1} d)`` costs two Gram matrices and
  two tall products per factor whatever the number of steps.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

METRICS = ("inv", "mix")


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _sym_fn(evals: torch.Tensor, evecs: torch.Tensor, power: float) -> torch.Tensor:
    """``V diag(evals^power) V^T`` for batched symmetric matrices."""
    return (evecs * evals.pow(power)[..., None, :]) @ _t(evecs)


@dataclass
class GLFactors:
    """Base-point quantities of a batch of GL blocks (all float64, shapes ``(B, h, h)``)."""

    P: torch.Tensor
    Q: torch.Tensor
    P_inv: torch.Tensor
    Q_inv: torch.Tensor
    P_half: torch.Tensor
    Q_half: torch.Tensor
    P_ihalf: torch.Tensor
    Q_ihalf: torch.Tensor
    # Sylvester factors of the inverse metric: A = P Q = U diag(lam) U^{-1}
    U: torch.Tensor | None = None
    U_inv: torch.Tensor | None = None
    lam_sum: torch.Tensor | None = None  # (B, h, h): lam_i + lam_j


class SingularHeadError(ValueError):
    """A GL block's Gram matrix ``P = G^T G + eps_P I`` or ``Q = H^T H + eps_Q I`` is singular in
    float64 (e.g. a dead head: ``W_Q, b_Q`` or ``W_V, b_V, W_O`` all zero), so the metric's inverse
    is infinite there. The message names the block and head and the relaxation that would help."""


#: ``lambda_min <= SINGULAR_RTOL * lambda_max`` counts as singular (float64 round-off of ``G^T G``)
SINGULAR_RTOL = 1e3 * torch.finfo(torch.float64).eps


def check_gram(ev: torch.Tensor, side: str, labels: list[str] | None, eps_rel: float, eps_abs: float) -> None:
    """Raise :class:`SingularHeadError` for the first block whose Gram eigenvalues ``ev`` ``(B, h)``
    (ascending) are singular: ``lambda_max = 0`` or ``lambda_min <= SINGULAR_RTOL lambda_max``."""
    ev = ev.detach()  # a check, no graph: float() of a tensor that requires grad warns
    top = ev[:, -1]
    bad = (top <= 0) | (ev[:, 0] <= SINGULAR_RTOL * top)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    where = labels[i] if labels is not None else f"block {i}"
    typical = float(top[~bad].median()) if bool((~bad).any()) else 1.0
    suggestion = f"{1e-6 * typical:.1e}"
    if float(top[i]) <= 0:
        what, fix = ("all zero (a dead head; a relative relaxation eps_rel * tr/h is 0 there too)",
                     "Pass an absolute relaxation")
    else:
        what = f"numerically singular (condition number {float(top[i] / ev[i, 0].clamp_min(1e-300)):.2e})"
        fix = "Pass eps_rel > 0 or an absolute relaxation"
    raise SingularHeadError(
        f"singular Gram matrix of {side} in {where}: the block is {what} [eps_rel={eps_rel:g}, "
        f"eps={eps_abs:g}], so the GL metric's inverse is infinite. {fix}, e.g. eps={suggestion} "
        "(1e-6 x the typical Gram eigenvalue of the other heads; invariance then holds only up to "
        "O(eps)), to find_symmetries / geodesic_sharpness, or leave this layer's blocks out of the "
        "quotient with find_symmetries(model, blocks=[...]) (its weights then get the rest metric)"
    )


def gl_factors(G: torch.Tensor, H: torch.Tensor, metric: str, eps_rel: float = 0.0,
               eps_abs: float = 0.0, labels: list[str] | None = None,
               for_projection: bool = True) -> GLFactors:
    """Cache P, Q, their inverses and square roots (and, if ``for_projection``, the Sylvester
    eigenbasis of the inverse metric), from the blocks ``G``, ``H`` (float64).

    Raises :class:`SingularHeadError` naming the block when a Gram matrix is singular or
    numerically singular in float64 after the relaxation (always for an all-zero block unless
    ``eps_abs > 0``)."""
    G, H = G.double(), H.double()
    return gl_factors_from_grams(_t(G) @ G, _t(H) @ H, metric, eps_rel, eps_abs, labels, for_projection)


def gl_factors_from_grams(GtG: torch.Tensor, HtH: torch.Tensor, metric: str, eps_rel: float = 0.0,
                          eps_abs: float = 0.0, labels: list[str] | None = None,
                          for_projection: bool = True) -> GLFactors:
    """:func:`gl_factors` from the unrelaxed float64 Gram matrices ``G^T G`` and ``H^T H``
    ``(B, h, h)`` (the relaxation ``eps_rel tr(G^T G) / h + eps_abs`` needs only their traces)."""
    h = GtG.shape[-1]
    eye = torch.eye(h, dtype=torch.float64, device=GtG.device)
    eps_p = eps_rel * GtG.diagonal(dim1=-2, dim2=-1).sum(-1) / h + eps_abs
    eps_q = eps_rel * HtH.diagonal(dim1=-2, dim2=-1).sum(-1) / h + eps_abs
    P = GtG + eps_p[:, None, None] * eye
    Q = HtH + eps_q[:, None, None] * eye
    p, Vp = torch.linalg.eigh(P)
    q, Vq = torch.linalg.eigh(Q)
    check_gram(p, "G (W_Q / W_V side)", labels, eps_rel, eps_abs)
    check_gram(q, "H (W_K / W_O side)", labels, eps_rel, eps_abs)
    f = GLFactors(
        P=P, Q=Q,
        P_inv=_sym_fn(p, Vp, -1.0), Q_inv=_sym_fn(q, Vq, -1.0),
        P_half=_sym_fn(p, Vp, 0.5), Q_half=_sym_fn(q, Vq, 0.5),
        P_ihalf=_sym_fn(p, Vp, -0.5), Q_ihalf=_sym_fn(q, Vq, -0.5),
    )
    if metric == "inv" and for_projection:
        S = f.P_half @ Q @ f.P_half
        lam, V = torch.linalg.eigh(0.5 * (S + _t(S)))
        f.U, f.U_inv = f.P_half @ V, _t(V) @ f.P_ihalf
        f.lam_sum = lam[..., :, None] + lam[..., None, :]
    return f


# ----------------------------------------------------------------------------- lazy blocks
def _promote(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dt = torch.promote_types(a.dtype, b.dtype)
    return a.to(dt), b.to(dt)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = _promote(a, b)
    return a @ b


class GramCache:
    """The last few Gram matrices ``X^T Y`` of :class:`Views`, keyed by their ``key`` (the identity
    and version of the tensors they read); an entry is used only while those tensors are alive
    (weak references), so a reused id never hits.

    * a pair is found in either order (``Y^T X = (X^T Y)^T``): a Christoffel term and its
      vector-Jacobian product at the same ``xi`` share ``xi^T G``;
    * :meth:`pin` keeps the base point's ``G^T G`` out of the LRU order;
    * :meth:`derive` records that an output ``Y = sum_k a_k X_k C_k`` was written from inputs
      whose Gram matrices with ``X`` are cached: ``X^T Y = sum_k a_k (X^T X_k) C_k`` is then a few
      ``h x h`` products (``G^T egrad`` of the Riemannian gradient of a vector-Jacobian product's
      output)."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.pinned: dict = {}
        self.recipes: OrderedDict = OrderedDict()

    @staticmethod
    def _alive(refs) -> bool:
        return all(r() is not None for r in refs)

    def _lookup(self, kx, ky) -> torch.Tensor | None:
        for store in (self.pinned, self.entries):
            hit = store.get((kx, ky))
            if hit is not None and self._alive(hit[0]):
                return hit[1]
            hit = store.get((ky, kx))
            if hit is not None and self._alive(hit[0]):
                return _t(hit[1])
        return None

    def get(self, X: Views, Y: Views) -> torch.Tensor | None:
        """``X^T Y`` if cached (either order) or derivable from a recorded combination, else None."""
        hit = self._lookup(X.key, Y.key)
        recipe = self.recipes.get((X.key, Y.key)) if hit is None else None
        if recipe is None or not self._alive(recipe[0]):
            return hit
        total = None
        for g, c, a in recipe[1]:
            g = _scaled(g, a) if c is None else a * _matmul(g, c)
            total = g if total is None else total + g
        self.entries[(X.key, Y.key)] = (recipe[0], total)
        return total

    def put(self, X: Views, Y: Views, value: torch.Tensor) -> None:
        """Store ``X^T Y`` (the oldest entry goes beyond ``size``)."""
        self.entries[(X.key, Y.key)] = (X.refs + Y.refs, value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def pin(self, X: Views, value: torch.Tensor) -> None:
        """Keep ``X^T X`` (the base point's Gram matrix) until the next :meth:`pin` of the stack."""
        self.pinned = {k: v for k, v in self.pinned.items() if k[0][0] != X.key[0] and self._alive(v[0])}
        self.pinned[(X.key, X.key)] = (X.refs, value)

    def derive(self, X: Views, Y: Views, combination: Blocks) -> None:
        """Record that ``Y`` (cached views of a freshly written output) holds ``combination``, so
        that ``X^T Y`` follows from the cached ``X^T X_k`` of its factors (resolved now, while
        they are alive; nothing is recorded if one is missing)."""
        terms = []
        for v, c, a in combination.terms:
            g = self._lookup(X.key, v.key) if v.cache is self else None
            if g is None:
                return
            terms.append((g, c, a))
        self.recipes[(X.key, Y.key)] = (X.refs + Y.refs, tuple(terms))
        while len(self.recipes) > self.size // 2:
            self.recipes.popitem(last=False)


class Views:
    """One factor (all ``G`` or all ``H``) of a stack of ``B`` GL blocks, as views into parameter
    tensors, never copied.

    ``parts``: ``(lo, hi, view)`` triples, ``view`` of shape ``(hi - lo, rows, h)`` holding rows of
    the factors of heads ``lo..hi-1`` (e.g. a weight matrix and its bias row for the heads of one
    layer); a head's factor is the row-wise concatenation of the views that hold it, so Gram
    matrices add over the parts. ``layout``: a hashable description of the parts; Gram matrices
    and writes need two ``Views`` of the same layout (the same slices of different dicts).
    ``sources`` (optional, with ``cache``): the tensors the views read, whose identity and version
    key the views' Gram matrices in ``cache`` (:class:`GramCache`).
    """

    __slots__ = ("parts", "B", "h", "layout", "dtype", "device", "cache", "key", "refs")

    def __init__(self, parts: list[tuple[int, int, torch.Tensor]], B: int, h: int, layout,
                 sources: Sequence[torch.Tensor] = (), cache: GramCache | None = None):
        self.parts, self.B, self.h, self.layout = parts, B, h, layout
        self.dtype, self.device = parts[0][2].dtype, parts[0][2].device
        self.cache = cache if sources else None
        self.key = (layout, tuple((id(t), t._version) for t in sources))
        self.refs = tuple(weakref.ref(t) for t in sources) if self.cache is not None else ()

    @property
    def rows(self) -> int:
        """Rows of one head's factor (``n`` of ``(B, n, h)``)."""
        return sum(v.shape[1] for lo, _, v in self.parts if lo == 0)

    def check_layout(self, other: Views) -> None:
        """Raise ``ValueError`` unless ``other`` has this layout."""
        if other.layout != self.layout or len(other.parts) != len(self.parts):
            raise ValueError("GL block views of different layouts (not the same slices of the same tensors)")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the tall products: the weights' own, at least float32."""
    return torch.promote_types(dtype, torch.float32)


def views_gram(X: Views, Y: Views, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``X^T Y``, ``(B, h, h)`` in float64, accumulated per view in ``dtype`` (default
    :func:`compute_dtype`; taken from the views' :class:`GramCache` when both have one and it
    holds the pair)."""
    X.check_layout(Y)
    cache = X.cache if X.cache is not None and X.cache is Y.cache and dtype is None else None
    if cache is not None:
        hit = cache.get(X, Y)
        if hit is not None:
            return hit
    cdt = dtype or compute_dtype(X.dtype)
    out = torch.zeros(X.B, X.h, X.h, dtype=cdt, device=X.device)
    for (lo, hi, vx), (_, _, vy) in zip(X.parts, Y.parts):
        out[lo:hi].baddbmm_(_t(vx.to(cdt)), vy.to(cdt))
    out = out.double()
    if cache is not None:
        cache.put(X, Y, out)
    return out


def _scaled(c: torch.Tensor, a: float) -> torch.Tensor:
    return c if a == 1 else a * c


class Blocks:
    """A lazy linear combination ``sum_k a_k X_k C_k`` of GL factors ``X_k`` (:class:`Views`) with
    scalars ``a_k`` and ``(B, h, h)`` coefficients ``C_k`` (``None``: the identity).

    Supports what the formulas of this module use: ``X @ C``, ``X + Y``, ``X - Y``, ``s * X``,
    ``-X``, ``X.transpose(-1, -2) @ Y`` / ``X.mT @ Y`` (a float64 Gram matrix ``(B, h, h)``), and
    ``.double()`` / ``.to(dtype)`` (no-ops: a combination is evaluated in its factors' dtype by
    :meth:`write`). Scalars stay apart from the coefficients until a Gram matrix or a write needs
    them (no ``h x h`` work for ``0.5 * t * t * Gamma``)."""

    __slots__ = ("terms",)

    def __init__(self, terms: tuple):
        self.terms = terms  # ((Views, coef | None, a), ...)

    @staticmethod
    def of(v: Views) -> Blocks:
        """The factor ``v`` itself."""
        return Blocks(((v, None, 1.0),))

    @property
    def _first(self) -> Views:
        return self.terms[0][0]

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype."""
        return self._first.dtype

    @property
    def device(self) -> torch.device:
        """The factors' device."""
        return self._first.device

    @property
    def shape(self) -> torch.Size:
        """``(B, n, h)``."""
        v = self._first
        return torch.Size((v.B, v.rows, v.h))

    def double(self) -> Blocks:
        """Itself (evaluation dtype fixed by :meth:`write`)."""
        return self

    def to(self, *args, **kwargs) -> Blocks:
        """Itself (evaluation dtype fixed by :meth:`write`)."""
        return self

    def transpose(self, a: int, b: int) -> _BlocksT:
        """The transpose of the last two dimensions (only ``@ Blocks`` follows)."""
        if {a % 3, b % 3} != {1, 2}:
            raise ValueError("Blocks only transpose their last two dimensions")
        return _BlocksT(self)

    @property
    def mT(self) -> _BlocksT:  # noqa: N802  (torch's name)
        """``transpose(-1, -2)``."""
        return _BlocksT(self)

    def __matmul__(self, C: torch.Tensor) -> Blocks:
        if not isinstance(C, torch.Tensor):
            return NotImplemented
        return Blocks(tuple((v, C if c is None else _matmul(c, C), a) for v, c, a in self.terms))

    def __mul__(self, s) -> Blocks:
        if isinstance(s, torch.Tensor):
            if s.ndim > 0:
                return NotImplemented
            s = float(s)
        return Blocks(tuple((v, c, a * s) for v, c, a in self.terms))

    __rmul__ = __mul__

    def __neg__(self) -> Blocks:
        return self * -1.0

    def __add__(self, other: Blocks) -> Blocks:
        if not isinstance(other, Blocks):
            return NotImplemented
        return Blocks(self.terms + other.terms)

    def __sub__(self, other: Blocks) -> Blocks:
        if not isinstance(other, Blocks):
            return NotImplemented
        return Blocks(self.terms + (-other).terms)

    def _merged(self) -> tuple[list, list]:
        """``(identity terms [(Views, a)], coefficient terms [(Views, a C)])``, one entry per
        distinct factor."""
        ident: dict[int, list] = {}
        coef: dict[int, list] = {}
        for v, c, a in self.terms:
            if c is None:
                if id(v) in ident:
                    ident[id(v)][1] += a
                else:
                    ident[id(v)] = [v, a]
            elif id(v) in coef:
                coef[id(v)][1] = sum(_promote(coef[id(v)][1], _scaled(c, a)))
            else:
                coef[id(v)] = [v, _scaled(c, a)]
        return list(ident.values()), list(coef.values())

    def write(self, out: Views) -> None:
        """Evaluate the combination into ``out`` (views of freshly allocated tensors, aliasing
        no factor), one batched matmul per view and distinct factor with a coefficient.

        The first identity term ``a X`` enters exactly (``baddbmm``'s ``beta`` input); a further
        identity term ``a Y`` is folded into ``Y``'s coefficient, ``Y (C + a I)``, when ``Y`` has
        one (rounding as in ``Y C + a Y``: one float per output entry), else added."""
        ident, coef = self._merged()
        for v, _ in ident + coef:
            out.check_layout(v)
        cdt = compute_dtype(out.dtype)
        base = ident[0] if ident else None
        extra = []
        coef = {id(v): [v, c] for v, c in coef}
        for v, a in ident[1:]:
            if id(v) in coef:
                c = coef[id(v)][1]
                coef[id(v)][1] = c + a * torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
            else:
                extra.append((v, a))
        cast = [(v, c.to(device=out.device, dtype=cdt)) for v, c in coef.values()]
        for k, (lo, hi, ov) in enumerate(out.parts):
            acc = ov if ov.dtype == cdt else torch.empty(ov.shape, dtype=cdt, device=ov.device)
            started = False
            for v, c in cast:
                x = v.parts[k][2].to(cdt)
                if started:
                    acc.baddbmm_(x, c[lo:hi])
                elif base is not None:
                    torch.baddbmm(base[0].parts[k][2].to(cdt), x, c[lo:hi], beta=base[1], out=acc)
                else:
                    torch.bmm(x, c[lo:hi], out=acc)
                started = True
            if not started:
                if base is not None:
                    x = base[0].parts[k][2]
                    acc.copy_(x) if base[1] == 1 else torch.mul(x.to(cdt), base[1], out=acc)
                else:
                    acc.zero_()
            for v, a in extra:
                acc.add_(v.parts[k][2].to(cdt), alpha=a)
            if acc is not ov:
                ov.copy_(acc)


class _BlocksT:
    """The transpose of a :class:`Blocks` combination; only ``@ Blocks`` (a Gram matrix)."""

    __slots__ = ("blocks",)

    def __init__(self, blocks: Blocks):
        self.blocks = blocks

    def __matmul__(self, other: Blocks) -> torch.Tensor:
        """``X^T Y = sum_ij L_i^T (X_i^T Y_j) R_j`` in float64, ``(B, h, h)``."""
        if not isinstance(other, Blocks):
            return NotImplemented
        lhs, rhs = self.blocks._merged(), other._merged()
        total = None
        for X, L in lhs[0] + lhs[1]:
            for Y, R in rhs[0] + rhs[1]:
                g = views_gram(X, Y)
                g = _scaled(g, L) if not isinstance(L, torch.Tensor) else _matmul(_t(L), g)
                g = _scaled(g, R) if not isinstance(R, torch.Tensor) else _matmul(g, R)
                total = g if total is None else total + g
        return total


def _sym(X: torch.Tensor) -> torch.Tensor:
    return X + _t(X)


# ----------------------------------------------------------------------------- geometry
def metric_weights(metric: str, f: GLFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``g(x, z) = tr(a xG^T zG) + tr(b xH^T zH)``: inv ``(P^{-1}, Q^{-1})``, mix ``(Q, P)``."""
    return (f.P_inv, f.Q_inv) if metric == "inv" else (f.Q, f.P)


def rgrad_weights(metric: str, f: GLFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``g^{-1}(dG, dH) = (dG a, dH b)``: inv ``(P, Q)``, mix ``(Q^{-1}, P^{-1})``."""
    return (f.P, f.Q) if metric == "inv" else (f.Q_inv, f.P_inv)


def gl_inner(metric: str, f: GLFactors, xG, xH, zG, zH) -> torch.Tensor:
    """Per-block metric, shape ``(B,)`` (float64).
    inv: ``tr(P^{-1} xG^T zG) + tr(Q^{-1} xH^T zH)``; mix: ``tr(Q xG^T zG) + tr(P xH^T zH)``
    (``a`` symmetric: ``tr(a M) = sum(a * M)``)."""
    a, b = metric_weights(metric, f)
    xG, xH, zG, zH = xG.double(), xH.double(), zG.double(), zH.double()
    return (a * (_t(xG) @ zG)).sum((-1, -2)) + (b * (_t(xH) @ zH)).sum((-1, -2))


def horizontal_lambda(metric: str, f: GLFactors, tG: torch.Tensor, tH: torch.Tensor) -> torch.Tensor:
    """``Lam`` of the horizontal projection ``(xG + G Lam, xH - H Lam^T)`` from the Gram
    matrices ``tG = G^T xG`` and ``tH = H^T xH`` (``(B, h, h)``, float64).

    mix: ``Lam = 1/2 (tH^T Q^{-1} - P^{-1} tG)`` (closed form);
    inv: ``Lam = X^T`` with ``A X + X A = B``, ``A = P Q``, ``B = P tH - tG^T Q``, solved by the
    cached eigenbasis ``X = U [(U^{-1} B U) / (lam_i + lam_j)] U^{-1}`` (spec §4.1)."""
    if metric == "mix":
        return 0.5 * (_t(tH) @ f.Q_inv - f.P_inv @ tG)
    B = f.P @ tH - _t(tG) @ f.Q
    X = f.U @ ((f.U_inv @ B @ f.U) / f.lam_sum) @ f.U_inv
    return _t(X)


def gl_project(metric: str, f: GLFactors, G, H, xG, xH):
    """Horizontal projection ``(xG + G Lam, xH - H Lam^T)``, ``Lam`` by :func:`horizontal_lambda`
    from ``G^T xG`` and ``H^T xH``."""
    dt = xG.dtype
    G, H, xG, xH = G.double(), H.double(), xG.double(), xH.double()
    lam = horizontal_lambda(metric, f, _t(G) @ xG, _t(H) @ xH)
    return (xG + G @ lam).to(dt), (xH - H @ _t(lam)).to(dt)


def gl_rgrad(metric: str, f: GLFactors, dG, dH):
    """Riemannian gradient: inv ``(dG P, dH Q)``; mix ``(dG Q^{-1}, dH P^{-1})``."""
    a, b = rgrad_weights(metric, f)
    return (dG.double() @ a).to(dG.dtype), (dH.double() @ b).to(dH.dtype)


def gl_christoffel(metric: str, f: GLFactors, G, H, xG, xH):
    """``Gamma_w(xi, xi)`` (Eqs. 11 / 12 of the paper, checked forms of spec §6.2-6.3).

    - inv: ``Gamma_G = -xG P^{-1}(xG^T G + G^T xG) + G P^{-1} xG^T xG`` (H alike with Q);
    - mix: ``Gamma_G = xG (xH^T H + H^T xH) Q^{-1} - G (xH^T xH) Q^{-1}``,
      ``Gamma_H = xH (xG^T G + G^T xG) P^{-1} - H (xG^T xG) P^{-1}``.

    Shapes: ``G, xG`` ``(B, n, h)``, ``H, xH`` ``(B, m, h)``; returns ``(Gamma_G, Gamma_H)`` of
    the same shapes and dtypes. Four Gram matrices ``xG^T G, xH^T H, xG^T xG, xH^T xH`` and two tall
    products per factor."""
    dt = xG.dtype
    G, H, xG, xH = G.double(), H.double(), xG.double(), xH.double()
    sG, sH = _t(xG) @ G, _t(xH) @ H
    kG, kH = _t(xG) @ xG, _t(xH) @ xH
    if metric == "inv":
        gG = xG @ (-f.P_inv @ _sym(sG)) + G @ (f.P_inv @ kG)
        gH = xH @ (-f.Q_inv @ _sym(sH)) + H @ (f.Q_inv @ kH)
    else:
        gG = xG @ (_sym(sH) @ f.Q_inv) - G @ (kH @ f.Q_inv)
        gH = xH @ (_sym(sG) @ f.P_inv) - H @ (kG @ f.P_inv)
    return gG.to(dt), gH.to(dt)


def gl_christoffel_vjp(metric: str, f: GLFactors, G, H, xG, xH, cG, cH):
    """``(D_xi Gamma_w(xi, xi))^T c``: the gradient of ``<cG, Gamma_G> + <cH, Gamma_H>`` w.r.t. ``(xG, xH)``.

    With ``sym(X) = X + X^T``:

    - inv: ``dG = -cG sym(xG^T G) P^{-1} - G sym(P^{-1} xG^T cG) + xG sym(P^{-1} G^T cG)`` (H alike, Q);
    - mix: with ``aG = cG Q^{-1}``, ``aH = cH P^{-1}``,
      ``dG = aG sym(xH^T H) + G sym(xH^T aH) - xG sym(H^T aH)``,
      ``dH = aH sym(xG^T G) + H sym(xG^T aG) - xH sym(G^T aG)``.

    Six Gram matrices and three tall products per factor (``aG, aH`` never formed: ``xH^T aH =
    (xH^T cH) P^{-1}``)."""
    dt = xG.dtype
    G, H, xG, xH, cG, cH = (t.double() for t in (G, H, xG, xH, cG, cH))
    if metric == "inv":
        def part(X, xX, cX, inv):
            s, u, v = _t(xX) @ X, _t(xX) @ cX, _t(X) @ cX
            return cX @ (-_sym(s) @ inv) - X @ _sym(inv @ u) + xX @ _sym(inv @ v)
        dG, dH = part(G, xG, cG, f.P_inv), part(H, xH, cH, f.Q_inv)
    else:
        sG, sH = _t(xG) @ G, _t(xH) @ H
        uG, uH = _t(xG) @ cG, _t(xH) @ cH
        vG, vH = _t(G) @ cG, _t(H) @ cH
        dG = cG @ (f.Q_inv @ _sym(sH)) + G @ _sym(uH @ f.P_inv) - xG @ _sym(vH @ f.P_inv)
        dH = cH @ (f.P_inv @ _sym(sG)) + H @ _sym(uG @ f.Q_inv) - xH @ _sym(vG @ f.Q_inv)
    return dG.to(dt), dH.to(dt)


def gl_whiten(metric: str, f: GLFactors, zG, zH):
    """Covariance ``g^{-1}`` samples: inv ``(zG P^{1/2}, zH Q^{1/2})``; mix ``(zG Q^{-1/2}, zH P^{-1/2})``."""
    a, b = (f.P_half, f.Q_half) if metric == "inv" else (f.Q_ihalf, f.P_ihalf)
    return (zG.double() @ a).to(zG.dtype), (zH.double() @ b).to(zH.dtype)


def gl_vertical(G, H, omega):
    """``nu(Omega) = (-G Omega, H Omega^T)``."""
    return -G @ omega.to(G.dtype), H @ _t(omega).to(H.dtype)


def gl_action(G, H, A):
    """``(G A^{-1}, H A^T)``."""
    A = A.to(G.dtype)
    G2 = _t(torch.linalg.solve(_t(A), _t(G)))  # G A^{-1} = (A^{-T} G^T)^T
    return G2, H @ _t(A)

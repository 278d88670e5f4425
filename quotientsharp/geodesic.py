"""Numerical integration of the geodesic ODE ``w'' = -Gamma_w(w', w')`` (spec part 1 §6.5) and its
vector-Jacobian product.

Works on any geometry through one callable ``christoffel(w, v) -> Gamma_w(v, v)`` on parameter
dicts, so a new symmetry group gets exact geodesics for free. The gradient of the integrated
endpoint is the **discrete adjoint** of RK4 (:meth:`GeodesicTrajectory.vjp`): the exact
vector-Jacobian product of the RK4 map, computed step by step backward from the stored stage
pullbacks (or from step states or checkpoints, recomputing what is missing), never through an
autograd graph of the whole integration. A group supplies the pullback of one Christoffel
evaluation through a ``linearize(w, v) -> (Gamma_w(v, v), pullback)`` callable (autograd by
default: :func:`autograd_linearization`; closed form for the GL attention blocks, in exact
compressed coordinates: :class:`GLBlockODE`, :func:`gl_stacked_christoffel`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from . import tangent as T

Christoffel = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict]
#: ``pullback(c) -> (d/dw, d/dv) <c, Gamma_w(v, v)>`` (dicts shaped like ``w`` and ``v``)
Pullback = Callable[[dict], tuple[dict, dict]]
#: ``linearize(w, v) -> (Gamma_w(v, v), pullback)``: one Christoffel evaluation and its VJP
Linearization = Callable[[dict, dict], tuple[dict, Pullback]]

#: The one vocabulary of geodesic orders: canonical ``1`` (the straight line ``w + t xi``), ``2``
#: (``w + t xi - t^2/2 Gamma_w(xi, xi)``), ``"exact"`` (closed form where a group has one, else
#: RK4) and ``"ode"`` (always RK4); the names accepted for them anywhere in the library.
GEODESIC_ORDERS: dict[object, int | str] = {
    1: 1, "first": 1, "retraction": 1,
    2: 2, "second": 2, "second_order": 2,
    "exact": "exact", "ode": "ode",
}

#: memory (bytes) a trajectory may keep for its vector-Jacobian product: the per-stage pullbacks
#: if they fit (estimated at 8 states per step), else every step state (each step's stages are
#: recomputed in the adjoint), else ``~sqrt(n)`` checkpoints (a segment is recomputed)
TRAJECTORY_MEMORY_BUDGET = 512 * 2**20


def geodesic_order(value: object, what: str = "geodesic order") -> int | str:
    """The canonical order (``1``, ``2``, ``"exact"``, ``"ode"``) of any accepted name."""
    try:
        known = not isinstance(value, bool) and value in GEODESIC_ORDERS
    except TypeError:  # unhashable
        known = False
    if not known:
        names = ", ".join(repr(k) for k in GEODESIC_ORDERS)
        raise ValueError(f"{what} must be one of {names}; got {value!r}")
    return GEODESIC_ORDERS[value]


def rk4_geodesic(
    christoffel: Christoffel,
    w: Mapping[str, torch.Tensor],
    xi: Mapping[str, torch.Tensor],
    t: float = 1.0,
    n_steps: int = 64,
    on_step: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> tuple[dict, dict]:
    """Classical RK4 with ``n_steps`` equal steps on ``(w, v)' = (v, -Gamma_w(v, v))`` from
    ``(w, xi)`` over ``[0, t]``. Returns the endpoint ``gamma(t)`` and velocity ``gamma'(t)``.
    ``on_step(w)`` is called after every step (domain checks). Plain tensor code: autograd
    differentiates through it (the reference the adjoint of :class:`GeodesicTrajectory` is tested
    against)."""
    h = t / n_steps
    w, v = dict(w), dict(xi)

    def acc(w_, v_):
        return T.scale(christoffel(w_, v_), -1.0)

    for _ in range(n_steps):
        k1w, k1v = v, acc(w, v)
        w2, v2 = T.add(w, k1w, h / 2), T.add(v, k1v, h / 2)
        k2w, k2v = v2, acc(w2, v2)
        w3, v3 = T.add(w, k2w, h / 2), T.add(v, k2v, h / 2)
        k3w, k3v = v3, acc(w3, v3)
        w4, v4 = T.add(w, k3w, h), T.add(v, k3v, h)
        k4w, k4v = v4, acc(w4, v4)
        w = {n: w[n] + h / 6 * (k1w[n] + 2 * k2w[n] + 2 * k3w[n] + k4w[n]) for n in w}
        v = {n: v[n] + h / 6 * (k1v[n] + 2 * k2v[n] + 2 * k3v[n] + k4v[n]) for n in v}
        if on_step is not None:
            on_step(w)
    return w, v


# ---------------------------------------------------------------------- dict arithmetic (foreach)
def _axpy(x: dict, y: dict, a: float) -> dict:
    """``x + a y`` (new tensors)."""
    names = list(x)
    return dict(zip(names, torch._foreach_add([x[n] for n in names], [y[n] for n in names], alpha=a)))


def _lincomb(x: dict, terms: list[tuple[float, dict]]) -> dict:
    """``x + sum_i a_i y_i`` (new tensors)."""
    names = list(x)
    out = torch._foreach_add([x[n] for n in names], [terms[0][1][n] for n in names], alpha=terms[0][0])
    for a, y in terms[1:]:
        torch._foreach_add_(out, [y[n] for n in names], alpha=a)
    return dict(zip(names, out))


def autograd_linearization(christoffel: Christoffel) -> Linearization:
    """``linearize`` of any ``christoffel`` by autograd: one graph per evaluation, freed by its
    pullback (which must be called at most once)."""
    def linearize(w: dict, v: dict):
        with torch.enable_grad():
            wl = {n: x.detach().requires_grad_(True) for n, x in w.items()}
            vl = {n: x.detach().requires_grad_(True) for n, x in v.items()}
            gam = christoffel(wl, vl)
        names = list(gam)

        def pullback(c: dict) -> tuple[dict, dict]:
            leaves = list(wl.values()) + list(vl.values())
            outs = [gam[n] for n in names if gam[n].requires_grad]
            if not outs:
                return T.zeros_like(w), T.zeros_like(v)
            grads = torch.autograd.grad(outs, leaves, [c[n] for n in names if gam[n].requires_grad],
                                        allow_unused=True)
            gs = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
            return dict(zip(wl, gs[:len(wl)])), dict(zip(vl, gs[len(wl):]))
        return {n: g.detach() for n, g in gam.items()}, pullback
    return linearize


# ---------------------------------------------------------------------- RK4 step and its adjoint
_STAGE_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
_STAGE_SHIFTS = (0.0, 0.5, 0.5, 1.0)  # stage i starts at y + shift_i h k_{i-1}


def _rk4_step(gamma: Callable, w: dict, v: dict, h: float, record: bool, velocity: bool = True):
    """One RK4 step ``(w, v) -> (w', v')``; ``gamma(w, v)`` returns ``(Gamma, pullback or None)``.
    Returns ``(w', v', pullbacks)`` (the 4 stage pullbacks when ``record``). With ``velocity``
    False the last stage's Gamma, which only ``v'`` needs, is skipped (``v'`` and its pullback
    are ``None``)."""
    g1, b1 = gamma(w, v)
    w2, v2 = _axpy(w, v, h / 2), _axpy(v, g1, -h / 2)
    g2, b2 = gamma(w2, v2)
    w3, v3 = _axpy(w, v2, h / 2), _axpy(v, g2, -h / 2)
    g3, b3 = gamma(w3, v3)
    w4, v4 = _axpy(w, v3, h), _axpy(v, g3, -h)
    w_next = _lincomb(w, [(h / 6, v), (h / 3, v2), (h / 3, v3), (h / 6, v4)])
    if not velocity:
        return w_next, None, ((b1, b2, b3, None) if record else None)
    g4, b4 = gamma(w4, v4)
    v_next = _lincomb(v, [(-h / 6, g1), (-h / 3, g2), (-h / 3, g3), (-h / 6, g4)])
    return w_next, v_next, ((b1, b2, b3, b4) if record else None)


def _rk4_step_vjp(h: float, aw: dict, av: dict | None, pullbacks) -> tuple[dict, dict]:
    """Adjoint of one RK4 step: the cotangent of ``(w, v)`` from that of ``(w', v')`` (``av``
    None: zero, as when the step skipped its last Gamma).

    With stages ``y_i = y + s_i h k_{i-1}``, ``k_i = f(y_i) = (v_i, -Gamma(w_i, v_i))`` and
    ``y' = y + h sum_i b_i k_i``: ``kbar_i = h b_i abar + s_{i+1} h ybar_{i+1}``,
    ``ybar_i = J_f(y_i)^T kbar_i = (-p_w, kbar_i^w - p_v)`` with ``(p_w, p_v)`` the pullback of
    ``Gamma`` at stage i applied to ``kbar_i^v``, and ``ybar = abar + sum_i ybar_i``."""
    names = list(aw)
    A_w = [aw[n] for n in names]
    A_v = [torch.zeros_like(x) for x in A_w] if av is None else [av[n] for n in names]
    out_w = [x.clone() for x in A_w]
    out_v = [x.clone() for x in A_v]
    nxt = None  # (ybar_{i+1}^w, ybar_{i+1}^v)
    for i in (3, 2, 1, 0):
        bh = h * _STAGE_WEIGHTS[i]
        kw = torch._foreach_mul(A_w, bh)
        kv = None if av is None and nxt is None else torch._foreach_mul(A_v, bh)
        if nxt is not None:
            sh = h * _STAGE_SHIFTS[i + 1]
            torch._foreach_add_(kw, nxt[0], alpha=sh)
            torch._foreach_add_(kv, nxt[1], alpha=sh)
        if pullbacks[i] is None or kv is None:  # zero cotangent on Gamma: ybar_i = (0, kbar_i^w)
            yw = [torch.zeros_like(x) for x in kw]
        else:
            pw, pv = pullbacks[i](dict(zip(names, kv)))
            yw = torch._foreach_neg([pw[n] for n in names])
            torch._foreach_sub_(kw, [pv[n] for n in names])
            torch._foreach_add_(out_w, yw)
        torch._foreach_add_(out_v, kw)
        nxt = (yw, kw)
    return dict(zip(names, out_w)), dict(zip(names, out_v))


def _nbytes(d: Mapping[str, torch.Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in d.values())


@dataclass
class GeodesicTrajectory:
    """An RK4 integration kept for its vector-Jacobian product (float64 states).

    ``checkpoints[j]`` is the state ``(w, v)`` after ``j * stride`` steps; ``stages[k]``, when
    kept, the 4 stage pullbacks of step ``k``. ``end``/``end_velocity``: ``gamma(t)``,
    ``gamma'(t)``."""

    t: float
    n_steps: int
    end: dict
    end_velocity: dict | None
    checkpoints: list
    stride: int
    stages: list | None
    christoffel: Christoffel
    linearize: Linearization

    def vjp(self, cot_end: Mapping[str, torch.Tensor],
            cot_velocity: Mapping[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
        """``(dL/dw0, dL/dxi)`` from ``dL/dgamma(t)`` (and ``dL/dgamma'(t)``): the exact gradient of
        the discrete RK4 map (discrete adjoint), in float64."""
        n, h = self.n_steps, self.t / self.n_steps
        w0 = self.checkpoints[0][0]
        if cot_velocity is not None and self.end_velocity is None:
            raise ValueError("this trajectory was integrated without its end velocity (velocity=False)")
        aw = {k: cot_end[k].to(w0[k].dtype) for k in self.end}
        av = None if cot_velocity is None else {k: cot_velocity[k].to(w0[k].dtype) for k in self.end_velocity}
        if self.stages is not None:
            for k in reversed(range(n)):
                aw, av = _rk4_step_vjp(h, aw, av, self.stages[k])
            return aw, av
        plain = lambda w_, v_: (self.christoffel(w_, v_), None)  # noqa: E731
        last_velocity = self.end_velocity is not None
        for j in reversed(range(len(self.checkpoints))):
            start, stop = j * self.stride, min((j + 1) * self.stride, n)
            states = [self.checkpoints[j]]
            for _ in range(start, stop - 1):  # recompute the segment's step states
                w, v, _ = _rk4_step(plain, *states[-1], h, False)
                states.append((w, v))
            for k in reversed(range(stop - start)):
                last = start + k == n - 1
                _, _, pbs = _rk4_step(self.linearize, *states[k], h, True, last_velocity or not last)
                aw, av = _rk4_step_vjp(h, aw, av, pbs)
                states[k] = None
        return aw, av


def rk4_trajectory(christoffel: Christoffel, w: Mapping[str, torch.Tensor], xi: Mapping[str, torch.Tensor],
                   t: float = 1.0, n_steps: int = 64, on_step: Callable | None = None,
                   linearize: Linearization | None = None, record: bool = True,
                   memory_budget: int | None = None, velocity: bool = True) -> GeodesicTrajectory:
    """RK4 with ``n_steps`` equal steps (as :func:`rk4_geodesic`, on the given dtype, no autograd
    graph), keeping what :meth:`GeodesicTrajectory.vjp` needs within ``memory_budget`` bytes
    (default :data:`TRAJECTORY_MEMORY_BUDGET`): the stage pullbacks (about 8 states per step)
    if they fit, else every step state, else every ``ceil(sqrt(n))``-th. ``velocity=False``
    skips the one Gamma evaluation only the end velocity needs (``end_velocity`` is then
    ``None``)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    linearize = linearize or autograd_linearization(christoffel)
    budget = TRAJECTORY_MEMORY_BUDGET if memory_budget is None else memory_budget
    h = t / n_steps
    w, v = dict(w), dict(xi)
    state = 2 * _nbytes(w)
    keep_stages = record and n_steps * 8 * state <= budget
    stride = 1 if n_steps * state <= budget else math.ceil(math.sqrt(n_steps))
    gamma = linearize if keep_stages else (lambda w_, v_: (christoffel(w_, v_), None))
    checkpoints, stages = [(w, v)], ([] if keep_stages else None)
    with torch.no_grad():
        for k in range(n_steps):
            w, v, pbs = _rk4_step(gamma, w, v, h, keep_stages, velocity or k + 1 < n_steps)
            if keep_stages:
                stages.append(pbs)
            if on_step is not None:
                on_step(w)
            if record and not keep_stages and (k + 1) % stride == 0 and k + 1 < n_steps:
                checkpoints.append((w, v))
    return GeodesicTrajectory(t, n_steps, w, v, checkpoints if record else [checkpoints[0]], stride,
                              stages, christoffel, linearize)


def geodesic_trajectory(christoffel: Christoffel, w: Mapping[str, torch.Tensor], xi: Mapping[str, torch.Tensor],
                        t: float = 1.0, n_steps: int = 64, tol: float | None = 1e-10, max_steps: int = 4096,
                        on_step: Callable | None = None, linearize: Linearization | None = None,
                        memory_budget: int | None = None, velocity: bool = True) -> GeodesicTrajectory:
    """The accepted RK4 integration of :func:`integrate_geodesic` (float64 states), kept for its
    vector-Jacobian product: ``n_steps`` steps when ``tol`` is None, else the first ``2n`` of the
    step doubling ``n = n_steps, 2 n_steps, ...`` whose endpoint is within ``tol * ||xi|| |t|`` of
    the ``n``-step one."""
    w64 = {n: p.detach().to(torch.float64) for n, p in w.items()}
    xi64 = {n: p.detach().to(torch.float64) for n, p in xi.items()}
    kw = dict(on_step=on_step, linearize=linearize, memory_budget=memory_budget, velocity=velocity)
    traj = rk4_trajectory(christoffel, w64, xi64, t, n_steps, record=tol is None, **kw)
    if tol is None:
        return traj
    scale = float(torch.sqrt(T.dot(xi64, xi64))) * abs(t) + 1e-300
    n = n_steps
    while True:
        if 2 * n > max_steps:
            raise RuntimeError(
                f"RK4 geodesic did not converge to tol={tol} within {max_steps} steps; "
                "the velocity may be too large for the manifold's curvature"
            )
        finer = rk4_trajectory(christoffel, w64, xi64, t, 2 * n, **kw)
        d = T.sub(finer.end, traj.end)
        diff = float(torch.sqrt(T.dot(d, d)))
        traj, n = finer, 2 * n
        if diff <= tol * scale:
            return traj


class _IntegratedGeodesic(torch.autograd.Function):
    """``(w, xi) -> make(w, xi).end`` as one autograd node whose backward is ``make(...).vjp``."""

    @staticmethod
    def forward(ctx, make, w_names, xi_names, *tensors):
        nw = len(w_names)
        out = make(dict(zip(w_names, tensors[:nw])), dict(zip(xi_names, tensors[nw:])))
        ctx.out, ctx.names, ctx.dtypes = out, (w_names, xi_names), [x.dtype for x in tensors]
        return tuple(out.end[n].to(x.dtype) for n, x in zip(w_names, tensors))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        w_names, xi_names = ctx.names
        cot = {n: torch.zeros_like(ctx.out.end[n]) if g is None else g for n, g in zip(w_names, grads)}
        dw, dxi = ctx.out.vjp(cot)
        out = [dw[n] for n in w_names] + [dxi[n] for n in xi_names]
        return (None, None, None, *[g.to(dt) for g, dt in zip(out, ctx.dtypes)])


def differentiable_endpoint(make: Callable, w: Mapping[str, torch.Tensor], xi: Mapping[str, torch.Tensor]) -> dict:
    """``make(w, xi).end`` (a dict over ``w``'s names) as an autograd node: ``make`` runs without a
    graph and returns an object with ``end`` and ``vjp(cot) -> (dL/dw, dL/dxi)`` (a
    :class:`GeodesicTrajectory`, or a group's wrapper of one); backward calls that ``vjp``."""
    wn, xn = list(w), list(xi)
    outs = _IntegratedGeodesic.apply(make, wn, xn, *[w[n] for n in wn], *[xi[n] for n in xn])
    return dict(zip(wn, outs))


def integrate_geodesic(
    christoffel: Christoffel,
    w: Mapping[str, torch.Tensor],
    xi: Mapping[str, torch.Tensor],
    t: float = 1.0,
    n_steps: int = 64,
    tol: float | None = 1e-10,
    max_steps: int = 4096,
    on_step: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
    linearize: Linearization | None = None,
) -> dict:
    """``gamma_xi(t)`` by RK4 in float64, with step doubling until the ``n``- and ``2n``-step
    endpoints differ by less than ``tol * ||xi|| |t|`` (Euclidean norms); ``tol=None`` runs
    ``n_steps`` once. Raises ``RuntimeError`` if ``max_steps`` is not enough. Differentiable
    (when grad is enabled and an input requires it) through the discrete adjoint of the accepted
    integration (:meth:`GeodesicTrajectory.vjp`), not through an autograd graph of every step."""
    def make(w_, xi_):
        return geodesic_trajectory(christoffel, w_, xi_, t, n_steps, tol, max_steps, on_step, linearize)

    if any(is_transformed(x) for x in (*w.values(), *xi.values())):
        return _plain_integration(christoffel, w, xi, t, n_steps, tol, max_steps, on_step)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*w.values(), *xi.values())):
        return differentiable_endpoint(make, w, xi)
    traj = make(w, xi)
    return {n: traj.end[n].to(w[n].dtype) for n in traj.end}


# ---------------------------------------------------------------------- GL(h) blocks in closed form
def _sym(X: torch.Tensor) -> torch.Tensor:
    return X + X.mT


def _gram(X: torch.Tensor, eps_rel: float, eps_abs: float) -> torch.Tensor:
    """``X^T X + (eps_rel tr(X^T X)/h + eps_abs) I`` (spec part 1 §4.3), ``(B, h, h)``."""
    P = X.mT @ X
    if eps_rel or eps_abs:
        h = X.shape[-1]
        eps = eps_rel * X.pow(2).sum(dim=(-1, -2)) / h + eps_abs
        P = P + eps[:, None, None] * torch.eye(h, dtype=X.dtype, device=X.device)
    return P


def gl_block_christoffel(metric: str, G, H, xG, xH, eps_rel: float = 0.0, eps_abs: float = 0.0,
                         record: bool = False):
    """``Gamma_w(xi, xi) = (Gamma_G, Gamma_H)`` of a batch of GL blocks ``(B, n, h)`` / ``(B, m, h)``
    with P, Q (and their relaxation) recomputed from ``G, H`` (the forms of
    :func:`quotientsharp.groups.gl_math.gl_christoffel`), and, if ``record``, its pullback
    ``(cG, cH) -> (dG, dH, dxG, dxH)`` (else ``None``): the separate-sides front end of
    :func:`gl_stacked_christoffel` (the factor with fewer rows zero-padded: exact)."""
    B, n, m = G.shape[0], G.shape[1], H.shape[1]
    r = max(n, m)

    def stack(a, b):
        pad = torch.nn.functional.pad
        return torch.cat([pad(a, (0, 0, 0, r - a.shape[1])), pad(b, (0, 0, 0, r - b.shape[1]))])

    g, pb = gl_stacked_christoffel(metric, stack(G, H), stack(xG, xH), eps_rel, eps_abs, record)
    if not record:
        return g[:B, :n], g[B:, :m], None

    def pullback(cG, cH):  # rows beyond the state's (its padding included) are state-zero rows
        R = max(cG.shape[1], cH.shape[1], r)
        pad = torch.nn.functional.pad
        dX, dx = pb(torch.cat([pad(cG, (0, 0, 0, R - cG.shape[1])), pad(cH, (0, 0, 0, R - cH.shape[1]))]))
        a, b = cG.shape[1], cH.shape[1]
        return dX[:B, :a], dX[B:, :b], dx[:B, :a], dx[B:, :b]
    return g[:B, :n], g[B:, :m], pullback


def gl_stacked_christoffel(metric: str, X: torch.Tensor, xX: torch.Tensor, eps_rel: float = 0.0,
                           eps_abs: float = 0.0, record: bool = False, infos: list | None = None):
    """``Gamma`` of GL blocks with both factors stacked along the batch: ``X = [G; H]``,
    ``xX = [xG; xH]`` ``(2B, r, h)`` (the first ``B`` entries the G side, the last the H side of
    the same blocks), P and Q (and their relaxation) recomputed from ``X``. Returns
    ``(Gamma, pullback)``, ``pullback(c) -> (d/dX, d/dxX) <c, Gamma>`` (closed form; ``None``
    unless ``record``). With ``Z = [X, xX]``, one product ``Z^T Z`` gives every Gram matrix
    (``P = G^T G + eps(G) I``, ``S_G = sym(xG^T G)``, ``K_G = xG^T xG``; H alike with Q) and
    ``Gamma = Z F``:

    - mix: ``Gamma_G = xG S_H Q^{-1} - G K_H Q^{-1}``, ``Gamma_H = xH S_G P^{-1} - H K_G P^{-1}``;
      with ``t = [G^T; xG^T] cG Q^{-1}`` (H alike) and ``Pbar = -Gamma_H^T cH P^{-1}``:
      ``dxG = cG Q^{-1} S_H + G sym(xH^T cH P^{-1}) - xG sym(H^T cH P^{-1})``,
      ``dG = -cG Q^{-1} K_H + xG sym(xH^T cH P^{-1}) + G sym(Pbar) (+ 2 eps_rel tr(Pbar)/h G)``;
    - inv: ``Gamma_G = -xG P^{-1} S_G + G P^{-1} K_G``; with ``u = P^{-1} xG^T cG``,
      ``r = P^{-1} G^T cG``, ``Pbar = (u S_G - r K_G) P^{-1}``:
      ``dxG = -cG S_G P^{-1} - G sym(u) + xG sym(r)``,
      ``dG = cG K_G P^{-1} - xG sym(u) + G sym(Pbar) (+ 2 eps_rel tr(Pbar)/h G)`` (H alike, Q).

    A cotangent may have more rows than the state (rows where ``X = xX = 0``, exact): they only
    see a right-multiplication. Zero rows of a factor and its velocity give zero rows of Gamma
    (row padding is exact). The inverses come from Cholesky factors; their ``info`` (``> 0``:
    a Gram matrix not positive definite) is appended to ``infos`` when given (checked later,
    without a synchronisation per stage)."""
    if metric not in ("inv", "mix"):
        raise ValueError(f"metric must be 'inv' or 'mix', got {metric!r}")
    h, r = X.shape[-1], X.shape[1]
    B = X.shape[0] // 2
    Z = torch.cat([X, xX], dim=-1)
    C = Z.mT @ Z
    P, S, K = C[:, :h, :h], _sym(C[:, h:, :h]), C[:, h:, h:]
    eye = None
    if eps_rel or eps_abs:
        eye = torch.eye(h, dtype=X.dtype, device=X.device)
        P = P + (eps_rel * P.diagonal(dim1=-2, dim2=-1).sum(-1) / h + eps_abs)[:, None, None] * eye
    L, info = torch.linalg.cholesky_ex(P)
    if infos is not None:
        infos.append(info)
    inv = torch.cholesky_inverse(L)
    if metric == "mix":  # own-side F = [-K; S] P^-1; Gamma_G uses the H side's: F rolled by B
        F = torch.cat([-K, S], dim=-2) @ inv
        Fr = F.roll(B, 0)
    else:  # Gamma = [X, xX] [P^-1 K; -P^-1 S]
        M = inv @ torch.cat([K, -S], dim=-1)
        Fr = F = torch.cat([M[..., :h], M[..., h:]], dim=-2)
    gam = Z @ Fr
    if not record:
        return gam, None

    def gram_term(Pbar):  # d/dX <Pbar, X^T X + eps(X) I> = X gram_term(Pbar)
        W = _sym(Pbar)
        if eps_rel:
            tr = Pbar.diagonal(dim1=-2, dim2=-1).sum(-1)
            W = W + (2 * eps_rel / h) * tr[:, None, None] * eye
        return W

    def pullback(c):
        t = Z.mT @ c[:, :r]  # [X^T c; xX^T c]
        if metric == "mix":
            t = (t @ inv.roll(B, 0)).roll(B, 0)  # at the G position: [H^T aH; xH^T aH], aH = cH P^-1
            s_lo, s_hi = _sym(t[:, :h]), _sym(t[:, h:])
            Pbar = -(F.mT @ t)
            W2 = torch.cat([torch.cat([gram_term(Pbar), s_hi], -1), torch.cat([s_hi, -s_lo], -1)], -2)
        else:
            rr, u = inv @ t[:, :h], inv @ t[:, h:]
            su, sr = _sym(u), _sym(rr)
            Pbar = (u @ S - rr @ K) @ inv
            W2 = torch.cat([torch.cat([gram_term(Pbar), -su], -1), torch.cat([-su, sr], -1)], -2)
        out = c @ Fr.mT  # [dX, dxX] = c F^T + [Z W2; 0]
        if c.shape[1] == r:
            out = out.add_(Z @ W2)
        else:
            out[:, :r] += Z @ W2
        return out[..., :h], out[..., h:]
    return gam, pullback


class GLBlockODE:
    """The geodesic ODE of stacks of GL blocks ``[(G, H), ...]`` (``(B_s, n_s, h_s)`` /
    ``(B_s, m_s, h_s)``) in compressed float64 coordinates, all stacks of one head dimension
    ``h`` in one batch ``X{k} = [G; H]`` of shape ``(2 B, 2h, h)``.

    The right side ``Gamma_G = [G, xG] F(Grams)`` only right-multiplies ``Z = [G, xG]`` (n x 2h)
    and reads it through ``Z^T Z``, so with a QR factorisation ``Z_0 = U R`` the whole RK4
    trajectory (stages included) is ``Z = U Y`` with ``Y`` (2h x 2h) integrated by the same ODE
    from ``Y_0 = R``: exact, and ``n / 2h`` times fewer rows (factors with ``n <= 2h`` rows are
    zero-padded instead; a zero row stays zero and changes no Gram matrix). A cotangent ``c``
    splits into ``U^T c`` and its part ``V T`` orthogonal to ``U`` (QR), which the linearised
    ODE only right-multiplies: the adjoint runs on ``3h`` rows ``[U^T c; T]``.

    Gives the ``christoffel``/``linearize`` pair of :func:`rk4_trajectory` and the domain check
    ``check`` (raises :class:`~quotientsharp.groups.gl_math.SingularHeadError` naming the head when a
    Gram matrix is singular, or the state is no longer finite)."""

    def __init__(self, metric: str, shapes: list[tuple[tuple, tuple]], eps_rel: float = 0.0,
                 eps_abs: float = 0.0, labels: Callable[[], list[list[str]]] | None = None):
        if metric not in ("inv", "mix"):
            raise ValueError(f"metric must be 'inv' or 'mix', got {metric!r}")
        self.metric, self.eps_rel, self.eps_abs, self._labels = metric, eps_rel, eps_abs, labels
        self.shapes = [(tuple(g), tuple(hh)) for g, hh in shapes]
        #: stack indices per merged batch k (one per head dimension)
        self.groups = [[s for s, (g, _) in enumerate(self.shapes) if g[-1] == h]
                       for h in sorted({g[-1] for g, _ in self.shapes})]

    # ------------------------------------------------------------------ coordinates
    def compress(self, w_stacks, xi_stacks) -> tuple[dict, dict, list]:
        """Blocks ``[(G, H), ...]`` of the base point and velocity -> the packed float64
        coordinates ``(w, v)`` and the bases (per stack and side: ``U`` or ``None``)."""
        bases = [[None, None] for _ in self.shapes]
        w, v = {}, {}
        for k, idx in enumerate(self.groups):
            h = self.shapes[idx[0]][0][-1]
            parts = {j: ([], []) for j in (0, 1)}
            for j in (0, 1):
                for s in idx:
                    X, x = w_stacks[s][j].to(torch.float64), xi_stacks[s][j].to(torch.float64)
                    if X.shape[1] > 2 * h:
                        U, R = torch.linalg.qr(torch.cat([X, x], dim=-1))
                        bases[s][j] = U
                        X, x = R[..., :h], R[..., h:]
                    elif X.shape[1] < 2 * h:
                        X, x = (torch.nn.functional.pad(a, (0, 0, 0, 2 * h - a.shape[1])) for a in (X, x))
                    parts[j][0].append(X)
                    parts[j][1].append(x)
            w[f"X{k}"] = torch.cat(parts[0][0] + parts[1][0])
            v[f"X{k}"] = torch.cat(parts[0][1] + parts[1][1])
        return w, v, bases

    def _split(self, k: int, T: torch.Tensor):
        """Packed batch ``k`` -> ``{(s, j): block}`` (rows as packed)."""
        out, start = {}, 0
        for j in (0, 1):
            for s in self.groups[k]:
                B = self.shapes[s][j][0]
                out[(s, j)] = T[start:start + B]
                start += B
        return out

    def expand(self, d: Mapping[str, torch.Tensor], bases, dtypes) -> list:
        """Packed coordinates of a point (or of a vector in the span of the bases) -> blocks
        ``[(G, H), ...]`` in ``dtypes`` (one per stack)."""
        out = [[None, None] for _ in self.shapes]
        for k in range(len(self.groups)):
            for (s, j), Y in self._split(k, d[f"X{k}"]).items():
                n = self.shapes[s][j][1]
                U = bases[s][j]
                out[s][j] = (U @ Y[:, :U.shape[-1]] if U is not None else Y[:, :n]).to(dtypes[s])
        return [tuple(x) for x in out]

    def compress_cotangent(self, c_stacks, bases) -> tuple[dict, list]:
        """Cotangent blocks -> packed coordinates with ``3h`` rows ``[U^T c; T]`` (``c - U U^T c
        = V T`` by QR) and the ``V`` (per stack and side)."""
        perps = [[None, None] for _ in self.shapes]
        out = {}
        for k, idx in enumerate(self.groups):
            h = self.shapes[idx[0]][0][-1]
            parts = []
            for j in (0, 1):
                for s in idx:
                    c, U = c_stacks[s][j].to(torch.float64), bases[s][j]
                    if U is not None:
                        cu = U.mT @ c
                        V, T = torch.linalg.qr(c - U @ cu)
                        perps[s][j] = V
                        c = torch.cat([cu, T], dim=-2)
                    parts.append(torch.nn.functional.pad(c, (0, 0, 0, 3 * h - c.shape[1])))
            out[f"X{k}"] = torch.cat(parts)
        return out, perps

    def expand_cotangent(self, d: Mapping[str, torch.Tensor], bases, perps, dtypes) -> list:
        """Packed ``3h``-row coordinates (of a gradient) -> blocks ``U g[:2h] + V g[2h:]``."""
        out = [[None, None] for _ in self.shapes]
        for k in range(len(self.groups)):
            for (s, j), Y in self._split(k, d[f"X{k}"]).items():
                U, n = bases[s][j], self.shapes[s][j][1]
                if U is None:
                    out[s][j] = Y[:, :n].to(dtypes[s])
                else:
                    m = U.shape[-1]
                    out[s][j] = torch.baddbmm(U @ Y[:, :m], perps[s][j], Y[:, m:]).to(dtypes[s])
        return [tuple(x) for x in out]

    # ------------------------------------------------------------------ the ODE
    def christoffel(self, w: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor]) -> dict:
        """``Gamma_w(v, v)`` on the packed coordinates (:func:`gl_stacked_christoffel` per batch)."""
        return {key: gl_stacked_christoffel(self.metric, w[key], v[key], self.eps_rel, self.eps_abs,
                                            infos=self._infos.setdefault(key, []))[0] for key in w}

    def linearize(self, w: Mapping[str, torch.Tensor], v: Mapping[str, torch.Tensor]):
        """``(Gamma_w(v, v), pullback)`` on the packed coordinates (a :data:`Linearization`)."""
        out, pbs = {}, {}
        for key in w:
            out[key], pbs[key] = gl_stacked_christoffel(self.metric, w[key], v[key], self.eps_rel, self.eps_abs,
                                                        True, self._infos.setdefault(key, []))

        def pullback(c):
            dw, dv = {}, {}
            for key, pb in pbs.items():
                dw[key], dv[key] = pb(c[key])
            return dw, dv
        return out, pullback

    _infos: dict = {}

    def start(self) -> None:
        """Begin collecting the Cholesky ``info`` of every stage (see :meth:`finish`)."""
        self._infos = {}

    def finish(self, w_end: Mapping[str, torch.Tensor]) -> None:
        """Raise if a Gram matrix was not positive definite at some stage since :meth:`start`
        (one synchronisation per integration), or is singular at the endpoint ``w_end``."""
        from .groups.gl_math import SingularHeadError
        labels = self._labels() if self._labels is not None else None
        for k, idx in enumerate(self.groups):
            infos = self._infos.get(f"X{k}", [])
            if infos:
                bad = torch.stack(infos).amax(0)
                if bool((bad > 0).any()):
                    i = int((bad > 0).nonzero()[0, 0])
                    B = bad.shape[0] // 2
                    lab = [x for s in idx for x in labels[s]] if labels is not None else None
                    side = "G (W_Q / W_V side)" if i < B else "H (W_K / W_O side)"
                    where = lab[i % B] if lab is not None else f"block {i % B}"
                    raise SingularHeadError(
                        f"singular Gram matrix of {side} in {where} on the way: the integrated geodesic left the "
                        "full-rank manifold (the velocity may be too large, or pass eps_rel > 0)")
        self._infos = {}
        self.check(w_end)

    def check(self, w: Mapping[str, torch.Tensor]) -> None:
        """Raise if a Gram matrix of the packed state ``w`` is singular (spec part 1 §6.5)."""
        from .groups.gl_math import SingularHeadError, check_gram
        labels = self._labels() if self._labels is not None else None
        for k, idx in enumerate(self.groups):
            X = w[f"X{k}"]
            ev = torch.linalg.eigvalsh(_gram(X, self.eps_rel, self.eps_abs))
            if not bool(torch.isfinite(ev).all()):
                raise SingularHeadError("the integrated geodesic is no longer finite: a Gram matrix turned "
                                        "singular on the way (the geodesic left the full-rank manifold)")
            B = ev.shape[0] // 2
            lab = [x for s in idx for x in labels[s]] if labels is not None else None
            check_gram(ev[:B], "G (W_Q / W_V side)", lab, self.eps_rel, self.eps_abs)
            check_gram(ev[B:], "H (W_K / W_O side)", lab, self.eps_rel, self.eps_abs)


def is_transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is wrapped by a ``torch.func`` transform (``grad``, ``jvp``, ``vmap``)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def _plain_integration(christoffel, w, xi, t, n_steps, tol, max_steps, on_step) -> dict:
    """:func:`integrate_geodesic` as plain tensor code (every step traced), for inputs inside a
    ``torch.func`` transform, which a custom autograd node does not support."""
    w64 = {n: p.to(torch.float64) for n, p in w.items()}
    xi64 = {n: p.to(torch.float64) for n, p in xi.items()}
    end, _ = rk4_geodesic(christoffel, w64, xi64, t, n_steps, on_step)
    if tol is not None:
        scale = _error_float(torch.sqrt(T.dot(xi64, xi64))) * abs(t) + 1e-300
        n = n_steps
        while True:
            if 2 * n > max_steps:
                raise RuntimeError(f"RK4 geodesic did not converge to tol={tol} within {max_steps} steps; "
                                   "the velocity may be too large for the manifold's curvature")
            finer, _ = rk4_geodesic(christoffel, w64, xi64, t, 2 * n, on_step)
            d = T.sub(finer, end)
            end, n = finer, 2 * n
            if _error_float(torch.sqrt(T.dot(d, d))) <= tol * scale:
                break
    return {n: end[n].to(w[n].dtype) for n in end}


def _error_float(x: torch.Tensor) -> float:
    """``float(x)`` for the step-doubling test, with a clear error where a transform (``vmap``)
    cannot give a Python number."""
    try:
        return float(x.detach())  # a step count's test, no graph (float() of a traced tensor warns)
    except RuntimeError as err:
        raise RuntimeError("integrate_geodesic chooses its number of steps by comparing error estimates "
                           "as Python floats, which torch.func.vmap cannot give; pass tol=None to "
                           "integrate a fixed n_steps under vmap") from err

"""Numerical integration of the geodesic ODE ``w'' = -Gamma_w(w', w')`` (spec part 1 §6.5).

Works on any geometry through one callable ``christoffel(w, v) -> Gamma_w(v, v)`` on parameter
dicts, so a new symmetry group gets exact geodesics for free.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from . import tangent as T

Christoffel = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict]

#: The one vocabulary of geodesic orders: canonical ``1`` (the straight line ``w + t xi``), ``2``
#: (``w + t xi - t^2/2 Gamma_w(xi, xi)``), ``"exact"`` (closed form where a group has one, else
#: RK4) and ``"ode"`` (always RK4); the names accepted for them anywhere in the library.
GEODESIC_ORDERS: dict[object, int | str] = {
    1: 1, "first": 1, "retraction": 1,
    2: 2, "second": 2, "second_order": 2,
    "exact": "exact", "ode": "ode",
}


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
    ``on_step(w)`` is called after every step (domain checks)."""
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


def integrate_geodesic(
    christoffel: Christoffel,
    w: Mapping[str, torch.Tensor],
    xi: Mapping[str, torch.Tensor],
    t: float = 1.0,
    n_steps: int = 64,
    tol: float | None = 1e-10,
    max_steps: int = 4096,
    on_step: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> dict:
    """``gamma_xi(t)`` by RK4 in float64, with step doubling until the ``n``- and ``2n``-step
    endpoints differ by less than ``tol * ||xi||`` (Euclidean norms); ``tol=None`` runs
    ``n_steps`` once. Raises ``RuntimeError`` if ``max_steps`` is not enough."""
    dtypes = {n: p.dtype for n, p in w.items()}
    w64 = {n: p.to(torch.float64) for n, p in w.items()}
    xi64 = {n: p.to(torch.float64) for n, p in xi.items()}
    end, _ = rk4_geodesic(christoffel, w64, xi64, t, n_steps, on_step)
    if tol is not None:
        scale = float(torch.sqrt(T.dot(xi64, xi64))) * abs(t) + 1e-300
        n = n_steps
        while True:
            if 2 * n > max_steps:
                raise RuntimeError(
                    f"RK4 geodesic did not converge to tol={tol} within {max_steps} steps; "
                    "the velocity may be too large for the manifold's curvature"
                )
            finer, _ = rk4_geodesic(christoffel, w64, xi64, t, 2 * n, on_step)
            diff = float(torch.sqrt(T.dot(T.sub(finer, end), T.sub(finer, end))))
            end, n = finer, 2 * n
            if diff <= tol * scale:
                break
    return {n: end[n].to(dtypes[n]) for n in end}

"""``DiagonalRescaling``: ``(u, v) -> (a * u, v / a)`` of diagonal linear networks ``x^T (u * v)``
(spec part 1 §4.4, §6.4).

Vertical space ``{(u c, -v c)}``; both metrics share the horizontal space ``{xi_u / u = xi_v / v}``
and the projection ``b = 1/2 (xi_u / u + xi_v / v)``, ``Pi(xi) = (u b, v b)``. A horizontal vector
is thus parametrised by ``b`` (:meth:`from_b` / :meth:`to_b`), and the geodesics have closed forms:

* inverse metric ``sum xi_u^2/u^2 + xi_v^2/v^2``: ``(u e^{b t}, v e^{b t})``, ``beta(t) = beta e^{2bt}``;
* mixed metric ``sum xi_u^2 v^2 + xi_v^2 u^2``: ``(u s, v s)`` with ``s = sqrt(1 + 2 b t)``,
  ``beta(t) = beta (1 + 2bt)``; defined while ``1 + 2bt > 0`` (``mixed_domain="restrict"`` clamps
  ``b >= -1/2``; ``"extend"`` uses ``beta (1 + 2b)`` for every b).
"""
from __future__ import annotations

import warnings

import torch

from .base import Params, SymmetryGroup


def _safe(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x != 0, x, torch.ones_like(x))


class DiagonalRescaling(SymmetryGroup):
    """Rescaling symmetry of the pair of parameters ``(u, v)`` (same shape, elementwise).

    ``DiagonalRescaling(u, v, metric)`` builds the subclass of that metric
    (:class:`DiagonalRescalingInv` or :class:`DiagonalRescalingMix`); this class holds what both
    share: the action, the vertical space, the ``b`` coordinates of the common horizontal space
    and the projection.
    """

    has_closed_form_geodesic = True

    def __new__(cls, u: str = "u", v: str = "v", metric: str = "inv", mixed_domain: str = "restrict"):
        if cls is DiagonalRescaling:
            if metric not in _BY_METRIC:
                raise ValueError(f"metric must be 'inv' or 'mix', got {metric!r}")
            cls = _BY_METRIC[metric]
        return super().__new__(cls)

    def __init__(self, u: str = "u", v: str = "v", metric: str = "inv", mixed_domain: str = "restrict"):
        if metric != self.metric:
            raise ValueError(f"{type(self).__name__} has metric {self.metric!r}, got {metric!r}")
        if mixed_domain not in ("restrict", "extend"):
            raise ValueError(f"mixed_domain must be 'restrict' or 'extend', got {mixed_domain!r}")
        super().__init__((u, v))
        self.u, self.v, self.mixed_domain = u, v, mixed_domain

    def __repr__(self) -> str:
        return f"DiagonalRescaling({self.u!r}, {self.v!r}, metric={self.metric!r})"

    def __getnewargs__(self):
        return (self.u, self.v, self.metric, self.mixed_domain)

    def with_metric(self, metric: str, **kw) -> DiagonalRescaling:
        return DiagonalRescaling(self.u, self.v, metric, kw.get("mixed_domain", self.mixed_domain))

    def validate(self, w: Params) -> None:
        super().validate(w)
        if w[self.u].shape != w[self.v].shape:
            raise ValueError(f"DiagonalRescaling needs {self.u!r} and {self.v!r} of equal shape, got "
                             f"{tuple(w[self.u].shape)} and {tuple(w[self.v].shape)}")

    # ------------------------------------------------------------------ group
    def action(self, w: Params, g: torch.Tensor) -> dict:
        return {self.u: w[self.u] * g, self.v: w[self.v] / g}

    def pushforward(self, w: Params, g: torch.Tensor, xi: Params) -> dict:
        return {self.u: xi[self.u] * g, self.v: xi[self.v] / g}

    def random_element(self, w: Params, scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        u = w[self.u]
        dev = generator.device if generator is not None else "cpu"
        mag = torch.exp(scale * torch.randn(u.shape, generator=generator, dtype=torch.float64, device=dev))
        sign = torch.where(torch.rand(u.shape, generator=generator, device=dev) < 0.5, -1.0, 1.0)
        return (mag * sign).to(u)

    def algebra_zeros(self, w: Params) -> torch.Tensor:
        return torch.zeros_like(w[self.u])

    def vertical(self, w: Params, omega: torch.Tensor) -> dict:
        u, v = w[self.u], w[self.v]
        return {self.u: u * omega, self.v: -v * omega}

    # ------------------------------------------------------------------ horizontal space
    def _metric_weights(self, w: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, c)`` with ``g(xi, zeta) = sum a xi_u zeta_u + c xi_v zeta_v`` (per metric)."""
        raise NotImplementedError(f"{type(self).__name__} defines no metric")

    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        a, c = self._metric_weights(w)
        return (xi[self.u] * zeta[self.u] * a).sum() + (xi[self.v] * zeta[self.v] * c).sum()

    def to_b(self, w: Params, xi: Params) -> torch.Tensor:
        """``b = 1/2 (xi_u / u + xi_v / v)`` (0 where ``u v = 0``)."""
        u, v = w[self.u], w[self.v]
        ok = (u != 0) & (v != 0)
        return torch.where(ok, 0.5 * (xi[self.u] / _safe(u) + xi[self.v] / _safe(v)), 0.0)

    def from_b(self, w: Params, b: torch.Tensor) -> dict:
        """The horizontal vector ``(u b, v b)``."""
        return {self.u: w[self.u] * b, self.v: w[self.v] * b}

    def horizontal_projection(self, w: Params, xi: Params) -> dict:
        u, v = w[self.u], w[self.v]
        zero = (u == 0) | (v == 0)
        if not torch._C._functorch.is_functorch_wrapped_tensor(u) and bool(zero.any()):
            warnings.warn(f"DiagonalRescaling: {int(zero.sum())} entries with u*v = 0 violate the "
                          "full-rank assumption; their perturbation is set to 0", stacklevel=2)
        return self.from_b(w, self.to_b(w, xi))

    def beta(self, w: Params) -> torch.Tensor:
        """The predictor ``beta = u * v``."""
        return w[self.u] * w[self.v]


class DiagonalRescalingInv(DiagonalRescaling):
    """Inverse metric ``sum xi_u^2/u^2 + xi_v^2/v^2`` (the adaptive metric on u and v); geodesic
    ``(u e^{xi_u t/u}, v e^{xi_v t/v})``."""

    metric = "inv"

    def _metric_weights(self, w: Params):
        u, v = w[self.u], w[self.v]
        return 1.0 / _safe(u * u), 1.0 / _safe(v * v)

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        u, v = w[self.u], w[self.v]
        return {self.u: egrad[self.u] * u * u, self.v: egrad[self.v] * v * v}

    def whiten(self, w: Params, zeta: Params) -> dict:
        return {self.u: zeta[self.u] * w[self.u].abs(), self.v: zeta[self.v] * w[self.v].abs()}

    def christoffel(self, w: Params, xi: Params) -> dict:
        u, v = _safe(w[self.u]), _safe(w[self.v])
        xu, xv = xi[self.u], xi[self.v]
        return {self.u: -xu * xu / u, self.v: -xv * xv / v}

    def geodesic_exact(self, w: Params, xi: Params, t: float = 1.0, **_) -> dict:
        u, v = w[self.u], w[self.v]
        return {self.u: u * torch.exp(t * xi[self.u] / _safe(u)),
                self.v: v * torch.exp(t * xi[self.v] / _safe(v))}


class DiagonalRescalingMix(DiagonalRescaling):
    """Mixed metric ``sum xi_u^2 v^2 + xi_v^2 u^2``; horizontal geodesic ``(u s, v s)``,
    ``s = sqrt(1 + 2 b t)``, defined while ``1 + 2bt > 0`` (``mixed_domain="restrict"`` clamps
    ``b >= -1/2``; ``"extend"`` uses ``beta (1 + 2b)`` for every b)."""

    metric = "mix"

    def _metric_weights(self, w: Params):
        u, v = w[self.u], w[self.v]
        return v * v, u * u

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        u, v = w[self.u], w[self.v]
        return {self.u: egrad[self.u] / _safe(v * v), self.v: egrad[self.v] / _safe(u * u)}

    def whiten(self, w: Params, zeta: Params) -> dict:
        u, v = w[self.u], w[self.v]
        return {self.u: zeta[self.u] / _safe(v.abs()), self.v: zeta[self.v] / _safe(u.abs())}

    def christoffel(self, w: Params, xi: Params) -> dict:
        u, v = _safe(w[self.u]), _safe(w[self.v])
        xu, xv = xi[self.u], xi[self.v]
        return {self.u: 2 * xu * xv / v - w[self.u] * xv * xv / (v * v),
                self.v: 2 * xu * xv / u - w[self.v] * xu * xu / (u * u)}

    def restrict_to_domain(self, w: Params, xi: Params) -> dict:
        """``mixed_domain="restrict"``: clamp ``b >= -1/2`` (spec part 2 §3.2)."""
        if self.mixed_domain == "extend":
            return dict(xi)
        return self.from_b(w, self.to_b(w, xi).clamp_min(-0.5))

    def geodesic_exact(self, w: Params, xi: Params, t: float = 1.0, **_) -> dict:
        """Closed form; assumes a horizontal ``xi`` (it uses ``b = to_b(xi)``)."""
        u, v = w[self.u], w[self.v]
        s = 1 + 2 * t * self.to_b(w, xi)
        # sqrt has an infinite derivative at s = 0 (the clamp b = -1/2, where beta reaches 0):
        # there the endpoint is 0 and its gradient is set to 0 instead of 0 * inf = NaN
        alive = s != 0
        root = torch.where(alive, torch.where(alive, s, 1.0).abs().sqrt(), 0.0)
        return {self.u: u * root, self.v: v * root * torch.sign(s)}


_BY_METRIC = {"inv": DiagonalRescalingInv, "mix": DiagonalRescalingMix}

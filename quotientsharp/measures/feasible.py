"""The feasible set of the sharpness maximisation (spec part 2 §3.2).

``S = {xi in H_{w0} : ||xi||_{w0} <= rho}`` (intersected with the geodesic's domain, e.g. the
``b >= -1/2`` clamp of the mixed diagonal metric). Because ``H_{w0}`` is a fixed subspace and the
ball is centred at 0 in the same inner product, the metric-orthogonal projection onto S is

    ``P_S(xi) = restrict_to_domain( Pi(xi) * min(1, rho / ||Pi(xi)||_{w0}) )``.
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import tangent as T
from ..quotient import Quotient
from ..types import Params


class HorizontalBall:
    """``S`` at the base point ``w0`` of ``quotient``; every vector is a dict over ``quotient.names``."""

    def __init__(self, quotient: Quotient, w0: Params, rho: float):
        self.quotient, self.w0, self.rho = quotient, {n: w0[n] for n in quotient.names}, float(rho)

    def zeros(self) -> dict:
        """The zero perturbation as broadcast views of one 0-d zero per tensor (no memory: the
        ascent only reads it; a full-size zero dict would cost one model's worth of memory)."""
        return {n: torch.zeros((), dtype=t.dtype, device=t.device).expand_as(t) for n, t in self.w0.items()}

    def norm(self, xi: Params) -> float:
        return float(self.quotient.norm(self.w0, xi))

    def project(self, xi: Params) -> dict:
        """``P_S(xi)``."""
        return self.shrink(self.quotient.horizontal_projection(self.w0, xi))

    def shrink(self, xi: Params, owned: bool = False) -> dict:
        """``P_S(xi)`` for a horizontal ``xi`` (``Pi xi = xi``): rescale into the ball, restrict to
        the domain. Every combination of the ascent's iterates and directions is horizontal.
        ``owned``: ``xi``'s tensors are fresh temporaries of the caller, rescaled in place."""
        n = self.norm(xi)
        if n > self.rho:
            xi = T.scale_(xi, self.rho / n) if owned else T.scale(xi, self.rho / n)
        return self.quotient.restrict_to_domain(self.w0, xi)

    def gaussian(self, generator: torch.Generator) -> dict:
        """``Pi(whiten(zeta))``, ``zeta ~ N(0, I)``: a standard Gaussian on ``H`` in
        metric-orthonormal coordinates."""
        zeta = T.randn_like(self.w0, generator)
        return self.quotient.horizontal_projection(self.w0, self.quotient.whiten(self.w0, zeta))

    def random_unit(self, generator: torch.Generator) -> dict:
        """A random horizontal direction of metric norm 1."""
        u = self.gaussian(generator)
        return T.scale(u, 1.0 / self.norm(u))

    def ascent_direction(self, egrad: Params, generator: torch.Generator) -> dict | None:
        """``d = Pi(g^{-1} egrad) / ||Pi(g^{-1} egrad)||_{w0}``; a random unit ``d`` if it is 0,
        None if ``egrad`` (or ``d`` even in float64) is not finite.

        When ``g^{-1} egrad`` or its norm overflows the weights' dtype (float32 weights of ~1e14
        make ``egrad * w^2`` exceed 3e38) but ``egrad`` is finite, ``d`` is computed in float64
        from ``egrad / 2^e`` (``2^e`` near ``max |egrad|``; ``d`` does not depend on the scale)
        and cast back."""
        d = self._unit_rgrad(self.w0, egrad)
        if d is None and any(t.dtype != torch.float64 for t in self.w0.values()):
            g64 = _power_of_two_normalized({n: egrad[n].double() for n in self.quotient.names})
            if g64 is not None:
                if self._w0_64 is None:
                    self._w0_64 = {n: t.double() for n, t in self.w0.items()}
                d64 = self._unit_rgrad(self._w0_64, g64)
                d = None if d64 is None else {n: d64[n].to(self.w0[n].dtype) for n in d64}
                if d is not None and _power_of_two_normalized(d) is None:  # overflows the dtype
                    d = None
        if d is None:
            return None
        return d if d else self.random_unit(generator)

    _w0_64: dict | None = None  # float64 copy of w0 for the overflow fallback of ascent_direction

    def _unit_rgrad(self, w0: Params, egrad: Params) -> dict | None:
        """``Pi(g^{-1} egrad) / ||.||_{w0}`` at ``w0``; ``{}`` if it is 0, None if not finite."""
        d = self.quotient.riemannian_gradient(w0, egrad)
        n = float(self.quotient.norm(w0, d))
        if not math.isfinite(n):
            return None
        if n == 0:
            return {}
        # d's own tensors are rescaled in place; one that is egrad itself (a flat metric) is not
        return {k: v * (1.0 / n) if v is egrad.get(k) else v.mul_(1.0 / n) for k, v in d.items()}


def _power_of_two_normalized(g: Params) -> dict | None:
    """``g / 2^e`` with ``2^e`` the power of two just above ``max |g|`` (exact); None if ``g`` is
    not finite."""
    top = float(torch.stack([t.abs().amax() for t in g.values() if t.numel()]).amax())
    if not math.isfinite(top):
        return None
    if top == 0.0:
        return dict(g)
    scale = math.ldexp(1.0, -math.frexp(top)[1])
    return {n: t * scale for n, t in g.items()}


MAX_RELATIVE_PERTURBATION = 0.5
"""A perturbation larger than this fraction of a GL block's norm triggers a warning: the
2nd-order geodesic is unreliable there (spec part 2 §1)."""


def relative_perturbation(quotient: Quotient, w0: Params, xi: Params) -> float | None:
    """``max`` over the quotient's groups of ``g.relative_perturbation(w0, xi)`` (for GL blocks
    ``||xi_G||_F / ||G||_F`` and alike for H); None if no group has a scale to compare with."""
    vals = [g.relative_perturbation(w0, xi) for g in quotient.groups]
    vals = [float(v) for v in vals if v is not None]
    return max(vals) if vals else None


def warn_large_perturbation(rel: float | None, kind: str, stacklevel: int = 2) -> None:
    """The shared warning of the worst and average case when ``rel > MAX_RELATIVE_PERTURBATION``."""
    if rel is not None and rel > MAX_RELATIVE_PERTURBATION:
        warnings.warn(f"{kind} perturbation reaches {rel:.3g} of a GL block's norm (> "
                      f"{MAX_RELATIVE_PERTURBATION}); the 2nd-order geodesic is unreliable there, use a "
                      "smaller rho", stacklevel=stacklevel + 1)


# --------------------------------------------------------------------------- relative mixed ball
BALLS = ("metric", "relative")


def _bilinear_norm_sq(G: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``||G Hᵀ||²_F`` per head, ``G, H`` of shape ``(B, n, h)``, ``(B, m, h)``, as ``||R_G R_Hᵀ||²_F``
    with ``G = Q_G R_G``, ``H = Q_H R_H`` (float64): no ``(n, m)`` product, and backward stable (the
    Gram form ``<GᵀG, HᵀH>`` loses ``cond(G)²`` digits to cancellation)."""
    RG = torch.linalg.qr(G.double(), mode="r")[1]
    RH = torch.linalg.qr(H.double(), mode="r")[1]
    return (RG @ RH.mT).pow(2).sum((-2, -1))


class RelativeBlockBall:
    """A mixed-metric group whose metric is divided, block by block, by ``s = ||G Hᵀ||²_F`` at the
    base point ``w0`` (``ball="relative"``, ``mix_rel``; spec part 2 §5.1):

        ``||xi||²_rel = Σ_blocks (||xi_G Hᵀ||²_F + ||G xi_Hᵀ||²_F) / ||G Hᵀ||²_F``.

    Blocks: every QK / VO head of an :class:`~quotientsharp.groups.AttentionGL` (``G, H`` of shape
    ``(n, h)``, ``(m, h)``), every coordinate of a :class:`~quotientsharp.groups.DiagonalRescaling`
    (``G = u_i``, ``H = v_i``, ``s = (u_i v_i)²``; then ``||xi||_rel = √2||b||``, the ``mix_bnorm``
    ball). With ``S`` the per-block scaling by ``s``: ``<xi, zeta>_rel = <S^{-1/2}xi, S^{-1/2}zeta>``,
    ``grad_rel = S grad``, ``whiten_rel = S^{1/2} whiten``. The factors are constants (taken at
    ``w0``) and vertical vectors live inside one block, so the horizontal projection, Christoffel
    symbols and geodesics are the mixed metric's, delegated unchanged; ``s`` is GL-invariant, so
    the ball is too.
    """

    _DELEGATED = frozenset({
        "names", "metric", "action", "pushforward", "vertical", "algebra_zeros", "random_element",
        "validate", "restrict", "horizontal_projection", "christoffel", "geodesic", "geodesic_2nd",
        "geodesic_exact", "geodesic_ode", "geodesic_ode_rhs", "geodesic_vjp", "restrict_to_domain",
        "check_domain", "relative_perturbation", "masked_count", "is_horizontal", "kernel_dimension",
        "has_closed_form_geodesic", "extract", "insert", "labels", "u", "v", "mixed_domain"})

    def __init__(self, group, w0: Params):
        from ..groups import AttentionGL, DiagonalRescaling
        if group.metric != "mix":
            raise ValueError(f"ball='relative' divides the mixed metric by ||G Hᵀ||²_F; {group!r} has metric "
                             f"{group.metric!r} (use metric='mix')")
        self.group = group
        if isinstance(group, AttentionGL):
            self.kind = "attention"
            self.scales = [_bilinear_norm_sq(G, H) for G, H in group.extract(w0)]  # (B_s,) per stack
            labels = [lab for stack in group.labels(w0) for lab in stack]
        elif isinstance(group, DiagonalRescaling):
            self.kind = "diagonal"
            self.scales = [(w0[group.u].double() * w0[group.v].double()) ** 2]
            labels = [f"{group.u}*{group.v}[{i}]" for i in range(self.scales[0].numel())]
        else:
            raise ValueError(f"ball='relative' is defined for AttentionGL and DiagonalRescaling groups, not {group!r}")
        flat = torch.cat([s.reshape(-1) for s in self.scales])
        bad = (~torch.isfinite(flat) | (flat <= 0)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"ball='relative' is undefined where the block's bilinear form G Hᵀ is zero or not "
                             f"finite: {[labels[i] for i in bad[:5]]}{' …' if len(bad) > 5 else ''}")

    def __repr__(self) -> str:
        return f"RelativeBlockBall({self.group!r})"

    def __getattr__(self, name: str):
        if name in RelativeBlockBall._DELEGATED:
            return getattr(self.__dict__["group"], name)
        raise AttributeError(f"RelativeBlockBall does not provide {name!r} (only the ball, gradient and "
                             "whitening of the relative metric, and the mixed metric's geometry)")

    def scale_blocks(self, vec: Params, power: float) -> dict:
        """``S^power vec``: every block of ``vec`` times ``s_block ** power``."""
        if self.kind == "diagonal":
            c = self.scales[0] ** power
            return {n: vec[n] * c.to(vec[n].dtype) for n in (self.group.u, self.group.v)}
        res = [(xG * c[:, None, None].to(xG.dtype), xH * c[:, None, None].to(xH.dtype))
               for (xG, xH), c in zip(self.group.extract(vec), (s ** power for s in self.scales))]
        return self.group.insert({n: torch.zeros_like(vec[n]) for n in self.names}, res)

    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        return self.group.inner(w, self.scale_blocks(xi, -0.5), self.scale_blocks(zeta, -0.5))

    def norm_sq(self, w: Params, xi: Params) -> torch.Tensor:
        return self.group.norm_sq(w, self.scale_blocks(xi, -0.5))

    def norm(self, w: Params, xi: Params) -> torch.Tensor:
        return self.norm_sq(w, xi).clamp_min(0).sqrt()

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        return self.scale_blocks(self.group.egrad_to_rgrad(w, egrad), 1.0)

    def riemannian_gradient(self, w: Params, egrad: Params) -> dict:
        return self.scale_blocks(self.group.riemannian_gradient(w, egrad), 1.0)

    def whiten(self, w: Params, zeta: Params) -> dict:
        return self.scale_blocks(self.group.whiten(w, zeta), 0.5)


def relative_ball_quotient(quotient: Quotient, w0: Params) -> Quotient:
    """``quotient`` with every group's ball made relative at ``w0`` (:class:`RelativeBlockBall`);
    the rest keeps its metric (adaptive: already relative)."""
    if not quotient.groups:
        raise ValueError("ball='relative' needs symmetry groups (AttentionGL or DiagonalRescaling) in the quotient")
    return quotient.replace(groups=[RelativeBlockBall(g, w0) for g in quotient.groups])

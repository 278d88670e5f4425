"""The feasible set of the sharpness maximisation (spec part 2 §3.2).

``S = {xi in H_{w0} : ||xi||_{w0} <= rho}`` (intersected with the geodesic's domain, e.g. the
``b >= -1/2`` clamp of the mixed diagonal metric). Because ``H_{w0}`` is a fixed subspace and the
ball is centred at 0 in the same inner product, the metric-orthogonal projection onto S is

    ``P_S(xi) = restrict_to_domain( Pi(xi) * min(1, rho / ||Pi(xi)||_{w0}) )``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .. import tangent as T
from ..quotient import Quotient

Params = Mapping[str, torch.Tensor]


class HorizontalBall:
    """``S`` at the base point ``w0`` of ``quotient``; every vector is a dict over ``quotient.names``."""

    def __init__(self, quotient: Quotient, w0: Params, rho: float):
        self.quotient, self.w0, self.rho = quotient, {n: w0[n] for n in quotient.names}, float(rho)

    def zeros(self) -> dict:
        return T.zeros_like(self.w0)

    def norm(self, xi: Params) -> float:
        return float(self.quotient.norm(self.w0, xi))

    def project(self, xi: Params) -> dict:
        """``P_S(xi)``."""
        return self.shrink(self.quotient.horizontal_projection(self.w0, xi))

    def shrink(self, xi: Params) -> dict:
        """``P_S(xi)`` for a horizontal ``xi`` (``Pi xi = xi``): rescale into the ball, restrict to
        the domain. Every combination of the ascent's iterates and directions is horizontal."""
        n = self.norm(xi)
        if n > self.rho:
            xi = T.scale(xi, self.rho / n)
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
        None if it is not finite."""
        d = self.quotient.riemannian_gradient(self.w0, egrad)
        n = self.norm(d)
        if not math.isfinite(n):
            return None
        return T.scale(d, 1.0 / n) if n > 0 else self.random_unit(generator)

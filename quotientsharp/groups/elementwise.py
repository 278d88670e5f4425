"""Elementwise geometries that quotient nothing (spec part 1 §4.5).

* :class:`PositiveRescaling` -- the adaptive metric ``<eta, zeta>_w = sum eta zeta / w^2``,
  invariant under every elementwise rescaling ``w -> a * w`` (``a > 0``), hence under any
  per-neuron / per-filter rescaling symmetry. First-order geodesic sharpness with it is adaptive
  sharpness (``c = |w|``). Entries with ``w_i = 0`` are masked: ``xi_i := 0`` and ``0/0 := 0``.
* :class:`Euclidean` -- the flat metric, for plain (Keskar) sharpness.

Both have a trivial vertical space (``Pi = id`` up to the zero mask).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Params, SymmetryGroup


class _Trivial(SymmetryGroup):
    """Shared plumbing of groups with ``V = {0}``: empty algebra, zero vertical vectors."""

    function_preserving = False
    has_closed_form_geodesic = True

    def algebra_zeros(self, w: Params) -> torch.Tensor:
        t = w[self.names[0]]
        return torch.zeros(0, dtype=t.dtype, device=t.device)

    def vertical(self, w: Params, omega) -> dict:
        return {n: torch.zeros_like(w[n]) for n in self.names}

    def is_horizontal(self, w: Params, xi: Params) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64)

    def kernel_dimension(self, w: Params) -> int:
        """The masked coordinates (``Pi`` zeroes them; the vertical space itself is ``{0}``)."""
        return self.masked_count(w)


class PositiveRescaling(_Trivial):
    """Adaptive metric on the named parameters. Group element: ``{name: a}`` with ``a > 0``."""

    def __init__(self, names: Sequence[str]):
        super().__init__(names)

    def action(self, w: Params, g) -> dict:
        return {n: w[n] * g[n] for n in self.names}

    def pushforward(self, w: Params, g, xi: Params) -> dict:
        return {n: xi[n] * g[n] for n in self.names}

    def random_element(self, w: Params, scale: float = 1.0, generator: torch.Generator | None = None) -> dict:
        dev = generator.device if generator is not None else "cpu"
        return {n: torch.exp(scale * torch.randn(w[n].shape, generator=generator, dtype=torch.float64,
                                                 device=dev)).to(w[n])
                for n in self.names}

    def _mask(self, w: Params) -> dict:
        return {n: w[n] != 0 for n in self.names}

    def masked_count(self, w: Params) -> int:
        """Number of zero entries, whose perturbation is forced to 0."""
        return int(sum((w[n] == 0).sum() for n in self.names))

    def _inv_sq(self, w: Params) -> dict:
        def build(wr):
            return {n: torch.where(t != 0, 1.0 / (t * t).clamp_min(torch.finfo(t.dtype).tiny), 0.0)
                    for n, t in wr.items()}
        return self._cached(w, build)

    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        s = self._inv_sq(w)
        return sum((xi[n] * zeta[n] * s[n]).sum() for n in self.names)

    def horizontal_projection(self, w: Params, xi: Params) -> dict:
        return {n: torch.where(w[n] != 0, xi[n], 0.0) for n in self.names}

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        return {n: egrad[n] * w[n] * w[n] for n in self.names}

    def christoffel(self, w: Params, xi: Params) -> dict:
        """``-xi^2 / w`` (0 where ``w = 0``)."""
        return {n: torch.where(w[n] != 0, -xi[n] * xi[n] / torch.where(w[n] != 0, w[n], 1.0), 0.0)
                for n in self.names}

    def geodesic_exact(self, w: Params, xi: Params, t: float = 1.0, **_) -> dict:
        """``w * exp(t xi / w)`` (``w`` where ``w = 0``)."""
        return {n: torch.where(w[n] != 0, w[n] * torch.exp(t * xi[n] / torch.where(w[n] != 0, w[n], 1.0)), w[n])
                for n in self.names}

    def whiten(self, w: Params, zeta: Params) -> dict:
        return {n: zeta[n] * w[n].abs() for n in self.names}


class Euclidean(_Trivial):
    """The flat metric ``sum eta zeta``. Group element: ``{name: c}`` translations (metric-only)."""

    def action(self, w: Params, g) -> dict:
        return {n: w[n] + g[n] for n in self.names}

    def pushforward(self, w: Params, g, xi: Params) -> dict:
        return {n: xi[n] for n in self.names}

    def random_element(self, w: Params, scale: float = 1.0, generator: torch.Generator | None = None) -> dict:
        dev = generator.device if generator is not None else "cpu"
        return {n: (scale * torch.randn(w[n].shape, generator=generator, dtype=torch.float64, device=dev)).to(w[n])
                for n in self.names}

    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        return sum((xi[n] * zeta[n]).sum() for n in self.names)

    def horizontal_projection(self, w: Params, xi: Params) -> dict:
        return {n: xi[n] for n in self.names}

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        return {n: egrad[n] for n in self.names}

    def christoffel(self, w: Params, xi: Params) -> dict:
        return {n: torch.zeros_like(xi[n]) for n in self.names}

    def geodesic_exact(self, w: Params, xi: Params, t: float = 1.0, **_) -> dict:
        return {n: w[n] + t * xi[n] for n in self.names}

    def whiten(self, w: Params, zeta: Params) -> dict:
        return {n: zeta[n] for n in self.names}

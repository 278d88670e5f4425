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

from .. import tangent as T
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


def _adaptive_product(xi: torch.Tensor, zeta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``xi zeta / w^2`` elementwise for ``w`` without zeros (``w^2`` clamped to the dtype's tiny)."""
    return (xi * zeta).div_((w * w).clamp_min_(torch.finfo(w.dtype).tiny))


def _masked_adaptive_product(xi: torch.Tensor, zeta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`_adaptive_product` with 0 where ``w = 0`` (``0/0 := 0``: masked coordinates)."""
    return torch.where(w != 0, _adaptive_product(xi, zeta, w), 0.0)


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

    def masked_count(self, w: Params) -> int:
        """Number of zero entries, whose perturbation is forced to 0."""
        return sum(index.numel() for index, _ in self._zeros(w).values())

    def _zeros(self, w: Params) -> dict[str, tuple[torch.Tensor, frozenset]]:
        """For each tensor holding exact zeros: their flat indices and the :func:`~quotientsharp.tangent.chunked_sum`
        chunks containing them (cached per base point; usually a few biases and an embedding's padding row)."""
        def build(wr):
            out = {}
            for n, t in wr.items():
                index = torch.nonzero(t.reshape(-1) == 0).view(-1)
                if index.numel():
                    chunks = frozenset((index // T.CHUNK).tolist()) if t.numel() > T.CHUNK else frozenset({0})
                    out[n] = (index, chunks)
            return out
        return self._cached(w, build)

    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        """``sum xi zeta / w^2`` (0 where ``w = 0``), without full-size temporaries."""
        zeros = self._zeros(w)
        return sum(T.chunked_sum(_adaptive_product, xi[n], zeta[n], w[n], masked_fn=_masked_adaptive_product,
                                 masked_chunks=zeros[n][1] if n in zeros else ())
                   for n in self.names)

    def horizontal_projection(self, w: Params, xi: Params) -> dict:
        """``xi`` with its masked coordinates (``w = 0``) set to 0; tensors already 0 there are
        returned as they are."""
        zeros = self._zeros(w)

        def needs_mask(n: str) -> bool:  # under vmap/grad: always (no data-dependent branch)
            return n in zeros and (torch._C._functorch.is_functorch_wrapped_tensor(xi[n])
                                   or bool(xi[n].reshape(-1)[zeros[n][0]].any()))

        return {n: xi[n].reshape(-1).index_fill(0, zeros[n][0], 0.0).reshape(xi[n].shape) if needs_mask(n) else xi[n]
                for n in self.names}

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        return {n: (egrad[n] * w[n]).mul_(w[n]) for n in self.names}

    def riemannian_gradient(self, w: Params, egrad: Params) -> dict:
        """``Pi(egrad * w^2)``: one new tensor per name, masked in place."""
        zeros, out = self._zeros(w), self.egrad_to_rgrad(w, egrad)
        for n, (index, _) in zeros.items():
            out[n] = out[n].contiguous()
            out[n].view(-1).index_fill_(0, index, 0.0)
        return out

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

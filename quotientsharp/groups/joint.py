"""``JointGroup``: the product of groups that act on disjoint slices of shared tensors.

A fused QKV weight with QK-norm (timm ``Attention(qkv, qk_norm=True)``) holds the query and key
rows, whose symmetry is one positive scale per head (:class:`HeadScaling`), and the value rows,
which form GL blocks with the output projection (:class:`AttentionGL`). A quotient gives every
tensor to one group, so the two become the parts of one product group: its metric is the sum of
the parts' metrics, its vertical space the direct sum, and every tangent-valued operation
(projection, gradient, Christoffel term, whitening, vertical vectors, pushforward) the sum of the
parts' results, each zero outside its own slices; point-valued ones (action, geodesics) combine
the parts' displacements. The parts are built with ``shares_tensors=True`` and must provide
``extract``/``insert`` (as :class:`AttentionGL` and :class:`HeadScaling` do); the joint group
checks that together they cover every tensor exactly once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Params, SymmetryGroup


class JointGroup(SymmetryGroup):
    """Product of ``parts`` (group elements and Lie-algebra elements: one per part, a list)."""

    def __init__(self, parts: Sequence[SymmetryGroup]):
        parts = list(parts)
        if len(parts) < 2:
            raise ValueError("JointGroup needs at least two parts")
        names: list[str] = []
        for p in parts:
            names.extend(n for n in p.names if n not in names)
        super().__init__(names)
        self.parts = parts
        self.metric = next((p.metric for p in parts if p.metric is not None), None)
        self._validated: tuple | None = None

    def __repr__(self) -> str:
        return f"JointGroup({', '.join(repr(p) for p in self.parts)})"

    def validate(self, w: Params) -> None:
        super().validate(w)
        signature = self.shape_signature(w)
        if self._validated == signature:
            return
        cover = {n: torch.zeros(w[n].shape, dtype=torch.float64) for n in self.names}
        for p in self.parts:
            p.validate(w)
            ones = {n: torch.ones(w[n].shape, dtype=torch.float64) for n in p.names}
            marked = p.insert({n: torch.zeros_like(t) for n, t in ones.items()}, p.extract(ones))
            for n, t in marked.items():
                cover[n] += t
        for n, c in cover.items():
            if not bool((c == 1).all()):
                raise ValueError(f"JointGroup: parameter {n!r} is not covered exactly once by the parts' slices")
        self._validated = signature

    # ------------------------------------------------------------------ combining
    def _sum(self, outs: Sequence[dict], like: Params) -> dict:
        total = {n: torch.zeros_like(like[n]) for n in self.names}
        for out in outs:
            for n, t in out.items():
                total[n] = total[n] + t
        return total

    def _part(self, p: SymmetryGroup, v: Params) -> dict:
        return {n: v[n] for n in p.names}

    def _own(self, p: SymmetryGroup, v: Params) -> dict:
        """``v`` on the part's own slices, zero on the slices of the other parts (a part's generic
        geodesic moves every entry of its tensors along ``v``)."""
        return p.insert({n: torch.zeros_like(v[n]) for n in p.names}, p.extract(self._part(p, v)))

    def _tangent(self, method: str, w: Params, *vecs: Params, **kw) -> dict:
        outs = [getattr(p, method)(w, *[self._part(p, v) for v in vecs], **kw) for p in self.parts]
        return self._sum(outs, vecs[0] if vecs else w)

    def _point(self, outs: Sequence[dict], w: Params) -> dict:
        """``w + sum_parts (out_part - w)``: each part moves only its own slices."""
        wr = self.restrict(w)
        moved = self._sum([{n: o[n] - wr[n] for n in o} for o in outs], wr)
        return {n: wr[n] + moved[n] for n in self.names}

    # ------------------------------------------------------------------ group
    def action(self, w: Params, g) -> dict:
        out = dict(self.restrict(w))
        for p, gp in zip(self.parts, g):  # each part reads and writes only its own slices
            out.update(p.action(out, gp))
        return out

    def pushforward(self, w: Params, g, xi: Params) -> dict:
        return self._sum([p.pushforward(w, gp, self._part(p, xi)) for p, gp in zip(self.parts, g)], xi)

    def random_element(self, w: Params, scale: float = 1.0, generator: torch.Generator | None = None, **kw):
        return [p.random_element(w, scale, generator, **kw) for p in self.parts]

    def algebra_zeros(self, w: Params):
        return [p.algebra_zeros(w) for p in self.parts]

    def vertical(self, w: Params, omega) -> dict:
        return self._sum([p.vertical(w, om) for p, om in zip(self.parts, omega)], w)

    # ------------------------------------------------------------------ geometry
    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        return sum(p.inner(w, self._part(p, xi), self._part(p, zeta)) for p in self.parts)

    def norm_sq(self, w: Params, xi: Params) -> torch.Tensor:
        """``g_w(xi, xi)``: the sum of the parts' squared norms (each on its slices of the shared tensors)."""
        return sum(p.norm_sq(w, self._part(p, xi)) for p in self.parts)

    def horizontal_projection(self, w: Params, xi: Params) -> dict:
        return self._tangent("horizontal_projection", w, xi)

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        return self._tangent("egrad_to_rgrad", w, egrad)

    def riemannian_gradient(self, w: Params, egrad: Params) -> dict:
        return self._tangent("riemannian_gradient", w, egrad)

    def christoffel(self, w: Params, xi: Params) -> dict:
        return self._tangent("christoffel", w, xi)

    def whiten(self, w: Params, zeta: Params) -> dict:
        return self._tangent("whiten", w, zeta)

    def restrict_to_domain(self, w: Params, xi: Params) -> dict:
        out = dict(xi)
        for p in self.parts:
            out.update(p.restrict_to_domain(w, self._part(p, out)))
        return out

    def geodesic(self, w: Params, xi: Params, t: float = 1.0, order: int | str = 2, **ode_kw) -> dict:
        """The product geodesic: each part's geodesic on its own slices (parts are independent)."""
        return self._point([p.geodesic(w, self._own(p, xi), t, order=order, **ode_kw) for p in self.parts], w)

    def geodesic_2nd(self, w: Params, xi: Params, t: float = 1.0) -> dict:
        return self.geodesic(w, xi, t, order=2)

    def geodesic_exact(self, w: Params, xi: Params, t: float = 1.0, **ode_kw) -> dict:
        return self.geodesic(w, xi, t, order="exact", **ode_kw)

    def geodesic_ode(self, w: Params, xi: Params, t: float = 1.0, n_steps: int = 64,
                     tol: float | None = 1e-10) -> dict:
        return self._point([p.geodesic_ode(w, self._own(p, xi), t, n_steps, tol) for p in self.parts], w)

    def geodesic_vjp(self, w: Params, xi: Params, cotangent: Params, order: int | str = 2, **ode_kw) -> dict:
        return self._sum([self._own(p, p.geodesic_vjp(w, self._own(p, xi), self._part(p, cotangent), order, **ode_kw))
                          for p in self.parts], xi)

    def check_domain(self, w: Params) -> None:
        for p in self.parts:
            p.check_domain(w)

    # ------------------------------------------------------------------ hooks
    def with_metric(self, metric: str, **kw) -> JointGroup:
        return JointGroup([p.with_metric(metric, **kw) for p in self.parts])

    def kernel_dimension(self, w: Params) -> int:
        return sum(p.kernel_dimension(w) for p in self.parts)

    def relative_perturbation(self, w: Params, xi: Params) -> torch.Tensor | None:
        vals = [p.relative_perturbation(w, self._part(p, xi)) for p in self.parts]
        vals = [v for v in vals if v is not None]
        return max(vals, key=float) if vals else None

    def masked_count(self, w: Params) -> int:
        return sum(p.masked_count(w) for p in self.parts)

    def block_summaries(self) -> list[tuple[str, str, str]]:
        return [row for p in self.parts for row in p.block_summaries()]

    def extract(self, w: Params) -> list:
        """The parts' blocks, one list per part."""
        return [p.extract(w) for p in self.parts]

    def insert(self, base: Params, blocks: Sequence) -> dict:
        """Inverse of :meth:`extract` (bit-exact: each part writes its own slices)."""
        out = {n: base[n] for n in self.names}
        for p, b in zip(self.parts, blocks):
            out.update(p.insert(out, b))
        return out


"""``Quotient``: all symmetry groups of one model plus a metric for every other parameter.

The parameters are split into disjoint blocks (spec part 1 §1). Each group owns its block; every
parameter in no group belongs to the *rest* group, ``PositiveRescaling`` (adaptive metric, the
paper's choice) or ``Euclidean``. The total metric is the sum of the block metrics, and the
projection, gradient conversion, Christoffel term and geodesic act block by block, so the quotient
offers the group operations on a whole parameter dict.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import tangent as T
from .geodesic import geodesic_order
from .groups.base import SymmetryGroup
from .groups.elementwise import Euclidean, PositiveRescaling
from .types import Params

REST = {"adaptive": PositiveRescaling, "euclidean": Euclidean}


class Quotient:
    """Composite geometry over the parameters ``names``.

    Args:
        groups: disjoint symmetry groups (e.g. from :func:`quotientsharp.find_symmetries`).
        names: every parameter name the geometry covers (usually all trainable parameters).
        rest: metric of the parameters in no group: ``"adaptive"`` or ``"euclidean"``.
        order: geodesic order on the groups (1, 2, ``"exact"``, ``"ode"``); default 2.
        rest_order: geodesic order on the rest; default 1 (the paper's recipe).

    Attributes:
        names: the parameter names, in order (tuple of str).
        groups: the symmetry groups (list).
        rest: the group of the parameters in no group (``PositiveRescaling`` for ``"adaptive"``,
            ``Euclidean``), or ``None`` when every parameter is in a group.
        order: the canonical geodesic order on the groups; rest_order: on the rest.

    Raises:
        ValueError: an unknown ``rest`` or order, a group acting on a parameter outside
            ``names``, or two groups claiming the same parameter.
    """

    def __init__(self, groups: Sequence[SymmetryGroup], names: Iterable[str], rest: str = "adaptive",
                 order: int | str = 2, rest_order: int | str = 1):
        if rest not in REST:
            raise ValueError(f"rest must be one of {sorted(REST)}, got {rest!r}")
        self.names = tuple(names)
        known = set(self.names)
        if len(known) < len(self.names):
            repeated = sorted(n for n, k in Counter(self.names).items() if k > 1)
            raise ValueError(f"parameter names repeated: {repeated} (each parameter once)")
        owner: dict[str, SymmetryGroup] = {}
        for g in groups:
            for n in g.names:
                if n not in known:
                    raise ValueError(f"{g!r} acts on {n!r}, which is not among the quotient's parameters")
                if n in owner:
                    raise ValueError(f"parameter {n!r} is claimed by both {owner[n]!r} and {g!r}")
                owner[n] = g
        self.groups = list(groups)
        rest_names = [n for n in self.names if n not in owner]
        self.rest_kind = rest
        self.rest = REST[rest](rest_names) if rest_names else None
        self.order, self.rest_order = geodesic_order(order, "order"), geodesic_order(rest_order, "rest_order")

    @classmethod
    def from_model(cls, model: nn.Module, groups: Sequence[SymmetryGroup] = (), rest: str = "adaptive",
                   **kw) -> Quotient:
        """Cover every trainable parameter of ``model``."""
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return cls(groups, names, rest, **kw)

    def __repr__(self) -> str:
        parts = ", ".join(repr(g) for g in self.groups)
        rest = f"{type(self.rest).__name__}({len(self.rest.names)})" if self.rest else "none"
        return f"Quotient([{parts}], rest={rest}, order={self.order!r}, rest_order={self.rest_order!r})"

    @property
    def all_groups(self) -> list[SymmetryGroup]:
        """The symmetry groups followed by the rest metric's group (if any parameter is in no group)."""
        return self.groups + ([self.rest] if self.rest is not None else [])

    def replace(self, groups: Sequence[SymmetryGroup] | None = None, rest: str | None = None,
                order: int | str | None = None, rest_order: int | str | None = None) -> Quotient:
        """A copy with some settings changed."""
        return Quotient(self.groups if groups is None else groups, self.names,
                        self.rest_kind if rest is None else rest,
                        self.order if order is None else order,
                        self.rest_order if rest_order is None else rest_order)

    def with_metric(self, metric: str, **kw) -> Quotient:
        """The same groups with another metric (``"inv"``/``"mix"``) on every group that has one."""
        return self.replace(groups=[g.with_metric(metric, **kw) for g in self.groups])

    def summary(self) -> str:
        """Readable description: one line per layer, ``<layer>: QK: ...; VO: ...`` (from the groups'
        ``block_summaries``: kind, heads, KV groups, group), then groups without block
        descriptions and the rest metric."""
        layers: dict[str, dict[str, str]] = {}
        others = []
        for g in self.groups:
            rows = g.block_summaries()
            if not rows:
                others.append(repr(g))
            for layer, part, text in rows:
                layers.setdefault(layer, {}).setdefault(part, text)
        lines = [f"{layer}: " + "; ".join(f"{p}: {t}" for p, t in sorted(parts.items()))
                 for layer, parts in layers.items()]
        lines += others
        if self.rest is not None:
            lines.append(f"rest: {self.rest_kind} metric on {len(self.rest.names)} parameters")
        return "\n".join(lines)

    # ------------------------------------------------------------------ plumbing
    def validate(self, w: Params) -> None:
        """Raise ``ValueError`` naming the parameter when ``w`` does not fit."""
        missing = [n for n in self.names if n not in w]
        if missing:
            raise ValueError(f"parameter dict lacks {missing}")
        T.check_consistent({n: w[n] for n in self.names})
        for g in self.all_groups:
            g.validate(w)

    def check_tangent(self, w: Params, xi: Params, what: str = "tangent vector") -> None:
        """Raise ``ValueError`` (naming ``what`` and the parameter) unless ``xi`` holds a tensor of
        the shape, dtype and device of ``w[n]`` for every ``n`` in :attr:`names`.
        """
        T.check_tangent({n: w[n] for n in self.names}, xi, self.names, what)

    def _per_group(self, method: str, w: Params, *vecs: Params, **kw) -> dict:
        out: dict[str, torch.Tensor] = {}
        for g in self.all_groups:
            out.update(getattr(g, method)(w, *[{n: v[n] for n in g.names} for v in vecs], **kw))
        return {n: out[n] for n in self.names}

    # ------------------------------------------------------------------ metric
    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        """``g_w(xi, zeta) = sum over groups of g^group_w(xi, zeta)`` (the rest metric included), a
        0-d tensor; ``w, xi, zeta`` are dicts over :attr:`names`.
        """
        return sum(g.inner(w, {n: xi[n] for n in g.names}, {n: zeta[n] for n in g.names})
                   for g in self.all_groups)

    def norm_sq(self, w: Params, xi: Params) -> torch.Tensor:
        """``g_w(xi, xi)`` summed over the groups and the rest (a 0-d tensor)."""
        return sum(g.norm_sq(w, {n: xi[n] for n in g.names}) for g in self.all_groups)

    def norm(self, w: Params, xi: Params) -> torch.Tensor:
        """``||xi||_w = g_w(xi, xi)^{1/2}`` (a 0-d tensor)."""
        return self.norm_sq(w, xi).clamp_min(0).sqrt()

    def horizontal_projection(self, w: Params, xi: Params) -> dict:
        """``Pi_w xi``: each group's g-orthogonal projection onto its horizontal space (identity on
        the rest, whose vertical space is 0); a dict over :attr:`names` with the shapes of ``xi``.
        """
        return self._per_group("horizontal_projection", w, xi)

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        """``g_w^{-1} egrad`` group by group (e.g. ``(dG P, dH Q)`` for an ``inv`` GL block,
        ``egrad * w**2`` on the adaptive rest), not projected: :meth:`riemannian_gradient` projects.
        """
        return self._per_group("egrad_to_rgrad", w, egrad)

    def riemannian_gradient(self, w: Params, egrad: Params) -> dict:
        """Horizontal Riemannian gradient ``Pi(g^{-1} grad)``."""
        return self._per_group("riemannian_gradient", w, egrad)

    def christoffel(self, w: Params, xi: Params) -> dict:
        """``Gamma_w(xi, xi)`` group by group, so that the second-order geodesic is
        ``w + xi - 1/2 Gamma_w(xi, xi)``; a dict over :attr:`names`.
        """
        return self._per_group("christoffel", w, xi)

    def whiten(self, w: Params, zeta: Params) -> dict:
        """Map ``zeta ~ N(0, I)`` (a dict over :attr:`names`) to a sample with covariance
        ``g_w^{-1}``, group by group (average-case sharpness draws its perturbations this way).
        """
        return self._per_group("whiten", w, zeta)

    def restrict_to_domain(self, w: Params, xi: Params) -> dict:
        """Each group's hook that keeps ``xi`` inside its geodesic's domain (identity except for the
        diagonal mixed metric's ``mixed_domain="restrict"``).
        """
        return self._per_group("restrict_to_domain", w, xi)

    def is_horizontal(self, w: Params, xi: Params) -> torch.Tensor:
        """The largest normalised ``|g_w(xi, vertical(w, E))|`` over the groups' Lie-algebra bases: 0
        for a horizontal ``xi`` (a 0-d tensor).
        """
        return max((g.is_horizontal(w, {n: xi[n] for n in g.names}) for g in self.all_groups),
                   key=float)

    # ------------------------------------------------------------------ group
    def random_element(self, w: Params, scale: float = 1.0, generator: torch.Generator | None = None,
                       **kw) -> list:
        """One random element per function-preserving group (``None`` = identity elsewhere)."""
        return [g.random_element(w, scale, generator, **kw) if g.function_preserving else None
                for g in self.all_groups]

    def action(self, w: Params, elements: Sequence[Any]) -> dict:
        """``psi(g, w)``: apply one element per group of :attr:`all_groups` (``None`` = identity, as
        :meth:`random_element` returns); the network function is unchanged.
        """
        out = dict(w)
        for g, el in zip(self.all_groups, elements):
            if el is not None:
                out.update(g.action(w, el))
        return out

    def pushforward(self, w: Params, elements: Sequence[Any], xi: Params) -> dict:
        """The tangent map ``d psi_g(xi)`` of :meth:`action` with the same ``elements`` (equivariance
        tests: ``Pi_{psi(g,w)}(d psi xi) = d psi(Pi_w xi)``).
        """
        out = dict(xi)
        for g, el in zip(self.all_groups, elements):
            if el is not None:
                out.update(g.pushforward(w, el, {n: xi[n] for n in g.names}))
        return {n: out[n] for n in self.names}

    def vertical(self, w: Params, omegas: Sequence[Any]) -> dict:
        """The vertical vector ``sum_g nu_g(omega_g)`` of one Lie-algebra element per group of
        :attr:`groups` (``None`` = 0); loss-null to first order.
        """
        out = {n: torch.zeros_like(w[n]) for n in self.names}
        for g, om in zip(self.groups, omegas):
            if om is not None:
                out.update(g.vertical(w, om))
        return out

    def random_vertical(self, w: Params, generator: torch.Generator | None = None) -> dict:
        """A vertical vector from a standard normal Lie-algebra element of every group."""
        from torch.utils._pytree import tree_map

        def draw(z):
            dev = generator.device if generator is not None else "cpu"
            return torch.randn(z.shape, generator=generator, dtype=z.dtype, device=dev).to(z.device)

        return self.vertical(w, [tree_map(draw, g.algebra_zeros(w)) for g in self.groups])

    # ------------------------------------------------------------------ geodesics
    def geodesic(self, w: Params, xi: Params, t: float = 1.0, order: int | str | None = None,
                 rest_order: int | str | None = None, **ode_kw) -> dict:
        """``gamma_xi(t)`` assembled block by block: ``order`` on the groups (default
        ``self.order``), ``rest_order`` on the rest (default ``self.rest_order``)."""
        order = self.order if order is None else geodesic_order(order, "order")
        rest_order = self.rest_order if rest_order is None else geodesic_order(rest_order, "rest_order")
        out: dict[str, torch.Tensor] = {}
        for g in self.all_groups:
            o = rest_order if g is self.rest else order
            out.update(g.geodesic(w, {n: xi[n] for n in g.names}, t, order=o,
                                  **(ode_kw if o in ("exact", "ode") else {})))
        return {n: out[n] for n in self.names}

    def geodesic_vjp(self, w: Params, xi: Params, cotangent: Params, order: int | str | None = None,
                     rest_order: int | str | None = None, **ode_kw) -> dict:
        """``J^T cotangent``, ``J`` the Jacobian of ``xi -> geodesic(w, xi, 1, order, rest_order)``,
        block by block (the gradient of ``L(gamma_xi(1))`` with respect to ``xi``)."""
        order = self.order if order is None else geodesic_order(order, "order")
        rest_order = self.rest_order if rest_order is None else geodesic_order(rest_order, "rest_order")
        out: dict[str, torch.Tensor] = {}
        for g in self.all_groups:
            o = rest_order if g is self.rest else order
            out.update(g.geodesic_vjp(w, {n: xi[n] for n in g.names}, {n: cotangent[n] for n in g.names},
                                      order=o, **(ode_kw if o in ("exact", "ode") else {})))
        return {n: out[n] for n in self.names}

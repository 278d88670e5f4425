"""Geodesic SAM and Riemannian SGD on a symmetry quotient (spec: training.md §9, geometry.md §4, §6).

:class:`GeodesicSAM` is SAM whose ascent is a geodesic step along the horizontal Riemannian
gradient; :class:`RiemannianSGD` is a base optimizer that descends the same way. With
``GeodesicSAM(..., RiemannianSGD, ...)`` every step is equivariant under the symmetry group
(geometry.md §6.7), so training from ``w`` and from ``g·w`` gives the same function.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from quotientsharp.adapters.resolve import default_quotient, unwrap
from quotientsharp.geodesic import geodesic_order
from quotientsharp.groups.gl_math import METRICS
from quotientsharp.optim.sam import EPS_NORM, SharpnessAwareOptimizer
from quotientsharp.optim.utils import Tensors, all_params, check_param_groups, check_rho
from quotientsharp.quotient import REST, Quotient
from quotientsharp.validation import check_choice, check_number

Geodesic = Literal["second_order", "exact", "retraction"]  # or any name of GEODESIC_ORDERS


def check_geometry_arguments(owner: str, model: Any, quotient: Quotient | None, metric: str,
                             rest: str, eps_rel: float) -> None:
    """model an ``nn.Module``; quotient a :class:`Quotient` or None (then the metric names and
    ``eps_rel`` ≥ 0, finite, are checked: they build the default quotient)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be the trained nn.Module, got {type(model).__name__}")
    if quotient is not None:
        if not isinstance(quotient, Quotient):
            raise TypeError(f"{owner}: quotient must be a Quotient (or None), got {type(quotient).__name__}")
        return
    check_choice("metric", metric, METRICS, owner)
    check_choice("rest", rest, tuple(REST), owner)
    check_number("eps_rel", eps_rel, low=0.0, owner=owner)


def rest_argument(owner: str, rest: str, rest_metric: str | None) -> str:
    """``rest``, or the older spelling ``rest_metric`` when that is given instead."""
    if rest_metric is None:
        return rest
    if rest not in (rest_metric, "adaptive"):
        raise TypeError(f"{owner}: rest_metric is the old name of rest; give one of them, not both")
    return rest_metric


class QuotientParameters:
    """The optimizer's parameters seen as a point of ``quotient``, matched by ``named_parameters()``."""

    def __init__(self, model: nn.Module, quotient: Quotient, geodesic: Geodesic = "second_order"):
        self.quotient, self.order = quotient, geodesic_order(geodesic, "geodesic")
        named = dict(unwrap(model).named_parameters())
        missing = [n for n in quotient.names if n not in named]
        if missing:
            raise ValueError(f"the quotient's parameters {missing} are not parameters of model=")
        self.by_name = {n: named[n] for n in quotient.names}
        self.name = {p: n for n, p in named.items()}

    def check(self, params: Tensors) -> None:
        """Raise unless ``params`` are exactly the quotient's parameters."""
        unnamed = [tuple(p.shape) for p in params if p not in self.name]
        if unnamed:
            raise ValueError(f"optimizer parameters of shapes {unnamed} are not parameters of model=")
        mine, covered = {self.name[p] for p in params}, set(self.quotient.names)
        if mine != covered:
            raise ValueError(
                "the quotient must cover exactly the optimizer's parameters; only in the optimizer: "
                f"{sorted(mine - covered)}, only in the quotient: {sorted(covered - mine)}"
            )

    def point(self) -> dict[str, torch.Tensor]:
        """θ as ``{name: detached tensor}`` over the quotient's names."""
        return {n: p.detach() for n, p in self.by_name.items()}

    def tangent(self, params: Tensors, values: Tensors) -> dict[str, torch.Tensor]:
        """``{name: value}`` for ``params``, zero for the quotient's other parameters."""
        out = {n: torch.zeros_like(p) for n, p in self.by_name.items()}
        out.update({self.name[p]: v for p, v in zip(params, values)})
        return out

    def riemannian_gradient(self, w: dict, params: Tensors, grads: Tensors) -> dict[str, torch.Tensor]:
        """ξ = Π_θ(g_θ⁻¹ ∇) on every group, G_rest⁻¹ ∇ on the rest (missing gradients count as 0)."""
        return self.quotient.riemannian_gradient(w, self.tangent(params, grads))

    def endpoint(self, w: dict, v: dict) -> dict[str, torch.Tensor]:
        """γ_v(1) on the groups at the chosen order; θ + v on the rest (training.md §9 step 3)."""
        return self.quotient.geodesic(w, v, order=self.order, rest_order=1)


class GeodesicSAM(SharpnessAwareOptimizer):
    """SAM on the quotient by the model's symmetries (training.md §9).

    Per step, with g the mini-batch gradient at θ:

    - ξ = Π_θ(g_θ⁻¹ g)  per group (``G_rest⁻¹ g`` on the rest),
    - v = ρ·ξ / (‖ξ‖_θ + 1e-12)  (one global metric norm, so gᵀv = ρ‖grad L‖_θ),
    - θ̃ = θ + v − ½Γ_θ(v, v)  (``"second_order"``; ``"exact"``: the integrated/closed-form
      geodesic; ``"retraction"``: θ + v); the rest always moves to θ + v,

    then g̃ = ∇L_B(θ̃) on the same batch, θ restored by copy, and a base step with g̃ at θ.
    :meth:`perturbation` returns v; :meth:`move_to_perturbed_point` applies the geodesic.

    The ascent is invariant: with ``eps_rel=0`` a group-transformed model reaches the transformed
    θ̃ (geometry.md §6.7). A Euclidean base optimizer (SGD) is not; pass :class:`RiemannianSGD`
    as ``base_optimizer_cls`` for a fully invariant step (it gets this quotient and geodesic).

    Args:
        model: the trained module; its ``named_parameters()`` match parameters to the quotient.
        quotient: the geometry; default ``default_quotient(model, metric, rest, eps_rel)``
            (then ``metric``, ``rest`` (old spelling ``rest_metric``) and ``eps_rel`` are used,
            else ignored). It must
            cover exactly the optimizer's parameters.
        rho: radius of the metric ball. The adaptive rest metric and the ``"inv"`` GL metric are
            dimensionless (ρ like ASAM's); ``"mix"`` scales like ``|w|⁴``, so sweep ρ per metric.
        geodesic: ``"second_order"`` (default), ``"exact"`` or ``"retraction"`` (any name of
            :data:`quotientsharp.geodesic.GEODESIC_ORDERS`: ``2``, ``"exact"``, ``1``, ``"ode"``).
        debug: check that ξ is horizontal (``is_horizontal`` ≤ 1e-6; slow).
        **kwargs: :class:`SharpnessAwareOptimizer` options and the base optimizer's arguments.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.5,
        *,
        model: nn.Module,
        quotient: Quotient | None = None,
        metric: Literal["mix", "inv"] = "mix",
        rest: Literal["adaptive", "euclidean"] = "adaptive",
        geodesic: Geodesic = "second_order",
        eps_rel: float = 0.0,
        debug: bool = False,
        rest_metric: str | None = None,
        **kwargs: Any,
    ):
        check_rho("GeodesicSAM", rho)
        rest = rest_argument("GeodesicSAM", rest, rest_metric)
        check_geometry_arguments("GeodesicSAM", model, quotient, metric, rest, eps_rel)
        if quotient is None:
            quotient = default_quotient(model, metric, rest, eps_rel, owner="GeodesicSAM")
        self.view = QuotientParameters(model, quotient, geodesic)
        if isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, RiemannianSGD):
            kwargs = {"geometry": self.view, **kwargs}
        super().__init__(params, base_optimizer_cls, rho=rho, model=model, **kwargs)
        self.view.check(all_params(self.param_groups))
        self.quotient, self.debug = quotient, debug

    def perturbation(self, grads: Tensors, params: Tensors) -> Tensors:
        """v = ρ·Π(g_θ⁻¹g)/(‖Π(g_θ⁻¹g)‖_θ + 1e-12), for ``params``."""
        w = self.view.point()
        xi = self.view.riemannian_gradient(w, params, grads)
        if self.debug:
            leak = float(self.quotient.is_horizontal(w, xi))
            if leak > 1e-6:
                raise AssertionError(f"GeodesicSAM: ξ is not horizontal (vertical leakage {leak:.2e})")
        scale = self.rho / (self.quotient.norm(w, xi) + EPS_NORM)
        return [(xi[self.view.name[p]] * scale).to(p.dtype) for p in params]

    def move_to_perturbed_point(self, params: Tensors, eps: Tensors) -> None:
        """θ ← γ_v(1) (``geodesic``), rest θ + v."""
        end = self.view.endpoint(self.view.point(), self.view.tangent(params, eps))
        torch._foreach_copy_(params, [end[self.view.name[p]] for p in params])


class RiemannianSGD(torch.optim.Optimizer):
    """Riemannian gradient descent on the quotient: θ ← γ_θ(−lr·Π_θ(g_θ⁻¹∇L)), γ the geodesic.

    ``geodesic``: ``"second_order"`` (θ − lr·ξ − ½lr²Γ_θ(ξ, ξ), default), ``"exact"`` or
    ``"retraction"`` on the groups; the rest always takes θ − lr·G_rest⁻¹∇L (with the adaptive
    rest metric, θ − lr·∇L⊙θ², so entries at exactly 0 never move). No momentum or weight decay:
    both would break the equivariance that is this optimizer's point (with ``eps_rel=0``, training
    a group-transformed model gives the transformed iterates). Each parameter uses its group's lr.
    The geometry is ``quotient`` (default ``default_quotient(model, metric, rest, eps_rel)``)
    or, as :class:`GeodesicSAM` passes it, a prebuilt ``geometry``.
    """

    def __init__(self, params: Iterable[Any], lr: float, *, model: nn.Module | None = None,
                 quotient: Quotient | None = None, metric: str = "mix", rest: str = "adaptive",
                 eps_rel: float = 0.0, geodesic: Geodesic = "second_order",
                 geometry: QuotientParameters | None = None, rest_metric: str | None = None):
        check_number("lr", lr, low=0.0, low_open=True, owner="RiemannianSGD")
        super().__init__(params, {"lr": lr})
        check_param_groups("RiemannianSGD", self.param_groups)
        if geometry is None:
            if model is None:
                raise TypeError("RiemannianSGD needs model= (or geometry=, as GeodesicSAM passes)")
            rest = rest_argument("RiemannianSGD", rest, rest_metric)
            check_geometry_arguments("RiemannianSGD", model, quotient, metric, rest, eps_rel)
            if quotient is None:
                quotient = default_quotient(model, metric, rest, eps_rel, owner="RiemannianSGD")
            geometry = QuotientParameters(model, quotient, geodesic)
        geometry.check(all_params(self.param_groups))
        self.view = geometry

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        lrs = {p: g["lr"] for g in self.param_groups for p in g["params"]}
        w = self.view.point()
        xi = self.view.riemannian_gradient(w, params, [p.grad for p in params])
        v = {n: -lrs[p] * xi[n] for n, p in self.view.by_name.items()}
        end = self.view.endpoint(w, v)
        torch._foreach_copy_(params, [end[self.view.name[p]] for p in params])
        return loss

"""The default geometry of a model: the one :class:`Quotient` that every consumer builds when it is
given none (the sharpness measures, the quotient Hessian, GeodesicSAM and RiemannianSGD)."""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..groups.gl_math import METRICS
from ..quotient import REST, Quotient
from ..validation import check_choice, check_number
from .discover import find_symmetries


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (else ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def default_quotient(model: nn.Module, metric: str | None = None, rest: str | None = None,
                     eps_rel: float = 0.0, eps: float = 0.0, owner: str = "") -> Quotient:
    """``find_symmetries(model, metric, rest, eps_rel, eps)`` on the unwrapped model, with the
    arguments checked: ``metric`` in ``("inv", "mix")`` (default
    ``"mix"``), ``rest`` in ``"adaptive"``/``"euclidean"`` (default ``"adaptive"``), relaxations
    finite and ``>= 0`` (default 0: exactly invariant). ``owner`` prefixes error messages."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner or 'default_quotient'}: finding the symmetries needs an nn.Module, "
                        f"got {type(model).__name__}; pass quotient= explicitly")
    metric = "mix" if metric is None else metric
    rest = "adaptive" if rest is None else rest
    check_choice("metric", metric, METRICS, owner)
    check_choice("rest", rest, tuple(REST), owner)
    check_number("eps_rel", eps_rel, low=0.0, owner=owner)
    check_number("eps", eps, low=0.0, owner=owner)
    return find_symmetries(unwrap(model), metric=metric, rest=rest, eps_rel=eps_rel, eps=eps)

"""quotientsharp: sharpness on the quotient of a network's parameter space by its symmetries.

The main API is importable from the top level (submodules load on first use, so
``import quotientsharp`` stays as cheap as importing its groups):

- geometry: :func:`find_symmetries`, :class:`Quotient`, the groups (:mod:`quotientsharp.groups`);
- sharpness (worst case): :func:`geodesic_sharpness`, :func:`adaptive_sharpness`,
  :func:`euclidean_sharpness`; average case: :func:`average_geodesic_sharpness`,
  :func:`average_adaptive_sharpness`, :func:`average_euclidean_sharpness` (the same with
  ``kind="average"``); results are :class:`SharpnessResult` with the number in ``.value``;
- curvature: :func:`hessian_trace`, :func:`hessian_max_eigenvalue`, :func:`renyi_sharpness`,
  :func:`quotient_hessian_trace`, ... (results with ``.value``);
- sharpness-aware optimizers: :class:`SAM`, :class:`ASAM`, :class:`RSAM`, :class:`SAF`,
  :class:`MESA`, :class:`GeodesicSAM`, :class:`RiemannianSGD`.

Every measure is called as ``measure(model, loader, loss_fn, ...)``.

>>> import torch
>>> import quotientsharp as qs
>>> _ = torch.manual_seed(0)
>>> model = qs.models.TinyViT(image_size=8, patch_size=4, n_classes=3, d_model=8, depth=1, n_heads=2, mlp_dim=8)
>>> batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))]
>>> quotient = qs.find_symmetries(model)           # one GL(h) group per attention layer
>>> [type(g).__name__ for g in quotient.groups]
['AttentionGL']
>>> loss = torch.nn.functional.cross_entropy
>>> geo = qs.geodesic_sharpness(model, batches, loss, rho=0.05, n_iter=5, progress=False)
>>> avg = qs.average_geodesic_sharpness(model, batches, loss, rho=0.01, n_samples=4, progress=False)
>>> geo.value >= 0 and geo.config["kind"] == "worst" and avg.config["kind"] == "average"
True
>>> trace = qs.hessian_trace(model, batches, loss, n_probes=5, progress=False)
>>> isinstance(trace.value, float) and trace.value == trace.estimate
True
"""
from __future__ import annotations

import importlib
from typing import Any

from .groups import (
    AttentionGL,
    DiagonalRescaling,
    Euclidean,
    GLBlock,
    Piece,
    PositiveRescaling,
    SingularHeadError,
    SymmetryGroup,
)
from .quotient import Quotient

__version__ = "0.1.0"

_SUBMODULES = ("adapters", "curvature", "data", "distributed", "functional", "groups", "measures",
               "models", "optim", "studies", "train", "validation")

# name -> submodule it is loaded from on first access
_LAZY = {
    **dict.fromkeys(["find_symmetries", "default_quotient", "attention_blocks", "linear_attention_blocks",
                     "UnsupportedAttentionError"], "adapters"),
    **dict.fromkeys(["geodesic_sharpness", "adaptive_sharpness", "euclidean_sharpness",
                     "SharpnessResult", "Options"], "measures"),
    **dict.fromkeys(["hessian_trace", "hessian_max_eigenvalue", "hessian_top_eigenvalues",
                     "hessian_slq", "hessian_log_det", "hessian_shannon_entropy",
                     "hessian_spectral_density", "renyi_sharpness", "renyi_entropy", "fisher_rao_norm",
                     "pac_bayes_flatness", "parameter_norm", "sam_sharpness", "asam_sharpness",
                     "curvature_operator", "HessianOperator", "GGNOperator", "QuotientHessianOperator",
                     "quotient_hessian_trace", "quotient_hessian_top_eigenvalues",
                     "quotient_hessian_slq", "quotient_hessian_spectral_density",
                     "quotient_renyi_sharpness", "Estimate"], "curvature"),
    **dict.fromkeys(["SAM", "ASAM", "RSAM", "SAF", "MESA", "GeodesicSAM", "RiemannianSGD",
                     "IndexedDataset"], "optim"),
    "BatchMismatchError": "validation",
}


def average_geodesic_sharpness(model, loader, loss_fn, rho: float, **kwargs):
    """Average-case geodesic sharpness: ``geodesic_sharpness(..., kind="average")``.

    ``value`` = mean over batches of ``E_zeta[L_S(gamma_xi(1)) - L_S(w0)]`` with
    ``xi = rho Pi_w0(whiten_w0(zeta))``, ``zeta ~ N(0, I)`` (covariance ``rho² g^{-1}`` on the
    horizontal space; ``n_samples`` draws per batch). Returns a
    :class:`~quotientsharp.measures.SharpnessResult`; raises as
    :func:`~quotientsharp.measures.geodesic_sharpness`."""
    from .measures import geodesic_sharpness
    return geodesic_sharpness(model, loader, loss_fn, rho, kind="average", **kwargs)


def average_adaptive_sharpness(model, loader, loss_fn, rho: float, **kwargs):
    """Average-case adaptive sharpness: ``adaptive_sharpness(..., kind="average")``.

    ``value`` = mean over batches of ``E[L_S(w0 + xi) - L_S(w0)]``, ``xi = rho zeta ⊙ |w0|``,
    ``zeta ~ N(0, I)``. Returns a :class:`~quotientsharp.measures.SharpnessResult`; raises as
    :func:`~quotientsharp.measures.adaptive_sharpness`."""
    from .measures import adaptive_sharpness
    return adaptive_sharpness(model, loader, loss_fn, rho, kind="average", **kwargs)


def average_euclidean_sharpness(model, loader, loss_fn, rho: float, **kwargs):
    """Average-case Euclidean sharpness: ``euclidean_sharpness(..., kind="average")``.

    ``value`` = mean over batches of ``E[L_S(w0 + xi) - L_S(w0)]``, ``xi = rho zeta``,
    ``zeta ~ N(0, I)``. Returns a :class:`~quotientsharp.measures.SharpnessResult`; raises as
    :func:`~quotientsharp.measures.euclidean_sharpness`."""
    from .measures import euclidean_sharpness
    return euclidean_sharpness(model, loader, loss_fn, rho, kind="average", **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["SymmetryGroup", "AttentionGL", "GLBlock", "Piece", "DiagonalRescaling",
           "PositiveRescaling", "Euclidean", "SingularHeadError", "Quotient", "average_geodesic_sharpness",
           "average_adaptive_sharpness", "average_euclidean_sharpness", *_LAZY]

"""Curvature of the loss: Hessian/GGN operators, eigenvalues, traces, SLQ, Rényi sharpness.

Every model-level function and operator takes ``(model, loader, loss_fn, ...)``, the order of the
sharpness measures; scalar results are :class:`Estimate` with the number in ``.value``.
"""
from quotientsharp.curvature.lanczos import EigenResult, lanczos, lanczos_tridiagonal, power_iteration
from quotientsharp.curvature.measures import (
    asam_sharpness,
    curvature_operator,
    fisher_rao_norm,
    hessian_log_det,
    hessian_max_eigenvalue,
    hessian_shannon_entropy,
    hessian_slq,
    hessian_spectral_density,
    hessian_top_eigenvalues,
    hessian_trace,
    pac_bayes_flatness,
    parameter_norm,
    renyi_sharpness,
    renyi_study_targets,
    sam_sharpness,
)
from quotientsharp.curvature.operators import (
    DEFAULT_HVP_MODE,
    HVP_MODES,
    FunctionOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    ModelOperator,
    as_operator,
    select_parameters,
)
from quotientsharp.curvature.quotient_hessian import (
    QuotientHessianOperator,
    quotient_hessian_slq,
    quotient_hessian_spectral_density,
    quotient_hessian_top_eigenvalues,
    quotient_hessian_trace,
    quotient_renyi_sharpness,
    vertical_dimension,
)
from quotientsharp.curvature.renyi import RenyiResult, renyi_entropy
from quotientsharp.curvature.results import Estimate
from quotientsharp.curvature.slq import SLQResult, SpectralDensity, slq
from quotientsharp.curvature.trace import hutch_plus_plus, hutchinson, sample_probes

__all__ = [
    "DEFAULT_HVP_MODE", "HVP_MODES", "EigenResult", "Estimate", "FunctionOperator", "GGNOperator",
    "HessianOperator", "LinearOperator", "MatrixOperator", "ModelOperator", "RenyiResult",
    "SLQResult", "SpectralDensity", "as_operator", "asam_sharpness", "curvature_operator",
    "fisher_rao_norm", "hessian_log_det", "hessian_max_eigenvalue", "hessian_shannon_entropy",
    "hessian_slq", "hessian_spectral_density", "hessian_top_eigenvalues", "hessian_trace",
    "hutch_plus_plus", "hutchinson", "lanczos", "lanczos_tridiagonal", "pac_bayes_flatness",
    "parameter_norm", "power_iteration", "renyi_entropy", "renyi_sharpness", "renyi_study_targets",
    "sam_sharpness", "sample_probes", "select_parameters", "slq",
    "QuotientHessianOperator", "quotient_hessian_slq", "quotient_hessian_spectral_density",
    "quotient_hessian_top_eigenvalues", "quotient_hessian_trace", "quotient_renyi_sharpness",
    "vertical_dimension",
]

"""Transformer studies, the measure registry: every measurement unit (:data:`MEASURES`, called
through :func:`measure_unit`), which of them are opt-in or spectral, and the studies' Gram
relaxation :data:`STUDY_EPS_REL`."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
from torch import nn

from ..curvature import hessian_max_eigenvalue, hessian_slq, quotient_renyi_sharpness, renyi_entropy
from ..curvature.layerwise import layerwise_renyi
from ..measures import adaptive_sharpness, euclidean_sharpness, geodesic_sharpness

STUDY_EPS_REL = 1e-6
"""Gram relaxation of the studies' GL quotients: the library default until issue 15 (now 0, exact),
kept so that the committed results reproduce."""


def _sharpness(fn: Callable, kind: str, **fixed) -> Callable:
    rho_key = "rho_average" if kind == "average" else "rho"

    def run(model, batches, plan, seed):
        average = {"antithetic": plan.get("antithetic", False)} if kind == "average" else {}
        r = fn(model, batches, F.cross_entropy, plan[rho_key], kind=kind, n_iter=plan["n_iter"],
               n_samples=plan["n_samples"], seed=seed, progress=False, **average, **fixed)
        details = {k: v for k, v in r.to_dict().items() if k != "traces"}
        return r.value, details
    return run


def _max_eigenvalue(model, batches, plan, seed):
    r = hessian_max_eigenvalue(model, batches, F.cross_entropy, tol=plan["lanczos_tol"], seed=seed, progress=False)
    return {"hessian_max_eigenvalue": r.value}, r.to_dict()


def _slq_measures(model, batches, plan, seed):
    """One SLQ run serves Tr H (= Hutchinson on the same probes) and Rényi sharpness at every α."""
    slq = hessian_slq(model, batches, F.cross_entropy, m=plan["slq_m"], n_probes=plan["slq_probes"], seed=seed,
                      progress=False)
    trace = slq.trace()
    renyi = {a: renyi_entropy(slq, a, "abs") for a in plan["alphas"]}
    values = {"hessian_trace": trace.value, **{f"renyi_{a}": r.sharpness for a, r in renyi.items()}}
    return values, {"trace": trace.to_dict(), "renyi": {str(a): r.to_dict() for a, r in renyi.items()}}


def _quotient_renyi(model, batches, plan, seed):
    results = quotient_renyi_sharpness(model, batches, F.cross_entropy, alpha=list(plan["alphas"]),
                                        m=plan["slq_m"], n_probes=plan["slq_probes"], seed=seed,
                                        progress=False, metric="mix", eps_rel=STUDY_EPS_REL)
    values = {f"quotient_renyi_{a}": r.sharpness for a, r in results.items()}
    return values, {str(a): r.to_dict() for a, r in results.items()}


def _layer_renyi(model, batches, plan, seed):
    """Rényi sharpness of every weight tensor's Hessian block (one SLQ run per layer): values
    ``layer_renyi_<alpha>@<layer>``. Lanczos steps, probes and batches are ``layer_slq_m``,
    ``layer_slq_probes`` and ``layer_batches`` when the plan sets them (else the study's ``slq_m``,
    ``slq_probes`` and spectral batches)."""
    batches = batches[:plan["layer_batches"]] if plan.get("layer_batches") else batches
    r = layerwise_renyi(model, batches, F.cross_entropy, alphas=list(plan["alphas"]),
                        m=plan.get("layer_slq_m", plan["slq_m"]), n_probes=plan.get("layer_slq_probes", plan["slq_probes"]),
                        seed=seed)
    return r.values(), r.to_dict()


MEASURES: dict[str, Callable] = {
    "geodesic_inv": _sharpness(geodesic_sharpness, "worst", metric="inv", eps_rel=STUDY_EPS_REL),
    "geodesic_mix": _sharpness(geodesic_sharpness, "worst", metric="mix", eps_rel=STUDY_EPS_REL),
    "geodesic_inv_avg": _sharpness(geodesic_sharpness, "average", metric="inv", eps_rel=STUDY_EPS_REL),
    "geodesic_mix_avg": _sharpness(geodesic_sharpness, "average", metric="mix", eps_rel=STUDY_EPS_REL),
    # mix_rel (spec part 2 §5.1): the mixed metric's ball with each head block divided by ||G Hᵀ||²_F
    "geodesic_mix_rel": _sharpness(geodesic_sharpness, "worst", metric="mix", ball="relative", eps_rel=STUDY_EPS_REL),
    "geodesic_mix_rel_avg": _sharpness(geodesic_sharpness, "average", metric="mix", ball="relative",
                                       eps_rel=STUDY_EPS_REL),
    "adaptive": _sharpness(adaptive_sharpness, "worst"),
    "adaptive_avg": _sharpness(adaptive_sharpness, "average"),
    "euclidean": _sharpness(euclidean_sharpness, "worst"),
    "hessian_max_eigenvalue": _max_eigenvalue,
    "hessian_slq": _slq_measures,
    "quotient_renyi": _quotient_renyi,
    "layer_renyi": _layer_renyi,
}
"""Measurement units: ``(model, batches, plan, seed) -> (value or {name: value}, details)``.
Worst-case sharpness at ``plan["rho"]``, average-case at ``plan["rho_average"]``."""


UNIT_VALUES: dict[str, tuple[str, ...]] = {
    "hessian_slq": ("hessian_trace", "renyi_"),
    "quotient_renyi": ("quotient_renyi_",),
    "layer_renyi": ("layer_renyi_",),
}
"""Row values a unit writes under names other than its own: exact names, or prefixes (ending in
``_``) followed by α (and ``@<layer>``). Every other unit writes one value under its own name."""


def unit_writes(unit: str, value_name: str) -> bool:
    """Whether the unit ``unit`` writes the row value ``value_name`` (:data:`UNIT_VALUES`)."""
    return value_name == unit or any(value_name == n or (n.endswith("_") and value_name.startswith(n))
                                     for n in UNIT_VALUES.get(unit, ()))


MEASURE_SETTINGS: dict[str, tuple[str, ...]] = {"layer_renyi": ("layer_slq_m", "layer_slq_probes", "layer_batches")}
"""Plan entries that configure one measure only: they belong to that measure's unit key and to no
other (adding them to a plan leaves every other measure's stored units valid)."""


def unit_settings(settings: Mapping[str, Any], name: str) -> dict:
    """The plan entries that key measure ``name``'s units: ``settings`` without the entries that
    :data:`MEASURE_SETTINGS` reserves for other measures."""
    foreign = {k for m, keys in MEASURE_SETTINGS.items() if m != name for k in keys}
    return {k: v for k, v in settings.items() if k not in foreign}


OPT_IN_MEASURES = ("layer_renyi",)
"""Units run only when asked for (``--measures``): per-layer Rényi costs one SLQ run per weight
tensor, ~14× the full-Hessian SLQ on the 2-layer TinyViT."""


def default_measures() -> list[str]:
    """Every unit of :data:`MEASURES` but the :data:`OPT_IN_MEASURES`."""
    return [name for name in MEASURES if name not in OPT_IN_MEASURES]


SPECTRAL_MEASURES = ("hessian_max_eigenvalue", "hessian_slq", "quotient_renyi", "layer_renyi")
"""The Hessian-spectrum units (Lanczos/SLQ: hundreds of HVPs per batch), which a plan may restrict to
fewer of the fixed batches (``spectral_batches``) than the sharpness measures."""


def measure_unit(name: str, model: nn.Module, batches: list, plan: Mapping[str, Any], seed: int) -> dict:
    """Run one measurement unit: ``{"values": {name: value}, "seconds", "warnings", "details"}``.

    A measure that is undefined at this model (it raises ``ValueError``, e.g. non-finite
    average-case draws at a collapsed network) is stored with no values and its ``"error"``, so
    the sweep goes on and the summary names it; the unit is deterministic, so a rerun reuses it
    (delete its file to retry). ``plan["spectral_batches"] = k`` (optional) gives the
    :data:`SPECTRAL_MEASURES` only the first k batches."""
    t0 = time.perf_counter()
    error = None
    if name in SPECTRAL_MEASURES and plan.get("spectral_batches"):
        batches = batches[:plan["spectral_batches"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values, details = MEASURES[name](model, batches, plan, seed)
        except ValueError as e:
            values, details, error = {}, {}, f"{type(e).__name__}: {e}"
    values = values if isinstance(values, dict) else {name: values}
    return {"values": values, "seconds": time.perf_counter() - t0,
            "warnings": sorted({str(w.message) for w in caught}), "details": details,
            **({"error": error} if error else {})}

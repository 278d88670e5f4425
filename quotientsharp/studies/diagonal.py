"""Diagonal-network study (spec part 2 §7): does sharpness rank-correlate with generalization?

A population of diagonal nets ``x^T(u*v)`` (init scale α × step multiplier c) is trained by
full-batch GD on sparse regression (:func:`quotientsharp.data.synthetic.diagonal_regression`),
all models at once as ``(M, d)`` tensors. For every model, adaptive, Euclidean and geodesic
sharpness (inverse and mixed metric, exact geodesics) are measured through the public measures at
every radius ρ, and Kendall τ against the test loss ``||u*v - β*||^2`` summarises each measure.

Everything is resumable (:mod:`quotientsharp.studies.runner`): trained weights go to
``<out>/train/<id>.json`` and each model's measurements to ``<out>/models/<id>.json``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.synthetic import diagonal_regression
from ..groups.diagonal import DiagonalRescaling, DiagonalRescalingInv, DiagonalRescalingMix
from ..measures import adaptive_sharpness, euclidean_sharpness, geodesic_sharpness, sum_squared_error
from ..models.diagonal import DiagonalNet
from ..quotient import Quotient
from .kendall import bootstrap_ci, kendall_tau
from .report import rho_tau_table, write_csv_atomic, write_json_atomic
from .runner import Executor, UnitStore, run_units, sequential

ALPHAS = tuple(float(a) for a in np.logspace(-3, 0, 10))
STEP_MULTS = (0.1, 0.2, 0.3, 0.4, 0.5)
RHOS = (0.01, 0.02, 0.05, 0.1, 0.2)
HEADLINE_RHO = 0.1
STEP_FLOOR = 1e-3
"""Floor of ``max_i(u_i² + v_i²)`` in the GD step (spec part 2 §7): without it the first step at
α ≤ 1e-2 is ~c/(2α²λ_max) and erases the small-initialisation regime."""
ODE_STEPS = 8
"""First RK4 step count of ``geodesic_inv_ode``; step doubling then runs until two successive
endpoints agree to ``ode_tol`` = 1e-10 (relative), so this sets only the cost, not the accuracy."""
PAPER_TAU = {"adaptive": -0.68, "geodesic_inv": -0.83, "geodesic_mix": -0.86}
GENERALIZATION = "test loss ||u*v - beta*||^2"


# --------------------------------------------------------------------------- population
def population(n_models: int = 50) -> list[dict]:
    """``n_models`` of the 50 grid models (α-major, c-minor), evenly spread over the grid.

    Each model is ``{"id", "index", "alpha", "c"}``; a model's id and weights do not depend on
    which other models are in the population.
    """
    grid = [(i, j) for i in range(len(ALPHAS)) for j in range(len(STEP_MULTS))]
    if not 1 <= n_models <= len(grid):
        raise ValueError(f"n_models must be in 1..{len(grid)}, got {n_models}")
    picks = np.unique(np.round(np.linspace(0, len(grid) - 1, n_models)).astype(int))
    return [{"id": f"a{grid[k][0]}_c{STEP_MULTS[grid[k][1]]}", "index": int(k),
             "alpha": ALPHAS[grid[k][0]], "c": STEP_MULTS[grid[k][1]]} for k in picks]


def train_population(X: torch.Tensor, y: torch.Tensor, alphas: Sequence[float], step_mults: Sequence[float],
                     tol: float = 1e-5, max_steps: int = 2_000_000, floor: float = STEP_FLOOR) -> list[dict]:
    """Full-batch GD on ``L = ||X(u*v) - y||^2`` for all models at once (spec part 2 §7).

    Model m starts at ``u = √2 α_m 1``, ``v = 0`` and steps with
    ``c_m / (λ_max(XᵀX) · max(max_i(u_i² + v_i²), floor))``, recomputed every step. It stops, independently
    of the others, as soon as ``L < tol`` (or after ``max_steps`` steps); stopped models leave the
    batch. Returns per model ``{"u", "v"}`` (tensors), ``"steps"``, ``"train_loss"``, ``"converged"``.
    """
    lam = torch.linalg.eigvalsh(X.T @ X)[-1]
    m, d = len(alphas), X.shape[1]
    u = (math.sqrt(2) * torch.tensor(alphas, dtype=X.dtype))[:, None].expand(m, d).clone()
    v = torch.zeros(m, d, dtype=X.dtype)
    c = torch.tensor(step_mults, dtype=X.dtype)
    active = torch.arange(m)
    Xt = X.T.contiguous()
    out: list[dict | None] = [None] * m
    for step in range(max_steps + 1):
        r = (u * v) @ Xt - y
        loss = (r * r).sum(1)
        stop = loss < tol if step < max_steps else torch.ones(len(active), dtype=torch.bool)
        if bool(stop.any()):
            for k in stop.nonzero().flatten().tolist():
                out[int(active[k])] = {"u": u[k].clone(), "v": v[k].clone(), "steps": step,
                                       "train_loss": float(loss[k]), "converged": bool(loss[k] < tol)}
            keep = ~stop
            active, u, v, c, r = active[keep], u[keep], v[keep], c[keep], r[keep]
            if not len(active):
                break
        grad_beta = 2 * (r @ X)
        lr = (c / (lam * (u * u + v * v).amax(1).clamp_min(floor)))[:, None]
        u, v = u - lr * grad_beta * v, v - lr * grad_beta * u
    return out


# --------------------------------------------------------------------------- measures
class MixedGeodesicBNorm(DiagonalRescalingInv):
    """Mixed-metric geodesics inside the ball ``√2‖b‖ ≤ ρ`` (``mix_bnorm``, spec part 2 §5, §7).

    The paper's App. E states the mixed radius in ``‖b‖``. Here the inner product, gradient
    conversion and whitening are the inverse metric's, whose norm of ``(u b, v b)`` is exactly
    ``√2‖b‖``, so the solver maximises over that ball with steepest-ascent steps for that norm;
    the Christoffel symbols, geodesics (``β(1) = β(1 + 2b)``) and the ``b ≥ −½`` clamp are the
    mixed metric's.
    """

    # the mixed metric's connection on the inverse metric's ball: methods of the mixed group,
    # which read only u, v, mixed_domain and the shared b coordinates
    christoffel = DiagonalRescalingMix.christoffel
    geodesic_exact = DiagonalRescalingMix.geodesic_exact
    restrict_to_domain = DiagonalRescalingMix.restrict_to_domain

    def __init__(self, u: str = "u", v: str = "v"):
        super().__init__(u, v, metric="inv", mixed_domain="restrict")

    def __repr__(self) -> str:
        return f"MixedGeodesicBNorm({self.u!r}, {self.v!r})"


def _geodesic(group_factory: Callable[[], DiagonalRescaling], geodesic: str = "exact"):
    def measure(model, loader, rho, **kw):
        return geodesic_sharpness(model, loader, sum_squared_error, rho, geodesic=geodesic,
                                  quotient=Quotient([group_factory()], names=("u", "v")), **kw)
    return measure


MEASURES: dict[str, Callable[..., Any]] = {
    "adaptive": lambda model, loader, rho, **kw: adaptive_sharpness(model, loader, sum_squared_error, rho, **kw),
    "euclidean": lambda model, loader, rho, **kw: euclidean_sharpness(model, loader, sum_squared_error, rho, **kw),
    "geodesic_inv": _geodesic(lambda: DiagonalRescaling("u", "v", "inv")),
    "geodesic_mix": _geodesic(lambda: DiagonalRescaling("u", "v", "mix", "restrict")),
    "geodesic_mix_bnorm": _geodesic(MixedGeodesicBNorm),
    "geodesic_inv_ode": _geodesic(lambda: DiagonalRescaling("u", "v", "inv"), geodesic="ode"),
}
"""Every measure of the study: ``(model, loader, rho, **options) -> SharpnessResult``; geodesic ones
use closed-form geodesics, except ``geodesic_inv_ode`` (RK4 integration of the geodesic ODE)."""


def measure_unit(name: str, model: torch.nn.Module, batches: list, plan: Mapping[str, Any], seed: int) -> dict:
    """One measurement unit, with the signature of the transformer studies'
    :func:`~quotientsharp.studies.transformer_measures.measure_unit`: worst-case sharpness
    ``MEASURES[name]`` on ``batches`` at every radius of ``plan = {"rhos": [...], **solver
    options}``, every solver seeded with ``seed``.

    Returns ``{"values": {str(rho): value}, "diagnostics": {str(rho): {"xi_norm", "n_halvings",
    "n_nonfinite"}}, "seconds": s}``.
    """
    solver = {k: val for k, val in plan.items() if k != "rhos"}
    t0 = time.perf_counter()
    results = {str(rho): MEASURES[name](model, batches, rho, kind="worst", seed=seed, progress=False, **solver)
               for rho in plan["rhos"]}
    return {"values": {r: res.value for r, res in results.items()},
            "diagnostics": {r: {k: res.extras[0][k] for k in ("xi_norm", "n_halvings", "n_nonfinite")}
                            for r, res in results.items()},
            "seconds": time.perf_counter() - t0}


def measure_model(u: torch.Tensor, v: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                  plan: Mapping[str, Mapping[str, Any]], seed: int) -> dict:
    """Every unit of the ``plan`` ``{measure: {"rhos": [...], **solver options}}``
    (:func:`measure_unit`) on the diagonal net ``(u, v)`` and the single full batch ``(X, y)``:
    ``{measure: unit record}``."""
    model = DiagonalNet(len(u), dtype=u.dtype)
    with torch.no_grad():
        model.u.copy_(u)
        model.v.copy_(v)
    loader = [(X, y)]
    return {name: measure_unit(name, model, loader, spec, seed) for name, spec in plan.items()}


def rk4_ratios(measures: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """``{str(rho): geodesic_inv_ode / geodesic_inv}`` at every radius both were measured at (same
    solver budget and seed, so the ratio shows the RK4 geodesic's effect alone); None where the
    closed-form value is 0."""
    if "geodesic_inv_ode" not in measures or "geodesic_inv" not in measures:
        return {}
    ode, closed = measures["geodesic_inv_ode"]["values"], measures["geodesic_inv"]["values"]
    return {r: (ode[r] / closed[r] if closed[r] != 0 else None) for r in ode if r in closed}


# --------------------------------------------------------------------------- the study
def study_config(n_models: int = 50, rhos: Sequence[float] = RHOS, seed: int = 0, noise: float = 0.0,
                 n_iter: int = 100, n_restarts: int = 4, ode_rhos: Sequence[float] | None = None,
                 ode_steps: int = ODE_STEPS, step_floor: float = STEP_FLOOR) -> dict:
    """The study's full configuration (JSON-ready; spec part 2 §7 by default).

    ``plan`` maps every measure to its radii and solver options. The RK4 variant
    ``geodesic_inv_ode`` costs ~10× more per iteration, so it runs only at ``ode_rhos``
    (default: the headline radius), with the closed form's solver budget (``n_iter``,
    ``n_restarts``) so that the two values are comparable (their ratio is in the results).
    """
    rhos = [float(r) for r in rhos]
    ode_rhos = [headline_rho(rhos)] if ode_rhos is None else [float(r) for r in ode_rhos]
    plan = {m: {"rhos": rhos, "n_iter": n_iter, "n_restarts": n_restarts}
            for m in MEASURES if not m.endswith("_ode")}
    if ode_rhos:
        plan["geodesic_inv_ode"] = {"rhos": ode_rhos, "n_iter": n_iter, "n_restarts": n_restarts,
                                    "ode_steps": int(ode_steps)}
    return {"data": {"d": 200, "n_train": 100, "sparsity": 0.9, "noise": float(noise), "seed": int(seed)},
            "train": {"tol": 1e-5, "max_steps": 2_000_000, "floor": float(step_floor)},
            "models": population(n_models),
            "plan": plan,
            "seed": int(seed), "n_boot": 2000}


def headline_rho(rhos: Sequence[float]) -> float:
    """``HEADLINE_RHO`` (0.1) if measured, else the measured radius closest to it in log scale."""
    return min(rhos, key=lambda r: abs(math.log(r / HEADLINE_RHO)))


def run_study(out: str | Path, config: Mapping[str, Any], progress: bool = True,
              executor: Executor = sequential) -> dict:
    """Train (what is not yet trained), measure (what is not yet measured), write and return the
    summary. ``<out>/summary.json`` and ``<out>/models.csv`` are rewritten from the stored units.
    Training is batched over the population here; ``executor`` runs the per-model measurements
    (e.g. :class:`~quotientsharp.studies.parallel.RayExecutor`)."""
    out = Path(out)
    data = diagonal_regression(**config["data"])
    trained = _train_stage(UnitStore(out / "train"), data, config)

    def measure(key: str, unit: Mapping[str, Any]) -> dict:
        w = trained[key]
        u, v = (torch.tensor(w[n], dtype=data.X_train.dtype) for n in ("u", "v"))
        measures = measure_model(u, v, data.X_train, data.y_train, unit["plan"], unit["seed"])
        return {"train": {k: w[k] for k in ("steps", "train_loss", "converged")},
                "test_loss": float(((u * v - data.beta_star) ** 2).sum()),
                "measures": measures,
                "rk4_over_closed_form": rk4_ratios(measures)}

    units = {m["id"]: {"model": m, "data": config["data"], "train": config["train"], "plan": config["plan"],
                       "seed": config["seed"] * 1000 + m["index"]}
             for m in config["models"]}
    records = run_units(UnitStore(out / "models"), units, measure, progress=progress, desc="models",
                        executor=executor)
    summary = summarize(records, config)
    write_json_atomic(out / "summary.json", summary)
    write_models_csv(out / "models.csv", records, config)
    return summary


def _train_stage(store: UnitStore, data, config: Mapping[str, Any]) -> dict[str, dict]:
    """Trained weights of every model: loaded if stored, else trained together and stored."""
    units = {m["id"]: {"model": m, "data": config["data"], "train": config["train"]} for m in config["models"]}
    stored = {key: store.load(key, cfg) for key, cfg in units.items()}
    todo = [m for m in config["models"] if stored[m["id"]] is None]
    if todo:
        fits = train_population(data.X_train, data.y_train, [m["alpha"] for m in todo], [m["c"] for m in todo],
                                **config["train"])
        for m, fit in zip(todo, fits):
            store.save(m["id"], units[m["id"]], {**fit, "u": fit["u"].tolist(), "v": fit["v"].tolist()})
            stored[m["id"]] = store.load(m["id"])
    return stored


# --------------------------------------------------------------------------- summary
def summarize(records: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> dict:
    """Kendall τ-a (and 95% bootstrap CI) of every measure at every ρ against the test loss."""
    keys = [m["id"] for m in config["models"]]
    test = [records[k]["test_loss"] for k in keys]
    per_rho: dict[str, dict] = {}
    for name, spec in config["plan"].items():
        for rho in spec["rhos"]:
            s = [records[k]["measures"][name]["values"][str(rho)] for k in keys]
            entry = per_rho.setdefault(str(rho), {"kendall_tau": {}, "ci95": {}})
            entry["kendall_tau"][name] = kendall_tau(s, test)
            entry["ci95"][name] = list(bootstrap_ci(s, test, n_boot=config["n_boot"], seed=config["seed"]))
    head = headline_rho([float(r) for r in per_rho])
    steps = [records[k]["train"]["steps"] for k in keys]
    ratios = {k: records[k].get("rk4_over_closed_form", {}) for k in keys}
    ratio_values = [x for r in ratios.values() for x in r.values() if x is not None]
    return {"n_models": len(keys),
            "generalization": GENERALIZATION,
            "headline_rho": head,
            "kendall_tau": per_rho[str(head)]["kendall_tau"],
            "ci95": per_rho[str(head)]["ci95"],
            "paper": PAPER_TAU,
            "per_rho": dict(sorted(per_rho.items(), key=lambda kv: float(kv[0]))),
            "population": {"test_loss_range": [min(test), max(test)], "steps_range": [min(steps), max(steps)],
                           "all_converged": all(records[k]["train"]["converged"] for k in keys)},
            "measure_seconds": {name: sum(records[k]["measures"][name]["seconds"] for k in keys)
                                for name in config["plan"]},
            "rk4_over_closed_form": {"range": [min(ratio_values), max(ratio_values)] if ratio_values else None,
                                     "max_abs_log": (max(abs(math.log(x)) for x in ratio_values)
                                                     if ratio_values and min(ratio_values) > 0 else None),
                                     "per_model": ratios},
            "config": dict(config)}


def write_models_csv(path: str | Path, records: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> None:
    """One row per model: its hyperparameters, training, test loss and every measure at every ρ."""
    cols = [(name, rho) for name, spec in config["plan"].items() for rho in spec["rhos"]]
    ratio_rhos = config["plan"].get("geodesic_inv_ode", {}).get("rhos", [])
    header = (["id", "alpha", "c", "steps", "train_loss", "test_loss"] + [f"{name}@{rho}" for name, rho in cols]
              + [f"rk4_over_closed_form@{rho}" for rho in ratio_rhos])
    rows = []
    for m in config["models"]:
        rec = records[m["id"]]
        rows.append([m["id"], m["alpha"], m["c"], rec["train"]["steps"], rec["train"]["train_loss"], rec["test_loss"]]
                    + [rec["measures"][name]["values"][str(rho)] for name, rho in cols]
                    + [rec.get("rk4_over_closed_form", {}).get(str(rho)) for rho in ratio_rhos])
    write_csv_atomic(path, header, rows)


tau_table = rho_tau_table
"""Markdown τ table of a summary (:func:`quotientsharp.studies.report.rho_tau_table`)."""

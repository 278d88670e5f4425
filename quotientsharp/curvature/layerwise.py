"""Per-layer Rényi sharpness (spec hessian_and_renyi §1, §6; issue 13 §4), and an honest choice of
the layer and α.

**Per layer.** For a layer ``l`` with parameters ``θ_l`` (the other parameters frozen at their
values), the diagonal block ``H_ll = ∂²L/∂θ_l²`` of the loss Hessian is estimated by SLQ (``m``
Lanczos steps × ``P`` Rademacher probes over ``θ_l`` only) and

    ``H_α(H_ll) = (log S_α − α log S₁)/(1 − α)``,  ``S_α = Tr|H_ll|^α``, ``S₁ = Tr|H_ll|``,

Rényi sharpness ``= −H_α``; one SLQ run per layer serves every α. Per-layer values are invariant
under rescaling layers of a bias-free ReLU net (``H_ll → H_ll / c_l²``), the full-Hessian value is
not (spec §6.4).

**Choosing the layer and α** (:func:`select_layer_alpha`). The Rényi paper picks, per setting,
the layer and α with the best τ — a choice fitted to the τ it reports. Here the population is
split once (seeded) into a *selection* half and an *evaluation* half: the (layer, α) with the
best τ on the selection half is chosen, and its τ (with a bootstrap CI) is reported on the
evaluation half only.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from quotientsharp.curvature.measures import curvature_operator
from quotientsharp.curvature.renyi import RenyiResult, renyi_entropy
from quotientsharp.curvature.results import jsonable
from quotientsharp.curvature.slq import slq
from quotientsharp.functional import LossFn
from quotientsharp.validation import check_count, check_model_loader_loss

SEP = "@"
"""Separator of a per-layer value name: ``f"layer_renyi_{alpha}{SEP}{layer}"``."""


def layer_targets(model: nn.Module) -> dict[str, list[str]]:
    """Default layers: every parameter whose name contains ``weight`` and whose tensor has
    ndim > 1, one block each (the spec's Rényi targets without ``"all"``): ``{name: [name]}``."""
    targets = {n: [n] for n, p in model.named_parameters() if p.requires_grad and "weight" in n and p.ndim > 1}
    if not targets:
        raise ValueError("the model has no trainable weight tensor with ndim > 1; pass targets= explicitly")
    return targets


@dataclass
class LayerwiseRenyi:
    """Per layer: the block size ``n[layer]`` and ``renyi[layer][alpha]`` (a
    :class:`~quotientsharp.curvature.renyi.RenyiResult`; ``.sharpness`` = −H_α, ``.stderr`` the
    jackknife over probes). ``config``: m, probes, seed, normalizer, targets."""

    n: dict[str, int]
    renyi: dict[str, dict[float | str, RenyiResult]]
    config: dict = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """``{f"layer_renyi_{alpha}@{layer}": sharpness}`` over every layer and α."""
        return {value_name(a, layer): r.sharpness for layer, per in self.renyi.items() for a, r in per.items()}

    def to_dict(self) -> dict:
        return jsonable({"n": self.n, "renyi": {layer: {str(a): r.to_dict() for a, r in per.items()}
                                                for layer, per in self.renyi.items()},
                         "config": self.config})


def value_name(alpha: float | str, layer: str) -> str:
    return f"layer_renyi_{alpha}{SEP}{layer}"


def parse_value_name(name: str) -> tuple[str, str] | None:
    """``(alpha, layer)`` of a :func:`value_name`, None for any other name."""
    if not name.startswith("layer_renyi_") or SEP not in name:
        return None
    alpha, layer = name[len("layer_renyi_"):].split(SEP, 1)
    return alpha, layer


def layerwise_renyi(
    model: nn.Module, loader: Iterable, loss_fn: LossFn, alphas: Sequence[float | str] = (0.5, 1.5),
    targets: Mapping[str, str | Sequence[str]] | None = None, m: int = 15, n_probes: int = 100,
    seed: int = 0, normalizer: str = "abs", probes: Callable[[int], torch.Tensor] | None = None,
    progress: bool = False, **operator_kwargs,
) -> LayerwiseRenyi:
    """Rényi entropy of every layer's Hessian block ``H_ll`` by SLQ (module docstring).

    Args:
        targets: ``{layer label: parameter name(s) or pattern}`` (see
            :func:`~quotientsharp.curvature.operators.select_parameters`); default
            :func:`layer_targets`.
        m, n_probes: Lanczos steps and Rademacher probes per layer (``m`` is capped at the block
            size; ``m = n`` is full Lanczos, exact per probe). Keep them fixed within a study.
        seed: probe seed, the same for every layer.
        probes: ``probes(n) -> (n, P)`` tensor of probe vectors for a block of size ``n``,
            instead of Rademacher draws (e.g. ``√n·I`` with ``m = n``: the exact trace).
        operator_kwargs: go to :class:`~quotientsharp.curvature.operators.HessianOperator`.
    """
    check_model_loader_loss("layerwise_renyi", model, loader, loss_fn)
    check_count("m", m, 1, "layerwise_renyi")
    check_count("n_probes", n_probes, 1, "layerwise_renyi")
    if isinstance(alphas, (str, int, float)):
        alphas = [alphas]
    if not alphas:
        raise ValueError("layerwise_renyi: alphas is empty")
    targets = layer_targets(model) if targets is None else dict(targets)
    if not targets:
        raise ValueError("layerwise_renyi: targets is empty")
    if not isinstance(loader, (list, tuple)):
        loader = list(loader)  # consumed once per layer
    n, renyi = {}, {}
    for layer, params in targets.items():
        op = curvature_operator(model, loader, loss_fn, params, **operator_kwargs)
        spectrum = slq(op, m, n_probes, seed=seed, progress=progress,
                       probes=None if probes is None else probes(int(op.shape[0])).to(torch.float64))
        n[layer] = int(op.shape[0])
        renyi[layer] = {a: renyi_entropy(spectrum, a, normalizer) for a in alphas}
    config = {"m": m, "n_probes": n_probes if probes is None else "given", "seed": seed, "normalizer": normalizer, "alphas": list(alphas),
              "targets": {k: list(v) if not isinstance(v, str) else v for k, v in targets.items()}}
    return LayerwiseRenyi(n, renyi, config)


# --------------------------------------------------------------------------- held-out choice
def split_halves(ids: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded random split of ``ids`` into (selection, evaluation) halves (selection gets the
    smaller half when the count is odd), each in the order of ``ids``."""
    ids = list(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("split_halves: model ids must be unique")
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen = set(order[: len(ids) // 2].tolist())
    return [i for k, i in enumerate(ids) if k in chosen], [i for k, i in enumerate(ids) if k not in chosen]


def select_layer_alpha(values: Mapping[str, Mapping[str, float]], gap: Mapping[str, float],
                       seed: int = 0, sign: int | None = 1, n_boot: int = 2000) -> dict:
    """Choose the per-layer Rényi value (layer, α) on one half of the models, report it on the other.

    Args:
        values: ``{model id: {value name: value}}``; the candidates are the names that parse as
            :func:`value_name` and are finite for every model.
        gap: ``{model id: generalization gap}``.
        sign: ``+1`` picks the largest τ on the selection half (the Rényi paper's direction:
            sharper ↔ larger gap), ``-1`` the smallest, ``None`` the largest ``|τ|``.
    Returns ``{"choice": {"layer", "alpha", "name"}, "tau_selection", "tau_evaluation",
    "ci95_evaluation", "selection", "evaluation" (model ids), "candidates": {name: τ on the
    selection half}, "seed", "sign"}``.
    """
    from quotientsharp.studies.kendall import bootstrap_ci, kendall_tau

    if sign not in (1, -1, None):
        raise ValueError(f"sign must be 1, -1 or None, got {sign!r}")
    ids = [i for i in values if i in gap]
    if len(ids) < 4:
        raise ValueError(f"select_layer_alpha needs at least 4 models with a gap (2 per half), got {len(ids)}")
    names = sorted({name for i in ids for name in values[i] if parse_value_name(name) is not None})
    names = [name for name in names
             if all(values[i].get(name) is not None and math.isfinite(values[i][name]) for i in ids)]
    if not names:
        raise ValueError("select_layer_alpha: no per-layer Rényi value (layer_renyi_<alpha>@<layer>) is finite "
                         "for every model")
    selection, evaluation = split_halves(ids, seed)

    def tau(name, half):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # ties: τ-a counts them as 0
            return kendall_tau([values[i][name] for i in half], [gap[i] for i in half])

    candidates = {name: tau(name, selection) for name in names}
    score = {1: lambda t: t, -1: lambda t: -t, None: abs}[sign]
    best = max(names, key=lambda name: (score(candidates[name]), name))
    alpha, layer = parse_value_name(best)
    ev_x, ev_y = [values[i][best] for i in evaluation], [gap[i] for i in evaluation]
    return {"choice": {"layer": layer, "alpha": alpha, "name": best},
            "tau_selection": candidates[best], "tau_evaluation": tau(best, evaluation),
            "ci95_evaluation": list(bootstrap_ci(ev_x, ev_y, n_boot=n_boot, seed=seed)),
            "selection": selection, "evaluation": evaluation, "candidates": candidates,
            "seed": seed, "sign": sign}

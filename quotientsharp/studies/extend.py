"""Add measures to a finished transformer study whose state dicts are gone (only its committed
``summary.json`` is left): retrain the same population from its seeds, measure the new units plus
a *check* measure that the summary already holds, and merge.

The merge trusts a retrained model only if it is the summarised one: its train/test accuracy
must be reproduced exactly and every check value to ``rtol`` (training and measures are seeded;
float32 kernels of another CPU reproduced 94 of the 96 committed from-scratch models' accuracies
exactly and their adaptive sharpness to < 4e-5 relative, hence the default 1e-4). A model that
is not reproduced gets no new values (it is named in the summary), and a population with more
than ``max_unreproduced`` of them is refused. The merged
summary is the base summary's rows with the new values added and every τ statistic recomputed
(:func:`~quotientsharp.studies.transformer_run.summarize_rows`), so the paired Δτ of a new
measure uses the base rows' values of its partner.

    python experiments/extend_study.py benchmarks/results/vit_study_summary.json \\
        --out benchmarks/results/scratch/vit --measures geodesic_mix_rel geodesic_mix_rel_avg
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .report import tau_table, write_json_atomic, write_models_csv, write_text_atomic
from .runner import Executor, sequential
from .transformer_measures import MEASURES, unit_writes
from .transformer_run import run_study, summarize_rows

__all__ = ["extension_config", "merge_summaries", "extend_study"]

ROW_CHECKS = ("train_acc", "test_acc")
"""Training metrics a retrained model must reproduce exactly."""


def _measured_names(summary: Mapping[str, Any]) -> list[str]:
    return list(summary["config"]["plan"]["measures"])


def extension_config(base: Mapping[str, Any], measures: Sequence[str], check: Sequence[str] = ("adaptive",)) -> dict:
    """The study configuration that retrains ``base``'s population and measures ``check`` (units
    the base summary holds, to prove the retrained models are the same) and the new ``measures``
    (units it lacks); everything else (data, architecture, subset, plan settings, seeds) is the
    base's."""
    have = _measured_names(base)
    unknown = [m for m in [*measures, *check] if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measures {unknown}; known: {list(MEASURES)}")
    if not measures:
        raise ValueError("no measures to add")
    again = [m for m in measures if m in have]
    if again:
        raise ValueError(f"the base summary already holds {again}; extend it with measures it lacks")
    if not check:
        raise ValueError("check must name at least one measure of the base summary (the proof that the "
                         "retrained models are the summarised ones)")
    absent = [m for m in check if m not in have]
    if absent:
        raise ValueError(f"check measures {absent} are not in the base summary (it holds {have})")
    config = copy.deepcopy(dict(base["config"]))
    config["plan"]["measures"] = list(dict.fromkeys([*check, *measures]))
    return config


def _same_config(base: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    strip = lambda c: {**c, "plan": {k: v for k, v in c["plan"].items() if k != "measures"}}  # noqa: E731
    a, b = strip(base["config"]), strip(extra["config"])
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        raise ValueError(f"the extension was run with another study configuration ({', '.join(differ)} differ)")


def merge_summaries(base: Mapping[str, Any], extra: Mapping[str, Any], rtol: float = 1e-4,
                    max_unreproduced: float = 0.1) -> dict:
    """``base`` with ``extra``'s new measures added, after checking that ``extra`` retrained the
    same models.

    Structure must match exactly: the configuration but for the measure list, and the model ids.
    Then per model: the same train and test accuracy, and every check measure equal to ``rtol``
    (a value missing in one summary must be missing in the other). A model that fails is *not
    reproduced* (float32 training can drift on other hardware): its new measures are left out (the
    summary lists it under ``"missing"``, so their τ and paired Δτ run over the other models) and
    ``"extension"["not_reproduced"]`` says why. More than ``max_unreproduced`` of the population
    not reproduced raises ``ValueError`` naming the first: that is another population. The
    ``"extension"`` entry also names the added measures and the largest relative difference per
    check measure over the reproduced models."""
    _same_config(base, extra)
    ids = [r["id"] for r in base["models"]]
    if [r["id"] for r in extra["models"]] != ids:
        raise ValueError("the extension measured other models than the base summary "
                         f"({len(extra['models'])} vs {len(ids)} models, or another order)")
    base_names, extra_names = _measured_names(base), _measured_names(extra)
    check = [m for m in extra_names if m in base_names]
    new = [m for m in extra_names if m not in base_names]
    if not check:
        raise ValueError("the extension shares no measure with the base summary: nothing proves its models are the same")
    rows, worst, unreproduced = [], dict.fromkeys(check, 0.0), {}
    for b, e in zip(base["models"], extra["models"], strict=True):
        reason, differences = _reproduction(b, e, check, rtol)
        if reason:
            unreproduced[b["id"]] = reason
            rows.append(dict(b))
            continue
        for unit, d in differences.items():
            worst[unit] = max(worst[unit], d)
        added = {k: v for k, v in e["values"].items() if k not in b["values"] and not _belongs(k, check)}
        rows.append({**b, "values": {**b["values"], **added}})
    if len(unreproduced) > max_unreproduced * len(ids):
        first = next(iter(unreproduced.items()))
        raise ValueError(f"{len(unreproduced)} of {len(ids)} models were not reproduced (more than "
                         f"{max_unreproduced:.0%}): the retrained models are not the summarised population; "
                         f"first: model {first[0]}: {first[1]}")
    config = copy.deepcopy(dict(base["config"]))
    config["plan"]["measures"] = base_names + new
    seconds = {**base["seconds"]["measures"], **{m: extra["seconds"]["measures"][m] for m in new}}
    errors = {**base.get("errors", {}),
              **{k: v for k, v in extra.get("errors", {}).items() if k.split("/", 1)[1] in new}}
    chance = base.get("learned", {}).get("chance_acc")
    summary = summarize_rows(config, rows, seconds, errors, chance)
    return summary | {"extension": {"measures": new, "check_max_rel_diff": worst, "not_reproduced": unreproduced}}


def _reproduction(b: Mapping[str, Any], e: Mapping[str, Any], check: Sequence[str], rtol: float
                  ) -> tuple[str | None, dict[str, float]]:
    """Why the retrained row ``e`` is not the summarised row ``b`` (None if it is), and the
    relative difference per check measure."""
    for key in ROW_CHECKS:
        if b[key] != e[key]:
            return f"retrained {key} {e[key]} differs from the summarised {b[key]}", {}
    differences = {}
    for value in sorted({v for v in [*b["values"], *e["values"]] if _belongs(v, check)}):
        x, y = b["values"].get(value), e["values"].get(value)
        if (x is None) != (y is None):
            return f"{value} is {x} in the base summary but {y} in the extension", {}
        if x is None or (math.isnan(x) and math.isnan(y)):
            continue
        if not math.isclose(x, y, rel_tol=rtol, abs_tol=0.0):
            return f"{value} {y!r} differs from the summarised {x!r} (relative tolerance {rtol})", {}
        unit = next(m for m in check if _belongs(value, [m]))
        differences[unit] = max(differences.get(unit, 0.0), abs(x - y) / max(abs(x), 1e-300))
    return None, differences


def _belongs(value_name: str, measures: Sequence[str]) -> bool:
    """Whether ``value_name`` (a row value) comes from one of the unit ``measures``: the unit's own
    name, or one of the values a multi-valued unit writes (``hessian_slq`` → ``hessian_trace``…)."""
    return any(unit_writes(m, value_name) for m in measures)


def extend_study(base_path: str | Path, out: str | Path, measures: Sequence[str], check: Sequence[str] = ("adaptive",),
                 progress: bool = True, executor: Executor = sequential, rtol: float = 1e-4,
                 max_unreproduced: float = 0.1) -> dict:
    """Run :func:`extension_config` in ``out`` (resumable like every study), merge it into the
    summary at ``base_path`` (:func:`merge_summaries`) and write the merged ``summary.json``,
    ``models.csv`` and ``tau_table.md`` to ``out/merged``; returns the merged summary."""
    import json

    base = json.loads(Path(base_path).read_text())
    extra = run_study(out, extension_config(base, measures, check), progress=progress, executor=executor)
    merged = merge_summaries(base, extra, rtol, max_unreproduced)
    merged["extension"]["base"] = str(base_path)
    target = Path(out) / "merged"
    write_json_atomic(target / "summary.json", merged)
    write_models_csv(target / "models.csv", merged)
    write_text_atomic(target / "tau_table.md", tau_table(merged) + "\n")
    return merged

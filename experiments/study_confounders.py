"""Confounders of the transformer studies, computed from the committed per-model rows.

Reads ``benchmarks/results/{vit,text}_study_summary.json`` (its ``models`` list: hyperparameters,
gaps and measure ``values``) and writes ``benchmarks/results/{vit,text}_study_confounders.json``;
for the fine-tune populations with random hyperparameters, reads
``benchmarks/results/finetune/{vit,text_random}/summary.json`` and writes ``confounders.json``
beside it (``--finetune``; every drawn hyperparameter and the training accuracy, whole-network
measures only, no optimizer ranks: one optimizer):

- ``tau_vs_hyperparameter[hp][measure]``: Kendall τ-a (:func:`quotientsharp.studies.kendall.kendall_tau`,
  the statistic of the studies' tables) of each measure against ``lr`` and ``epochs`` (fine-tunes:
  :data:`FINETUNE_HYPERPARAMETERS`), with the 95%
  percentile bootstrap CI (:func:`~quotientsharp.studies.kendall.bootstrap_ci`, 2000 resamples, seed 0).
  Tied hyperparameter values (epochs take few values) count as 0 in τ-a, so τ-a is smaller in
  magnitude than scipy's τ-b there; τ-b is stored beside it (``tau_b_vs_hyperparameter``).
- ``gap_tau_vs_hyperparameter[hp][gap]``: the same for the error and loss gaps (against
  ``train_acc``: how well the fit alone ranks the gaps, a baseline for every measure).
- ``median_rank_by_optimizer[measure][optimizer]``: median over that optimizer's models of the
  model's rank by the measure (1 = smallest value = flattest, among all models of the study);
  ``flattest_two[measure]``: the two optimizers with the lowest median rank.

Deterministic: no training, no measuring; rerun it whenever a summary changes
(``python experiments/study_confounders.py``); ``tests/test_readme_numbers.py`` checks that the
committed files equal what this script computes from the committed summaries.
"""
from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau, rankdata

from quotientsharp.studies.kendall import bootstrap_ci, kendall_tau

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
HYPERPARAMETERS = ("lr", "epochs")
# What varies across a random-hyperparameter fine-tune population, and how far each model fit.
FINETUNE_HYPERPARAMETERS = {"vit": ("lr", "epochs", "weight_decay", "label_smoothing", "mixup", "train_acc"),
                            "text_random": ("lr", "epochs", "weight_decay", "label_smoothing", "train_acc")}
GAPS = ("error_gap", "loss_gap")


def _tau_entry(x: Sequence[float], y: Sequence[float], n_boot: int, seed: int) -> dict:
    """τ-a, its bootstrap CI and scipy's τ-b of ``x`` against ``y`` (ties allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ties in y are expected (epochs)
        tau_a = kendall_tau(x, y)
    return {"tau_a": tau_a, "ci95": list(bootstrap_ci(x, y, n_boot, seed=seed)),
            "tau_b": float(kendalltau(x, y).statistic)}


def confounders(rows: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0,
                hyperparameters: Sequence[str] = HYPERPARAMETERS, per_layer: bool = True) -> dict:
    """τ-a of every measure and gap against each hyperparameter, and per-optimizer median ranks.

    ``rows``: the summary's ``models`` (each with the ``hyperparameters``, the gaps, ``values`` and,
    for the ranks, ``optimizer``); a measure without a finite value on every model is left out
    (named in ``skipped``), and so are the per-layer ones (``name@layer``) unless ``per_layer``.
    """
    if len(rows) < 2:
        raise ValueError(f"confounders need at least two models, got {len(rows)}")
    names = [n for n in dict.fromkeys(n for row in rows for n in row["values"]) if per_layer or "@" not in n]
    complete = [n for n in names if all(r["values"].get(n) is not None and np.isfinite(r["values"][n])
                                        for r in rows)]
    out: dict[str, Any] = {"n_models": len(rows), "statistic": "Kendall tau-a (ties count 0), as in the tau tables",
                           "skipped": [n for n in names if n not in complete]}
    out["tau_vs_hyperparameter"] = {
        hp: {n: _tau_entry([r["values"][n] for r in rows], [r[hp] for r in rows], n_boot, seed) for n in complete}
        for hp in hyperparameters}
    out["gap_tau_vs_hyperparameter"] = {
        hp: {g: _tau_entry([r[g] for r in rows], [r[hp] for r in rows], n_boot, seed) for g in GAPS}
        for hp in hyperparameters}
    if not all("optimizer" in r for r in rows):
        return out
    optimizers = sorted({r["optimizer"] for r in rows})
    out["n_by_optimizer"] = {o: sum(r["optimizer"] == o for r in rows) for o in optimizers}
    ranks_by_measure = {}
    for n in complete:
        rank = rankdata([r["values"][n] for r in rows])  # 1 = flattest; ties get their mean rank
        ranks_by_measure[n] = {o: float(np.median([rank[i] for i, r in enumerate(rows) if r["optimizer"] == o]))
                               for o in optimizers}
    out["median_rank_by_optimizer"] = ranks_by_measure
    out["flattest_two"] = {n: sorted(med, key=lambda o: (med[o], o))[:2] for n, med in ranks_by_measure.items()}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["vit", "text"])
    parser.add_argument("--finetune", nargs="*", default=list(FINETUNE_HYPERPARAMETERS),
                        choices=list(FINETUNE_HYPERPARAMETERS), help="fine-tune populations under finetune/")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name in args.finetune:
        source = args.results / "finetune" / name / "summary.json"
        rows = json.loads(source.read_text())["models"]
        result = {"source": f"benchmarks/results/finetune/{name}/summary.json",
                  **confounders(rows, hyperparameters=FINETUNE_HYPERPARAMETERS[name], per_layer=False)}
        target = source.with_name("confounders.json")
        target.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {target}")
    for task in args.tasks:
        source = args.results / f"{task}_study_summary.json"
        summary = json.loads(source.read_text())
        result = {"source": f"benchmarks/results/{source.name}", **confounders(summary["models"])}
        target = args.results / f"{task}_study_confounders.json"
        target.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {target}")


if __name__ == "__main__":
    main()

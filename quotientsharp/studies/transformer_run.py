"""Transformer studies, the run: the study configuration, :func:`run_study` (train, measure,
resume, write), the per-model rows and the summary with its τ statistics (written through
:mod:`quotientsharp.studies.report`).

Layout of the output folder (everything resumable through :mod:`quotientsharp.studies.runner`)::

    config.json                    the study configuration
    models/<id>.pt, <id>.json      trained state dict; training record (history, train/test metrics)
    measures/<id>/<measure>.json   one file per (model, measure), written as soon as it is done
    summary.json, models.csv       τ table and per-model values, rebuilt from the stored units
    tau_table.md                   the τ table (:func:`~quotientsharp.studies.report.tau_table`)
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..curvature.layerwise import parse_value_name, select_layer_alpha
from .report import tau_block, tau_table, write_json_atomic, write_models_csv, write_text_atomic
from .runner import Executor, UnitStore, run_units, sequential
from .transformer_measures import default_measures, measure_unit, unit_settings
from .transformer_population import DEFAULT_DATASET, TASKS, population
from .transformer_training import FROM_SCRATCH, Recipe, majority_rate, save_state_dict, sharpness_batches

GAPS = {"error_gap": "test error − train error", "loss_gap": "test loss − train loss"}
PAPER_ANCHORS = {
    "ImageNet ViT": {"adaptive": -0.41, "geodesic_inv": -0.71, "geodesic_mix": -0.70},
    "MNLI BERT": {"adaptive": 0.06, "geodesic_inv": 0.28, "geodesic_mix": 0.38},
    "Rényi paper (ResNet-18/CIFAR-10)": {"renyi_0.5": 0.77, "renyi_1.5": 0.77, "hessian_trace": -0.05},
}
"""τ published for the closest settings (spec part 2 §6; Rényi: best layer, against the loss gap)."""
COMPARISONS = [("geodesic_inv", "adaptive"), ("geodesic_mix", "adaptive"), ("geodesic_mix_rel", "adaptive"),
               ("geodesic_inv_avg", "adaptive_avg"), ("geodesic_mix_avg", "adaptive_avg"),
               ("geodesic_mix_rel_avg", "adaptive_avg")]
"""Measure pairs whose τ difference gets a paired bootstrap CI (does the quotient help?)."""
TASK_ANCHORS = {"vit": ("ImageNet ViT", "Rényi paper (ResNet-18/CIFAR-10)"),
                "text": ("MNLI BERT", "Rényi paper (ResNet-18/CIFAR-10)")}
"""The anchors each study is compared with."""


# --------------------------------------------------------------------------- configuration
def study_config(task: str, *, quick: bool = False, n_models: int | None = None, dataset: str | None = None,
                 seed: int = 0, **plan_overrides) -> dict:
    """The full, JSON-ready study configuration.

    Full: the task's dataset (Fashion-MNIST 10k subset / tweets 3-way), width 64, 2 layers,
    4 heads, 24 models, 4 measurement batches of 64. ``quick``: digits (vit) or a 4k/1k tweet
    split (text), 4 models of 30 or 60 epochs (vit: 1–4 left digits at chance, 12 left the ASAM
    and GeodesicSAM models near 22%) or 1–4 (text), 2 batches of 32 and cheap solver settings. The average
    case draws ``n_samples`` antithetic pairs ±ξ (the first-order term cancels; at ρ = 0.01 it
    would otherwise swamp the second-order increase).
    ``plan_overrides`` replace entries of the measurement plan (``rho``, ``slq_probes``, ...).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    dataset = dataset or ("digits" if quick and task == "vit" else DEFAULT_DATASET[task])
    data_kwargs = {"n_train": 4000, "n_test": 1000} if quick and dataset == "tweets" else {}
    plan = {"rho": 0.1, "rho_average": 0.01, "n_iter": 20, "n_samples": 10, "antithetic": True,
            "lanczos_tol": 1e-3, "slq_m": 15, "slq_probes": 8, "alphas": [0.5, 1.5]}
    if quick:
        plan.update(n_iter=5, n_samples=4, slq_m=8, slq_probes=2)
    plan.update(plan_overrides)
    plan.setdefault("measures", default_measures())
    return {"task": task,
            "data": {"name": dataset, "kwargs": data_kwargs},
            "arch": {"d_model": 64, "depth": 2, "n_heads": 4, "mlp_dim": 128},
            "models": population(task, n_models or (4 if quick else 24), seed,
                                 epochs=([30, 60] if task == "vit" else [1, 2, 4]) if quick else None),
            "subset": {"n_batches": 2 if quick else 4, "batch_size": 32 if quick else 64, "seed": seed},
            "plan": plan, "seed": seed, "n_boot": 2000}


def run_study(out: str | Path, config: Mapping[str, Any], progress: bool = True,
              executor: Executor = sequential, recipe: Recipe = FROM_SCRATCH) -> dict:
    """Train what is not trained, measure what is not measured, write and return the summary.

    Model-major: each model is trained and then measured before the next one starts, so a run
    stopped early leaves complete rows for a prefix of the population, and a rerun with a
    smaller ``n_models`` (populations are prefix-stable) summarises them without new work.
    ``executor`` runs the per-model work (:class:`~quotientsharp.studies.parallel.RayExecutor`:
    one Ray task per model, writing its units itself, so ``out`` must be visible to every node).
    ``recipe``: where data and models come from (:data:`~quotientsharp.studies.transformer_training.FROM_SCRATCH`, or the fine-tune
    populations of :mod:`quotientsharp.studies.finetune`). A model whose state dict is missing
    while some of its measures are not (results copied without the ``.pt`` files) is retrained
    from its seed, and must reproduce its stored train/test metrics.
    """
    out = Path(out)
    write_json_atomic(out / "config.json", config)
    data = recipe.data(config)
    task, arch = config["task"], config["arch"]
    batches = sharpness_batches(data, **config["subset"])
    settings = {k: v for k, v in config["plan"].items() if k != "measures"}
    train_store, measure_store = UnitStore(out / "models"), UnitStore(out / "measures")
    (out / "models").mkdir(parents=True, exist_ok=True)

    def model_work(hp: Mapping[str, Any]) -> tuple[dict, dict]:
        """Train (unless stored), then measure one model; returns its train and measure records."""
        model_path = out / "models" / f"{hp['id']}.pt"
        model: list[nn.Module] = []

        def train(key: str, unit: Mapping[str, Any]) -> dict:
            trained_model, record = recipe.train(config, data, unit["model"])
            save_state_dict(trained_model, model_path)
            return record

        def measure(key: str, unit: Mapping[str, Any]) -> dict:
            if not model and not model_path.exists():
                retrained, record = recipe.train(config, data, hp)
                stored = train_store.load(hp["id"])
                if any(record[k] != stored[k] for k in ("train_acc", "test_acc")):
                    raise ValueError(f"{model_path} is missing and retraining {hp['id']} from its seed gave "
                                     f"other metrics (train/test acc {record['train_acc']}/{record['test_acc']}, "
                                     f"stored {stored['train_acc']}/{stored['test_acc']}); delete "
                                     f"{train_store.path(hp['id'])} to retrain and remeasure it")
                save_state_dict(retrained, model_path)
            if not model:
                model.append(recipe.load(config, data, hp, model_path))
            return measure_unit(unit["measure"], model[0], batches, settings, config["seed"] * 1000 + hp["index"])

        train_unit = {hp["id"]: {"model": hp, "data": config["data"], "arch": arch}}
        trained = run_units(train_store, train_unit, train, progress=False)
        units = {f"{hp['id']}/{name}": {"model": hp["id"], "measure": name, "subset": config["subset"],
                                        "plan": unit_settings(settings, name), "hparams": hp}
                 for name in config["plan"]["measures"]}
        return trained, run_units(measure_store, units, measure, progress=False)

    trained, measured = {}, {}
    with tqdm(total=len(config["models"]), desc=f"{task} models", disable=not progress) as bar:
        def done(args: tuple, records: tuple[dict, dict]) -> None:
            trained.update(records[0])
            measured.update(records[1])
            bar.update()

        executor(model_work, [(hp,) for hp in config["models"]], done)
    summary = summarize(config, trained, measured, chance_acc=majority_rate(data))
    write_json_atomic(out / "summary.json", summary)
    write_models_csv(out / "models.csv", summary)
    write_text_atomic(out / "tau_table.md", tau_table(summary) + "\n")
    return summary


# --------------------------------------------------------------------------- summary
def model_rows(config: Mapping[str, Any], trained: Mapping[str, dict], measured: Mapping[str, dict]) -> list[dict]:
    """One row per model: hyperparameters, train/test metrics, gaps and every measured value."""
    rows = []
    for hp in config["models"]:
        record = trained[hp["id"]]
        values = {}
        for name in config["plan"]["measures"]:
            values.update(measured[f"{hp['id']}/{name}"]["values"])
        rows.append({**{k: v for k, v in hp.items() if k != "index"},
                     **{k: record[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "error_gap",
                                               "loss_gap")},
                     "train_seconds": record["history"]["wall_time"], "values": values})
    return rows


def summarize(config: Mapping[str, Any], trained: Mapping[str, dict], measured: Mapping[str, dict],
              chance_acc: float | None = None) -> dict:
    """Kendall τ-a and 95% bootstrap CI of every measure against both gaps, per-model rows, timing.

    ``chance_acc`` (the majority-class rate of the training set): models whose training accuracy
    does not exceed it by one point never learned (they predict one class, gap ≈ 0, sharpness ≈ 0)
    and would count as concordant pairs for any measure, so ``"learned"`` repeats the τ block
    over the other models (and lists the ``excluded`` ones).
    """
    rows = model_rows(config, trained, measured)
    seconds = {name: sum(measured[f"{row['id']}/{name}"]["seconds"] for row in rows)
               for name in config["plan"]["measures"]}
    errors = {key: measured[key]["error"] for key in (f"{row['id']}/{name}" for row in rows
                                                      for name in config["plan"]["measures"])
              if "error" in measured[key]}
    return summarize_rows(config, rows, seconds, errors, chance_acc)


def summarize_rows(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], measure_seconds: Mapping[str, float],
                   errors: Mapping[str, str], chance_acc: float | None = None) -> dict:
    """The summary of :func:`summarize` from per-model rows (:func:`model_rows`), the seconds
    spent per measure and the stored errors (``{"<id>/<measure>": message}``)."""
    summary = {"task": config["task"], "dataset": config["data"]["name"], "gaps": GAPS,
               **tau_block(rows, config["n_boot"], config["seed"], GAPS, COMPARISONS),
               "paper": {k: PAPER_ANCHORS[k] for k in TASK_ANCHORS[config["task"]]},
               "population": {gap: [min(r[gap] for r in rows), max(r[gap] for r in rows)] for gap in GAPS}
               | {"test_acc": [min(r["test_acc"] for r in rows), max(r["test_acc"] for r in rows)]},
               "seconds": {"train": sum(r["train_seconds"] for r in rows), "measures": dict(measure_seconds)},
               "errors": dict(errors)}
    if chance_acc is not None:
        learned = [r for r in rows if r["train_acc"] > chance_acc + 0.01]
        summary["learned"] = {"chance_acc": chance_acc,
                              "excluded": [r["id"] for r in rows if r not in learned],
                              **tau_block(learned, config["n_boot"], config["seed"], GAPS, COMPARISONS)}
    selection = layer_renyi_selection(rows, config["n_boot"], config["seed"])
    if selection:  # per-layer Rényi: layer and α chosen on half the models, τ on the other half
        summary["layer_renyi_selection"] = selection
    return summary | {"models": rows, "config": dict(config)}


def layer_renyi_selection(rows: Sequence[Mapping[str, Any]], n_boot: int, seed: int) -> dict:
    """Per gap: the layer and α of per-layer Rényi sharpness chosen on a seeded half of the models
    and its τ on the other half (:func:`~quotientsharp.curvature.layerwise.select_layer_alpha`);
    ``{}`` without per-layer values or with fewer than 4 models."""
    if len(rows) < 4 or not any(parse_value_name(n) for row in rows for n in row["values"]):
        return {}
    values = {row["id"]: row["values"] for row in rows}
    return {gap: select_layer_alpha(values, {row["id"]: row[gap] for row in rows}, seed=seed, n_boot=n_boot)
            for gap in GAPS}


def require_learned(summary: Mapping[str, Any]) -> None:
    """Exit with an error naming them if some models never learned (quick runs must learn)."""
    excluded = summary.get("learned", {}).get("excluded")
    if excluded:
        import sys
        sys.exit(f"error: {len(excluded)} of {summary['n_models']} models did not learn ({', '.join(excluded)}): "
                 "this run cannot test anything")


def read_summary(out: str | Path) -> dict:
    """``<out>/summary.json`` of a finished study."""
    return json.loads((Path(out) / "summary.json").read_text())

"""Transformer studies (issue #7): does sharpness rank-correlate with generalization in small
ViTs and text transformers trained from scratch?

A deterministic population of models with varied hyperparameters (:func:`population`) is trained
with :func:`quotientsharp.train.train_classifier`; every model is then measured on one fixed,
non-augmented training subset shared by the whole population (:func:`sharpness_batches`), in eval
mode, through the library's public measures (:data:`MEASURES`). Kendall τ-a of each measure
against the generalization gap (test error − train error, and test loss − train loss) with a
bootstrap 95% CI summarises the study; scipy's τ-b is stored beside it (they differ only on ties).

Layout of the output folder (everything resumable through :mod:`quotientsharp.studies.runner`)::

    config.json                    the study configuration
    models/<id>.pt, <id>.json      trained state dict; training record (history, train/test metrics)
    measures/<id>/<measure>.json   one file per (model, measure), written as soon as it is done
    summary.json, models.csv       τ table and per-model values, rebuilt from the stored units
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..curvature import hessian_max_eigenvalue, hessian_slq, quotient_renyi_sharpness, renyi_entropy
from ..curvature.layerwise import layerwise_renyi, parse_value_name, select_layer_alpha
from ..data import ClassificationData, get_dataset
from ..data.text import UNK_ID
from ..measures import adaptive_sharpness, euclidean_sharpness, geodesic_sharpness
from ..models import TextTransformer, TinyViT
from ..train import evaluate, train_classifier
from .report import (  # noqa: F401 (re-exported: finetune, tests)
    not_learned_notice,
    tau_block,
    tau_cell,
    tau_table,
    write_json_atomic,
    write_models_csv,
    write_text_atomic,
)
from .runner import Executor, UnitStore, run_units, sequential

TASKS = ("vit", "text")
DEFAULT_DATASET = {"vit": "fashion_mnist", "text": "tweets"}
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


# --------------------------------------------------------------------------- population
STUDY_EPS_REL = 1e-6
"""Gram relaxation of the studies' GL quotients: the library default until issue 15 (now 0, exact),
kept so that the committed results reproduce."""
OPTIMIZERS = ["adamw", "adamw", "sgd", "sam", "asam", "rsam", "saf", "mesa", "geodesic_sam"]
"""Optimizers of the population (AdamW drawn twice as often); the SAM family has an AdamW base."""


SEARCH_SPACE = {
    "vit": {"lr_adamw": [3e-4, 1e-3, 3e-3], "lr_sgd": [0.03, 0.1], "weight_decay": [0.0, 0.01, 0.1, 0.5],
            "weight_decay_sgd": [0.0, 1e-4, 1e-3, 5e-3],
            "batch_size": [64, 128, 256], "epochs": [2, 4, 8, 16], "label_smoothing": [0.0, 0.1],
            "augment": [None, "shift"], "dropout": [0.0, 0.1]},
    "text": {"lr_adamw": [3e-4, 1e-3, 3e-3], "lr_sgd": [0.03, 0.1], "weight_decay": [0.0, 0.01, 0.1, 0.5],
             "weight_decay_sgd": [0.0, 1e-4, 1e-3, 5e-3],
             "batch_size": [64, 128, 256], "epochs": [1, 2, 4], "label_smoothing": [0.0, 0.1],
             "augment": [None, "word_dropout"], "dropout": [0.0, 0.1]},
}
"""Hyperparameter choices per task; every model draws each one independently. Weight decay is
AdamW's decoupled coefficient (per-step shrinkage lr·wd ≤ 1.5e-3); plain SGD couples it to the
gradient with a 30–300× larger lr, so it draws from ``weight_decay_sgd`` (lr·wd ≤ 5e-4): with
the AdamW grid, lr·wd = 0.05 decays every weight to ~1e-30 within a few hundred steps."""


def population(task: str, n_models: int, seed: int = 0, epochs: Sequence[int] | None = None) -> list[dict]:
    """``n_models`` hyperparameter sets drawn from :data:`SEARCH_SPACE` with ``seed``.

    Model i's draw depends only on ``(seed, i)``, so a larger population extends a smaller one.
    ``epochs`` overrides the task's epoch choices (quick runs).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    space = dict(SEARCH_SPACE[task], **({"epochs": list(epochs)} if epochs is not None else {}))
    optimizers = OPTIMIZERS
    models = []
    for i in range(n_models):
        rng = np.random.default_rng([seed, i])
        pick = lambda key: space[key][int(rng.integers(len(space[key])))]  # noqa: E731
        optimizer = optimizers[int(rng.integers(len(optimizers)))]
        sgd = optimizer == "sgd"
        lr = pick("lr_sgd") if sgd else pick("lr_adamw")
        models.append({"id": f"{task}{i:03d}", "index": i, "optimizer": optimizer, "lr": lr,
                       "weight_decay": pick("weight_decay_sgd" if sgd else "weight_decay"),
                       **{k: pick(k) for k in ("batch_size", "epochs", "label_smoothing", "augment", "dropout")},
                       "init_seed": seed * 100_003 + i})
    return models


# --------------------------------------------------------------------------- data and models
def load_data(spec: Mapping[str, Any]) -> ClassificationData:
    """``get_dataset(spec["name"], **spec["kwargs"])``; a missing source raises
    :class:`~quotientsharp.data.DatasetUnavailableError` naming its install command."""
    return get_dataset(spec["name"], **spec.get("kwargs", {}))


def build_model(task: str, arch: Mapping[str, Any], data: ClassificationData, dropout: float) -> nn.Module:
    """TinyViT (16 patches + CLS) or TextTransformer sized for ``data``."""
    inputs = data.train.tensors[0]
    if task == "vit":
        side = inputs.shape[-1]
        return TinyViT(image_size=side, patch_size=side // 4, in_channels=inputs.shape[1],
                       n_classes=data.n_classes, dropout=dropout, **arch)
    return TextTransformer(vocab_size=len(data.vocab), n_classes=data.n_classes, max_len=inputs.shape[1],
                           dropout=dropout, **arch)


def word_dropout(tokens: torch.Tensor, generator: torch.Generator, p: float = 0.1) -> torch.Tensor:
    """Replace each non-padding token by the unknown id with probability ``p`` (text augmentation)."""
    drop = (torch.rand(tokens.shape, generator=generator) < p).to(tokens.device) & (tokens != 0)
    return torch.where(drop, torch.full_like(tokens, UNK_ID), tokens)


def optimizer_factory(hp: Mapping[str, Any], model: nn.Module, data: ClassificationData) -> Callable | None:
    """A factory for the SAM-family optimizers (AdamW base) of ``model``; None for the built-in
    AdamW/SGD. ``model`` gives ASAM its parameter names (it adapts only ``weight`` tensors) and
    GeodesicSAM its symmetries. Short runs set the schedules: no RSAM warm-up, SAF's KL from the
    second epoch on (lag Ẽ = 1) and MESA's from the second epoch with a one-epoch EMA horizon, so
    SAF and MESA act only in runs of two or more epochs."""
    if hp["optimizer"] in ("adamw", "sgd"):
        return None
    from .. import optim

    adamw = torch.optim.AdamW
    base = dict(lr=hp["lr"], weight_decay=hp["weight_decay"])
    if hp["optimizer"] == "sam":
        return lambda params: optim.SAM(params, adamw, rho=0.05, model=model, **base)
    if hp["optimizer"] == "asam":
        return lambda params: optim.ASAM(params, adamw, rho=0.5, model=model, **base)
    if hp["optimizer"] == "rsam":  # warmup_epochs=-1: perturb from the first step
        return lambda params: optim.RSAM(params, adamw, warmup_epochs=-1, model=model, **base)
    if hp["optimizer"] == "geodesic_sam":
        return lambda params: optim.GeodesicSAM(params, adamw, rho=0.01, metric="mix", model=model,
                                                       eps_rel=STUDY_EPS_REL, **base)
    smoothing = dict(label_smoothing=hp["label_smoothing"], start_epoch=0)
    if hp["optimizer"] == "saf":
        n = len(data.train)
        return lambda params: optim.SAF(params, adamw, num_samples=n, num_classes=data.n_classes, lag_epochs=1,
                                        **smoothing, **base)
    if hp["optimizer"] == "mesa":
        steps = math.ceil(len(data.train) / hp["batch_size"])
        return lambda params: optim.MESA(params, adamw, model=model, ema_horizon_epochs=1.0, steps_per_epoch=steps,
                                         **smoothing, **base)
    raise ValueError(f"unknown optimizer {hp['optimizer']!r}")


def train_model(task: str, arch: Mapping[str, Any], data: ClassificationData, hp: Mapping[str, Any]) -> tuple[nn.Module, dict]:
    """Train one population member; returns the model and its record (history, metrics, gaps)."""
    torch.manual_seed(hp["init_seed"])
    model = build_model(task, arch, data, hp["dropout"])
    augment = word_dropout if hp["augment"] == "word_dropout" else hp["augment"]
    optimizer = "sgd" if hp["optimizer"] == "sgd" else "adamw"
    history = train_classifier(model, data.train, epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
                               weight_decay=hp["weight_decay"], optimizer=optimizer,
                               label_smoothing=hp["label_smoothing"], augment=augment, seed=hp["init_seed"],
                               progress=False, optimizer_factory=optimizer_factory(hp, model, data))
    return model, trained_record(model, data, history)


def trained_record(model: nn.Module, data: ClassificationData, history: Mapping[str, Any]) -> dict:
    """A trained model's record: its training ``history``, train/test loss and accuracy (eval mode,
    no augmentation), both gaps and the parameter count."""
    train, test = evaluate(model, data.train), evaluate(model, data.test)
    return {"history": dict(history), "train_loss": train["loss"], "train_acc": train["acc"],
            "test_loss": test["loss"], "test_acc": test["acc"],
            "error_gap": (1 - test["acc"]) - (1 - train["acc"]), "loss_gap": test["loss"] - train["loss"],
            "n_params": sum(p.numel() for p in model.parameters())}


def majority_rate(data: ClassificationData) -> float:
    """The training accuracy of always predicting the most frequent training class."""
    labels = data.train.tensors[1]
    return float(torch.bincount(labels).max()) / len(labels)


def sharpness_batches(data: ClassificationData, n_batches: int, batch_size: int, seed: int) -> list[tuple]:
    """The fixed measurement subset: ``n_batches`` batches of ``batch_size`` training examples,
    drawn once with ``seed``, without augmentation; the same for every model."""
    inputs, labels = data.train.tensors
    n = n_batches * batch_size
    if n > len(labels):
        raise ValueError(f"{n_batches}×{batch_size} examples requested, the training set has {len(labels)}")
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return [(inputs[chunk], labels[chunk]) for chunk in idx.split(batch_size)]


# --------------------------------------------------------------------------- measures
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
    """Rényi sharpness of every weight tensor's Hessian block (one SLQ run per layer, the study's
    m, probes and α): values ``layer_renyi_<alpha>@<layer>``."""
    r = layerwise_renyi(model, batches, F.cross_entropy, alphas=list(plan["alphas"]), m=plan["slq_m"],
                        n_probes=plan["slq_probes"], seed=seed)
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


OPT_IN_MEASURES = ("layer_renyi",)
"""Units run only when asked for (``--measures``): per-layer Rényi costs one SLQ run per weight
tensor, ~14× the full-Hessian SLQ on the 2-layer TinyViT."""


def default_measures() -> list[str]:
    """Every unit of :data:`MEASURES` but the :data:`OPT_IN_MEASURES`."""
    return [name for name in MEASURES if name not in OPT_IN_MEASURES]


def layer_renyi_selection(rows: Sequence[Mapping[str, Any]], n_boot: int, seed: int) -> dict:
    """Per gap: the layer and α of per-layer Rényi sharpness chosen on a seeded half of the models
    and its τ on the other half (:func:`~quotientsharp.curvature.layerwise.select_layer_alpha`);
    ``{}`` without per-layer values or with fewer than 4 models."""
    if len(rows) < 4 or not any(parse_value_name(n) for row in rows for n in row["values"]):
        return {}
    values = {row["id"]: row["values"] for row in rows}
    return {gap: select_layer_alpha(values, {row["id"]: row[gap] for row in rows}, seed=seed, n_boot=n_boot)
            for gap in GAPS}


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


# --------------------------------------------------------------------------- the study
def save_state_dict(model: nn.Module, path: Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace`` (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def load_trained(task: str, arch: Mapping[str, Any], data: ClassificationData, hp: Mapping[str, Any],
                 path: Path) -> nn.Module:
    """Rebuild a population member from its saved state dict, in eval mode."""
    model = build_model(task, arch, data, hp["dropout"])
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@dataclass(frozen=True)
class Recipe:
    """How :func:`run_study` gets a population's data and models: ``data(config)`` →
    ClassificationData; ``train(config, data, hp)`` → (model, :func:`trained_record`);
    ``load(config, data, hp, path)`` → the model saved at ``path``, in eval mode. Module-level
    functions, so that Ray can ship them."""

    data: Callable[[Mapping[str, Any]], ClassificationData]
    train: Callable[[Mapping[str, Any], ClassificationData, Mapping[str, Any]], tuple[nn.Module, dict]]
    load: Callable[[Mapping[str, Any], ClassificationData, Mapping[str, Any], Path], nn.Module]


def _scratch_data(config):
    return load_data(config["data"])


def _scratch_train(config, data, hp):
    return train_model(config["task"], config["arch"], data, hp)


def _scratch_load(config, data, hp, path):
    return load_trained(config["task"], config["arch"], data, hp, path)


FROM_SCRATCH = Recipe(_scratch_data, _scratch_train, _scratch_load)
"""The from-scratch populations of :func:`population` (looked up at call time, so patchable)."""


def run_study(out: str | Path, config: Mapping[str, Any], progress: bool = True,
              executor: Executor = sequential, recipe: Recipe = FROM_SCRATCH) -> dict:
    """Train what is not trained, measure what is not measured, write and return the summary.

    Model-major: each model is trained and then measured before the next one starts, so a run
    stopped early leaves complete rows for a prefix of the population, and a rerun with a
    smaller ``n_models`` (populations are prefix-stable) summarises them without new work.
    ``executor`` runs the per-model work (:class:`~quotientsharp.studies.parallel.RayExecutor`:
    one Ray task per model, writing its units itself, so ``out`` must be visible to every node).
    ``recipe``: where data and models come from (:data:`FROM_SCRATCH`, or the fine-tune
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
                                        "plan": settings, "hparams": hp} for name in config["plan"]["measures"]}
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
    summary = {"task": config["task"], "dataset": config["data"]["name"], "gaps": GAPS,
               **tau_block(rows, config["n_boot"], config["seed"], GAPS, COMPARISONS),
               "paper": {k: PAPER_ANCHORS[k] for k in TASK_ANCHORS[config["task"]]},
               "population": {gap: [min(r[gap] for r in rows), max(r[gap] for r in rows)] for gap in GAPS}
               | {"test_acc": [min(r["test_acc"] for r in rows), max(r["test_acc"] for r in rows)]},
               "seconds": {"train": sum(r["train_seconds"] for r in rows), "measures": seconds},
               "errors": {key: measured[key]["error"] for key in (f"{row['id']}/{name}" for row in rows
                                                                   for name in config["plan"]["measures"])
                          if "error" in measured[key]}}
    if chance_acc is not None:
        learned = [r for r in rows if r["train_acc"] > chance_acc + 0.01]
        summary["learned"] = {"chance_acc": chance_acc,
                              "excluded": [r["id"] for r in rows if r not in learned],
                              **tau_block(learned, config["n_boot"], config["seed"], GAPS, COMPARISONS)}
    selection = layer_renyi_selection(rows, config["n_boot"], config["seed"])
    if selection:  # per-layer Rényi: layer and α chosen on half the models, τ on the other half
        summary["layer_renyi_selection"] = selection
    return summary | {"models": rows, "config": dict(config)}


# --------------------------------------------------------------------------- command line
def main(task: str, argv: Sequence[str] | None = None, description: str = "") -> dict:
    """The shared command line of ``experiments/vit_study.py`` and ``experiments/text_study.py``."""
    import argparse
    import sys

    from ..data import DatasetUnavailableError
    from . import parallel

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="output folder (reused to resume)")
    parser.add_argument("--quick", action="store_true", help="tiny data, 4 models, cheap settings (minutes)")
    parser.add_argument("--n-models", type=int, help="population size (default 24; quick 4)")
    parser.add_argument("--dataset", help=f"dataset name (default {DEFAULT_DATASET[task]}; "
                                          f"{'digits' if task == 'vit' else 'tweets'} with --quick)")
    parser.add_argument("--rho", type=float, help="worst-case radius (default 0.1)")
    parser.add_argument("--rho-average", type=float, help="average-case radius (default 0.01)")
    parser.add_argument("--slq-probes", type=int, help="SLQ probes for Tr H and Rényi (default 8)")
    parser.add_argument("--measures", nargs="+", choices=list(MEASURES),
                        help=f"measurement units (default: all but {', '.join(OPT_IN_MEASURES)})")
    parser.add_argument("--seed", type=int, default=0, help="population, subset, solver and bootstrap seed")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true")
    parallel.add_arguments(parser)
    args = parser.parse_args(argv)
    executor = parallel.executor_from_args(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("rho", args.rho), ("rho_average", args.rho_average),
                                   ("slq_probes", args.slq_probes), ("measures", args.measures)) if v is not None}
    config = study_config(task, quick=args.quick, n_models=args.n_models, dataset=args.dataset, seed=args.seed,
                          **overrides)
    t0 = time.perf_counter()
    try:
        summary = run_study(args.out, config, progress=not args.no_progress, executor=executor)
    except DatasetUnavailableError as err:
        hint = "\n(the small offline fallback: --dataset digits)" if task == "vit" else ""
        sys.exit(f"error: {err}{hint}")
    print(f"\n{task} study on {summary['dataset']}: Kendall τ-a of sharpness vs generalization gap, "
          f"{summary['n_models']} models, 95% bootstrap CI\n")
    print(tau_table(summary))
    print(f"\nwall time {time.perf_counter() - t0:.1f} s; outputs in {args.out}")
    if args.quick:
        require_learned(summary)
    return summary


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

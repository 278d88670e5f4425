"""Transformer studies, builders and training: data, models, the SAM-family optimizer factory,
training records, the fixed measurement subset, state-dict saving, and :class:`Recipe` (where a
study's data and models come from; :data:`FROM_SCRATCH` for the populations of
:mod:`quotientsharp.studies.transformer_population`, the fine-tune recipes in :mod:`quotientsharp.studies.finetune`)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import ClassificationData, get_dataset
from ..data.text import UNK_ID
from ..models import TextTransformer, TinyViT
from ..train import evaluate, train_classifier
from .transformer_measures import STUDY_EPS_REL


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
    """How :func:`~quotientsharp.studies.transformer_run.run_study` gets a population's data and models: ``data(config)`` →
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
"""The from-scratch populations of :func:`~quotientsharp.studies.transformer_population.population` (looked up at call time, so patchable)."""

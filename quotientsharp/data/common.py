"""What every loader shares: the returned structure, stratified splits, locating installed data."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

SPLIT_SEED = 0


class DatasetUnavailableError(FileNotFoundError):
    """A data source is not installed; the message names the command that installs it."""

    def __init__(self, name: str, where: str, install: str):
        self.install = install
        super().__init__(f"{name} not found ({where}); install it with: {install}")


@dataclass
class ClassificationData:
    """A train/test pair of ``TensorDataset``s of ``(inputs, labels)``.

    ``meta`` is JSON-serialisable and records the source, split seed, sizes and class names, for
    run metadata. ``vocab`` is the :class:`~quotientsharp.data.text.Vocab` of text datasets
    (built on the training split), else None.
    """

    train: TensorDataset
    test: TensorDataset
    n_classes: int
    meta: dict[str, Any] = field(default_factory=dict)
    vocab: Any = None


def tensor_data(inputs: torch.Tensor, labels: np.ndarray | torch.Tensor) -> TensorDataset:
    return TensorDataset(inputs, torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes proportionally to ``counts`` (largest remainder); ≤ counts."""
    exact = counts * total / counts.sum()
    alloc = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - alloc), kind="stable")
    alloc[order[: total - alloc.sum()]] += 1
    return alloc


def stratified_split(
    labels: np.ndarray, n_train: int | None, n_test: int, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(train_idx, test_idx)``, disjoint and each stratified by label.

    The test set gets ``n_test`` indices; the training set ``n_train`` (None: all the rest).
    With ``n_train + n_test`` below the dataset size, a stratified subset of that size is split.
    Each index array is shuffled (classes interleaved); deterministic for a ``seed``.
    """
    labels = np.asarray(labels)
    n_total = len(labels)
    n_train = n_total - n_test if n_train is None else n_train
    if n_train < 0 or n_test < 0 or n_train + n_test > n_total:
        raise ValueError(f"cannot take {n_train} train + {n_test} test from {n_total} examples")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    kept = _allocate(counts, n_train + n_test)
    per_class = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, kept)]
    n_test_per_class = _allocate(kept, n_test)
    test = np.concatenate([idx[:k] for idx, k in zip(per_class, n_test_per_class)])
    train = np.concatenate([idx[k:] for idx, k in zip(per_class, n_test_per_class)])
    return rng.permutation(train), rng.permutation(test)


def package_dir(package: str, install: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(f"package {package!r}", "not installed", install)
    return Path(spec.submodule_search_locations[0])


def require_file(path: Path, name: str, install: str) -> Path:
    if not path.exists():
        raise DatasetUnavailableError(name, f"missing {path}", install)
    return path


def class_counts(dataset: TensorDataset, n_classes: int) -> list[int]:
    return torch.bincount(dataset.tensors[1], minlength=n_classes).tolist()

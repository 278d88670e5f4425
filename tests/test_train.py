"""The training loop: it learns, it is deterministic, and two-pass optimizers plug in."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from quotientsharp.data import blobs, load_digits_dataset
from quotientsharp.models import MLP, TinyViT
from quotientsharp.optim import MESA, RSAM, SAF
from quotientsharp.train import evaluate, random_flip, random_shift, train_classifier


@pytest.fixture(scope="module")
def digits_subset():
    x, y = load_digits_dataset().train.tensors
    return TensorDataset(x[:384], y[:384])


def run_vit(data, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TinyViT(depth=1, dropout=0.1)
    history = train_classifier(model, data, epochs=2, batch_size=32, lr=3e-3, seed=seed,
                               progress=False, **kwargs)
    return model, history


def test_vit_training_lowers_loss(digits_subset):
    torch.manual_seed(0)
    before = evaluate(TinyViT(depth=1, dropout=0.1), digits_subset)["loss"]
    model, history = run_vit(digits_subset)
    assert len(history["train_loss"]) == len(history["train_acc"]) == 2
    assert history["steps"] == 2 * 12 and history["wall_time"] > 0
    assert history["train_loss"][1] < history["train_loss"][0]
    after = evaluate(model, digits_subset)
    assert after["loss"] < before and 0.0 <= after["acc"] <= 1.0
    assert model.training  # evaluate restores the mode


def test_same_seed_same_history(digits_subset):
    _, first = run_vit(digits_subset, augment="shift", weight_decay=0.01)
    _, second = run_vit(digits_subset, augment="shift", weight_decay=0.01)
    _, other = run_vit(digits_subset, seed=1, augment="shift", weight_decay=0.01)
    assert first["train_loss"] == second["train_loss"]
    assert first["train_acc"] == second["train_acc"]
    assert first["train_loss"] != other["train_loss"]


def test_training_leaves_global_rng_untouched():
    data = blobs(n=32, d=4, n_classes=2, n_test=8, dtype=torch.float32)
    model = MLP([4, 2])
    state = torch.random.get_rng_state()
    train_classifier(model, data.train, epochs=1, batch_size=8, lr=0.1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


class TwoPassSGD(torch.optim.SGD):
    """Minimal SAM-shaped optimizer: evaluates the closure twice, steps with the second gradient."""

    def first_step(self):
        pass

    def step(self, closure):
        self.calls = getattr(self, "calls", 0)
        loss = closure()
        closure()
        self.calls += 2
        super().step()
        return loss


def test_optimizer_factory_with_two_pass_optimizer():
    data = blobs(n=64, d=4, n_classes=2, n_test=8, dtype=torch.float32)
    optimizers = []

    def factory(params):
        optimizers.append(TwoPassSGD(params, lr=0.1))
        return optimizers[0]

    torch.manual_seed(0)
    model = MLP([4, 8, 2])
    history = train_classifier(model, data.train, epochs=3, batch_size=16, lr=0.0,
                               optimizer_factory=factory, progress=False)
    assert optimizers[0].calls == 2 * history["steps"] == 2 * 12
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_sgd_and_label_smoothing_run():
    data = blobs(n=32, d=4, n_classes=2, n_test=8, dtype=torch.float32)
    torch.manual_seed(0)
    history = train_classifier(MLP([4, 2]), data.train, epochs=1, batch_size=8, lr=0.1,
                               optimizer="sgd", label_smoothing=0.1, progress=False)
    assert history["steps"] == 4
    # one full-batch step is plain SGD (the first momentum step is the gradient) on the smoothed loss
    X, y = data.train.tensors
    torch.manual_seed(0)
    model = MLP([4, 2])
    start = copy.deepcopy(model)
    history = train_classifier(model, data.train, epochs=1, batch_size=32, lr=0.1, optimizer="sgd",
                               label_smoothing=0.1, progress=False)
    smoothed = F.cross_entropy(start(X), y, label_smoothing=0.1)
    assert history["train_loss"][0] == pytest.approx(float(smoothed), rel=1e-6)
    assert abs(float(F.cross_entropy(start(X), y)) - float(smoothed)) > 1e-2  # smoothing changes the loss
    for p, p0, g in zip(model.parameters(), start.parameters(), torch.autograd.grad(smoothed, list(start.parameters()))):
        torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * g, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(MLP([4, 2]), data.train, epochs=1, batch_size=8, lr=0.1,
                         optimizer="lion", progress=False)


def test_augmentations():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 2, 5, 5)
    torch.testing.assert_close(random_shift(images, gen, max_shift=0), images)
    shifted = random_shift(images, gen)
    assert shifted.shape == images.shape
    for img, out in zip(images, shifted):  # each output is a ±1-pixel translation with zero fill
        padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
        crops = [padded[:, i:i + 5, j:j + 5] for i in range(3) for j in range(3)]
        assert any(torch.equal(out, c) for c in crops)
    flipped = random_flip(images, gen)
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for i, o in zip(images, flipped))


def test_two_pass_optimizer_is_told_the_epoch():
    """RSAM warms up for ``warmup_epochs`` epochs; train_classifier must advance its epoch."""
    opts = []

    def factory(params):
        opts.append(RSAM(params, torch.optim.SGD, lr=0.1, warmup_epochs=1))
        return opts[0]

    data = blobs(n=64, d=4, n_classes=2, n_test=8, dtype=torch.float32).train
    train_classifier(MLP([4, 8, 2]), data, epochs=3, batch_size=16, lr=0.1, progress=False,
                     optimizer_factory=factory)
    assert opts[0].stats["perturbed"] == 4  # epochs 0-1 are warm-up, epoch 2 has 4 steps


def _train_flat(data, factory, epochs):
    torch.manual_seed(0)
    model = MLP([4, 8, 2])
    opt = []
    train_classifier(model, data, epochs=epochs, batch_size=16, lr=0.0, seed=1, progress=False,
                     optimizer_factory=lambda params: opt.append(factory(params, model)) or opt[0])
    return model, opt[0], torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_saf_and_mesa_get_their_regularised_loss(method):
    """The KL term acts from the second epoch (start_epoch=0) and only through λ: λ = 0 or a
    single epoch reproduce plain SGD bit for bit, λ > 0 over two epochs does not."""
    data = blobs(n=64, d=4, n_classes=2, n_test=8, dtype=torch.float32).train

    def factory(lam):
        def make(params, model):
            if method == "saf":
                return SAF(params, torch.optim.SGD, num_samples=len(data), num_classes=2, lam=lam, lag_epochs=1,
                           start_epoch=0, lr=0.5)
            return MESA(params, torch.optim.SGD, model=model, lam=lam, decay=0.5, start_epoch=0, lr=0.5)
        return make

    sgd = lambda params, model: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    for epochs in (1, 2):
        plain = _train_flat(data, sgd, epochs)[2]
        torch.testing.assert_close(_train_flat(data, factory(0.0), epochs)[2], plain, rtol=0, atol=0)
        regularised = _train_flat(data, factory(5.0), epochs)[2]
        if epochs == 1:
            torch.testing.assert_close(regularised, plain, rtol=0, atol=0)
        else:
            assert (regularised - plain).abs().max() > 1e-4


def test_saf_memory_rows_belong_to_their_samples():
    """With lr = 0 the network is fixed, so SAF's memory row i must be the logits of sample i."""
    data = blobs(n=50, d=4, n_classes=2, n_test=8, dtype=torch.float32).train
    make = lambda params, model: SAF(params, torch.optim.SGD, num_samples=len(data), num_classes=2,  # noqa: E731
                                     lag_epochs=1, start_epoch=0, lr=0.0)
    model, opt, _ = _train_flat(data, make, epochs=2)
    with torch.no_grad():
        logits = model(data.tensors[0])
    for epoch in (0, 1):
        torch.testing.assert_close(opt.logit_memory[:, epoch % 2], logits)
    assert opt.stats["stale_rows"] == 0

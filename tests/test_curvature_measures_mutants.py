"""Survivors of the mutation run on quotientsharp/curvature/measures.py: parameter norms, the
Fisher–Rao norm, SAM/ASAM one-step sharpness, PAC-Bayes flatness and its accuracy helper.

Every reference here is computed outside the library: norms from the raw tensors, Fisher–Rao from
a Python loop of per-example ``torch.autograd.grad`` calls, SAM/ASAM from a loss typed in by hand
(``tanh`` two-layer net, explicit matrix products), the PAC-Bayes bisection re-run with the same
generator draws and a hand-written accuracy, the curvature operators and the spectral measures
against ``torch.autograd.functional.hessian`` / a hand-built GGN and ``eigvalsh``. Float64 unless
the dtype handling is the point.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import gen
from torch import nn

from quotientsharp.curvature import (
    asam_sharpness,
    curvature_operator,
    fisher_rao_norm,
    hessian_log_det,
    hessian_max_eigenvalue,
    hessian_shannon_entropy,
    hessian_slq,
    hessian_spectral_density,
    hessian_top_eigenvalues,
    hessian_trace,
    measures,
    pac_bayes_flatness,
    parameter_norm,
    renyi_sharpness,
    renyi_study_targets,
    sam_sharpness,
)

DT = torch.float64


class ModeNet(nn.Module):
    """x ↦ W2 tanh(c (W1 x + b1)) + b2 with c = 2 in train mode and 1 in eval mode, so that a
    result computed in the wrong mode is visibly different."""

    def __init__(self, d_in: int = 4, d_hidden: int = 5, d_out: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d_in, d_hidden)
        self.l2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        h = self.l1(x)
        return self.l2(torch.tanh(2 * h if self.training else h))


def mode_net(seed: int = 0, dtype=DT) -> ModeNet:
    return ModeNet(seed=seed).to(dtype)


def by_hand_loss(p: dict, X, y, train: bool = False) -> torch.Tensor:
    """The mean cross-entropy of :class:`ModeNet` written out with explicit products."""
    h = X @ p["l1.weight"].T + p["l1.bias"]
    logits = torch.tanh(2 * h if train else h) @ p["l2.weight"].T + p["l2.bias"]
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -logp[torch.arange(len(y)), y].mean()


def data(n: int, d: int = 4, n_classes: int = 3, seed: int = 1, zero_column: bool = False):
    g = gen(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    if zero_column:  # the gradient w.r.t. l1.weight[:, 0] is then exactly 0
        X[:, 0] = 0
    return X, torch.randint(0, n_classes, (n,), generator=g)


def detached(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- parameter_norm -----------------------------------------------------------------------------
def test_parameter_norm_by_hand_selection_and_config():
    model = mode_net()
    p = detached(model)

    def norm(names):
        return math.sqrt(math.fsum(float(v) ** 2 for n in names for v in p[n].reshape(-1).tolist()))

    everything = parameter_norm(model)
    assert everything.value == pytest.approx(norm(list(p)), rel=1e-14)
    assert everything.config == {"params": ["l1.weight", "l1.bias", "l2.weight", "l2.bias"],
                                 "include_vectors": True}
    assert everything.stderr is None and everything.samples is None
    matrices = parameter_norm(model, include_vectors=False)
    assert matrices.value == pytest.approx(norm(["l1.weight", "l2.weight"]), rel=1e-14)
    assert matrices.config == {"params": ["l1.weight", "l2.weight"], "include_vectors": False}
    second = parameter_norm(model, params="l2.*")
    assert second.value == pytest.approx(norm(["l2.weight", "l2.bias"]), rel=1e-14)
    assert second.config["params"] == ["l2.weight", "l2.bias"]
    only_w = parameter_norm(model, params=["l2.bias", "l2.weight"], include_vectors=False)
    assert only_w.value == pytest.approx(norm(["l2.weight"]), rel=1e-14)
    assert only_w.config == {"params": ["l2.weight"], "include_vectors": False}


def test_parameter_norm_accumulates_in_float64_for_half_weights():
    """300² overflows float16 (max 65504): the squares must be taken in float64."""
    model = nn.Linear(2, 2).half()
    with torch.no_grad():
        model.weight.fill_(300.0)
        model.bias.copy_(torch.tensor([1.5, -2.0]))
    result = parameter_norm(model)
    assert result.value == pytest.approx(math.sqrt(4 * 300.0**2 + 1.5**2 + 2.0**2), rel=1e-14)
    assert parameter_norm(model, include_vectors=False).value == pytest.approx(600.0, rel=1e-14)


# --- fisher_rao_norm ----------------------------------------------------------------------------
def per_example_fr(model: nn.Module, examples, names, loss_fn=F.cross_entropy, train: bool = False):
    """[(θᵀ∇ℓ_i)²] by one autograd.grad per example; ``examples`` yields (call, y_i) where
    ``call(model)`` evaluates the model on the single example (batch of one)."""
    named = dict(model.named_parameters())
    theta = [named[n] for n in names]
    model.train(train)
    out = []
    for call, y in examples:
        loss = loss_fn(call(model), y.reshape(1))
        grads = torch.autograd.grad(loss, theta)
        out.append(float(sum((g.double() * t.detach().double()).sum() for g, t in zip(grads, theta))) ** 2)
    model.eval()
    return torch.tensor(out, dtype=DT)


def tensor_examples(X, y):
    return [((lambda m, x=x: m(x[None])), t) for x, t in zip(X, y)]


@pytest.mark.parametrize("params, names", [
    ("all", ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]),
    (["l2.weight", "l1.bias"], ["l1.bias", "l2.weight"]),
])
def test_fisher_rao_empirical_is_the_mean_over_all_examples(params, names):
    """Two batches of sizes 3 and 8: the value is the mean over the 11 examples (not the mean of
    the two batch means), each sample the square for its example, in loader order."""
    model = mode_net()
    X, y = data(11)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    expected = per_example_fr(model, tensor_examples(X, y), names)
    result = fisher_rao_norm(model, batches, F.cross_entropy, params=params)
    torch.testing.assert_close(result.samples, expected, rtol=1e-10, atol=1e-14)
    assert result.value == pytest.approx(float(expected.mean()), rel=1e-10)
    assert result.config == {"params": names, "labels": "empirical", "seed": 0}
    assert result.stderr is None
    assert not model.training  # left as found


def test_fisher_rao_train_mode_switches_the_model_mode():
    model = mode_net()
    X, y = data(6)
    names = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]
    evaluated = per_example_fr(model, tensor_examples(X, y), names, train=False)
    trained = per_example_fr(model, tensor_examples(X, y), names, train=True)
    assert not torch.allclose(evaluated, trained)
    model.train()  # the default evaluates in eval mode whatever mode the model is in
    torch.testing.assert_close(fisher_rao_norm(model, [(X, y)], F.cross_entropy).samples, evaluated,
                               rtol=1e-10, atol=1e-14)
    assert model.training
    model.eval()
    torch.testing.assert_close(fisher_rao_norm(model, [(X, y)], F.cross_entropy, train_mode=True).samples,
                               trained, rtol=1e-10, atol=1e-14)
    assert not model.training


def test_fisher_rao_float32_model_casts_inputs_and_returns_float64_samples():
    model32 = mode_net(dtype=torch.float32)
    model64 = mode_net(dtype=DT)
    with torch.no_grad():  # the float64 twin holds exactly the float32 weights
        for p32, p64 in zip(model32.parameters(), model64.parameters()):
            p64.copy_(p32.double())
    X, y = data(7)  # float64 inputs: cast to the model's float32
    expected = per_example_fr(model64, tensor_examples(X.float().double(), y), list(detached(model64)))
    result = fisher_rao_norm(model32, [(X, y)], F.cross_entropy)
    assert result.samples.dtype == torch.float64
    torch.testing.assert_close(result.samples, expected, rtol=1e-4, atol=1e-7)
    # float32 inputs to a float64 model: cast up
    model64_result = fisher_rao_norm(model64, [(X.float(), y)], F.cross_entropy)
    torch.testing.assert_close(model64_result.samples, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("seed", [None, 3])
def test_fisher_rao_model_labels_follow_the_seeded_generator(seed):
    """labels="model": y_i ~ softmax(f(x_i)) drawn by torch.multinomial from a CPU generator seeded
    with ``seed`` (default 0), one draw per batch in loader order; the global RNG plays no part."""
    model = mode_net(seed=2)
    with torch.no_grad():
        model.l2.weight.mul_(0.3)  # soft predictions: the draws are genuinely random
    X, _ = data(14)
    y_true = torch.zeros(14, dtype=torch.long)
    batches = [(X[:5], y_true[:5]), (X[5:], y_true[5:])]
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    with torch.no_grad():
        model.eval()
        sampled = torch.cat([torch.multinomial(model(Xb).softmax(-1), 1, generator=generator)[:, 0]
                             for Xb, _ in batches])
    assert len(set(sampled.tolist())) > 1
    names = list(detached(model))
    expected = per_example_fr(model, tensor_examples(X, sampled), names)
    torch.manual_seed(12345)
    kwargs = {} if seed is None else {"seed": seed}
    result = fisher_rao_norm(model, batches, F.cross_entropy, labels="model", **kwargs)
    torch.testing.assert_close(result.samples, expected, rtol=1e-10, atol=1e-14)
    assert result.value == pytest.approx(float(expected.mean()), rel=1e-10)
    assert result.config == {"params": names, "labels": "model", "seed": 0 if seed is None else seed}


def test_fisher_rao_model_labels_of_a_one_class_model():
    """One class: every sampled label is 0, the loss is identically 0, so is the norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X = torch.randn(5, 3, dtype=DT)
    result = fisher_rao_norm(model, [(X, torch.zeros(5, dtype=torch.long))], F.cross_entropy, labels="model")
    assert result.value == 0.0 and result.samples.tolist() == [0.0] * 5


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(2, 3, bias=False)

    def forward(self, a, b):
        return torch.tanh(self.a(a)) + self.b(b)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_fisher_rao_tuple_and_dict_inputs(form):
    model = TwoInputNet().double()
    g = gen(5)
    A, B = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    batch = ((A, B), y) if form == "tuple" else {"a": A, "b": B, "labels": y}
    examples = [((lambda m, a=a, b=b: m(a[None], b[None])), t) for a, b, t in zip(A, B, y)]
    expected = per_example_fr(model, examples, ["a.weight", "a.bias", "b.weight"])
    result = fisher_rao_norm(model, [batch], F.cross_entropy)
    torch.testing.assert_close(result.samples, expected, rtol=1e-10, atol=1e-14)


def test_fisher_rao_argument_errors():
    model = mode_net()
    X, y = data(4)
    with pytest.raises(ValueError, match=r"labels must be 'empirical' or 'model', got 'true'"):
        fisher_rao_norm(model, [(X, y)], F.cross_entropy, labels="true")
    with pytest.raises(TypeError, match=r"^fisher_rao_norm\(model, loader, loss_fn, \.\.\.\): loader and loss_fn"):
        fisher_rao_norm(model, F.cross_entropy, [(X, y)])


# --- sam_sharpness / asam_sharpness -------------------------------------------------------------
NAMES = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]


def flat_reference(model, batches, names, train=False):
    """(θ over ``names`` flat, θ ↦ L(θ) the size-weighted mean loss over the batches)."""
    p = detached(model)
    shapes = [p[n].shape for n in names]
    theta = torch.cat([p[n].reshape(-1) for n in names])
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(flat):
        q = dict(p)
        for n, part in zip(names, torch.split(flat, [math.prod(s) for s in shapes])):
            q[n] = part.reshape(p[n].shape)
        return by_hand_loss(q, X, y, train)
    return theta, loss


def sam_reference(model, batches, names, rho, norm, eta=None, train=False):
    theta, loss = flat_reference(model, batches, names, train)
    t = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(t), t)
    if eta is None:
        eps = rho * g / g.norm() if norm == "l2" else rho * g.sign()
    else:
        s = theta.abs() + eta
        eps = rho * s**2 * g / (s * g).norm() if norm == "l2" else rho * s * g.sign()
    return loss(theta).item(), loss(theta + eps).item(), g


def test_sam_defaults_and_config():
    """Defaults ρ = 0.05, ``"l2"``; config holds the settings, both losses and the target names."""
    model = mode_net()
    X, y = data(9)
    base, perturbed, _ = sam_reference(model, [(X, y)], NAMES, 0.05, "l2")
    result = sam_sharpness(model, [(X, y)], F.cross_entropy)
    assert result.value == pytest.approx(perturbed - base, rel=1e-10, abs=1e-14)
    assert result.value > 0 and result.stderr is None and result.samples is None
    assert set(result.config) == {"rho", "norm", "adaptive", "loss", "perturbed_loss", "params"}
    assert result.config["rho"] == 0.05 and result.config["norm"] == "l2"
    assert result.config["adaptive"] is False and result.config["params"] == NAMES
    assert result.config["loss"] == pytest.approx(base, rel=1e-12)
    assert result.config["perturbed_loss"] == pytest.approx(perturbed, rel=1e-12)


def test_asam_defaults_and_config():
    """Defaults ρ = 0.5, ``"l2"``, η = 0.01."""
    model = mode_net()
    X, y = data(9)
    base, perturbed, _ = sam_reference(model, [(X, y)], NAMES, 0.5, "l2", eta=0.01)
    result = asam_sharpness(model, [(X, y)], F.cross_entropy)
    assert result.value == pytest.approx(perturbed - base, rel=1e-10, abs=1e-14)
    assert set(result.config) == {"rho", "norm", "adaptive", "eta", "loss", "perturbed_loss", "params"}
    assert result.config["rho"] == 0.5 and result.config["norm"] == "l2" and result.config["eta"] == 0.01
    assert result.config["adaptive"] is True and result.config["params"] == NAMES
    assert result.config["loss"] == pytest.approx(base, rel=1e-12)
    assert result.config["perturbed_loss"] == pytest.approx(perturbed, rel=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_sam_and_asam_on_a_block_in_train_mode_over_two_batches(norm, adaptive):
    """Target block ["l1.weight", "l2.bias"], ``train_mode=True`` passed through to the operator,
    batches of 3 and 8 examples (L is the mean over all 11), and an input column of zeros so that
    part of the gradient is exactly 0 (sign 0: no step there)."""
    model = mode_net()
    X, y = data(11, zero_column=True)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    names = ["l1.weight", "l2.bias"]
    rho, eta = 0.2, 0.05
    base, perturbed, g = sam_reference(model, batches, names, rho, norm, eta=eta if adaptive else None, train=True)
    assert int((g == 0).sum()) == 5  # l1.weight[:, 0]
    kwargs = dict(rho=rho, norm=norm, params=names, train_mode=True)
    if adaptive:
        result = asam_sharpness(model, batches, F.cross_entropy, eta=eta, **kwargs)
    else:
        result = sam_sharpness(model, batches, F.cross_entropy, **kwargs)
    assert math.isfinite(result.value)
    assert result.value == pytest.approx(perturbed - base, rel=1e-10, abs=1e-14)
    assert result.config["params"] == names and result.config["norm"] == norm
    assert result.config["adaptive"] is adaptive and result.config["rho"] == rho
    assert result.config["loss"] == pytest.approx(base, rel=1e-12)


def test_asam_with_eta_zero_is_allowed():
    model = mode_net()
    X, y = data(9)
    base, perturbed, _ = sam_reference(model, [(X, y)], NAMES, 0.1, "linf", eta=0.0)
    result = asam_sharpness(model, [(X, y)], F.cross_entropy, rho=0.1, norm="linf", eta=0.0)
    assert result.value == pytest.approx(perturbed - base, rel=1e-10, abs=1e-14)
    assert result.config["eta"] == 0.0


@pytest.mark.parametrize("fn", [sam_sharpness, asam_sharpness])
def test_sam_and_asam_argument_errors(fn):
    model = mode_net()
    X, y = data(4)
    name = fn.__name__
    for rho in (0, 0.0, -0.5):
        with pytest.raises(ValueError, match=rf"^{name}: rho must be a finite number > 0, got {rho!r}$"):
            fn(model, [(X, y)], F.cross_entropy, rho=rho)
    with pytest.raises(ValueError, match=r"norm must be 'l2' or 'linf', got 'l1'"):
        fn(model, [(X, y)], F.cross_entropy, norm="l1")
    with pytest.raises(TypeError, match=rf"^{name}\(model, loader, loss_fn, \.\.\.\): loader and loss_fn are swapped"):
        fn(model, F.cross_entropy, [(X, y)])
    if fn is asam_sharpness:
        with pytest.raises(ValueError, match=r"^asam_sharpness: eta must be a finite number >= 0, got -0.01$"):
            fn(model, [(X, y)], F.cross_entropy, eta=-0.01)


# --- pac_bayes_flatness (and its accuracy helper) ---------------------------------------------
def accuracy_by_hand(p: dict, batches) -> float:
    correct = total = 0
    for X, y in batches:
        logits = torch.tanh(X @ p["l1.weight"].T + p["l1.bias"]) @ p["l2.weight"].T + p["l2.bias"]
        correct += sum(int(a == b) for a, b in zip(logits.argmax(1).tolist(), y.tolist()))
        total += len(y)
    return correct / total


def pac_bayes_by_hand(model, batches, names, target, sigma_max, depth, n_samples, tol, seed):
    p = detached(model)
    generator = torch.Generator().manual_seed(seed)
    base_acc = accuracy_by_hand(p, batches)
    lo, hi, trail = 0.0, sigma_max, []
    for _ in range(depth):
        sigma = (lo + hi) / 2
        accs = []
        for _ in range(n_samples):
            q = dict(p)
            for n in names:
                q[n] = p[n] + sigma * torch.randn(p[n].shape, generator=generator, dtype=p[n].dtype)
            accs.append(accuracy_by_hand(q, batches))
        drop = base_acc - sum(accs) / n_samples
        trail.append((sigma, drop))
        if abs(drop - target) < tol:
            break
        if drop > target:
            hi = sigma
        else:
            lo = sigma
    return base_acc, trail


def pac_model_and_batches():
    """ModeNet (eval mode: tanh(W1x + b1)) on 20 points in two batches of 7 and 13, labels its
    own predictions except on four points (base accuracy 16/20, not the mean of the batch
    accuracies)."""
    model = mode_net(seed=3)
    X, _ = data(20, seed=7)
    with torch.no_grad():
        y = model(X).argmax(1)
    y[[0, 1, 2, 10]] = (y[[0, 1, 2, 10]] + 1) % 3
    return model, [(X[:7], y[:7]), (X[7:], y[7:])]


@pytest.mark.parametrize("params, names, tol, n_samples, seed", [
    ("all", NAMES, 1e-9, 2, 0),            # no early stop: all `depth` steps
    ("l2.*", ["l2.weight", "l2.bias"], 0.05, 3, 5),
])
def test_pac_bayes_trail_matches_a_hand_bisection(params, names, tol, n_samples, seed):
    model, batches = pac_model_and_batches()
    target, sigma_max, depth = 0.2, 3.0, 6
    base_acc, trail = pac_bayes_by_hand(model, batches, names, target, sigma_max, depth, n_samples, tol, seed)
    assert base_acc == 16 / 20
    result = pac_bayes_flatness(model, batches, params=params, target_drop=target, sigma_max=sigma_max, depth=depth,
                                n_samples=n_samples, tol=tol, seed=seed, progress=False)
    assert result.samples.dtype == DT
    torch.testing.assert_close(result.samples, torch.tensor(trail, dtype=DT), rtol=1e-12, atol=1e-12)
    sigma = trail[-1][0]
    assert result.value == pytest.approx(1 / sigma**2, rel=1e-12)
    assert result.config == {"sigma": sigma, "base_accuracy": 0.8, "target_drop": target, "sigma_max": sigma_max,
                             "depth": depth, "n_samples": n_samples, "tol": tol, "seed": seed, "params": names}
    assert len(trail) == depth if tol < 1e-6 else len(trail) < depth


def test_pac_bayes_argument_errors():
    model, batches = pac_model_and_batches()
    with pytest.raises(TypeError, match="1st argument must be the nn.Module"):
        pac_bayes_flatness(batches, model)
    for kwargs, pattern in [
        (dict(depth=0), r"pac_bayes_flatness: depth must be an integer >= 1, got 0"),
        (dict(n_samples=0), r"pac_bayes_flatness: n_samples must be an integer >= 1, got 0"),
        (dict(target_drop=0.0), r"pac_bayes_flatness: target_drop must be a finite number > 0 and <= 1"),
        (dict(sigma_max=0.0), r"pac_bayes_flatness: sigma_max must be a finite number > 0"),
        (dict(tol=0.0), r"pac_bayes_flatness: tol must be a finite number > 0"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            pac_bayes_flatness(model, batches, progress=False, **kwargs)


# --- curvature_operator and the spectral measures on a dense Hessian written out by hand --------
def dense_reference(model, batches, names, train=False):
    """∇²L over the flat ``names`` block, by torch.autograd.functional.hessian of the hand loss."""
    theta, loss = flat_reference(model, batches, names, train)
    return torch.autograd.functional.hessian(loss, theta)


def ggn_reference(model, batches, names, train=False):
    """Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i / N with J_i the logits' Jacobian over the flat block."""
    p = detached(model)
    shapes = [p[n].shape for n in names]
    theta = torch.cat([p[n].reshape(-1) for n in names])
    X = torch.cat([b[0] for b in batches])

    def logits(flat):
        q = dict(p)
        for n, part in zip(names, torch.split(flat, [math.prod(s) for s in shapes])):
            q[n] = part.reshape(p[n].shape)
        h = X @ q["l1.weight"].T + q["l1.bias"]
        return torch.tanh(2 * h if train else h) @ q["l2.weight"].T + q["l2.bias"]
    J = torch.autograd.functional.jacobian(logits, theta)  # (N, C, n)
    probs = logits(theta).softmax(1)
    H_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return torch.einsum("ica,icd,idb->ab", J, H_out, J) / len(X)


def spectral_setup():
    model = mode_net(seed=6)
    X, y = data(11, seed=2)
    return model, [(X[:3], y[:3]), (X[3:], y[3:])]


def rademacher(n, count, seed):
    """The Rademacher probes of the trace estimators: ±1 from torch.randint on a seeded CPU generator."""
    return torch.randint(0, 2, (n, count), generator=gen(seed)).to(DT) * 2 - 1


def test_curvature_operator_is_the_hand_hessian_or_ggn():
    model, batches = spectral_setup()
    block = ["l1.bias", "l2.weight"]
    H = dense_reference(model, batches, NAMES)
    torch.testing.assert_close(curvature_operator(model, batches, F.cross_entropy).to_dense(), H,
                               rtol=1e-9, atol=1e-12)
    H_block_train = dense_reference(model, batches, block, train=True)
    op = curvature_operator(model, batches, F.cross_entropy, params=["l2.weight", "l1.bias"], train_mode=True)
    assert op.param_names == block
    torch.testing.assert_close(op.to_dense(), H_block_train, rtol=1e-9, atol=1e-12)
    G = ggn_reference(model, batches, block, train=True)
    assert not torch.allclose(G, H_block_train, atol=1e-6)
    assert not torch.allclose(G, ggn_reference(model, batches, block), atol=1e-6)
    ggn = curvature_operator(model, batches, F.cross_entropy, params=["l2.weight", "l1.bias"], curvature="ggn",
                             train_mode=True)
    torch.testing.assert_close(ggn.to_dense(), G, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"curvature must be 'hessian' or 'ggn', got 'fisher'"):
        curvature_operator(model, batches, F.cross_entropy, curvature="fisher")
    with pytest.raises(TypeError, match=r"^curvature_operator\(model, loader, loss_fn, \.\.\.\): loader and loss_fn"):
        curvature_operator(model, F.cross_entropy, batches)


def test_hessian_trace_hutchinson_probe_by_probe():
    """Each sample is zᵀHz for the Rademacher probes drawn by torch.randint from a generator
    seeded with ``seed`` (default 0, 100 probes); the block and operator options are passed on."""
    model, batches = spectral_setup()
    H = dense_reference(model, batches, NAMES)
    Z = rademacher(H.shape[0], 100, 0)
    default = hessian_trace(model, batches, F.cross_entropy, progress=False)
    torch.testing.assert_close(default.samples, (Z * (H @ Z)).sum(0), rtol=1e-9, atol=1e-10)
    assert default.value == pytest.approx(float((Z * (H @ Z)).sum(0).mean()), rel=1e-9)
    assert default.config["method"] == "hutchinson" and default.config["seed"] == 0
    assert default.config["n_probes"] == 100 and default.config["n"] == 43

    block = ["l1.bias", "l2.weight"]
    H_block = dense_reference(model, batches, block, train=True)
    Z = rademacher(H_block.shape[0], 7, 3)
    result = hessian_trace(model, batches, F.cross_entropy, params=block, n_probes=7, seed=3, progress=False,
                           train_mode=True)
    torch.testing.assert_close(result.samples, (Z * (H_block @ Z)).sum(0), rtol=1e-9, atol=1e-10)
    one = hessian_trace(model, batches, F.cross_entropy, n_probes=1, progress=False)
    assert one.samples.shape == (1,)


def test_hessian_trace_slq_and_hutch_plus_plus():
    """SLQ with f = id: n e₁ᵀTe₁ = zᵀHz, so its samples are Hutchinson's on the same probes, for
    any m (default 15 recorded); Hutch++ with budget 3n + 2 spans the space and is exact."""
    model, batches = spectral_setup()
    block = ["l2.weight", "l2.bias"]
    H = dense_reference(model, batches, block)
    n = H.shape[0]
    Z = rademacher(n, 4, 2)
    slq_trace = hessian_trace(model, batches, F.cross_entropy, params=block, method="slq", n_probes=4, seed=2,
                              progress=False)
    torch.testing.assert_close(slq_trace.samples, (Z * (H @ Z)).sum(0), rtol=1e-9, atol=1e-10)
    assert slq_trace.config["m"] == 15 and slq_trace.config["n_probes"] == 4 and slq_trace.config["seed"] == 2
    short = hessian_trace(model, batches, F.cross_entropy, params=block, method="slq", n_probes=2, m=1,
                          progress=False)
    torch.testing.assert_close(short.samples, (rademacher(n, 2, 0) * (H @ rademacher(n, 2, 0))).sum(0),
                               rtol=1e-9, atol=1e-10)
    assert short.config["m"] == 1
    exact = hessian_trace(model, batches, F.cross_entropy, params=block, method="hutch++", n_probes=3 * n + 2,
                          seed=4, progress=False)
    assert exact.value == pytest.approx(float(torch.trace(H)), rel=1e-9)
    assert exact.config["budget"] == 3 * n + 2 and exact.config["seed"] == 4
    four = hessian_trace(model, batches, F.cross_entropy, params=block, method="hutch++", n_probes=4,
                         progress=False)
    assert four.config["budget"] == 4 and four.config["seed"] == 0 and four.samples.shape == (2,)


def test_hessian_trace_argument_errors():
    model, batches = spectral_setup()
    for kwargs, pattern in [
        (dict(method="hutch++", n_probes=3), r"^hessian_trace: n_probes must be an integer >= 4, got 3$"),
        (dict(n_probes=0), r"^hessian_trace: n_probes must be an integer >= 1, got 0$"),
        (dict(method="slq", n_probes=0), r"^hessian_trace: n_probes must be an integer >= 1, got 0$"),
        (dict(m=0), r"^hessian_trace: m must be an integer >= 1, got 0$"),
        (dict(method="exact"), r"^hessian_trace: method must be one of 'hutchinson', 'hutch\+\+', 'slq'; got 'exact'$"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            hessian_trace(model, batches, F.cross_entropy, progress=False, **kwargs)
    with pytest.raises(TypeError, match=r"^hessian_trace\(model, loader, loss_fn, \.\.\.\): loader and loss_fn"):
        hessian_trace(model, F.cross_entropy, batches, progress=False)


def test_hessian_top_and_max_eigenvalues_against_eigvalsh():
    model, batches = spectral_setup()
    H = dense_reference(model, batches, NAMES)
    lam = torch.linalg.eigvalsh(H)
    top = hessian_top_eigenvalues(model, batches, F.cross_entropy, progress=False)
    assert top.eigenvalues.shape == (1,)
    assert float(top.eigenvalues[0]) == pytest.approx(float(lam[-1]), rel=1e-6)
    assert top.config["method"] == "lanczos" and top.config["k"] == 1 and top.config["which"] == "LA"
    assert top.config["tol"] == 1e-4 and top.config["seed"] == 0 and top.config["n"] == 43
    two = hessian_top_eigenvalues(model, batches, F.cross_entropy, k=2, which="SA", tol=1e-8, seed=2, progress=False)
    assert torch.allclose(two.eigenvalues, lam[:2], rtol=1e-6, atol=1e-9)
    assert two.config["tol"] == 1e-8 and two.config["seed"] == 2 and two.config["k"] == 2
    block = ["l2.weight"]
    H_block = dense_reference(model, batches, block, train=True)
    lam_block = torch.linalg.eigvalsh(H_block)
    power = hessian_top_eigenvalues(model, batches, F.cross_entropy, params=block, method="power", seed=1,
                                    progress=False, train_mode=True)
    assert power.config["method"] == "power_iteration" and power.config["tol"] == 1e-3
    assert power.config["seed"] == 1 and power.config["n"] == 15 and power.config["k"] == 1
    assert abs(float(power.eigenvalues[0])) == pytest.approx(float(lam_block.abs().max()), rel=1e-2)
    power_tight = hessian_top_eigenvalues(model, batches, F.cross_entropy, params=block, method="power", k=2,
                                          tol=1e-9, progress=False, train_mode=True)
    assert power_tight.config["tol"] == 1e-9 and power_tight.eigenvalues.shape == (2,)

    biggest = hessian_max_eigenvalue(model, batches, F.cross_entropy, params=block, progress=False, train_mode=True)
    assert biggest.value == pytest.approx(float(lam_block[-1]), rel=1e-6)
    assert biggest.stderr is None and biggest.samples.shape == (1,)
    assert float(biggest.samples[0]) <= 1e-4 * abs(biggest.value) + 1e-12
    assert biggest.config["k"] == 1 and biggest.config["n"] == 15 and biggest.config["method"] == "lanczos"
    everything = hessian_max_eigenvalue(model, batches, F.cross_entropy, seed=3, progress=False)
    assert everything.value == pytest.approx(float(lam[-1]), rel=1e-6) and everything.config["seed"] == 3


def test_hessian_eigenvalue_argument_errors():
    model, batches = spectral_setup()
    for kwargs, pattern in [
        (dict(k=0), r"^hessian_top_eigenvalues: k must be an integer >= 1, got 0$"),
        (dict(method="arnoldi"), r"^hessian_top_eigenvalues: method must be one of 'lanczos', 'power'; got 'arnoldi'$"),
        (dict(tol=0.0), r"^hessian_top_eigenvalues: tol must be a finite number > 0, got 0.0$"),
        (dict(tol=-1.0), r"^hessian_top_eigenvalues: tol must be a finite number > 0, got -1.0$"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            hessian_top_eigenvalues(model, batches, F.cross_entropy, progress=False, **kwargs)
    for fn in (hessian_top_eigenvalues, hessian_max_eigenvalue):
        with pytest.raises(TypeError, match=rf"^{fn.__name__}\(model, loader, loss_fn, \.\.\.\): loader and loss_fn"):
            fn(model, F.cross_entropy, batches, progress=False)


def test_renyi_study_targets_are_the_weight_matrices_then_all():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)              # 4-D weight
            self.norm = nn.LayerNorm(4)                 # 1-D weight
            self.proj = nn.Parameter(torch.zeros(3, 3))  # a matrix not called weight
            self.head = nn.Linear(4, 2)                 # 2-D weight

    assert renyi_study_targets(Net()) == ["conv.weight", "head.weight", "all"]


def test_pac_bayes_accuracy_counts_every_token_of_per_token_outputs():
    """Logits (N, T, C) against labels (N, T): the accuracy is over the N·T token predictions.
    Labels are the model's own predictions except on 3 of the 30 tokens, so the base accuracy is
    27/30 (it was divided by N = 5 sequences: 5.4)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    X = torch.randn(5, 6, 3, generator=gen(8), dtype=DT)
    with torch.no_grad():
        y = model(X).argmax(-1)
    y[0, 0], y[2, 3], y[4, 5] = (y[0, 0] + 1) % 4, (y[2, 3] + 1) % 4, (y[4, 5] + 1) % 4
    result = pac_bayes_flatness(model, [(X[:2], y[:2]), (X[2:], y[2:])], depth=2, n_samples=1, progress=False)
    assert result.config["base_accuracy"] == pytest.approx(27 / 30, abs=1e-15)
    assert bool((result.samples[:, 1] <= 27 / 30).all())  # a drop is at most the base accuracy


def test_parameter_norm_refuses_a_block_without_matrices():
    model = nn.LayerNorm(4)
    with pytest.raises(ValueError, match="no parameter with more than one dimension"):
        parameter_norm(model, include_vectors=False)
    assert parameter_norm(model).value == pytest.approx(2.0, abs=1e-15)  # ‖1‖ over 4 weights, bias 0


# --- the SLQ wrappers: hessian_slq / hessian_log_det / hessian_shannon_entropy /
# hessian_spectral_density / renyi_sharpness -----------------------------------------------------
# With m = n Lanczos steps the Gauss rule of probe z is exact: its sample ‖z‖² Σ_k w_k f(θ_k) is
# zᵀ f(H) z, computed here from eigh of the dense hand Hessian and the Rademacher probes.
SLQ_BLOCK = ["l1.bias"]  # n = 5, eigenvalues of both signs


def probe_sums(H, f, Z):
    """zᵀ f(H) z for each column z of Z, with f applied to the eigenvalues of the dense H."""
    lam, V = torch.linalg.eigh(H)
    M = V @ torch.diag(f(lam)) @ V.T
    return (Z * (M @ Z)).sum(0)


def renyi_by_hand(H, Z, alpha, normalizer):
    mass = (lambda t: t.clamp(min=0)) if normalizer == "clamp" else torch.abs
    s_1 = float(probe_sums(H, mass, Z).mean())
    if alpha == "shannon":
        def t_log_t(t):
            return torch.where(mass(t) > 0, mass(t) * torch.log(mass(t).clamp(min=1e-300)), 0 * t)
        return math.log(s_1) - float(probe_sums(H, t_log_t, Z).mean()) / s_1
    s_alpha = float(probe_sums(H, lambda t: mass(t) ** alpha, Z).mean())
    return (math.log(s_alpha) - alpha * math.log(s_1)) / (1 - alpha)


def test_slq_wrappers_defaults_and_progress_bar(capsys):
    """Defaults m = 15 (n = 43 ≥ 15), 100 probes, seed 0, the whole model, and the SLQ progress
    bar on stderr unless progress=False (which hessian_slq passes on)."""

    model, batches = spectral_setup()
    capsys.readouterr()
    log_det = hessian_log_det(model, batches, F.cross_entropy, clamp_min=1e-3)
    assert "Lanczos" in capsys.readouterr().err
    assert log_det.config["m"] == 15 and log_det.config["n_probes"] == 100 and log_det.config["seed"] == 0
    assert log_det.config["params"] == NAMES and log_det.config["n"] == 43 and log_det.samples.shape == (100,)
    quiet = hessian_slq(model, batches, F.cross_entropy, m=2, n_probes=1, seed=1, progress=False)
    assert capsys.readouterr().err == ""
    assert quiet.config["m"] == 2 and quiet.config["n_probes"] == 1 and quiet.config["seed"] == 1
    renyi = renyi_sharpness(model, batches, F.cross_entropy, progress=False)
    assert capsys.readouterr().err == ""
    assert renyi.alpha == 0.5 and renyi.normalizer == "abs" and renyi.config["params"] == NAMES
    assert renyi.config["m"] == 15 and renyi.config["n_probes"] == 100 and renyi.config["seed"] == 0


def test_slq_helper_defaults_to_the_whole_model():

    model, batches = spectral_setup()
    result = measures._slq("somewhere", model, batches, F.cross_entropy, m=2, n_probes=1, progress=False)
    assert result.config["params"] == NAMES and result.n == 43


def test_spectral_density_defaults():
    """m = 100, 3 probes, 10 000 grid points (n = 115 parameters, so m = 100 is not capped)."""

    model = ModeNet(d_in=10, d_hidden=8, d_out=3, seed=2).to(DT)
    X, y = data(6, d=10, seed=3)
    density = hessian_spectral_density(model, [(X, y)], F.cross_entropy, progress=False)
    assert density.config["m"] == 100 and density.config["n_probes"] == 3 and density.config["n"] == 115
    assert density.config["n_grid"] == 10_000 and density.grid.shape == (10_000,)


def test_slq_wrappers_exact_on_a_block_against_eigh():

    model, batches = spectral_setup()
    H = dense_reference(model, batches, SLQ_BLOCK)
    lam, V = torch.linalg.eigh(H)
    assert lam[0] < -0.02 and lam[-1] > 0.1
    Z = rademacher(5, 3, 2)
    kw = dict(params=SLQ_BLOCK, m=5, n_probes=3, seed=2, progress=False)

    log_det = hessian_log_det(model, batches, F.cross_entropy, clamp_min=0.01, **kw)
    torch.testing.assert_close(log_det.samples, probe_sums(H, lambda t: torch.log(t.clamp(min=0.01)), Z),
                               rtol=1e-8, atol=1e-10)
    assert log_det.config["clamp_min"] == 0.01 and log_det.config["seed"] == 2
    with pytest.raises(ValueError, match="log det is undefined"):
        hessian_log_det(model, batches, F.cross_entropy, **kw)

    for normalizer in ("abs", "clamp"):
        extra = {} if normalizer == "abs" else {"normalizer": "clamp"}
        shannon = hessian_shannon_entropy(model, batches, F.cross_entropy, **extra, **kw)
        assert shannon.normalizer == normalizer and shannon.config["n"] == 5
        assert shannon.estimate == pytest.approx(renyi_by_hand(H, Z, "shannon", normalizer), rel=1e-8)
        one = renyi_sharpness(model, batches, F.cross_entropy, alpha=2.0, **extra, **kw)
        assert one.normalizer == normalizer and one.config["seed"] == 2
        assert one.estimate == pytest.approx(renyi_by_hand(H, Z, 2.0, normalizer), rel=1e-8)
        many = renyi_sharpness(model, batches, F.cross_entropy, alpha=[0.5, 3.0, "shannon"], **extra, **kw)
        assert list(many) == [0.5, 3.0, "shannon"]
        for a, r in many.items():
            assert r.normalizer == normalizer
            assert r.estimate == pytest.approx(renyi_by_hand(H, Z, a, normalizer), rel=1e-8)
    assert renyi_by_hand(H, Z, 2.0, "abs") != pytest.approx(renyi_by_hand(H, Z, 2.0, "clamp"), rel=1e-3)

    density = hessian_spectral_density(model, batches, F.cross_entropy, n_grid=40, **kw)
    grid = torch.linspace(float(lam[0]) - 0.01, float(lam[-1]) + 0.01, 40, dtype=DT)
    torch.testing.assert_close(density.grid, grid, rtol=1e-8, atol=1e-10)
    s2 = 1e-5
    W = (V.T @ Z) ** 2 / (Z**2).sum(0)  # (k, p): Gauss weights of the exact rule
    phi = (torch.exp(-((grid[:, None] - lam[None, :]) ** 2) / (2 * s2)) / math.sqrt(2 * math.pi * s2)) @ W.mean(1)
    torch.testing.assert_close(density.density, phi / torch.trapezoid(phi, grid), rtol=1e-6, atol=1e-8)
    assert density.config["params"] == SLQ_BLOCK and density.config["seed"] == 2
    short = hessian_spectral_density(model, batches, F.cross_entropy, params=SLQ_BLOCK, m=3, n_probes=2, n_grid=2,
                                     progress=False)
    assert short.config["m"] == 3 and short.config["n_probes"] == 2 and short.grid.shape == (2,)


def test_slq_wrapper_argument_errors():

    model, batches = spectral_setup()
    for fn in (hessian_slq, hessian_log_det, hessian_shannon_entropy, hessian_spectral_density, renyi_sharpness):
        name = fn.__name__
        for kwargs, pattern in [
            (dict(m=0), rf"^{name}: m must be an integer >= 1, got 0$"),
            (dict(n_probes=0), rf"^{name}: n_probes must be an integer >= 1, got 0$"),
        ]:
            with pytest.raises(ValueError, match=pattern):
                fn(model, batches, F.cross_entropy, progress=False, **kwargs)
        with pytest.raises(TypeError, match=rf"^{name}\(model, loader, loss_fn, \.\.\.\): loader and loss_fn"):
            fn(model, F.cross_entropy, batches, progress=False)
    with pytest.raises(ValueError, match=r"^hessian_spectral_density: n_grid must be an integer >= 2, got 1$"):
        hessian_spectral_density(model, batches, F.cross_entropy, n_grid=1, progress=False)
    smallest = hessian_log_det(model, batches, F.cross_entropy, params=SLQ_BLOCK, clamp_min=0.01, m=1, n_probes=1,
                               progress=False)
    assert smallest.config["m"] == 1 and smallest.samples.shape == (1,)


# --- progress bars of the Hessian measures (shown by default, none with progress=False) -----------
@pytest.mark.parametrize("measure, kwargs, bar", [
    (hessian_trace, {"method": "hutchinson", "n_probes": 4}, "Hutchinson"),
    (hessian_trace, {"method": "hutch++", "n_probes": 4}, "Hutch++"),
    (hessian_trace, {"method": "slq", "n_probes": 4, "m": 3}, "Lanczos (lockstep)"),
    (hessian_top_eigenvalues, {"method": "lanczos"}, "Lanczos"),
    (hessian_top_eigenvalues, {"method": "power"}, "power iteration"),
])
def test_hessian_measures_show_their_progress_bar_unless_told_not_to(capsys, measure, kwargs, bar):
    model, batch = mode_net(), data(6)
    capsys.readouterr()
    measure(model, [batch], F.cross_entropy, **kwargs)
    assert bar in capsys.readouterr().err
    measure(model, [batch], F.cross_entropy, progress=False, **kwargs)
    assert capsys.readouterr().err == ""

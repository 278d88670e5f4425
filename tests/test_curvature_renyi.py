"""Rényi entropy/sharpness: closed forms, properties, SLQ accuracy, ReLU rescaling (spec §6, §8)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_curvature_models import classification_data, dense_hessian, single_thread  # noqa: F401
from torch import nn

from quotientsharp.curvature import HessianOperator, renyi_entropy, slq


def exact_renyi(p: torch.Tensor, alpha: float) -> float:
    p = p / p.sum()
    return float(torch.log((p[p > 0] ** alpha).sum()) / (1 - alpha))


def exact_shannon(p: torch.Tensor) -> float:
    p = p / p.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def random_symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return Q @ torch.diag(eigenvalues) @ Q.T


LAMBDA = torch.tensor([4.0, 2.5, 1.0, 0.3, 0.0, -0.2, -0.7], dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.5, 1.5, 3.0])
def test_normalizer_closed_forms(alpha):
    abs_value = renyi_entropy(LAMBDA, alpha, "abs").estimate
    assert abs(abs_value - exact_renyi(LAMBDA.abs(), alpha)) < 1e-12
    clamp_value = renyi_entropy(LAMBDA, alpha, "clamp").estimate
    assert abs(clamp_value - exact_renyi(LAMBDA.clamp(min=0), alpha)) < 1e-12
    with pytest.warns(UserWarning, match="Tr\\|H\\|"):
        signed = renyi_entropy(LAMBDA, alpha, "signed")
    expected = (math.log(float((LAMBDA.abs() ** alpha).sum())) - alpha * math.log(float(LAMBDA.sum()))) / (1 - alpha)
    assert abs(signed.estimate - expected) < 1e-12
    assert signed.sharpness == -signed.estimate


def test_normalizer_shannon_closed_forms_and_signed_error():
    assert abs(renyi_entropy(LAMBDA, "shannon").estimate - exact_shannon(LAMBDA.abs())) < 1e-12
    assert abs(renyi_entropy(LAMBDA, "shannon", "clamp").estimate - exact_shannon(LAMBDA.clamp(min=0))) < 1e-12
    with pytest.raises(ValueError, match="Tr H"):
        renyi_entropy(torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5, "signed")
    with pytest.raises(ValueError, match="≤ 0"):
        renyi_entropy(torch.tensor([-1.0, -2.0], dtype=torch.float64), 0.5, "clamp")


def test_invalid_alpha_raises():
    for alpha in (0.0, -0.5):
        with pytest.raises(ValueError, match="> 0"):
            renyi_entropy(LAMBDA, alpha)
    with pytest.raises(ValueError, match="shannon"):
        renyi_entropy(LAMBDA, 1.0)
    with pytest.raises(ValueError, match="normalizer"):
        renyi_entropy(LAMBDA, 0.5, "relu")


def test_scale_invariance_isotropy_monotonicity_and_shannon_limit():
    g = torch.Generator().manual_seed(0)
    spectrum = torch.rand(50, generator=g, dtype=torch.float64) ** 3
    for alpha in (0.5, 1.5):
        assert abs(renyi_entropy(7.3 * spectrum, alpha).estimate - renyi_entropy(spectrum, alpha).estimate) < 1e-12
        assert abs(renyi_entropy(torch.full((50,), 2.7, dtype=torch.float64), alpha).estimate - math.log(50)) < 1e-12
    values = [renyi_entropy(spectrum, a).estimate for a in (0.1, 0.5, 0.999, 1.001, 1.5, 3.0)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    shannon = renyi_entropy(spectrum, "shannon").estimate
    assert abs(values[2] - shannon) < 2e-3 and abs(values[3] - shannon) < 2e-3
    for a, value in zip((0.1, 0.5, 0.999, 1.001, 1.5, 3.0), values):  # the closed form, not a bound
        assert abs(value - exact_renyi(spectrum, a)) < 1e-12
    assert values[0] - values[-1] > 0.5  # this spectrum is far from uniform: the α-dependence is visible


def spiky_spectrum() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.cat([
        10 + 40 * torch.rand(5, generator=g, dtype=torch.float64),
        0.1 + torch.rand(100, generator=g, dtype=torch.float64),
        1e-4 * torch.rand(290, generator=g, dtype=torch.float64),
        -0.05 * torch.rand(5, generator=g, dtype=torch.float64),
    ])


def test_slq_renyi_on_synthetic_spiky_spectrum():
    eigenvalues = spiky_spectrum()
    result = slq(random_symmetric(eigenvalues, seed=12), m=15, n_probes=100, seed=13, progress=False)
    for alpha in (0.5, 1.5):
        estimate = renyi_entropy(result, alpha)
        power_sum = result.abs_power_trace(alpha)
        assert abs(power_sum.value - float((eigenvalues.abs() ** alpha).sum())) < 4 * power_sum.stderr
        assert abs(estimate.s_alpha - power_sum.value) < 1e-9 * power_sum.value
        assert abs(estimate.estimate - exact_renyi(eigenvalues.abs(), alpha)) < 0.06
        # jackknife over probes of H_α from the probe-averaged sums, written out here
        sums = estimate.samples.numpy()
        loo = (sums.sum(0) - sums) / (len(sums) - 1)
        h = (np.log(loo[:, 0]) - alpha * np.log(loo[:, 1])) / (1 - alpha)
        assert estimate.stderr == pytest.approx(np.sqrt((len(h) - 1) / len(h) * ((h - h.mean()) ** 2).sum()), rel=1e-10)
        assert np.allclose(sums[:, 0], power_sum.samples.numpy(), rtol=1e-12)
        assert estimate.samples.shape == (100, 2)
    s1 = result.abs_power_trace(1.0)
    assert abs(s1.value - float(eigenvalues.abs().sum())) < 4 * s1.stderr
    assert abs(renyi_entropy(result, "shannon").estimate - exact_shannon(eigenvalues.abs())) < 0.06


def trained_mlp():
    """916-parameter tanh MLP trained on 20%-noisy labels (≈40% of |λ| below 1e-3·λ_max).

    The m = 15 bias of H_0.5 depends strongly on the spectrum near 0 (spec §6.3): on variants of
    this net trained to near-zero loss without label noise it reached 0.3–0.4 (m = 30: < 0.01).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4)).double()
    X = torch.randn(128, 8, dtype=torch.float64)
    y = (X[:, :4] + 0.3 * X[:, 4:]).argmax(1)
    y = torch.where(torch.rand(128) < 0.2, torch.randint(0, 4, (128,)), y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model, X, y


def test_slq_renyi_on_trained_mlp_hessian():
    model, X, y = trained_mlp()
    H = dense_hessian(model, X, y)
    assert H.shape == (916, 916)
    eigenvalues = torch.linalg.eigvalsh((H + H.T) / 2)
    result = slq(H, m=15, n_probes=100, seed=1, progress=False)
    for alpha in (0.5, 1.5):
        assert abs(renyi_entropy(result, alpha).estimate - renyi_entropy(eigenvalues, alpha).estimate) < 0.1


def test_relu_rescaling_per_layer_invariant_full_network_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()
    X = classification_data(40, (5,))[0]
    y = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # MSE, not cross-entropy: softmax's exact null directions would give eigenvalues at roundoff
    # level, whose |λ|^0.5 ≈ 1e-8 would swamp a 1e-9 comparison.

    def entropies():
        out = {}
        for block in ("0.weight", "2.weight", "all"):
            H = HessianOperator(model, [(X, y)], F.mse_loss, params=block).to_dense()
            out[block] = renyi_entropy(torch.linalg.eigvalsh((H + H.T) / 2), 0.5).estimate
        return out

    before = entropies()
    loss_before = F.mse_loss(model(X), y).item()
    with torch.no_grad():
        model[0].weight.mul_(3)
        model[2].weight.div_(3)
    assert abs(F.mse_loss(model(X), y).item() - loss_before) < 1e-12
    after = entropies()
    assert abs(after["0.weight"] - before["0.weight"]) < 1e-9
    assert abs(after["2.weight"] - before["2.weight"]) < 1e-9
    assert abs(after["all"] - before["all"]) > 0.1


def test_result_value_is_the_renyi_sharpness():
    """``.value`` is the number the measure reports, −H_α (the package docstring: every result has
    ``.value``), while ``estimate`` stays the entropy."""
    spectrum = torch.tensor([4.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    for alpha in (0.5, 2.0):
        result = renyi_entropy(spectrum, alpha)
        assert result.estimate == pytest.approx(exact_renyi(spectrum, alpha), abs=1e-12)
        assert result.value == pytest.approx(-exact_renyi(spectrum, alpha), abs=1e-12)
    assert renyi_entropy(spectrum, "shannon").value == pytest.approx(-exact_shannon(spectrum), abs=1e-12)
    assert renyi_entropy(spectrum).to_dict()["sharpness"] == renyi_entropy(spectrum).value

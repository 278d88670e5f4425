"""The classical measures of spec §7 and the model-level convenience functions."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_curvature_models import (  # noqa: F401
    classification_data,
    dense_hessian,
    flat_loss,
    mlp_with_layernorm,
    single_thread,
    transformer,
)
from torch import nn

from quotientsharp.curvature import (
    asam_sharpness,
    curvature_operator,
    fisher_rao_norm,
    hessian_log_det,
    hessian_max_eigenvalue,
    hessian_shannon_entropy,
    hessian_spectral_density,
    hessian_top_eigenvalues,
    hessian_trace,
    pac_bayes_flatness,
    parameter_norm,
    renyi_entropy,
    renyi_sharpness,
    renyi_study_targets,
    sam_sharpness,
)
from quotientsharp.curvature.trace import hutch_plus_plus, sample_probes


def relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()


def test_fisher_rao_direct_equals_euler_form():
    """Bias-free ReLU net with K = 2 layers: ⟨θ, ∇ℓ_i⟩ = K ⟨∂ℓ_i/∂f, f(x_i)⟩ (Euler)."""
    model = relu_net()
    X, y = classification_data(30, (5,))
    direct = fisher_rao_norm(model, [(X[:10], y[:10]), (X[10:], y[10:])], F.cross_entropy)
    logits = model(X).detach().requires_grad_()
    (dl_df,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), logits)
    euler = 4 * float(((dl_df * logits).sum(1) ** 2).mean())
    assert abs(direct.value - euler) < 1e-10 * euler
    assert direct.samples.shape == (30,)
    sampled = fisher_rao_norm(model, [(X, y)], F.cross_entropy, labels="model", seed=1)
    assert sampled.value > 0 and sampled.value != direct.value


def test_parameter_norm_counts_what_it_says():
    model = mlp_with_layernorm()
    everything = parameter_norm(model).value
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm().item()
    assert abs(everything - expected) < 1e-12
    matrices = parameter_norm(model, include_vectors=False)
    assert matrices.config["params"] == ["0.weight", "3.weight"]
    assert abs(matrices.value - (model[0].weight.norm() ** 2 + model[3].weight.norm() ** 2).sqrt().item()) < 1e-12


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_sam_and_asam_one_step_sharpness(norm):
    model = mlp_with_layernorm()
    X, y = classification_data(20, (6,))
    theta, loss = flat_loss(model, X, y)
    t = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(t), t)
    rho, eta = 0.05, 0.01
    s = theta.abs() + eta
    eps = {"l2": rho * g / g.norm(), "linf": rho * g.sign()}[norm]
    eps_adaptive = {"l2": rho * s**2 * g / (s * g).norm(), "linf": rho * s * g.sign()}[norm]
    base = loss(theta).item()
    sam = sam_sharpness(model, [(X, y)], F.cross_entropy, rho=rho, norm=norm)
    asam = asam_sharpness(model, [(X, y)], F.cross_entropy, rho=rho, norm=norm, eta=eta)
    assert abs(sam.value - (loss(theta + eps).item() - base)) < 1e-12
    assert abs(asam.value - (loss(theta + eps_adaptive).item() - base)) < 1e-12
    assert sam.value > 0
    with pytest.raises(ValueError, match="norm"):
        sam_sharpness(model, [(X, y)], F.cross_entropy, norm="l1")


def test_pac_bayes_flatness_bisection():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    X = torch.randn(200, 2, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(model(X), y).backward()
        optimizer.step()
    result = pac_bayes_flatness(model, [(X, y)], n_samples=5, progress=False)
    sigma, drop = result.samples[-1]
    assert result.config["base_accuracy"] > 0.9
    assert abs(result.value - 1 / float(sigma) ** 2) < 1e-12
    # converged to the target drop before the depth limit, moving toward it at every step
    assert abs(float(drop) - 0.1) < 0.01 and result.samples.shape[0] < 15
    for s, d in result.samples[:-1].tolist():
        assert (d > 0.1) == (s > float(sigma)), (s, d)
    json.dumps(result.to_dict())


def test_convenience_functions_agree_with_dense_hessian():
    model = transformer()
    X, y = classification_data(16, (5, 4))
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    H = dense_hessian(model, X, y)
    exact = torch.linalg.eigvalsh((H + H.T) / 2)
    kwargs = dict(progress=False)
    trace = hessian_trace(model, data, F.cross_entropy, n_probes=100, **kwargs)
    assert abs(trace.value - float(exact.sum())) < 4 * trace.stderr
    # SLQ with f = id is Hutchinson on the same probes (n e₁ᵀT e₁ = zᵀHz), sample by sample
    slq_trace = hessian_trace(model, data, F.cross_entropy, method="slq", n_probes=5, **kwargs)
    five = hessian_trace(model, data, F.cross_entropy, n_probes=5, **kwargs)
    assert torch.allclose(slq_trace.samples, five.samples, rtol=1e-10, atol=1e-12)
    assert abs(slq_trace.value - float(exact.sum())) < 4 * slq_trace.stderr
    # Hutch++ against the algorithm written out on the dense H with the same draws ...
    hutchpp = hessian_trace(model, data, F.cross_entropy, method="hutch++", n_probes=30, **kwargs)
    generator = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(H @ sample_probes(H.shape[0], 10, "rademacher", generator)).Q
    G = sample_probes(H.shape[0], 10, "rademacher", generator)
    G = G - Q @ (Q.T @ G)
    by_hand = float(torch.trace(Q.T @ H @ Q)) + float((G * (H @ G)).sum(0).mean())
    assert hutchpp.value == pytest.approx(by_hand, rel=1e-10)
    # ... and exact once the sketch spans the space (budget 3n + 2)
    assert hutch_plus_plus(H, 3 * H.shape[0] + 2, progress=False).value == pytest.approx(float(exact.sum()), rel=1e-10)
    top = hessian_top_eigenvalues(model, data, F.cross_entropy, k=2, **kwargs)
    assert torch.allclose(top.eigenvalues, exact.flip(0)[:2], rtol=1e-4)
    lam = hessian_max_eigenvalue(model, data, F.cross_entropy, mode="forward_over_reverse", **kwargs)
    assert abs(lam.value - float(exact[-1])) < 1e-4 * float(exact[-1])
    power = hessian_top_eigenvalues(model, data, F.cross_entropy, method="power", tol=1e-6, **kwargs)
    assert abs(abs(power.eigenvalues[0]) - float(exact.abs().max())) < 1e-2 * float(exact.abs().max())
    n = H.shape[0]
    alphas = renyi_sharpness(model, data, F.cross_entropy, alpha=[0.5, 1.5, "shannon"], m=n, n_probes=2, **kwargs)
    # m = n: the quadrature is exact, n Σ_k w_k f(θ_k) = zᵀf(H)z for each probe z (‖z‖² = n), so the
    # estimate is the probe-averaged dense value on the same two Rademacher probes
    lam, U = torch.linalg.eigh((H + H.T) / 2)
    weights = (U.T @ sample_probes(n, 2, "rademacher", torch.Generator().manual_seed(0))) ** 2

    def quadratic_form(values):
        return float((values[:, None] * weights).sum(0).mean())

    s1 = quadratic_form(lam.abs())
    dense = {a: (math.log(quadratic_form(lam.abs() ** a)) - a * math.log(s1)) / (1 - a) for a in (0.5, 1.5)}
    dense["shannon"] = math.log(s1) - quadratic_form(torch.where(lam != 0, lam.abs() * lam.abs().log(), 0.0)) / s1
    for alpha, result in alphas.items():
        assert result.estimate == pytest.approx(dense[alpha], rel=1e-7)
        assert result.sharpness == -result.estimate
    shannon = hessian_shannon_entropy(model, data, F.cross_entropy, m=30, n_probes=2, **kwargs)
    assert abs(shannon.estimate - renyi_entropy(exact, "shannon").estimate) < 0.5
    density = hessian_spectral_density(model, data, F.cross_entropy, m=40, n_probes=2, n_grid=500, **kwargs)
    assert abs(float(torch.trapezoid(density.density, density.grid)) - 1) < 1e-6
    if exact.min() <= 0:
        with pytest.raises(ValueError, match="log det"):
            hessian_log_det(model, data, F.cross_entropy, m=60, n_probes=1, **kwargs)
    json.dumps(alphas[0.5].to_dict())
    json.dumps(top.to_dict())


def test_ggn_curvature_and_study_targets():
    model = mlp_with_layernorm()
    X, y = classification_data(20, (6,))
    result = renyi_sharpness(model, [(X, y)], F.cross_entropy, alpha=0.5, curvature="ggn", m=20, n_probes=3, progress=False)
    ggn = curvature_operator(model, [(X, y)], F.cross_entropy, curvature="ggn").to_dense()
    assert result.config["n"] == ggn.shape[0]
    exact = renyi_entropy(torch.linalg.eigvalsh((ggn + ggn.T) / 2), 0.5).estimate
    assert abs(result.estimate - exact) < 0.1  # spec §8: SLQ (m = 15+) on a small model's curvature
    assert renyi_study_targets(model) == ["0.weight", "3.weight", "all"]

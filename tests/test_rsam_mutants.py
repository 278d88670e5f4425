"""RSAM against its documented formula where the 1e-16 guards matter, its documented defaults
(ρ = 0.65, α = 1.2, warm-up through epoch 5: spec training.md §3) and a single-parameter model
(issue 18: tests written against the surviving mutants of ``optim/rsam.py``)."""
import math

import pytest
import torch

from quotientsharp.optim import RSAM


def reference_epsilon(grads, rho, alpha):
    """ε = −c·g, c = sign(1−α)·ρ·S_α / S₁^(α+1), S₁ = Σg² + 1e-16, S_α = Σ|g|^(2α) + 1e-16 (docstring),
    in plain Python floats over the flat gradient."""
    flat = [float(x) for g in grads for x in g.flatten()]
    s1 = math.fsum(x * x for x in flat) + 1e-16
    sa = math.fsum(abs(x) ** (2 * alpha) for x in flat) + 1e-16
    c = math.copysign(1.0, 1 - alpha) * rho * sa / s1 ** (alpha + 1)
    return [-c * g for g in grads]


@pytest.mark.parametrize("alpha", [0.5, 1.2])
@pytest.mark.parametrize("scale", [1.0, 2e-7])
def test_perturbation_matches_the_formula_down_to_the_guard_scale(alpha, scale):
    """At gradients of size ~1e-7 the sums are comparable to the 1e-16 guards: a guard with the
    wrong sign changes ε by far more than the tolerance."""
    torch.manual_seed(0)
    params = [torch.zeros(3, 2, dtype=torch.float64, requires_grad=True), torch.zeros(4, dtype=torch.float64, requires_grad=True)]
    grads = [scale * torch.randn_like(p) for p in params]
    opt = RSAM(params, torch.optim.SGD, rho=0.3, alpha=alpha, lr=0.1)
    got = opt.perturbation(grads, params)
    for e, r in zip(got, reference_epsilon(grads, 0.3, alpha), strict=True):
        torch.testing.assert_close(e, r, rtol=1e-9, atol=0.0)


def test_single_parameter_model_and_float32_dtype():
    """One parameter tensor (no second gradient to look at) in float32: ε keeps the parameter's dtype."""
    p = torch.zeros(5, requires_grad=True)
    g = [torch.linspace(-1.0, 1.0, 5)]
    eps = RSAM([p], torch.optim.SGD, rho=0.2, alpha=1.5, lr=0.1).perturbation(g, [p])
    assert len(eps) == 1 and eps[0].dtype == torch.float32
    torch.testing.assert_close(eps[0], reference_epsilon([g[0].double()], 0.2, 1.5)[0].float())


def test_documented_defaults():
    """ρ = 0.65 and α = 1.2 (ε equals the formula with them) and plain base steps through epoch 5."""
    torch.manual_seed(1)
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = RSAM([p], torch.optim.SGD, lr=0.1)
    g = [torch.randn(4, dtype=torch.float64)]
    torch.testing.assert_close(opt.perturbation(g, [p])[0], reference_epsilon(g, 0.65, 1.2)[0], rtol=1e-12, atol=0.0)
    for epoch in range(7):
        opt.set_epoch(epoch)
        assert opt.perturbing == (epoch >= 6), epoch


def test_mixed_dtypes_each_tensor_gets_the_factor_at_its_own_precision():
    """A float32 tensor first and a float64 one after it: the float64 part of ε is the formula to
    float64 precision (not the factor rounded to float32 by the first tensor's dtype)."""
    g = torch.Generator().manual_seed(3)
    params = [torch.zeros(4, requires_grad=True), torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    grads = [torch.randn(4, generator=g), torch.randn(3, generator=g, dtype=torch.float64)]
    eps = RSAM(params, torch.optim.SGD, rho=0.3, alpha=1.2, lr=0.1).perturbation(grads, params)
    ref = reference_epsilon(grads, 0.3, 1.2)
    assert [e.dtype for e in eps] == [torch.float32, torch.float64]
    torch.testing.assert_close(eps[0], ref[0].float(), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(eps[1], ref[1], rtol=1e-6, atol=0.0)  # c itself sums float32 powers
    ratio = eps[1] / grads[1]  # −c for every entry, kept in float64
    torch.testing.assert_close(ratio, ratio[:1].expand(3), rtol=1e-15, atol=0.0)
    c = float(ratio[0])
    assert abs(c - float(torch.tensor(c).float())) > 1e-10 * abs(c), "c was rounded to float32"
    # and a list that mixes them the other way round reduces in float64 too
    eps_rev = RSAM(params[::-1], torch.optim.SGD, rho=0.3, alpha=1.2, lr=0.1).perturbation(grads[::-1], params[::-1])
    torch.testing.assert_close(eps_rev[0], eps[1], rtol=1e-15, atol=0.0)

"""Survivors of the mutation run on quotientsharp/curvature/renyi.py: the defaults, the result's
fields and config, the jackknife over probes, and the ``signed`` normalizer's warning and errors.

Ground truth is the module docstring's formulas evaluated by hand in float64: ``S_α = Σ μ(λ)^α``,
``S₁ = Σ μ(λ)``, ``H_α = (log S_α − α log S₁)/(1 − α)``. SLQ inputs are :class:`SLQResult` records
built here from chosen nodes, weights and probe norms, so every per-probe sum is
``‖z_p‖² Σ_k w_k f(θ_k)`` and the jackknife is written out leave-one-probe-out.
"""
from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

from quotientsharp.curvature import renyi_entropy
from quotientsharp.curvature.slq import SLQResult

DT = torch.float64


def entropy(s_alpha: float, s_1: float, alpha: float) -> float:
    return (math.log(s_alpha) - alpha * math.log(s_1)) / (1 - alpha)


def slq_record(nodes, weights, norms) -> SLQResult:
    nodes, weights, norms = (torch.tensor(x, dtype=DT) for x in (nodes, weights, norms))
    return SLQResult(nodes, weights, norms, n=4, config={"method": "slq", "m": nodes.shape[1]})


# three probes, two nodes each (one negative node, so |θ| and θ differ)
NODES = [[2.0, -0.5], [3.0, 1.0], [0.5, 4.0]]
WEIGHTS = [[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]
NORMS = [4.0, 3.5, 5.0]


def per_probe(f) -> list[float]:
    return [n * sum(w * f(t) for t, w in zip(ts, ws)) for ts, ws, n in zip(NODES, WEIGHTS, NORMS)]


def test_default_order_is_one_half_of_the_abs_mass():
    lam = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=DT)
    result = renyi_entropy(lam)
    s_half, s_1 = sum(abs(x) ** 0.5 for x in lam.tolist()), sum(abs(x) for x in lam.tolist())
    assert inspect.signature(renyi_entropy).parameters["alpha"].default == 0.5
    assert result.alpha == 0.5 and result.normalizer == "abs"
    assert result.estimate == pytest.approx(entropy(s_half, s_1, 0.5), rel=1e-14)
    assert (result.s_alpha, result.s_1) == pytest.approx((s_half, s_1), rel=1e-14)


def test_exact_eigenvalues_give_no_stderr_no_samples_and_their_config():
    result = renyi_entropy(torch.tensor([1.0, 2.0, 5.0], dtype=DT), alpha=2.0)
    assert result.stderr is None and result.samples is None
    assert result.config == {"source": "eigenvalues", "n": 3}
    assert result.s_1 == 8.0 and result.s_alpha == 30.0


def test_float32_eigenvalues_are_summed_in_float64():
    lam32 = torch.tensor([1e-3, 7.0, 1.0 / 3.0, 2.5e4, 0.1], dtype=torch.float32)
    lam = lam32.to(DT).tolist()  # the float32 values, exactly
    s_a, s_1 = math.fsum(x**1.5 for x in lam), math.fsum(lam)
    result = renyi_entropy(lam32, alpha=1.5)
    assert result.s_1 == pytest.approx(s_1, rel=1e-15) and result.s_alpha == pytest.approx(s_a, rel=1e-15)
    assert result.estimate == pytest.approx(entropy(s_a, s_1, 1.5), rel=1e-13)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_slq_sums_config_and_jackknife_by_hand(alpha):
    result = renyi_entropy(slq_record(NODES, WEIGHTS, NORMS), alpha=alpha)
    a, one = per_probe(lambda t: abs(t) ** alpha), per_probe(abs)
    p = len(a)
    assert result.samples.shape == (p, 2)
    assert result.samples.reshape(-1).tolist() == pytest.approx([v for pair in zip(a, one) for v in pair], rel=1e-14)
    assert (result.s_alpha, result.s_1) == pytest.approx((sum(a) / p, sum(one) / p), rel=1e-14)
    assert result.estimate == pytest.approx(entropy(sum(a) / p, sum(one) / p, alpha), rel=1e-13)
    loo = [entropy((sum(a) - a[i]) / (p - 1), (sum(one) - one[i]) / (p - 1), alpha) for i in range(p)]
    mean = sum(loo) / p
    assert result.stderr == pytest.approx(math.sqrt((p - 1) / p * sum((v - mean) ** 2 for v in loo)), rel=1e-12)
    assert result.config == {"method": "slq", "m": 2, "source": "slq"}


def test_two_probes_already_give_a_jackknife():
    result = renyi_entropy(slq_record(NODES[:2], WEIGHTS[:2], NORMS[:2]), alpha=2.0)
    assert result.samples.shape == (2, 2) and result.stderr is not None and result.stderr > 0


def test_signed_normalizer_warns_from_the_callers_line_past_one_percent_of_the_abs_trace():
    # per-probe ‖z‖² Σ w θ = 4(0.5 − 0.375) = 0.5, 3.5·2 = 7, 5(0.45 + 0.4) = 4.25; with |θ| the first is
    # 4(0.5 + 0.375) = 3.5, so the probe means differ by 3/3 = 1 of Tr|H| = 14.75/3
    record = slq_record(NODES, WEIGHTS, NORMS)
    with pytest.warns(UserWarning, match="Tr\\|H\\| − Tr H = 1 exceeds 1% of Tr\\|H\\|") as caught:
        result = renyi_entropy(record, alpha=2.0, normalizer="signed")
    # stacklevel=2: the caller, not renyi.py (under mutmut, whose trampoline adds a frame per mutated
    # call, the same stacklevel lands in the trampoline)
    assert caught[0].filename == __file__ or caught[0].filename.endswith("mutmut/mutation/trampoline.py")
    assert result.s_1 == pytest.approx((0.5 + 7 + 4.25) / 3, rel=1e-14)


@pytest.mark.parametrize("lam, warns", [
    ([99.5, -0.5], False),   # Tr|H| − Tr H = 1 = 1% of Tr|H| = 100 exactly: not past it
    ([99.75, -0.25], False),  # 0.5 of 100
    ([99.25, -0.75], True),   # 1.5 of 100
    ([3.0, 1.0], False),      # PSD: Tr H = Tr|H|
])
def test_signed_warning_threshold_is_strictly_one_percent(lam, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = renyi_entropy(torch.tensor(lam, dtype=DT), alpha=2.0, normalizer="signed")
    assert bool(caught) == warns
    assert result.s_1 == sum(lam) and result.s_alpha == sum(x * x for x in lam)


def test_other_normalizers_never_warn_about_the_signed_trace():
    lam = torch.tensor([2.0, -3.0, 1.0], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clamp = renyi_entropy(lam, alpha=2.0, normalizer="clamp")
        absolute = renyi_entropy(lam, alpha=2.0, normalizer="abs")
    assert (clamp.s_1, clamp.s_alpha) == (3.0, 5.0) and (absolute.s_1, absolute.s_alpha) == (6.0, 14.0)


def test_nonpositive_s1_errors_name_the_normalizers_sum():
    with pytest.raises(ValueError, match="^Tr H = -1 ≤ 0"):
        renyi_entropy(torch.tensor([1.0, -2.0], dtype=DT), normalizer="signed")
    with pytest.raises(ValueError, match="^the 'clamp' spectral mass S₁ = 0 ≤ 0"):
        renyi_entropy(torch.tensor([-1.0, -2.0], dtype=DT), normalizer="clamp")

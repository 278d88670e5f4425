"""Survivors of the mutation run on quotientsharp/curvature/trace.py: Hutchinson and Hutch++.

Ground truth is rebuilt outside the code under test from small explicit float64 matrices: the
probes are redrawn by hand from ``torch.Generator().manual_seed(seed)`` in the documented order
(Rademacher ``2·randint(0, 2) − 1`` or ``randn``; Hutch++ draws the sketch S first, then the
residual probes G), the per-probe values ``zᵀAz`` and their mean / ``std/√P`` are computed densely,
Hutch++'s sketch is ``Q = qr(A S).Q`` with ``tr(QᵀAQ)`` plus the Hutchinson mean on
``(I − QQᵀ)G``, and the early stop (``stderr ≤ rtol·|estimate|`` after each block, from
``min_probes`` on) is replayed block by block. Also checked: the config dicts written out field by
field, the exact error messages, the budget rule ``s = budget // 3 ≥ 1, budget − 2s ≥ 2`` at its
boundary, the progress bars on stderr (description, ``total=3`` for Hutch++, erased on close) and
that probes reach the operator on its device (the ``meta`` device stands in for a GPU).
"""
from __future__ import annotations

import math

import pytest
import torch
from tensor_checks import DT, DeviceProbe, gen, meta_operator, randn

from quotientsharp.curvature.trace import hutch_plus_plus, hutchinson


def sym(n: int, seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with a dominant positive diagonal (trace far from 0)."""
    B = randn(n, n, seed=seed)
    return B + B.T + 4 * n * torch.eye(n, dtype=DT)


def draw(n: int, count: int, distribution: str, g: torch.Generator) -> torch.Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (n, count), generator=g).to(DT) * 2 - 1
    return torch.randn(n, count, generator=g, dtype=DT)


def quad(A: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """``z_pᵀ A z_p`` for each column."""
    return torch.einsum("ip,ij,jp->p", Z, A, Z)


def stats(x: torch.Tensor) -> tuple[float, float | None]:
    p = x.numel()
    mean = sum(x.tolist()) / p
    if p == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in x.tolist()) / (p - 1) / p)


def by_hand_hutchinson(A, n_probes, distribution="rademacher", seed=0):
    return quad(A, draw(A.shape[0], n_probes, distribution, gen(seed)))


def by_hand_hutch_pp(A, budget, distribution="rademacher", seed=0):
    n, s = A.shape[0], budget // 3
    g = gen(seed)
    Q = torch.linalg.qr(A @ draw(n, s, distribution, g)).Q
    low = float(torch.trace(Q.T @ A @ Q))
    G = draw(n, budget - 2 * s, distribution, g)
    G = (torch.eye(n, dtype=DT) - Q @ Q.T) @ G
    return low, quad(A, G)


def erased_bar(err: str, desc: str) -> bool:
    """A bar described ``desc`` was drawn and erased on close (``leave=False``): no newline, and
    the last thing written is a blank line ended by a carriage return."""
    return desc + ":" in err and "\n" not in err and err.endswith("\r") and err.split("\r")[-2].strip() == ""


# --------------------------------------------------------------------------------------------------
# Hutchinson
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_samples_mean_stderr_and_config_by_hand(distribution):
    A = sym(9, seed=1)
    result = hutchinson(A, n_probes=13, distribution=distribution, seed=5, block_size=4, progress=False)
    samples = by_hand_hutchinson(A, 13, distribution, seed=5)
    torch.testing.assert_close(result.samples, samples, rtol=1e-12, atol=1e-12)
    mean, stderr = stats(samples)
    assert result.value == pytest.approx(mean, rel=1e-12)
    assert result.stderr == pytest.approx(stderr, rel=1e-10)
    assert result.config == {"method": "hutchinson", "n_probes": 13, "distribution": distribution,
                             "seed": 5, "rtol": None, "n": 9}


def test_hutchinson_defaults_100_probes_seed_0_and_a_progress_bar(capsys):
    A = sym(7, seed=2)
    capsys.readouterr()
    result = hutchinson(A)
    assert erased_bar(capsys.readouterr().err, "Hutchinson")
    torch.testing.assert_close(result.samples, by_hand_hutchinson(A, 100, seed=0), rtol=1e-12, atol=1e-12)
    assert result.config["n_probes"] == 100 and result.config["seed"] == 0


def test_hutchinson_progress_bar_counts_blocks_and_is_erased(capsys):
    A = sym(5)
    capsys.readouterr()
    hutchinson(A, n_probes=7, block_size=3, progress=True)
    err = capsys.readouterr().err
    assert erased_bar(err, "Hutchinson") and "0/3" in err
    hutchinson(A, n_probes=7, block_size=3, progress=False)
    assert capsys.readouterr().err == ""


def test_hutchinson_default_rtol_stop_is_after_the_first_block_of_ten():
    """min_probes = 10 and block_size = 10 by default: a loose rtol stops after 10 probes."""
    A = sym(6, seed=3)
    result = hutchinson(A, n_probes=50, rtol=10.0, progress=False)
    samples = by_hand_hutchinson(A, 50)[:10]
    torch.testing.assert_close(result.samples, samples, rtol=1e-12, atol=1e-12)
    mean, stderr = stats(samples)
    assert result.value == pytest.approx(mean, rel=1e-12) and result.stderr == pytest.approx(stderr, rel=1e-10)
    assert result.config == {"method": "hutchinson", "n_probes": 10, "distribution": "rademacher",
                             "seed": 0, "rtol": 10.0, "n": 6}


@pytest.mark.parametrize("min_probes", [2, 3, 5])
def test_hutchinson_stops_exactly_at_min_probes(min_probes):
    A = sym(6, seed=3)
    result = hutchinson(A, n_probes=20, rtol=10.0, min_probes=min_probes, block_size=1, progress=False)
    assert result.samples.numel() == min_probes


def test_hutchinson_never_stops_on_a_single_sample_without_stderr():
    A = sym(6, seed=3)
    result = hutchinson(A, n_probes=20, rtol=10.0, min_probes=1, block_size=1, progress=False)
    assert result.samples.numel() == 2


def test_hutchinson_replays_the_stopping_rule_block_by_block():
    A = sym(8, seed=4)
    all_samples = by_hand_hutchinson(A, 60, seed=2)
    rtol = 0.0087
    stop = 60
    for used in range(3, 61, 3):
        mean, stderr = stats(all_samples[:used])
        if used >= 10 and stderr <= rtol * abs(mean):
            stop = used
            break
    # rtol is met at 9 probes already, but only counts from min_probes = 10 on; it stops inside the run
    assert stats(all_samples[:9])[1] <= rtol * abs(stats(all_samples[:9])[0]) and 12 < stop < 60
    result = hutchinson(A, n_probes=60, seed=2, rtol=rtol, min_probes=10, block_size=3, progress=False)
    torch.testing.assert_close(result.samples, all_samples[:stop], rtol=1e-12, atol=1e-12)


def test_hutchinson_does_not_stop_while_stderr_exceeds_rtol():
    A = sym(6, seed=3)
    assert len(set(by_hand_hutchinson(A, 20, seed=1).tolist())) > 1
    result = hutchinson(A, n_probes=20, seed=1, rtol=1e-15, min_probes=2, block_size=1, progress=False)
    assert result.samples.numel() == 20


def test_hutchinson_stops_when_stderr_equals_rtol_times_estimate():
    """Rademacher probes on a diagonal matrix give zᵀAz = Tr A exactly: stderr 0 ≤ 0·|estimate|."""
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=DT))
    result = hutchinson(A, n_probes=20, rtol=0.0, min_probes=5, block_size=1, progress=False)
    assert result.samples.tolist() == [11.0] * 5
    assert result.value == 11.0 and result.stderr == 0.0


def test_hutchinson_rejects_zero_probes_naming_itself():
    with pytest.raises(ValueError, match=r"^hutchinson: n_probes must be an integer >= 1, got 0$"):
        hutchinson(sym(3), n_probes=0, progress=False)


def test_hutchinson_sends_probes_to_the_operator_device():
    op, seen = meta_operator(4)
    with pytest.raises(DeviceProbe):
        hutchinson(op, n_probes=3, progress=False)
    assert seen == [torch.device("meta")]


# --------------------------------------------------------------------------------------------------
# Hutch++
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutch_plus_plus_by_hand(distribution):
    A = sym(12, seed=6)
    result = hutch_plus_plus(A, budget=11, distribution=distribution, seed=4, progress=False)
    low, samples = by_hand_hutch_pp(A, 11, distribution, seed=4)
    torch.testing.assert_close(result.samples, samples, rtol=1e-9, atol=1e-9)
    mean, stderr = stats(samples)
    assert result.value == pytest.approx(low + mean, rel=1e-10)
    assert result.stderr == pytest.approx(stderr, rel=1e-8)
    assert set(result.config) == {"method", "budget", "sketch_size", "distribution", "seed", "n", "low_rank_trace"}
    assert result.config["low_rank_trace"] == pytest.approx(low, rel=1e-10)
    assert {k: v for k, v in result.config.items() if k != "low_rank_trace"} == {
        "method": "hutch++", "budget": 11, "sketch_size": 3, "distribution": distribution, "seed": 4, "n": 12}


def test_hutch_plus_plus_defaults_budget_99_seed_0_and_a_progress_bar(capsys):
    A = sym(40, seed=7)  # n > s = 33, so the residual part is not zero
    capsys.readouterr()
    result = hutch_plus_plus(A)
    err = capsys.readouterr().err
    assert erased_bar(err, "Hutch++") and "0/3" in err
    low, samples = by_hand_hutch_pp(A, 99, seed=0)
    assert result.config["budget"] == 99 and result.config["sketch_size"] == 33 and result.config["seed"] == 0
    torch.testing.assert_close(result.samples, samples, rtol=1e-8, atol=1e-8)
    assert result.value == pytest.approx(low + stats(samples)[0], rel=1e-10)


def test_hutch_plus_plus_progress_bar_is_silent_when_off(capsys):
    capsys.readouterr()
    hutch_plus_plus(sym(5), budget=6, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("budget", [-1, 0, 1, 2, 3])
def test_hutch_plus_plus_rejects_budgets_below_four(budget):
    with pytest.raises(ValueError, match=rf"^Hutch\+\+ needs a budget of at least 4 matvecs, got {budget}$"):
        hutch_plus_plus(sym(5), budget=budget, progress=False)


@pytest.mark.parametrize(("budget", "sketch", "residual"), [(4, 1, 2), (5, 1, 3), (6, 2, 2), (7, 2, 3), (8, 2, 4),
                                                             (9, 3, 3)])
def test_hutch_plus_plus_splits_the_budget_into_thirds(budget, sketch, residual):
    A = sym(10, seed=8)
    result = hutch_plus_plus(A, budget=budget, seed=1, progress=False)
    assert result.config["sketch_size"] == sketch and result.samples.numel() == residual
    low, samples = by_hand_hutch_pp(A, budget, seed=1)
    torch.testing.assert_close(result.samples, samples, rtol=1e-9, atol=1e-9)
    assert result.value == pytest.approx(low + stats(samples)[0], rel=1e-10)


def test_hutch_plus_plus_sends_the_sketch_to_the_operator_device():
    op, seen = meta_operator(6)
    with pytest.raises(DeviceProbe):
        hutch_plus_plus(op, budget=6, progress=False)
    assert seen == [torch.device("meta")]


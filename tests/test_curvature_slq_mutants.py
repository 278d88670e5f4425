"""Survivors of the mutation run on quotientsharp/curvature/slq.py: where Lanczos restarts draw
from, the probes' dtype and device, the progress default, and the SLQResult/SpectralDensity records.

Ground truth is dense float64 linear algebra: on ``A = diag(1, 1, 2, 2, 3, 3)`` a probe's Krylov
space has dimension 3, so Lanczos breaks down after three steps and restarts from a Gaussian
vector drawn from the run's generator *after* the probes (same seed); the rule's last two nodes
are then the Ritz values of ``A`` on ``span(q, Aq)`` for that vector ``q`` made orthogonal to the
first Krylov space, computed here from the matrix.
"""
from __future__ import annotations

import pytest
import torch
from tensor_checks import DT, DeviceProbe, gen, meta_operator

from quotientsharp.curvature.slq import SLQResult, slq

A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=DT))


def restart_nodes(seed: int) -> torch.Tensor:
    """Sorted nodes of a 5-step rule from the seeded Rademacher probe, restarting after step 3."""
    g = gen(seed)
    z = (torch.randint(0, 2, (6, 1), generator=g).to(DT) * 2 - 1)[:, 0]
    K = torch.linalg.qr(torch.stack([z, A @ z, A @ A @ z], 1)).Q
    q = torch.randn(6, generator=g, dtype=DT)
    q = q - K @ (K.T @ q)
    q = q - K @ (K.T @ q)
    B = torch.linalg.qr(torch.stack([q, A @ q], 1)).Q
    ritz = torch.linalg.eigvalsh(B.T @ A @ B)
    return torch.cat([torch.tensor([1.0, 2.0, 3.0], dtype=DT), ritz]).sort().values


@pytest.mark.parametrize("lockstep", [True, False])
@pytest.mark.parametrize("seed", [0, 3])
def test_restart_vectors_come_from_the_generator_after_the_probes(seed, lockstep):
    result = slq(A, m=5, n_probes=1, seed=seed, lockstep=lockstep, progress=False)
    expected = restart_nodes(seed)
    assert not torch.allclose(expected[[1, 3]], torch.tensor([1.0, 2.0], dtype=DT))  # q shows in the rule
    torch.testing.assert_close(result.nodes[0].sort().values, expected, rtol=1e-9, atol=1e-9)


def test_float32_probes_run_in_float64():
    probes = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.0, 1.0], [2.0, 0.25], [1.0, 1.0], [-0.5, 1.5]])
    as_given = slq(A + torch.diag(torch.arange(6, dtype=DT) / 10), m=4, probes=probes, progress=False)
    in_double = slq(A + torch.diag(torch.arange(6, dtype=DT) / 10), m=4, probes=probes.to(DT), progress=False)
    assert as_given.nodes.dtype == DT
    torch.testing.assert_close(as_given.nodes, in_double.nodes, rtol=0, atol=0)
    torch.testing.assert_close(as_given.probe_norms_sq, (probes.to(DT) ** 2).sum(0), rtol=1e-15, atol=0)


def test_progress_is_shown_by_default(capsys):
    capsys.readouterr()
    slq(A, m=3, n_probes=2)
    assert "Lanczos (lockstep)" in capsys.readouterr().err
    slq(A, m=3, n_probes=2, progress=False)
    assert capsys.readouterr().err == ""


def test_sequential_probes_reach_the_operator_on_its_device():
    """The ``meta`` device stands in for a GPU: the first matvec sees where the probe was sent."""
    op, seen = meta_operator(6)
    with pytest.raises(DeviceProbe):
        slq(op, m=3, n_probes=2, lockstep=False, progress=False)
    assert seen == [torch.device("meta")]


def test_result_traces_default_to_the_first_power_and_name_the_function():
    nodes = torch.tensor([[2.0, -0.5], [3.0, 1.0]], dtype=DT)
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=DT)
    record = SLQResult(nodes, weights, torch.tensor([4.0, 2.0], dtype=DT), n=6, config={"m": 2})
    # per probe ‖z‖² Σ w |θ|: 4(0.5 + 0.375) = 3.5 and 2(1.5 + 0.5) = 4
    assert record.abs_power_trace().value == pytest.approx(3.75, rel=1e-15)
    assert record.abs_power_trace().config == {"m": 2, "function": "abs_power_1.0"}
    assert record.spectral_sum(torch.exp).config == {"m": 2, "function": "f"}


def test_density_record_is_json_ready():
    record = SLQResult(torch.tensor([[1.0, 2.0]], dtype=DT), torch.tensor([[0.5, 0.5]], dtype=DT),
                       torch.tensor([6.0], dtype=DT), n=6, config={"m": 2})
    density = record.density(n_grid=5, padding=0.5, variance=0.25)
    data = density.to_dict()
    assert data["grid"] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5], rel=1e-15)
    assert data["variance"] == 0.25 and data["config"] == {"m": 2, "n_grid": 5, "padding": 0.5}
    grid = torch.linspace(0.5, 2.5, 5, dtype=DT)
    phi = sum(0.5 * torch.exp(-(grid - t) ** 2 / 0.5) / (0.5 * torch.pi) ** 0.5 for t in (1.0, 2.0))
    assert data["density"] == pytest.approx((phi / torch.trapezoid(phi, grid)).tolist(), rel=1e-12)

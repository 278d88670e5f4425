"""Stochastic trace estimators: Hutchinson and Hutch++ (spec §4).

Both estimate the matrix trace ``Tr A = Σ_i A_ii`` with Euclidean probes ``zᵀ A z``
(``E[z zᵀ] = I``, :func:`~quotientsharp.curvature.probes.sample_probes`), whatever inner product
the operator carries: unbiased for any square ``A``, so they deliberately do not use an
operator's own :meth:`~quotientsharp.curvature.operators.LinearOperator.sample_probes` (which are
matched to its inner product, as SLQ needs).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from quotientsharp.curvature.operators import as_operator
from quotientsharp.curvature.probes import DISTRIBUTIONS, sample_probes
from quotientsharp.curvature.results import Estimate, mean_and_stderr
from quotientsharp.validation import check_count

__all__ = ["DISTRIBUTIONS", "hutch_plus_plus", "hutchinson", "sample_probes"]


def hutchinson(
    op,
    n_probes: int = 100,
    distribution: str = "rademacher",
    seed: int = 0,
    probes: torch.Tensor | None = None,
    rtol: float | None = None,
    min_probes: int = 10,
    block_size: int = 10,
    progress: bool = True,
) -> Estimate:
    """Hutchinson: ``Tr A ≈ (1/P) Σ_p z_pᵀ A z_p``; stderr = sample std/√P.

    Probes are applied ``block_size`` at a time through ``matmat``. ``probes`` ``(n, P)`` overrides
    sampling. ``rtol``: stop once ``stderr ≤ rtol·|estimate|`` (checked after each block, from
    ``min_probes`` on). Single-sample variance: ``2(‖A‖_F² − Σ A_ii²)`` Rademacher, ``2‖A‖_F²`` Gaussian.
    """
    op = as_operator(op)
    n = op.shape[0]
    if probes is None:
        check_count("n_probes", n_probes, 1, "hutchinson")
        probes = sample_probes(n, n_probes, distribution, torch.Generator().manual_seed(seed))
    samples = []
    for start in tqdm(range(0, probes.shape[1], block_size), desc="Hutchinson", disable=not progress, leave=False):
        Z = probes[:, start : start + block_size].to(op.device)
        samples.append((Z * op.matmat(Z)).sum(0).cpu())
        used = torch.cat(samples)
        if rtol is not None and used.numel() >= min_probes:
            estimate, stderr = mean_and_stderr(used)
            if stderr is not None and stderr <= rtol * abs(estimate):
                break
    samples = torch.cat(samples)
    estimate, stderr = mean_and_stderr(samples)
    return Estimate(estimate, stderr, samples, {
        "method": "hutchinson", "n_probes": samples.numel(), "distribution": distribution,
        "seed": seed, "rtol": rtol, "n": n,
    })


def hutch_plus_plus(
    op, budget: int = 99, distribution: str = "rademacher", seed: int = 0, progress: bool = True
) -> Estimate:
    """Hutch++ with ``budget`` matvecs: ``s = budget//3`` sketch probes S, ``Q = orth(A S)``,

    ``Tr A ≈ tr(Qᵀ A Q) + mean_g gᵀ(I−QQᵀ) A (I−QQᵀ) g`` over ``budget − 2s`` probes g. ``samples``
    are the residual-probe values; ``stderr`` is theirs (conditional on the sketch).
    """
    op = as_operator(op)
    n = op.shape[0]
    s = budget // 3
    if s < 1 or budget - 2 * s < 2:
        raise ValueError(f"Hutch++ needs a budget of at least 4 matvecs, got {budget}")
    generator = torch.Generator().manual_seed(seed)
    with tqdm(total=3, desc="Hutch++", disable=not progress, leave=False) as bar:
        Q = torch.linalg.qr(op.matmat(sample_probes(n, s, distribution, generator).to(op.device))).Q
        bar.update()
        low_rank = float(torch.trace(Q.T @ op.matmat(Q)))
        bar.update()
        G = sample_probes(n, budget - 2 * s, distribution, generator).to(op.device)
        G = G - Q @ (Q.T @ G)
        samples = (G * op.matmat(G)).sum(0).cpu()
        bar.update()
    mean, stderr = mean_and_stderr(samples)
    return Estimate(low_rank + mean, stderr, samples, {
        "method": "hutch++", "budget": budget, "sketch_size": s, "distribution": distribution,
        "seed": seed, "n": n, "low_rank_trace": low_rank,
    })

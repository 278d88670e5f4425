"""Random probe vectors for the stochastic estimators (Hutchinson, Hutch++, SLQ)."""
from __future__ import annotations

import torch

DISTRIBUTIONS = ("rademacher", "gaussian")


def sample_probes(
    n: int, count: int, distribution: str = "rademacher", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(n, count)`` float64 probes with ``E[z zᵀ] = I``: Rademacher (±1) or standard Gaussian
    entries, drawn on CPU (device-independent draws for a given generator)."""
    if distribution == "rademacher":
        return torch.randint(0, 2, (n, count), generator=generator).to(torch.float64) * 2 - 1
    if distribution == "gaussian":
        return torch.randn(n, count, generator=generator, dtype=torch.float64)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")

"""Result records shared by the curvature estimators, each JSON-serialisable via ``to_dict()``."""
from __future__ import annotations

import dataclasses
import math

import torch

from quotientsharp.serialize import jsonable  # noqa: F401  (the curvature modules import it from here)


@dataclasses.dataclass
class Estimate:
    """A scalar estimate ``value`` with its standard error (``None`` when it does not apply).

    ``value`` is the result field shared with :class:`~quotientsharp.measures.SharpnessResult`;
    ``estimate`` is a read-only alias of it. ``samples``: the raw per-probe (or per-trial) values
    it was averaged from; ``config``: every setting needed to reproduce it (probe count, seed,
    Lanczos steps, ...).
    """

    value: float
    stderr: float | None = None
    samples: torch.Tensor | None = None
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def estimate(self) -> float:
        """Read-only alias of ``value`` (the field's former name)."""
        return self.value

    def to_dict(self) -> dict:
        """The record as JSON-ready data (:func:`quotientsharp.serialize.jsonable`: non-finite floats become ``None``)."""
        return jsonable(self)


def mean_and_stderr(samples: torch.Tensor) -> tuple[float, float | None]:
    """Sample mean and std/√P (``None`` for a single sample)."""
    p = samples.numel()
    stderr = float(samples.std(unbiased=True) / math.sqrt(p)) if p > 1 else None
    return float(samples.mean()), stderr

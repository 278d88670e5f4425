"""Result records shared by the curvature estimators, each JSON-serialisable via ``to_dict()``."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch


def jsonable(obj: Any) -> Any:
    """Tensors/arrays → nested lists, dataclasses/dicts/sequences recursively, non-finite floats → str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


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
        """Read-only alias of :attr:`value` (the field's former name)."""
        return self.value

    def to_dict(self) -> dict:
        return jsonable(self)


def mean_and_stderr(samples: torch.Tensor) -> tuple[float, float | None]:
    """Sample mean and std/√P (``None`` for a single sample)."""
    p = samples.numel()
    stderr = float(samples.std(unbiased=True) / math.sqrt(p)) if p > 1 else None
    return float(samples.mean()), stderr

"""``SharpnessResult``: the value of a sharpness measure, its per-batch details and its config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..serialize import jsonable


@dataclass
class SharpnessResult:
    """Output of every sharpness measure.

    Attributes:
        value: ``(1/B) sum_S s_S``, the mean over batches of the per-batch sharpness ``s_S``.
        per_batch: ``s_S`` per batch (worst case: ``max L_S(gamma_xi(1)) - L_S(w0)``; average case:
            the sample mean of the increase).
        stderr: worst case, the standard error of ``value`` over batches (None for one batch);
            average case, ``sqrt(sum_S se_S^2) / B`` from the per-batch sampling errors.
        base_loss: ``L_S(w0)`` per batch.
        error_increase: mean over batches of the top-1 error increase at ``xi_best`` (worst case)
            or averaged over samples (average case); None unless the task is classification.
        extras: per batch, e.g. ``xi_norm`` (``||xi_best||_{w0}``), ``n_halvings``,
            ``error_increase`` (worst); ``stderr`` (average); ``max_relative_perturbation``
            (both: ``max ||xi_G||_F / ||G||_F`` over GL blocks, at ``xi_best`` or over the draws).
        traces: per batch, per run, the loss increase and step size at every iteration (worst).
        config: everything needed to reproduce the number (JSON-serialisable).
    """

    value: float
    per_batch: list[float]
    stderr: float | None
    base_loss: list[float]
    error_increase: float | None
    extras: list[dict] = field(default_factory=list)
    traces: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (:func:`quotientsharp.serialize.jsonable`: non-finite floats become None)."""
        return jsonable(self)

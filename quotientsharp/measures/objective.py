"""The function every measure maximises: ``params -> (L_S(params), error_S(params))`` on one batch.

A model is either an ``nn.Module`` (called through ``functional_call``, so the module's own
weights are never touched) or a plain callable ``model(params, inputs) -> outputs``. Parameters
absent from ``params`` (and all buffers) keep the module's values.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import functional as F
from ..types import LossFn
from ..validation import conform_inputs_for


def normalize_logits(outputs: torch.Tensor) -> torch.Tensor:
    """Centre each row of logits and divide by its L2 norm (spec part 2 §2, off by default)."""
    centred = outputs - outputs.mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(outputs.dtype).tiny)


def error_rate(outputs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Top-1 error for ``(batch, classes)`` logits and integer ``(batch,)`` targets, else None."""
    if (outputs.ndim == 2 and outputs.shape[1] > 1 and targets.ndim == 1
            and not targets.is_floating_point() and targets.shape[0] == outputs.shape[0]):
        return float((outputs.argmax(dim=1) != targets).double().mean())
    return None


class BatchObjective:
    """``L_S(params)`` (a 0-d tensor, mean over the batch) and the error rate on one batch."""

    def __init__(self, model: nn.Module | Callable[[Mapping, Any], torch.Tensor], batch: Any,
                 loss_fn: LossFn, logit_normalization: bool = False):
        self.model, self.loss_fn, self.logit_normalization = model, loss_fn, logit_normalization
        self.inputs, self.targets = F.split_batch(batch)
        self.inputs = conform_inputs_for(model, self.inputs, "sharpness")

    def outputs(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(self.model, nn.Module):
            out = F.forward(self.model, params, self.inputs)
        else:
            out = self.model(params, self.inputs)
        return normalize_logits(out) if self.logit_normalization else out

    def __call__(self, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, float | None]:
        out = self.outputs(params)
        loss = self.loss_fn(out, self.targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (mean over the batch), got {shape}")
        return loss, error_rate(out.detach(), self.targets)

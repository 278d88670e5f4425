"""Plumbing shared by the sharpness-aware optimizers.

- :class:`WrappedOptimizer`: a ``torch.optim.Optimizer`` that drives a base optimizer and shares
  its ``param_groups`` (so LR schedulers work on either) and checkpoints it in ``state_dict()``;
- :func:`bn_frozen`: BatchNorm running statistics restored bit-exactly after a block;
- :func:`check_rho`, :func:`check_param_groups`: the hyperparameter validation shared by every
  optimizer here (SAM, ASAM, RSAM, GeodesicSAM, RiemannianSGD, SAF, MESA), built on
  :mod:`quotientsharp.validation`; errors name the optimizer, the hyperparameter and its value;
- foreach helpers over lists of tensors.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from quotientsharp.adapters.resolve import unwrap  # noqa: F401  (re-exported: optim's import path)
from quotientsharp.types import Tensors
from quotientsharp.validation import check_count, check_number

# Ranges of the base optimizers' per-group hyperparameters (torch.optim names); any other real
# number in a param group must not be NaN.
GROUP_RANGES: dict[str, dict[str, Any]] = {
    "lr": {"low": 0.0},
    "momentum": {"low": 0.0, "high": 1.0},
    "dampening": {"low": 0.0, "high": 1.0},
    "weight_decay": {"low": 0.0},
    "eps": {"low": 0.0},
    "alpha": {"low": 0.0, "high": 1.0},
    "lr_decay": {"low": 0.0},
    "initial_accumulator_value": {"low": 0.0},
}


def check_rho(owner: str, rho: Any) -> float:
    """ρ must be a finite number > 0 (NaN or inf would turn every weight into NaN in one step)."""
    return check_number("rho", rho, low=0.0, low_open=True, owner=owner)


def check_hyperparameters(owner: str, values: dict, suffix: str = "") -> None:
    """Validate the numeric hyperparameters in ``values`` (base-optimizer keyword arguments or a
    param group): lr, weight_decay, eps ≥ 0 and finite; momentum, dampening, alpha in [0, 1]; each
    of betas in [0, 1); any other real number not NaN. ``suffix`` follows the name in errors."""
    for key, value in values.items():
        if key == "params" or isinstance(value, bool):
            continue
        name = f"{key}{suffix}"
        if key == "betas" and isinstance(value, (tuple, list)):
            for j, beta in enumerate(value):
                check_number(f"{key}[{j}]{suffix}", beta, low=0.0, high=1.0, high_open=True, owner=owner)
        elif key in GROUP_RANGES:
            check_number(name, value, **GROUP_RANGES[key], owner=owner)
        elif isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{owner}: {name} must not be NaN")


def check_param_groups(owner: str, param_groups: list[dict], first: int = 0) -> None:
    """:func:`check_hyperparameters` on every param group (numbered from ``first`` in errors when
    there are several)."""
    several = first > 0 or len(param_groups) > 1
    for i, group in enumerate(param_groups, start=first):
        check_hyperparameters(owner, group, f" (param group {i})" if several else "")


def check_distillation(owner: str, lam: Any, tau: Any, start_epoch: Any, end_epoch: Any,
                       label_smoothing: Any) -> tuple[float, float, float]:
    """SAF/MESA: λ ≥ 0 and τ > 0 finite, start_epoch an integer ≥ 0, end_epoch > start_epoch
    (inf allowed), label_smoothing in [0, 1]; returns ``(λ, τ, label_smoothing)`` as floats."""
    lam = check_number("lam", lam, low=0.0, owner=owner)
    tau = check_number("tau", tau, low=0.0, low_open=True, owner=owner)
    start = check_count("start_epoch", start_epoch, 0, owner)
    check_number("end_epoch", end_epoch, low=start, low_open=True, finite=False, owner=owner)
    label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0, owner=owner)
    return lam, tau, label_smoothing


def _reduction_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The widest floating dtype of ``tensors``, at least float32 (mixed float32/float64 lists reduce in float64)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t₁, …, t_n)‖₂ over all entries: per-tensor norms (in the widest dtype, float32 or wider)
    stacked, then normed."""
    if not tensors:
        raise ValueError("global_norm of an empty list of tensors")
    norms = torch._foreach_norm(list(tensors), 2, dtype=_reduction_dtype(tensors))
    return torch.linalg.vector_norm(torch.stack(norms))


def global_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ of all entries of non-negative tensors (a foreach L1 norm, in the widest dtype)."""
    return torch.stack(torch._foreach_norm(list(tensors), 1, dtype=_reduction_dtype(tensors))).sum()


def params_with_grads(param_groups: Iterable[dict]) -> tuple[Tensors, Tensors]:
    """The parameters of ``param_groups`` that have a ``.grad``, and those gradients."""
    params = [p for g in param_groups for p in g["params"] if p.grad is not None]
    return params, [p.grad for p in params]


def all_params(param_groups: Iterable[dict]) -> Tensors:
    return [p for g in param_groups for p in g["params"]]


def is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> Tensors:
    """Mean over ranks of each tensor (one flat all-reduce); new tensors, inputs untouched."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@contextlib.contextmanager
def bn_frozen(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm buffer (running mean/var, ``num_batches_tracked``) after the block.

    Forward passes inside still normalise with batch statistics (train mode); only the running
    estimates are put back, bit-identically, so a second (perturbed) pass does not update them.
    """
    saved = [
        (buf, buf.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)


class WrappedOptimizer(torch.optim.Optimizer):
    """``base_optimizer_cls(params, **base_kwargs)`` behind a ``torch.optim.Optimizer`` façade.

    Both objects hold the same ``param_groups`` dicts, so an LR scheduler built on either changes
    both. ``state_dict()`` carries the base optimizer's state under ``"base_optimizer"``.
    """

    def __init__(self, params: Any, base_optimizer_cls: type[torch.optim.Optimizer], **base_kwargs):
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(
                f"base_optimizer_cls must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), "
                f"got {base_optimizer_cls!r}"
            )
        super().__init__(params, {})
        owner = type(self).__name__
        check_hyperparameters(owner, base_kwargs)
        check_param_groups(owner, self.param_groups)
        try:
            self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        except TypeError as err:
            raise TypeError(f"{owner}: the base optimizer {base_optimizer_cls.__name__} refused the "
                            f"arguments {sorted(base_kwargs)}: {err}") from err
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        check_param_groups(owner, self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
            try:
                check_param_groups(type(self).__name__, self.param_groups[-1:], len(self.param_groups) - 1)
            except (TypeError, ValueError):
                self.param_groups.pop()
                raise
        else:  # during torch.optim.Optimizer.__init__
            super().add_param_group(param_group)

    def run_closure_once(self, closure: Callable[[], Any]) -> Any:
        """Zero grads, call ``closure`` under ``enable_grad``, check it produced gradients."""
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        if not any(p.grad is not None for p in all_params(self.param_groups)):
            raise RuntimeError("the closure left no gradient: it must call loss.backward()")
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_optimizer")
        super().load_state_dict(state_dict)
        self.base_optimizer.load_state_dict(base_state)
        self.param_groups = self.base_optimizer.param_groups

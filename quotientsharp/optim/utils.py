"""Plumbing shared by the sharpness-aware optimizers.

- :class:`WrappedOptimizer`: a ``torch.optim.Optimizer`` that drives a base optimizer and shares
  its ``param_groups`` (so LR schedulers work on either) and checkpoints it in ``state_dict()``;
- :func:`bn_frozen`: BatchNorm running statistics restored bit-exactly after a block;
- foreach helpers over lists of tensors.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Tensors = list[torch.Tensor]


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t₁, …, t_n)‖₂ over all entries: per-tensor norms (float32 or wider) stacked, then normed."""
    if not tensors:
        raise ValueError("global_norm of an empty list of tensors")
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    norms = torch._foreach_norm(list(tensors), 2, dtype=dtype)
    return torch.linalg.vector_norm(torch.stack(norms))


def global_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ of all entries of non-negative tensors (a foreach L1 norm)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return torch.stack(torch._foreach_norm(list(tensors), 1, dtype=dtype)).sum()


def params_with_grads(param_groups: Iterable[dict]) -> tuple[Tensors, Tensors]:
    """The parameters of ``param_groups`` that have a ``.grad``, and those gradients."""
    params = [p for g in param_groups for p in g["params"] if p.grad is not None]
    return params, [p.grad for p in params]


def all_params(param_groups: Iterable[dict]) -> Tensors:
    return [p for g in param_groups for p in g["params"]]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (else ``model`` itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
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

"""Functional plumbing shared by every measure: parameters as dicts, batches, losses.

A *batch* is what a data loader yields: an ``(inputs, targets)`` pair (a tuple, list or
namedtuple; inputs a tensor or a tuple of tensors), or a dict of keyword inputs holding the
targets under ``"labels"`` (HuggingFace style). Models are called through
:func:`torch.func.functional_call` so that any parameter dict (perturbed weights, a tangent-space
endpoint) can be plugged in without touching the module.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .types import LossFn, Params


def named_params(model: nn.Module, names: Iterable[str] | None = None) -> Params:
    """Detached views ``{name: tensor}`` of the parameters that require grad (or of ``names``)."""
    all_params = dict(model.named_parameters())
    if names is None:
        return {n: p.detach() for n, p in all_params.items() if p.requires_grad}
    out = {}
    for n in names:
        if n not in all_params:
            raise KeyError(f"model has no parameter named {n!r}")
        out[n] = all_params[n].detach()
    return out


def check_finite(params: Mapping[str, torch.Tensor], what: str = "weights") -> None:
    """Raise ``ValueError`` naming the first tensor with a NaN or inf entry."""
    for n, t in params.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"non-finite {what} in parameter {n!r}")


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of a batch; see the module docstring for accepted forms."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError("a dict batch must hold its targets under 'labels'")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        "a batch must be an (inputs, targets) pair or a dict with 'labels'; "
        f"got {type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
    )


def batch_size(batch: Any) -> int:
    """Number of examples in a batch (length of its targets)."""
    return int(split_batch(batch)[1].shape[0])


def same_sequence(seq: tuple | list, items: Iterable) -> tuple | list:
    """A tuple or list of ``seq``'s type holding ``items`` (a namedtuple takes them as arguments)."""
    return type(seq)(*items) if hasattr(seq, "_fields") else type(seq)(items)


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` (a tensor, or dicts, tuples, namedtuples and lists of them) with ``fn`` applied to
    every tensor; anything else is kept as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return same_sequence(obj, (map_tensors(fn, v) for v in obj))
    return obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    return map_tensors(lambda t: t.to(device), obj)


def forward(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any) -> torch.Tensor:
    """``model(inputs)`` with ``params`` substituted; returns the logits tensor.

    Parameters missing from ``params`` (and all buffers) keep the module's own values.
    """
    if isinstance(inputs, Mapping):
        out = functional_call(model, dict(params), args=(), kwargs=dict(inputs), strict=False)
    elif isinstance(inputs, tuple):
        out = functional_call(model, dict(params), args=inputs, strict=False)
    else:
        out = functional_call(model, dict(params), args=(inputs,), strict=False)
    return getattr(out, "logits", out)


def batch_loss(
    model: nn.Module, params: Mapping[str, torch.Tensor], batch: Any, loss_fn: LossFn
) -> torch.Tensor:
    """Mean loss of the model with ``params`` on one batch; raises if it is not a scalar."""
    inputs, targets = split_batch(batch)
    loss = loss_fn(forward(model, params, inputs), targets)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (mean over the batch), got {shape}")
    return loss


def materialize(loader: Iterable, device: torch.device | str | None = None) -> list:
    """The batches of ``loader`` as a list (moved to ``device``); raises on an empty loader."""
    batches = [to_device(b, device) if device is not None else b for b in loader]
    if not batches:
        raise ValueError("the data loader is empty: no batch to measure on")
    return batches


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()))
    return p.device, p.dtype


@contextlib.contextmanager
def eval_mode(model: nn.Module, train: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in eval (or train) mode for the block; restore every submodule's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Force the math backend of ``F.scaled_dot_product_attention``.

    The fused CPU/GPU kernels have neither double backward nor forward-mode AD in torch 2.13;
    the math backend has both. Every second-order computation enters this context itself.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield

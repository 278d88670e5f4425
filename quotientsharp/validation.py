"""Argument checks shared by the public API: numbers, counts, call shape and batch dtype/device.

Every check raises with a message that names the function, the argument and the value given.

- :func:`check_number` / :func:`check_count`: hyperparameters (finite, in range) and counts
  (integers ``>= minimum``).
- :func:`check_model_loader_loss`: the one argument order of every model-level measure,
  ``(model, loader, loss_fn, ...)``; swapped arguments raise a ``TypeError`` saying which is which.
- :func:`conform_batch` / :func:`conform_inputs`: the batch rule of the sharpness measures and
  curvature operators.

**Batch rule.** Batches are moved to the model's device before use (no copy when already there).
Floating-point *input* tensors are cast to the model's floating dtype (the dtype the computation
runs in: the curvature operators' ``dtype=`` when given, else the parameters' dtype), exactly as if
the caller had written ``x.to(model_dtype)``; a float32 batch for a float64 model is therefore
measured on the same (exactly representable) values. Integer and bool tensors (token ids, masks)
and the targets are never cast (the loss function decides what targets it accepts). A model whose
parameters have several floating dtypes gets no cast. An input tensor still on another device after
the move (a custom batch type the move cannot see into) raises :class:`BatchMismatchError` naming
it, instead of a raw error deep inside the forward pass.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .functional import same_sequence


def _as_real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (bool excluded) or a one-element tensor."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    return None


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, finite: bool = True,
                 owner: str = "") -> float:
    """``value`` as a float, after checking it is a real number in the interval.

    The interval is ``[low, high]``, with an open end where ``low_open``/``high_open``; ``None``
    leaves that side unbounded. NaN is always refused, ±inf unless ``finite=False``.
    """
    where = f"{owner}: " if owner else ""
    x = _as_real(value)
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    wanted = " and ".join(s for s in (lo, hi) if s)
    kind = "a finite number" if finite else "a number"
    expected = f"{kind}{' ' + wanted if wanted else ''}"
    if x is None:
        raise TypeError(f"{where}{name} must be {expected}, got {value!r} ({type(value).__name__})")
    bad = (math.isnan(x) or (finite and math.isinf(x))
           or (low is not None and (x <= low if low_open else x < low))
           or (high is not None and (x >= high if high_open else x > high)))
    if bad:
        raise ValueError(f"{where}{name} must be {expected}, got {value!r}")
    return x


def check_count(name: str, value: Any, minimum: int = 1, owner: str = "") -> int:
    """``value`` as an int, after checking it is an integer ``>= minimum`` (bool refused)."""
    where = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}{name} must be an integer >= {minimum}, got {value!r} "
                        f"({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{where}{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable, owner: str = "") -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        where = f"{owner}: " if owner else ""
        raise ValueError(f"{where}{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _is_loader(obj: Any) -> bool:
    return hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes, nn.Module))


def _describe(obj: Any) -> str:
    if isinstance(obj, nn.Module):
        return f"the module {type(obj).__name__}"
    if callable(obj) and not _is_loader(obj):
        return f"the function {getattr(obj, '__name__', type(obj).__name__)}"
    if _is_loader(obj):
        return f"an iterable ({type(obj).__name__})"
    return f"{type(obj).__name__} {obj!r}"


def check_model_loader_loss(where: str, model: Any, loader: Any, loss_fn: Any) -> None:
    """Raise ``TypeError`` unless ``where(model, loader, loss_fn, ...)`` got a model, an iterable
    of batches and a callable loss, in that order; the message says which argument is which."""
    shape = f"{where}(model, loader, loss_fn, ...)"
    if not callable(loss_fn) and _is_loader(loss_fn) and callable(loader) and not _is_loader(loader):
        raise TypeError(
            f"{shape}: loader and loss_fn are swapped: the 2nd argument (loader) is "
            f"{_describe(loader)} and the 3rd (loss_fn) is {_describe(loss_fn)}; pass the batches "
            "second and the loss function third")
    if not (isinstance(model, nn.Module) or callable(model)):
        raise TypeError(f"{shape}: the 1st argument (model) must be an nn.Module (or a callable "
                        f"model(params, inputs)), got {_describe(model)}")
    if not _is_loader(loader):
        raise TypeError(f"{shape}: the 2nd argument (loader) must be an iterable of batches "
                        f"(a DataLoader or a list of (inputs, targets)), got {_describe(loader)}")
    if not callable(loss_fn):
        raise TypeError(f"{shape}: the 3rd argument (loss_fn) must be callable as "
                        f"loss_fn(outputs, targets), got {_describe(loss_fn)}")


class BatchMismatchError(TypeError):
    """A batch's input tensor is on a device that the model's parameters are not on."""


def _conform(obj: Any, dtype: torch.dtype | None, devices: set, path: str, where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        if devices and obj.device not in devices:
            raise BatchMismatchError(
                f"{where}{path} is on device {obj.device} but the model's parameters are on "
                f"{', '.join(sorted(map(str, devices)))}; move the model or the data (batches are moved "
                "to the model's device only through tuples, lists and dicts)")
        return obj.to(dtype) if dtype is not None and obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, Mapping):
        return {k: _conform(v, dtype, devices, f"{path}[{k!r}]", where) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return same_sequence(obj, (_conform(v, dtype, devices, f"{path}[{i}]", where) for i, v in enumerate(obj)))
    return obj


def conform_inputs(inputs: Any, dtype: torch.dtype | None, devices: Iterable[torch.device] = (),
                   where: str = "", index: int | None = None) -> Any:
    """``inputs`` with every floating tensor cast to ``dtype`` (None: no cast), after checking that
    every tensor is on one of ``devices`` (empty: no check); see the module's batch rule."""
    prefix = f"{where}: " if where else ""
    prefix += "the batch: " if index is None else f"batch {index}: "
    return _conform(inputs, dtype, set(devices), "inputs", prefix)


def conform_batch(batch: Any, dtype: torch.dtype | None, devices: Iterable[torch.device] = (),
                  where: str = "", index: int | None = None) -> Any:
    """A batch ``(inputs, targets)`` or ``{..., "labels": targets}`` with its inputs conformed by
    :func:`conform_inputs`; the targets are left as they are."""
    if isinstance(batch, Mapping):
        inputs = conform_inputs({k: v for k, v in batch.items() if k != "labels"}, dtype, devices, where, index)
        return {**inputs, **({"labels": batch["labels"]} if "labels" in batch else {})}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return same_sequence(batch, (conform_inputs(batch[0], dtype, devices, where, index), batch[1]))
    return batch


def model_dtype_devices(model: Any) -> tuple[torch.dtype | None, set[torch.device]]:
    """The floating dtype of an ``nn.Module``'s parameters (None if they have several or none)
    and their devices; ``(None, set())`` for a plain callable."""
    if not isinstance(model, nn.Module):
        return None, set()
    params = list(model.parameters())
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    return (dtypes.pop() if len(dtypes) == 1 else None), {p.device for p in params}


def conform_inputs_for(model: Any, inputs: Any, where: str = "", index: int | None = None) -> Any:
    """:func:`conform_inputs` to ``model``'s floating dtype and devices (unchanged for a callable)."""
    dtype, devices = model_dtype_devices(model)
    return conform_inputs(inputs, dtype, devices, where, index)


def check_measure_call(where: str, model: Any, loader: Any, loss_fn: Any, options: Any = None) -> None:
    """The sharpness measures' checks: :func:`check_model_loader_loss`, then the counts and
    numbers of their :class:`~quotientsharp.measures.sharpness.Options` (when given): ``n_iter``,
    ``n_samples``, ``ode_steps`` ≥ 1, ``n_restarts`` ≥ 0, ``momentum`` in [0, 1], ``step_mult`` > 0,
    ``ode_tol`` > 0 or None."""
    check_model_loader_loss(where, model, loader, loss_fn)
    if options is None:
        return
    for name, minimum in (("n_iter", 1), ("n_samples", 1), ("ode_steps", 1), ("n_restarts", 0)):
        if hasattr(options, name):
            check_count(name, getattr(options, name), minimum, where)
    if hasattr(options, "momentum"):
        check_number("momentum", options.momentum, low=0.0, high=1.0, owner=where)
    if hasattr(options, "step_mult"):
        check_number("step_mult", options.step_mult, low=0.0, low_open=True, owner=where)
    if getattr(options, "ode_tol", None) is not None:
        check_number("ode_tol", options.ode_tol, low=0.0, low_open=True, owner=where)

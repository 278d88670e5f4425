"""Argument checks shared by the public API: numbers, counts, call shape and batch dtype/device.

Every check raises with a message that names the function, the argument and the value given.

- :func:`check_number` / :func:`check_count`: hyperparameters (finite, in range) and counts
  (integers ``>= minimum``).
- :func:`check_model_loader_loss`: the one argument order of every model-level measure,
  ``(model, loader, loss_fn, ...)``; swapped arguments raise a ``TypeError`` saying which is which.
- :func:`check_batch`: the batch rule of the sharpness measures and curvature operators.

**Batch rule.** Batches are moved to the model's device before use (no copy when already there);
their floating-point *input* tensors must already have a floating dtype of the model's
parameters (for the curvature operators with ``dtype=``, that dtype: they cast the batch
themselves). Nothing is cast silently: a mismatch raises :class:`BatchMismatchError` naming the
tensor, its dtype and device and the model's. Integer tensors (token ids, masks) and the targets
are not checked (the loss function decides what targets it accepts).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


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
    """A batch's input tensor has a dtype or device that the model's parameters do not have."""


def _tensors(obj: Any, path: str) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]")
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def model_dtypes_devices(model: nn.Module) -> tuple[set[torch.dtype], set[torch.device]]:
    """The floating dtypes and the devices of a module's parameters."""
    params = list(model.parameters())
    return ({p.dtype for p in params if p.is_floating_point()}, {p.device for p in params})


def check_batch(inputs: Any, dtypes: Iterable[torch.dtype], devices: Iterable[torch.device],
                where: str = "", index: int | None = None) -> None:
    """Raise :class:`BatchMismatchError` if a floating input tensor's dtype is not in ``dtypes``
    or any input tensor is not on a device in ``devices`` (see the module's batch rule).

    Empty ``dtypes``/``devices`` skip that check (a plain callable model has none).
    """
    dtypes, devices = set(dtypes), set(devices)
    batch = "the batch" if index is None else f"batch {index}"
    prefix = f"{where}: " if where else ""
    for path, t in _tensors(inputs, "inputs"):
        if devices and t.device not in devices:
            raise BatchMismatchError(
                f"{prefix}{batch}: {path} is on device {t.device} but the model's parameters are on "
                f"{', '.join(sorted(map(str, devices)))}; move the model or the data "
                "(measures move batches to the model's device themselves: is this a custom batch type?)")
        if dtypes and t.is_floating_point() and t.dtype not in dtypes:
            model_dtype = ", ".join(sorted(str(d) for d in dtypes))
            raise BatchMismatchError(
                f"{prefix}{batch}: {path} has dtype {t.dtype} but the model's parameters are "
                f"{model_dtype}; cast the data (x.to({model_dtype})) or the model "
                f"(model.to({t.dtype})) so that they match")


def check_batch_for(model: Any, inputs: Any, where: str = "", index: int | None = None) -> None:
    """:func:`check_batch` against ``model``'s parameters (no check for a plain callable)."""
    if isinstance(model, nn.Module):
        check_batch(inputs, *model_dtypes_devices(model), where=where, index=index)


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

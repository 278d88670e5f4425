"""Type aliases shared by the whole library (defined once here).

* ``Params``: a point of parameter space, ``{name: tensor}`` (read-only mapping);
* ``Tangent``: a tangent vector at such a point, ``{name: tensor}`` with the same shapes;
* ``LossFn``: ``loss_fn(outputs, targets) -> 0-d tensor`` (the batch mean);
* ``ParamSelector``: which parameters a curvature measure covers, ``"all"`` or a list of names;
* ``Tensors``: a list of tensors (the optimizers' parameter and gradient lists).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

Params = Mapping[str, torch.Tensor]
Tangent = Mapping[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ParamSelector = str | Sequence[str]
Tensors = list[torch.Tensor]

__all__ = ["Params", "Tangent", "LossFn", "ParamSelector", "Tensors"]

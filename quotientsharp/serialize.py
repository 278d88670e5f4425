"""The one JSON policy of every result record (``SharpnessResult``, the curvature estimates, study
summaries): tensors and arrays become nested lists, dataclasses and mappings recurse, and a
non-finite float (NaN, ±inf) becomes ``null`` -- valid JSON that no reader mistakes for a number."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data under the policy above (unknown objects become their ``repr``)."""
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
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)

"""Timing shared by the benchmarks: one function, one clock policy."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], device: str, clock: str = "wall") -> float:
    """Seconds of ``fn()``. On CUDA always wall time between two synchronisations; on CPU
    ``clock="wall"`` (``perf_counter``) or ``"process"`` (this process's CPU time, which does not
    count the time other jobs hold shared cores; meaningful with one torch thread)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    now = {"wall": time.perf_counter, "process": time.process_time}[clock]
    start = now()
    fn()
    return now() - start

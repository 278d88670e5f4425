"""Data-parallel measures over a ``torch.distributed`` process group.

Every rank passes the same model and the same loader. The sharpness measures and the curvature
operators (:class:`~quotientsharp.curvature.HessianOperator` and the estimators built on it) then
take ``process_group=`` (or ``distributed=True`` for the default group) and return, on every
rank, the single-process result:

* ``split="batches"`` (default): rank ``r`` of ``W`` keeps batches ``r, r+W, r+2W, …``
  (``DistributedSampler``-style, by batch; the last shard may be shorter, no batch is dropped).
  A sharpness measure solves its batches and all-gathers the per-batch values, bit-identical to
  one process; a curvature operator all-reduces its ``n_b/N``-weighted gradients and HVPs, so
  every rank runs the same Lanczos/SLQ iteration (equal to one process up to summation order).
* ``split="examples"`` (sharpness only): every batch is split by examples across the ranks; the
  loss and its gradient are all-reduced with weights ``n_r/n_b`` inside each ascent step, so
  every rank takes the same step (one large batch on several GPUs).

Ranks holding different weights (or loaders of different sizes) are refused: a checksum is
all-reduced and compared before any work. Launch, e.g.::

    torchrun --nproc-per-node 2 measure.py        # in measure.py:
    dist.init_process_group("nccl")               # "gloo" on CPUs
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    r = geodesic_sharpness(model.cuda(), loader, loss_fn, rho=0.1, distributed=True)
    t = hessian_trace(model.cuda(), loader, loss_fn, distributed=True)

An error on one rank (e.g. a non-finite loss on its batch) ends the job under ``torchrun``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .functional import batch_size, map_tensors, to_device

SPLITS = ("batches", "examples")
KEYWORDS = ("process_group", "distributed", "split")


def data_parallel(process_group=None, distributed: bool = False, split: str = "batches") -> DataParallel:
    """The plan of a measure: ``process_group`` (None and ``distributed=False``: one process)."""
    if process_group is None and distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed.init_process_group(...) first "
                             "(e.g. launched with torchrun --nproc-per-node N)")
        process_group = dist.group.WORLD
    return DataParallel(process_group, split)


class DataParallel:
    """Sharding, sums and gathers over ``group`` (None: a single process, no collectives)."""

    def __init__(self, group=None, split: str = "batches"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.group, self.split = group, split
        self.rank = 0 if group is None else dist.get_rank(group)
        self.world = 1 if group is None else dist.get_world_size(group)

    def shard(self, loader: Iterable, device) -> tuple[list[int], list, list[int]]:
        """``(global indices of this rank's batches, those batches on device, sizes of all batches)``."""
        index, mine, sizes = [], [], []
        for i, batch in enumerate(loader):
            sizes.append(batch_size(batch))
            if self.split == "examples":
                if sizes[-1] < self.world:
                    raise ValueError(f"batch {i} has {sizes[-1]} examples, fewer than the {self.world} ranks "
                                     "of split='examples'")
                batch = _part(batch, self.rank, self.world)
            elif i % self.world != self.rank:
                continue
            index.append(i)
            mine.append(to_device(batch, device))
        if not sizes:
            raise ValueError("the data loader is empty: no batch to measure on")
        return index, mine, sizes

    def check_same(self, params: Mapping[str, torch.Tensor], sizes: list[int]) -> None:
        """Raise on every rank unless all ranks hold the same weights and batch sizes."""
        if self.world == 1:
            return
        ref = next(iter(params.values()))
        data = torch.tensor([len(sizes), sum(sizes)], dtype=torch.float64, device=ref.device)
        local = torch.cat([checksum(params), data])
        high, low = local.clone(), -local
        dist.all_reduce(high, dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(low, dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(high, -low):
            what = "weights" if not torch.equal(high[:-2], -low[:-2]) else "loaders (number or sizes of batches)"
            raise ValueError(f"the ranks of the process group hold different {what}; every rank must pass "
                             "the same model and the same loader (checksum min "
                             f"{(-low).tolist()} vs max {high.tolist()})")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place)."""
        if self.world > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather(self, index: list[int], *columns: list) -> tuple[list, ...]:
        """Per-batch ``columns`` of every rank, in global batch order (``split="batches"``); a
        column that is empty on every rank stays empty."""
        if self.world == 1 or self.split == "examples":
            return columns
        parts = [None] * self.world
        dist.all_gather_object(parts, (index, columns), group=self.group)
        return tuple([v for _, v in sorted(((i, v) for idx, cols in parts for i, v in zip(idx, cols[c])),
                                           key=lambda row: row[0])]
                     for c in range(len(columns)))

    def objective(self, objective: Callable, batch_total: int, batch_local: int) -> Callable:
        """The whole batch's objective from this rank's part (``split="examples"``)."""
        if self.world == 1 or self.split == "batches":
            return objective
        return _SplitObjective(objective, batch_local / batch_total, self.group)


def checksum(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Float64 fingerprint ``[numel, Σθ, Σθ², Σ_t (t+1) Σ θ_t·ramp]`` of a parameter dict."""
    out = torch.zeros(4, dtype=torch.float64, device=next(iter(params.values())).device)
    for t, p in enumerate(params.values()):
        x = torch.nan_to_num(p.detach().reshape(-1).to(torch.float64), nan=0.5, posinf=1.5, neginf=-1.5)
        ramp = torch.linspace(0, 1, x.numel(), dtype=torch.float64, device=x.device)
        out += torch.stack([x.new_tensor(x.numel()), x.sum(), (x * x).sum(), (t + 1) * (x * ramp).sum()])
    return out


def _part(obj: Any, rank: int, world: int) -> Any:
    """This rank's share of the examples of a (nested) batch."""
    return map_tensors(lambda t: t.tensor_split(world)[rank], obj)


class _SumValue(torch.autograd.Function):
    """All-reduce sum forward, identity backward: every rank differentiates the same total."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumGradient(torch.autograd.Function):
    """Identity forward, all-reduce sum backward: the gradient of the total on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SplitObjective:
    """``Σ_r w_r L_r(params)`` (and the weighted error) with ``w_r = n_r / n_b``, on every rank."""

    def __init__(self, objective: Callable, weight: float, group):
        self.objective, self.weight, self.group = objective, weight, group

    def __call__(self, params: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, float | None]:
        loss, err = self.objective({n: _SumGradient.apply(t, self.group) for n, t in params.items()})
        total = _SumValue.apply(loss * self.weight, self.group)
        if err is not None:
            err_total = torch.tensor(err * self.weight, dtype=torch.float64, device=loss.device)
            dist.all_reduce(err_total, group=self.group)
            err = float(err_total)
        return total, err

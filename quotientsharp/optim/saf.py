"""SAF: sharpness-aware training for free, from logits stored a few epochs earlier."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from quotientsharp.optim.utils import WrappedOptimizer, all_params, check_distillation, is_distributed
from quotientsharp.validation import check_count


class IndexedDataset(Dataset):
    """Yields ``(index, x, y)`` for a dataset yielding ``(x, y)``; SAF keys its memory by index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any, Any]:
        x, y = self.dataset[index]
        return index, x, y


def softened_kl_rows(logits: torch.Tensor, past_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Per row Σ_c q_c (log q_c − log p_c), q = softmax(past/τ), p = softmax(logits/τ)."""
    log_p = F.log_softmax(logits / tau, dim=-1)
    log_q = F.log_softmax(past_logits.to(logits.dtype) / tau, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


class SAF(WrappedOptimizer):
    """SAF: loss = CE(z, y) + λ·τ²·mean_B KL(softmax(z_past/τ) ‖ softmax(z/τ)), one pass per step.

    z_past are the logits of the same training sample recorded Ẽ = ``lag_epochs`` epochs
    earlier, kept in a ring buffer ``[N, Ẽ+1, C]`` (float32: N·C·(Ẽ+1)·4 bytes, on the model's
    device unless ``buffer_device`` says otherwise) with an epoch stamp per row and slot. At epoch
    e every batch writes slot e mod (Ẽ+1) and, when ``start_epoch < e < end_epoch``, reads slot
    (e−Ẽ) mod (Ẽ+1); rows whose stamp is not e−Ẽ (never seen that epoch, resumed without the
    buffer, sampler changes) are dropped from the KL (they count as 0 in the batch mean).

    Training loop (data set wrapped in :class:`IndexedDataset`)::

        opt = SAF(model.parameters(), torch.optim.SGD, num_samples=len(train_set),
                  num_classes=C, lr=0.1, momentum=0.9)
        for epoch in range(epochs):
            opt.set_epoch(epoch)
            for idx, x, y in loader:
                loss = opt.loss(model(x), y, idx)   # records the logits, adds λ·KL when active
                opt.zero_grad()
                loss.backward()
                opt.step()

    ``loss`` is for training batches only (it writes the memory). The stored targets come from
    the train-mode network on a differently augmented view of the image, as in the paper. Under
    mixup/cutmix (soft targets) the stored row is the logit of a mixed image: a warning is given.

    Distributed: ``buffer_mode="global"`` (default) all-gathers ``(index, logits)`` every step, so
    each rank holds the full memory whichever rank saw a sample; ``"per_rank_legacy"`` keeps one
    memory per rank as the official code did (most targets stale on W > 1 ranks).

    τ² (``tau_squared=True``) is in the reference code, and λ was tuned with it. Defaults: τ = 5,
    Ẽ = 3, E_start = 5, λ = 0.3. ``step(closure)`` runs the closure (forward, ``opt.loss``,
    backward) once under ``enable_grad`` after zeroing the gradients.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[torch.optim.Optimizer],
        *,
        num_samples: int,
        num_classes: int,
        lam: float = 0.3,
        tau: float = 5.0,
        lag_epochs: int = 3,
        start_epoch: int = 5,
        end_epoch: float = math.inf,
        tau_squared: bool = True,
        label_smoothing: float = 0.0,
        buffer_device: torch.device | str | None = None,
        buffer_dtype: torch.dtype = torch.float32,
        buffer_mode: Literal["global", "per_rank_legacy"] = "global",
        save_buffer: bool = False,
        **base_kwargs: Any,
    ):
        num_samples = check_count("num_samples", num_samples, 1, "SAF")
        num_classes = check_count("num_classes", num_classes, 1, "SAF")
        lam, tau, label_smoothing = check_distillation("SAF", lam, tau, start_epoch, end_epoch, label_smoothing)
        lag_epochs = check_count("lag_epochs", lag_epochs, 1, "SAF")
        if start_epoch + 1 < lag_epochs:
            raise ValueError(
                f"SAF: need start_epoch + 1 >= lag_epochs (the first KL epoch must read a written "
                f"slot), got lag_epochs={lag_epochs}, start_epoch={start_epoch}"
            )
        if buffer_mode not in ("global", "per_rank_legacy"):
            raise ValueError(f"buffer_mode must be 'global' or 'per_rank_legacy', got {buffer_mode!r}")
        if buffer_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"buffer_dtype must be a float type, got {buffer_dtype}")
        super().__init__(params, base_optimizer_cls, **base_kwargs)
        self.lam, self.tau, self.lag_epochs = lam, tau, lag_epochs
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.kl_factor = tau**2 if tau_squared else 1.0
        self.label_smoothing = label_smoothing
        self.buffer_mode, self.save_buffer = buffer_mode, save_buffer
        device = torch.device(buffer_device) if buffer_device is not None else all_params(self.param_groups)[0].device
        slots = lag_epochs + 1
        pin = device.type == "cpu" and torch.cuda.is_available()
        self.logit_memory = torch.zeros(num_samples, slots, num_classes, dtype=buffer_dtype, device=device, pin_memory=pin)
        self.epoch_stamps = torch.full((num_samples, slots), -1, dtype=torch.int32, device=device)
        self.epoch: int | None = None
        self._stale_rows = torch.zeros((), dtype=torch.int64, device=device)
        self._warned_soft_targets = False

    @property
    def memory_bytes(self) -> int:
        """Bytes of the logit memory, N·C·(Ẽ+1)·itemsize (stamps not included)."""
        return self.logit_memory.numel() * self.logit_memory.element_size()

    @property
    def stats(self) -> dict[str, int]:
        """``stale_rows``: rows dropped from the KL because their slot was not written at e−Ẽ."""
        return {"stale_rows": int(self._stale_rows)}

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (0-indexed)."""
        self.epoch = epoch

    @property
    def active(self) -> bool:
        """Whether the regulariser is on: ``start_epoch < epoch < end_epoch`` (``epoch`` set by :meth:`set_epoch`)."""
        return self.epoch is not None and self.start_epoch < self.epoch < self.end_epoch

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """CE(z, y) + λ·τ²·KL term for a training batch; records ``logits`` under ``indices``."""
        if self.epoch is None:
            raise RuntimeError("call opt.set_epoch(epoch) at the start of every epoch")
        indices = torch.as_tensor(indices).to(self.logit_memory.device, torch.int64)
        n = self.logit_memory.shape[0]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise IndexError(f"sample indices must lie in [0, {n}) (num_samples); got out-of-range ones")
        if targets.is_floating_point() and not self._warned_soft_targets:
            warnings.warn(
                "soft targets (mixup/cutmix?): SAF stores the logits of the mixed image",
                stacklevel=2,
            )
            self._warned_soft_targets = True
        self._record(indices, logits.detach())
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if not self.active:
            return loss
        return loss + self.lam * self.sharpness_term(logits, indices)

    def sharpness_term(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``τ²·(1/|B|)``·Σ_rows KL(softmax(z_past/τ) ‖ softmax(z/τ)) over rows stamped e−Ẽ."""
        past_epoch = self.epoch - self.lag_epochs
        if past_epoch < 0:
            raise RuntimeError(f"epoch {self.epoch} would read epoch {past_epoch}: nothing recorded yet")
        slot = past_epoch % (self.lag_epochs + 1)
        past = self.logit_memory[indices, slot].to(logits.device)
        valid = (self.epoch_stamps[indices, slot] == past_epoch).to(logits.device)
        self._stale_rows += (~valid).sum().to(self._stale_rows.device)
        rows = softened_kl_rows(logits, past, self.tau)
        return self.kl_factor * torch.where(valid, rows, 0.0).sum() / logits.shape[0]

    @torch.no_grad()
    def _record(self, indices: torch.Tensor, logits: torch.Tensor) -> None:
        if self.buffer_mode == "global" and is_distributed():
            indices, logits = _all_gather_rows(indices.to(logits.device), logits)
        indices = indices.to(self.logit_memory.device)
        slot = self.epoch % (self.lag_epochs + 1)
        self.logit_memory[indices, slot] = logits.to(self.logit_memory.device, self.logit_memory.dtype)
        self.epoch_stamps[indices, slot] = self.epoch

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Base step; with a closure, zero grads and call it once (it runs ``opt.loss`` + backward)."""
        loss = self.run_closure_once(closure) if closure is not None else None
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["saf"] = {"epoch": self.epoch}
        if self.save_buffer:
            state["saf"].update(logit_memory=self.logit_memory, epoch_stamps=self.epoch_stamps)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saf = state_dict.pop("saf")
        super().load_state_dict(state_dict)
        self.epoch = saf["epoch"]
        if "logit_memory" in saf:
            self.logit_memory.copy_(saf["logit_memory"])
            self.epoch_stamps.copy_(saf["epoch_stamps"])


def _all_gather_rows(indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(indices, rows)`` of every rank (batches may differ in size)."""
    dist = torch.distributed
    world = dist.get_world_size()
    size = torch.tensor([indices.numel()], device=rows.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded_idx = torch.zeros(longest, dtype=torch.int64, device=rows.device)
    padded_rows = rows.new_zeros(longest, rows.shape[1])
    padded_idx[: indices.numel()], padded_rows[: indices.numel()] = indices, rows
    all_idx = [torch.empty_like(padded_idx) for _ in range(world)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    dist.all_gather(all_idx, padded_idx)
    dist.all_gather(all_rows, padded_rows)
    return (
        torch.cat([t[:c] for t, c in zip(all_idx, counts)]),
        torch.cat([t[:c] for t, c in zip(all_rows, counts)]),
    )

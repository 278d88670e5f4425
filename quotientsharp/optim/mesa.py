"""MESA: memory-efficient SAF, with an EMA teacher in place of the stored logits."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quotientsharp.optim.saf import softened_kl_rows
from quotientsharp.optim.utils import WrappedOptimizer, check_distillation, unwrap
from quotientsharp.validation import check_count, check_number


class MESA(WrappedOptimizer):
    """loss = CE(z, y) + λ·τ²·mean_B KL(softmax(z_T/τ) ‖ softmax(z/τ)), z_T from an EMA teacher.

    The teacher is a deep copy of ``model`` kept in ``eval()`` mode, updated after every step by
    v ← β·v + (1−β)·θ over parameters and floating buffers (integer buffers are copied). Its
    no-grad forward on the same augmented batch gives z_T, before the student step. The KL is
    active when ``start_epoch < epoch < end_epoch``; the EMA runs from the first step.

    Training loop::

        opt = MESA(model.parameters(), torch.optim.SGD, model=model, lr=0.1, momentum=0.9)
        for epoch in range(epochs):
            opt.set_epoch(epoch)
            for x, y in loader:
                loss = opt.loss(model(x), y, x)    # teacher forward on x when active
                opt.zero_grad()
                loss.backward()
                opt.step()                         # base step, then EMA update

    Defaults β = 0.9998, λ = 0.8, τ = 5, E_start = 5. The horizon 1/(1−β) = 5,000 steps is long
    for small data sets: ``ema_horizon_epochs=H`` with ``steps_per_epoch=S`` sets
    β = 1 − 1/(H·S). Memory: one copy of the model. ``step(closure)`` zeros grads and runs the
    closure (forward, ``opt.loss``, backward) once under ``enable_grad``.

    Cost per step over the base optimizer's: one teacher forward (``inference_mode``, no graph;
    about a third of a forward+backward step) when active, one fused EMA pass
    (``_foreach_lerp_``) over the floating tensors, and the KL on the logits; no host sync.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[torch.optim.Optimizer],
        *,
        model: nn.Module,
        decay: float = 0.9998,
        lam: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 5,
        end_epoch: float = math.inf,
        tau_squared: bool = True,
        label_smoothing: float = 0.0,
        ema_horizon_epochs: float | None = None,
        steps_per_epoch: int | None = None,
        **base_kwargs: Any,
    ):
        if ema_horizon_epochs is not None:
            if steps_per_epoch is None:
                raise ValueError("MESA: ema_horizon_epochs needs steps_per_epoch")
            horizon = check_number("ema_horizon_epochs", ema_horizon_epochs, low=0.0, low_open=True, owner="MESA")
            steps = check_count("steps_per_epoch", steps_per_epoch, 1, "MESA")
            decay = 1.0 - 1.0 / (horizon * steps)
        decay = check_number("decay", decay, low=0.0, high=1.0, high_open=True, owner="MESA")
        lam, tau, label_smoothing = check_distillation("MESA", lam, tau, start_epoch, end_epoch, label_smoothing)
        if not isinstance(model, nn.Module):
            raise TypeError(f"MESA: model must be the trained nn.Module, got {type(model).__name__}")
        super().__init__(params, base_optimizer_cls, **base_kwargs)
        self.decay, self.lam, self.tau = decay, lam, tau
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.kl_factor = tau**2 if tau_squared else 1.0
        self.label_smoothing = label_smoothing
        student = unwrap(model)
        self.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        pairs = list(zip(_state_tensors(self.teacher), _state_tensors(student)))
        # Floating tensors grouped by (device, dtype) for one fused lerp per group; others copied.
        self._ema_groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for t, s in pairs:
            if t.is_floating_point():
                teachers, students = self._ema_groups.setdefault((t.device, t.dtype), ([], []))
                teachers.append(t)
                students.append(s)
        self._copied_pairs = [(t, s) for t, s in pairs if not t.is_floating_point()]
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of every epoch (0-indexed)."""
        self.epoch = epoch

    @property
    def active(self) -> bool:
        """Whether the regulariser is on: ``start_epoch < epoch < end_epoch`` (``epoch`` set by :meth:`set_epoch`)."""
        return self.epoch is not None and self.start_epoch < self.epoch < self.end_epoch

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, inputs: Any) -> torch.Tensor:
        """CE(z, y) + λ·τ²·mean_B KL(teacher ‖ student) on the batch ``inputs`` when active."""
        if self.epoch is None:
            raise RuntimeError("call opt.set_epoch(epoch) at the start of every epoch")
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        if not self.active:
            return loss
        kl = softened_kl_rows(logits, self.teacher_logits(inputs), self.tau).mean()
        return loss + self.lam * self.kl_factor * kl

    def teacher_logits(self, inputs: Any) -> torch.Tensor:
        """z_T = teacher(inputs) without a graph (``inputs``: a tensor, a tuple of positional
        inputs or a dict of keyword inputs; a ``.logits`` attribute of the output is taken)."""
        with torch.inference_mode():
            if isinstance(inputs, Mapping):
                out = self.teacher(**inputs)
            elif isinstance(inputs, tuple):
                out = self.teacher(*inputs)
            else:
                out = self.teacher(inputs)
            logits = getattr(out, "logits", out)
        return logits.clone()  # a normal tensor (inference tensors cannot join autograd graphs)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """v ← β·v + (1−β)·θ = v + (1−β)·(θ − v) on floating tensors (one fused lerp per
        device and dtype); integer buffers copied."""
        for teachers, students in self._ema_groups.values():
            torch._foreach_lerp_(teachers, students, 1.0 - self.decay)
        for t, s in self._copied_pairs:
            t.copy_(s)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Base step then EMA update; with a closure, zero grads and call it once first."""
        loss = self.run_closure_once(closure) if closure is not None else None
        self.base_optimizer.step()
        self.update_teacher()
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["mesa"] = {"epoch": self.epoch, "teacher": self.teacher.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        mesa = state_dict.pop("mesa")
        super().load_state_dict(state_dict)
        self.epoch = mesa["epoch"]
        self.teacher.load_state_dict(mesa["teacher"])


def _state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, detached, in registration order."""
    return [p.detach() for p in module.parameters()] + [b for b in module.buffers()]

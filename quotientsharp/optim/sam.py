"""Two-pass sharpness-aware optimizers: the shared step (:class:`SharpnessAwareOptimizer`), SAM, ASAM.

Every step: g = ∇L_B(θ); ε = ``perturbation(g, θ)``; θ̃ = ``move_to_perturbed_point(θ, ε)``
(θ + ε here); g̃ = ∇L_B(θ̃) on the same batch; θ restored by copy; base step at θ with g̃.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from quotientsharp.functional import has_batchnorm
from quotientsharp.optim.utils import (
    Tensors,
    WrappedOptimizer,
    all_params,
    all_reduce_mean,
    bn_frozen,
    check_rho,
    global_norm,
    is_distributed,
    params_with_grads,
)
from quotientsharp.validation import check_choice, check_count, check_number

EPS_NORM = 1e-12

WarmupPredicate = Callable[[int, Mapping[str, float] | None], bool]


class SharpnessAwareOptimizer(WrappedOptimizer):
    """Base of the two-pass methods; subclasses implement :meth:`perturbation`.

    Closure API (preferred)::

        def closure():                      # must not zero grads; must call backward
            loss = criterion(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)            # calls closure at θ and at θ+ε, returns first loss

    ``step`` zeroes gradients itself, runs each call under ``torch.enable_grad()`` and raises if
    a call left no gradient. With ``accumulate=k`` the closure takes the micro-batch index
    ``i ∈ [0, k)`` and should return that micro-batch's mean loss; gradients are averaged.

    Two-step API (needed for fp16 + ``GradScaler``)::

        with opt.first_pass():              # DDP: no_sync, so g is this worker's gradient
            criterion(model(x), y).backward()
        opt.first_step()                    # θ ← θ̃, grads zeroed
        with opt.second_pass():             # BatchNorm running stats restored afterwards
            criterion(model(x), y).backward()
        opt.second_step()                   # restore θ, base step with g̃, grads zeroed

    fp16 with a ``GradScaler``: backward on ``scaler.scale(loss)``; call
    ``opt.first_step(grad_scale=scaler.get_scale())`` (ε is formed from g / scale; a non-finite g
    gives ε = 0); after the second backward call ``opt.restore()`` unconditionally, then
    ``scaler.step(opt.base_optimizer)``, ``scaler.update()`` and ``opt.zero_grad()``.
    bf16 autocast needs no scaler and works with either API.

    Options:
        model: the trained module (or its DDP wrapper); needed for BatchNorm protection in the
            second pass and for DDP's ``no_sync`` in the first.
        perturbation: ``"local"`` (default, SAM paper's m-sharpness per worker): ε from this
            worker's gradient, first pass under ``no_sync``; ``"global"``: ε from the gradient
            averaged over workers. The second pass is always synchronised.
        accumulate, accumulate_mode: k micro-batches per base step. ``"micro"`` (default): one ε
            per micro-batch (m-sharpness), g̃ averaged over micro-batches; ``"global"``: ε from the
            averaged first gradient of all k micro-batches, then k second passes. With k = 1, a
            backward that adds to gradients not yet consumed by the optimizer raises.
        warmup_epochs, warmup_predicate: plain base-optimizer steps while
            ``warmup_predicate(epoch, metrics)`` is True (default: ``epoch <= warmup_epochs``;
            ``-1`` = never); once False it stays off. Fed by :meth:`set_epoch`.

    ``self.stats`` counts perturbed steps and perturbations skipped for a zero or non-finite
    gradient (ε = 0, the step proceeds with the gradient at θ).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[torch.optim.Optimizer],
        *,
        rho: float,
        model: nn.Module | None = None,
        perturbation: Literal["local", "global"] = "local",
        accumulate: int = 1,
        accumulate_mode: Literal["micro", "global"] = "micro",
        warmup_epochs: int = -1,
        warmup_predicate: WarmupPredicate | None = None,
        **base_kwargs: Any,
    ):
        owner = type(self).__name__
        rho = check_rho(owner, rho)
        check_choice("perturbation", perturbation, ("local", "global"), owner)
        accumulate = check_count("accumulate", accumulate, 1, owner)
        check_choice("accumulate_mode", accumulate_mode, ("micro", "global"), owner)
        warmup_epochs = check_count("warmup_epochs", warmup_epochs, -1, owner)
        if warmup_predicate is not None and not callable(warmup_predicate):
            raise TypeError(f"{owner}: warmup_predicate must be callable (epoch, metrics) -> bool, "
                            f"got {warmup_predicate!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be the trained nn.Module, got {type(model).__name__}")
        super().__init__(params, base_optimizer_cls, **base_kwargs)
        self.rho = rho
        self.model = model
        self.perturbation_scope = perturbation
        self.accumulate, self.accumulate_mode = accumulate, accumulate_mode
        self.warmup_predicate = warmup_predicate or (lambda epoch, metrics: epoch <= warmup_epochs)
        self.epoch = 0
        self.warming_up = bool(self.warmup_predicate(0, None))
        self.stats = {"perturbed": 0, "skipped_zero_grad": 0, "skipped_nonfinite_grad": 0}
        self._backup: dict[torch.Tensor, torch.Tensor] = {}
        self._perturbed: Tensors | None = None
        self._grad_sum: dict[torch.Tensor, torch.Tensor] = {}
        self._micro_steps = 0
        self._unconsumed_grads = False
        self._warned_entry_grads = False
        self._watch_gradient_accumulation()
        if perturbation == "local" and is_distributed() and not isinstance(model, DistributedDataParallel):
            warnings.warn(
                "distributed run but model= is not the DistributedDataParallel wrapper: the first "
                "pass cannot run under no_sync, so perturbation='local' is not honoured",
                stacklevel=3,
            )

    # ----- the two hooks a subclass overrides -------------------------------------------------

    def perturbation(self, grads: Tensors, params: Tensors) -> Tensors:
        """ε(g, θ) as new tensors; a pure function of its inputs and the hyperparameters."""
        raise NotImplementedError

    def move_to_perturbed_point(self, params: Tensors, eps: Tensors) -> None:
        """Overwrite ``params`` in place with the perturbed point; here θ̃ = θ + ε."""
        torch._foreach_add_(params, eps)

    # ----- schedule -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int, metrics: Mapping[str, float] | None = None) -> None:
        """Start of epoch ``epoch`` (0-indexed); ``metrics`` feeds ``warmup_predicate``."""
        self.epoch = epoch
        if self.warming_up:
            self.warming_up = bool(self.warmup_predicate(epoch, metrics))

    @property
    def perturbing(self) -> bool:
        """False during warm-up, where :meth:`first_step` leaves θ unperturbed."""
        return not self.warming_up

    # ----- pass contexts ------------------------------------------------------------------------

    def first_pass(self) -> contextlib.AbstractContextManager:
        """Context for the first forward+backward: DDP ``no_sync`` (ε from this worker's g)."""
        if isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def second_pass(self) -> contextlib.AbstractContextManager:
        """Context for the second forward+backward: BatchNorm running stats left untouched."""
        if self.model is not None and has_batchnorm(self.model):
            return bn_frozen(self.model)
        return contextlib.nullcontext()

    # ----- two-step API -------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True, grad_scale: float | torch.Tensor | None = None) -> None:
        """θ ← θ̃ from the gradients in ``.grad`` (divided by ``grad_scale`` if given)."""
        if self._perturbed is not None:
            raise RuntimeError("first_step() called twice without second_step() or restore()")
        if self.accumulate_mode == "micro":
            self._check_no_accumulation("first_step")
        params, grads = params_with_grads(self.param_groups)
        if not params:
            raise RuntimeError("no parameter has a gradient: run the first backward before first_step()")
        divisor = (self.accumulate if self.accumulate_mode == "global" else 1) * (grad_scale or 1.0)
        if isinstance(divisor, torch.Tensor) or divisor != 1.0:
            grads = torch._foreach_div(grads, divisor)
        if self.perturbation_scope == "global" and is_distributed():
            grads = all_reduce_mean(grads)
        if self.perturbing and self._gradient_usable(grads):
            eps = self.perturbation(grads, params)
            self._save(params)
            self.move_to_perturbed_point(params, eps)
            self.stats["perturbed"] += 1
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Restore θ, then a base step with g̃ (after k micro-batches when accumulating)."""
        if self.accumulate_mode == "micro":
            self._check_no_accumulation("second_step")
        self.restore()
        if self.accumulate > 1 and not self._average_accumulated_grads():
            return
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved θ back into the parameters (no-op if θ is not perturbed)."""
        if self._perturbed is not None:
            torch._foreach_copy_(self._perturbed, [self._backup[p] for p in self._perturbed])
            self._perturbed = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._unconsumed_grads = False

    # ----- closure API --------------------------------------------------------------------------

    def step(self, closure: Callable[..., Any] | None = None) -> Any:  # type: ignore[override]
        """One sharpness-aware step; calls ``closure`` twice (per micro-batch), returns first loss."""
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure (it runs forward+backward twice); "
                "without one use first_step() and second_step() around your two backward passes"
            )
        self._discard_entry_grads()
        k = self.accumulate
        if not self.perturbing:
            losses = [self._call(closure, i) for i in range(k)]
            self._plain_step()
        elif self.accumulate_mode == "micro":
            losses = []
            for i in range(k):
                with self.first_pass():
                    losses.append(self._call(closure, i))
                self.first_step()
                with self.second_pass():
                    self._call(closure, i)
                self.second_step()
        else:
            with self.first_pass():
                losses = [self._call(closure, i) for i in range(k)]
            self.first_step()
            with self.second_pass():
                for i in range(k):
                    self._call(closure, i)
            self.second_step()
        if k == 1:
            return losses[0]
        if any(loss is None for loss in losses):
            return None
        return torch.stack([torch.as_tensor(loss).detach() for loss in losses]).mean()

    @torch.no_grad()
    def _plain_step(self) -> None:
        """Warm-up: base step with the (micro-batch averaged) gradient at θ."""
        if self.accumulate > 1:
            torch._foreach_div_(params_with_grads(self.param_groups)[1], self.accumulate)
        self.base_optimizer.step()
        self.zero_grad()

    def _call(self, closure: Callable[..., Any], micro_batch: int) -> Any:
        with torch.enable_grad():
            loss = closure(micro_batch) if self.accumulate > 1 else closure()
        self._unconsumed_grads = False  # several backward calls inside one closure are intended
        if not any(p.grad is not None for p in all_params(self.param_groups)):
            raise RuntimeError("the closure left no gradient: it must call loss.backward()")
        return loss

    def _discard_entry_grads(self) -> None:
        if any(p.grad is not None for p in all_params(self.param_groups)):
            if not self._warned_entry_grads:
                warnings.warn(
                    f"{type(self).__name__}.step(closure) runs both backward passes itself; "
                    "gradients present at entry are discarded",
                    stacklevel=4,
                )
                self._warned_entry_grads = True
            self.zero_grad()

    # ----- internals ----------------------------------------------------------------------------

    def _gradient_usable(self, grads: Tensors) -> bool:
        norm = global_norm(grads)
        if not bool(torch.isfinite(norm)):
            self.stats["skipped_nonfinite_grad"] += 1
            return False
        if norm == 0:
            self.stats["skipped_zero_grad"] += 1
            return False
        return True

    def _save(self, params: Tensors) -> None:
        for p in params:
            if p not in self._backup:
                self._backup[p] = torch.empty_like(p)
        torch._foreach_copy_([self._backup[p] for p in params], params)
        self._perturbed = params

    def _average_accumulated_grads(self) -> bool:
        """Fold g̃ into the micro-batch sum; True (with .grad = mean) once k are in."""
        params, grads = params_with_grads(self.param_groups)
        if self.accumulate_mode == "global":
            torch._foreach_div_(grads, self.accumulate)
            return True
        for p, g in zip(params, grads):
            if p in self._grad_sum:
                self._grad_sum[p].add_(g)
            else:
                self._grad_sum[p] = g.clone()
        self._micro_steps += 1
        if self._micro_steps < self.accumulate:
            self.zero_grad()
            return False
        for p, total in self._grad_sum.items():
            p.grad = total.div_(self.accumulate)
        self._grad_sum, self._micro_steps = {}, 0
        return True

    def _check_no_accumulation(self, where: str) -> None:
        if self._unconsumed_grads:
            self._unconsumed_grads = False
            raise RuntimeError(
                f"{where}(): .grad holds gradients of several backward passes that no step has "
                "consumed; the two-step API needs exactly one backward per pass. For gradient "
                "accumulation construct the optimizer with accumulate=k "
                "(accumulate_mode='micro' or 'global')"
            )

    def _watch_gradient_accumulation(self) -> None:
        """Flag any backward that adds to a ``.grad`` the optimizer has not consumed."""
        owner = weakref.ref(self)

        def flag_if_accumulating(param: torch.Tensor) -> Callable[[torch.Tensor], None]:
            param_ref = weakref.ref(param)

            def hook(grad: torch.Tensor) -> None:
                opt, p = owner(), param_ref()
                if opt is not None and p is not None and p.grad is not None:
                    opt._unconsumed_grads = True

            return hook

        self._hook_handles = [
            p.register_hook(flag_if_accumulating(p))
            for p in all_params(self.param_groups)
            if p.requires_grad
        ]


class SAM(SharpnessAwareOptimizer):
    """Sharpness-Aware Minimization: ε = ρ·g/(‖g‖ + 1e-12), ‖·‖ over all parameters.

    Defaults ρ = 0.05 (CIFAR-10-like); 0.1 for CIFAR-100-like problems. See
    :class:`SharpnessAwareOptimizer` for the training-loop shape and options. ``adaptive=False``
    (the davda54/sam keyword) is accepted; ``adaptive=True`` raises and points to :class:`ASAM`.
    """

    def __init__(self, params: Any, base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs: Any):
        if kwargs.pop("adaptive", False):
            raise TypeError(
                "SAM(adaptive=True) is the davda54/sam spelling of adaptive SAM; here it is its own "
                "class: ASAM(params, base_optimizer_cls, rho=..., eta=0.0, adaptive_filter=None, ...) "
                "reproduces that step (T = |θ| on every tensor); the default ASAM(...) follows the "
                "official ASAM code (η = 0.01, weight tensors only, ρ ≈ 10× SAM's)"
            )
        super().__init__(params, base_optimizer_cls, rho=rho, **kwargs)

    def perturbation(self, grads: Tensors, params: Tensors) -> Tensors:
        return torch._foreach_mul(grads, self.rho / (global_norm(grads) + EPS_NORM))


def weight_names_only(name: str, param: torch.Tensor) -> bool:
    """The official ASAM rule: ``T = |θ| + η`` only for tensors whose name contains ``"weight"``."""
    return "weight" in name


class ASAM(SharpnessAwareOptimizer):
    """Adaptive SAM: ``T = diag(|θ| + η)``, ε = ρ·T²g/(‖Tg‖ + 1e-12), so ‖T⁻¹ε‖ = ρ.

    ``adaptive_filter(name, param) → bool`` picks the tensors that get T (others T = 1); the
    default is the official rule (name contains "weight"); ``None`` applies T to every tensor
    (the popular port, usually with ``eta=0``). Names come from ``named_parameters()`` passed as
    ``params`` or from ``model=``. Defaults ρ = 0.5 (CIFAR-10; ~10× SAM's), η = 0.01.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.5,
        *,
        eta: float = 0.01,
        adaptive_filter: Callable[[str, torch.Tensor], bool] | None = weight_names_only,
        **kwargs: Any,
    ):
        eta = check_number("eta", eta, low=0.0, owner=type(self).__name__)
        if adaptive_filter is not None and not callable(adaptive_filter):
            raise TypeError(f"{type(self).__name__}: adaptive_filter must be callable (name, param) -> bool "
                            f"or None, got {adaptive_filter!r}")
        super().__init__(params, base_optimizer_cls, rho=rho, **kwargs)
        self.eta = eta
        params_list = all_params(self.param_groups)
        if adaptive_filter is None:
            self._adaptive = set(params_list)
        else:
            names = self._parameter_names(params_list)
            self._adaptive = {p for p in params_list if adaptive_filter(names[p], p)}

    def _parameter_names(self, params: Tensors) -> dict[torch.Tensor, str]:
        names: dict[torch.Tensor, str] = {}
        for group in self.param_groups:
            names.update(zip(group["params"], group.get("param_names", ())))
        if self.model is not None:
            for name, p in self.model.named_parameters():
                names.setdefault(p, name)
        missing = [p for p in params if p not in names]
        if missing:
            raise ValueError(
                "ASAM's adaptive_filter needs parameter names: pass model.named_parameters() as "
                "params, or model=..., or adaptive_filter=None to adapt every tensor"
            )
        return names

    def perturbation(self, grads: Tensors, params: Tensors) -> Tensors:
        adaptive = [i for i, p in enumerate(params) if p in self._adaptive]
        if not adaptive:
            return torch._foreach_mul(grads, self.rho / (global_norm(grads) + EPS_NORM))
        scales = torch._foreach_add(torch._foreach_abs([params[i] for i in adaptive]), self.eta)
        scaled_grads = list(grads)  # T g
        for i, tg in zip(adaptive, torch._foreach_mul(scales, [grads[i] for i in adaptive])):
            scaled_grads[i] = tg
        eps = torch._foreach_mul(scaled_grads, self.rho / (global_norm(scaled_grads) + EPS_NORM))
        torch._foreach_mul_([eps[i] for i in adaptive], scales)
        return eps

"""RSAM: Rényi-sharpness-aware minimization (SAM with a signed, adaptive radius)."""
from __future__ import annotations

from typing import Any

import torch

from quotientsharp.optim.sam import SharpnessAwareOptimizer
from quotientsharp.optim.utils import Tensors, global_norm, global_sum
from quotientsharp.validation import check_number


class RSAM(SharpnessAwareOptimizer):
    """ε = −c·g with c = sign(1−α)·ρ·S_α / S₁^(α+1), S₁ = Σg_j² + 1e-16, S_α = Σ|g_j|^(2α) + 1e-16.

    Sums run over all parameters as one flat vector (the reference implementation's rule).
    Equivalently ε = −sign(1−α)·ρ_t·g/‖g‖ with ρ_t = ρ·Σ_j p_j^α / ‖g‖, p_j = g_j²/‖g‖²: for
    α > 1 an ascent step like SAM, for α < 1 a descent look-ahead; α → 1⁺ gives SAM with radius
    ρ/‖g‖. α = 1 is rejected (the reference divides by zero there).

    Schedule: plain base steps while ``epoch <= warmup_epochs`` (default 5, so RSAM starts at
    the 7th epoch; call ``set_epoch`` every epoch) or per ``warmup_predicate``. Defaults are the
    CIFAR-10/ResNet-20 values ρ = 0.65, α = 1.2. Training loop: see
    :class:`~quotientsharp.optim.sam.SharpnessAwareOptimizer`.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[torch.optim.Optimizer],
        rho: float = 0.65,
        alpha: float = 1.2,
        *,
        warmup_epochs: int = 5,
        **kwargs: Any,
    ):
        alpha = check_number("alpha", alpha, low=0.0, low_open=True, owner="RSAM")
        if alpha == 1:
            raise ValueError("RSAM: alpha = 1 is undefined (use SAM, the alpha -> 1+ limit)")
        super().__init__(params, base_optimizer_cls, rho=rho, warmup_epochs=warmup_epochs, **kwargs)
        self.alpha = alpha

    def perturbation(self, grads: Tensors, params: Tensors) -> Tensors:
        sum_sq = global_norm(grads).double() ** 2 + 1e-16
        abs_grads = torch._foreach_abs(grads)
        sum_pow = global_sum(torch._foreach_pow(abs_grads, 2 * self.alpha)).double() + 1e-16
        sign = 1.0 if self.alpha < 1 else -1.0
        c = sign * self.rho * sum_pow / sum_sq ** (self.alpha + 1)
        return torch._foreach_mul(grads, -c)  # the float64 factor, cast to each tensor's own dtype

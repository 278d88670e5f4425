"""The curvature and norm measures of the Rényi study (spec §7), one function each.

Model-level functions take ``(model, loss_fn, loader)`` and build the operator themselves;
``operator_kwargs`` (``mode``, ``train_mode``, ``check_deterministic``, ``dtype``, ...) go to
:class:`~quotientsharp.curvature.operators.HessianOperator` (or :class:`GGNOperator` with
``curvature="ggn"``). ``params`` selects the target block (see
:func:`~quotientsharp.curvature.operators.select_parameters`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import jvp, vmap
from tqdm.auto import tqdm

from quotientsharp.curvature.lanczos import EigenResult, lanczos, power_iteration
from quotientsharp.curvature.operators import (
    GGNOperator,
    HessianOperator,
    ModelOperator,
    select_parameters,
)
from quotientsharp.curvature.renyi import RenyiResult, renyi_entropy
from quotientsharp.curvature.results import Estimate
from quotientsharp.curvature.slq import SLQResult, SpectralDensity, slq
from quotientsharp.curvature.trace import hutch_plus_plus, hutchinson
from quotientsharp.functional import (
    LossFn,
    batch_loss,
    eval_mode,
    forward,
    materialize,
    math_attention,
    split_batch,
)

Params = str | Sequence[str]


def curvature_operator(
    model: nn.Module, loss_fn: LossFn, loader: Iterable, params: Params = "all",
    curvature: str = "hessian", **operator_kwargs,
) -> HessianOperator | GGNOperator:
    """The Hessian (``curvature="hessian"``) or GGN (``"ggn"``) operator of the loader loss."""
    if curvature == "hessian":
        return HessianOperator(model, loss_fn, loader, params, **operator_kwargs)
    if curvature == "ggn":
        return GGNOperator(model, loss_fn, loader, params, **operator_kwargs)
    raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")


# --- spectral measures -----------------------------------------------------------------------
def hessian_trace(
    model, loss_fn, loader, params: Params = "all", method: str = "hutchinson", n_probes: int = 100,
    m: int = 15, seed: int = 0, progress: bool = True, **operator_kwargs,
) -> Estimate:
    """Tr H by ``"hutchinson"`` (P probes), ``"hutch++"`` (budget = P matvecs) or ``"slq"`` (f = id)."""
    op = curvature_operator(model, loss_fn, loader, params, **operator_kwargs)
    if method == "hutchinson":
        return hutchinson(op, n_probes, seed=seed, progress=progress)
    if method == "hutch++":
        return hutch_plus_plus(op, n_probes, seed=seed, progress=progress)
    if method == "slq":
        return slq(op, m, n_probes, seed=seed, progress=progress).trace()
    raise ValueError(f"method must be 'hutchinson', 'hutch++' or 'slq', got {method!r}")


def hessian_top_eigenvalues(
    model, loss_fn, loader, k: int = 1, params: Params = "all", method: str = "lanczos",
    which: str = "LA", tol: float | None = None, seed: int = 0, progress: bool = True, **operator_kwargs,
) -> EigenResult:
    """Top-k eigenpairs by ``"lanczos"`` (tol 1e-4, ``which`` LA/SA/LM) or ``"power"`` iteration
    (tol 1e-3, largest |λ|, PyHessian semantics)."""
    op = curvature_operator(model, loss_fn, loader, params, **operator_kwargs)
    if method == "lanczos":
        return lanczos(op, k, which, tol=tol or 1e-4, seed=seed, progress=progress)
    if method == "power":
        return power_iteration(op, k, tol=tol or 1e-3, seed=seed, progress=progress)
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")


def hessian_max_eigenvalue(model, loss_fn, loader, params: Params = "all", **kwargs) -> Estimate:
    """λ_max(H) by Lanczos; ``samples`` holds the residual ‖Hy − λy‖ of the Ritz pair."""
    result = hessian_top_eigenvalues(model, loss_fn, loader, 1, params, **kwargs)
    return Estimate(float(result.eigenvalues[0]), None, result.residuals, result.config)


def hessian_slq(
    model, loss_fn, loader, params: Params = "all", m: int = 15, n_probes: int = 100, seed: int = 0,
    progress: bool = True, **operator_kwargs,
) -> SLQResult:
    """One SLQ run (m steps × P Rademacher probes) to derive any spectral sum from."""
    op = curvature_operator(model, loss_fn, loader, params, **operator_kwargs)
    result = slq(op, m, n_probes, seed=seed, progress=progress)
    result.config["params"] = op.param_names
    return result


def hessian_log_det(
    model, loss_fn, loader, params: Params = "all", clamp_min: float | None = None, **slq_kwargs,
) -> Estimate:
    """log det H = Tr log H by SLQ; raises on a node ≤ 0 unless ``clamp_min`` is given."""
    return hessian_slq(model, loss_fn, loader, params, **slq_kwargs).log_det(clamp_min)


def hessian_shannon_entropy(
    model, loss_fn, loader, params: Params = "all", normalizer: str = "abs", **slq_kwargs,
) -> RenyiResult:
    """Shannon spectral entropy (Rényi α → 1) by SLQ."""
    return renyi_entropy(hessian_slq(model, loss_fn, loader, params, **slq_kwargs), "shannon", normalizer)


def hessian_spectral_density(
    model, loss_fn, loader, params: Params = "all", m: int = 100, n_probes: int = 3,
    n_grid: int = 10_000, **slq_kwargs,
) -> SpectralDensity:
    """Smoothed spectral density (spec §5: m = 100, 3–5 probes for a less noisy plot)."""
    return hessian_slq(model, loss_fn, loader, params, m=m, n_probes=n_probes, **slq_kwargs).density(n_grid)


def renyi_sharpness(
    model, loss_fn, loader, alpha: float | str | Sequence[float | str] = 0.5, params: Params = "all",
    normalizer: str = "abs", m: int = 15, n_probes: int = 100, seed: int = 0, **slq_kwargs,
) -> RenyiResult | dict:
    """Rényi entropy/sharpness (``.sharpness`` = −H_α) of the loader-loss Hessian by SLQ.

    A sequence of α values is served by a single SLQ run and returns ``{alpha: RenyiResult}``.
    Keep (m, P, subset, seed) fixed within a study: values with different m are not comparable.
    """
    result = hessian_slq(model, loss_fn, loader, params, m=m, n_probes=n_probes, seed=seed, **slq_kwargs)
    if isinstance(alpha, (str, int, float)):
        return renyi_entropy(result, alpha, normalizer)
    return {a: renyi_entropy(result, a, normalizer) for a in alpha}


def renyi_study_targets(model: nn.Module) -> list:
    """Default Rényi targets: every ``weight`` tensor with ndim > 1 (one block each), then ``"all"``."""
    return [n for n, p in model.named_parameters() if "weight" in n and p.ndim > 1] + ["all"]


# --- norm-based measures ---------------------------------------------------------------------
def parameter_norm(model: nn.Module, params: Params = "all", include_vectors: bool = True) -> Estimate:
    """‖θ‖₂ over the target block; ``include_vectors=False`` drops 1-D tensors (biases, norm scales)."""
    named = dict(model.named_parameters())
    names = [n for n in select_parameters(model, params) if include_vectors or named[n].ndim > 1]
    squares = torch.stack([named[n].detach().to(torch.float64).pow(2).sum() for n in names])
    return Estimate(float(squares.sum().sqrt()), None, None, {"params": names, "include_vectors": include_vectors})


def fisher_rao_norm(
    model: nn.Module, loss_fn: LossFn, loader: Iterable, params: Params = "all", labels: str = "empirical",
    seed: int = 0, train_mode: bool = False,
) -> Estimate:
    """Fisher–Rao norm ⟨θ, Fθ⟩ = (1/N) Σ_i (θᵀ ∇_θ ℓ_i)² (empirical Fisher, per-example losses).

    ``labels="model"`` samples y_i ~ softmax(f(x_i)) instead of the true labels (classification).
    θᵀ∇ℓ_i is one forward-mode jvp of the per-example losses in direction θ. ``samples``: the
    per-example squares.
    """
    if labels not in ("empirical", "model"):
        raise ValueError(f"labels must be 'empirical' or 'model', got {labels!r}")
    names = select_parameters(model, params)
    named = dict(model.named_parameters())
    target = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in target}
    generator = torch.Generator().manual_seed(seed)
    squares = []
    with eval_mode(model, train_mode), math_attention():
        for batch in materialize(loader, next(model.parameters()).device):
            inputs, targets = split_batch(batch)
            if labels == "model":
                with torch.no_grad():
                    probs = forward(model, {**frozen, **target}, inputs).softmax(-1)
                targets = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(targets.device)

            def one_example(x, y, point):
                x1 = {k: v[None] for k, v in x.items()} if isinstance(x, dict) else (
                    tuple(t[None] for t in x) if isinstance(x, tuple) else x[None])
                return batch_loss(model, {**frozen, **point}, (x1, y[None]), loss_fn)

            def per_example(point):
                return vmap(one_example, in_dims=(0, 0, None))(inputs, targets, point)

            directional = jvp(per_example, (target,), (target,))[1]
            squares.append(directional.detach().to(torch.float64) ** 2)
    squares = torch.cat(squares)
    return Estimate(float(squares.mean()), None, squares, {"params": names, "labels": labels, "seed": seed})


# --- perturbation-based measures -------------------------------------------------------------
def _accuracy(model: nn.Module, params: dict, batches: list) -> float:
    correct = total = 0
    for batch in batches:
        inputs, targets = split_batch(batch)
        correct += int((forward(model, params, inputs).argmax(-1) == targets).sum())
        total += int(targets.shape[0])
    return correct / total


@torch.no_grad()
def pac_bayes_flatness(
    model: nn.Module, loader: Iterable, params: Params = "all", target_drop: float = 0.1,
    sigma_max: float = 2.0, depth: int = 15, n_samples: int = 10, tol: float = 0.01, seed: int = 0,
    progress: bool = True,
) -> Estimate:
    """PAC-Bayes flatness 1/σ'², σ' the largest **std** of isotropic Gaussian weight noise whose
    Monte-Carlo mean accuracy drop is ≈ ``target_drop`` (bisection on [0, σ_max], ``depth`` steps,
    ``n_samples`` noise draws, stop when |drop − target| < tol). ``samples``: rows (σ, drop).

    (A public reference implementation passes σ² where a std is expected; here σ is the std.)
    """
    batches = materialize(loader, next(model.parameters()).device)
    names = select_parameters(model, params)
    named = dict(model.named_parameters())
    base = {n: p.detach() for n, p in named.items()}
    generator = torch.Generator().manual_seed(seed)
    trail = []
    with eval_mode(model):
        base_accuracy = _accuracy(model, base, batches)
        lo, hi = 0.0, sigma_max
        for _ in tqdm(range(depth), desc="PAC-Bayes bisection", disable=not progress, leave=False):
            sigma = (lo + hi) / 2
            accuracies = []
            for _ in range(n_samples):
                noisy = dict(base)
                for n in names:
                    noise = torch.randn(base[n].shape, generator=generator, dtype=base[n].dtype)
                    noisy[n] = base[n] + sigma * noise.to(base[n].device)
                accuracies.append(_accuracy(model, noisy, batches))
            drop = base_accuracy - sum(accuracies) / n_samples
            trail.append((sigma, drop))
            if abs(drop - target_drop) < tol:
                break
            lo, hi = (lo, sigma) if drop > target_drop else (sigma, hi)
    return Estimate(1 / sigma**2, None, torch.tensor(trail, dtype=torch.float64), {
        "sigma": sigma, "base_accuracy": base_accuracy, "target_drop": target_drop, "sigma_max": sigma_max,
        "depth": depth, "n_samples": n_samples, "tol": tol, "seed": seed, "params": names,
    })


def _one_step_sharpness(op: ModelOperator, epsilon: torch.Tensor, config: dict) -> Estimate:
    perturbed = op.loss_and_gradient(epsilon)[0]
    return Estimate(perturbed - op.loss, None, None, {
        **config, "loss": op.loss, "perturbed_loss": perturbed, "params": op.param_names,
    })


def sam_sharpness(
    model, loss_fn, loader, rho: float = 0.05, norm: str = "l2", params: Params = "all", **operator_kwargs,
) -> Estimate:
    """One-step SAM sharpness L(θ+ε) − L(θ): ε = ρ g/‖g‖ (``"l2"``) or ρ sign(g) (``"linf"``), g = ∇L."""
    op = ModelOperator(model, loss_fn, loader, params, **operator_kwargs)
    g = op.gradient
    if norm == "l2":
        epsilon = rho * g / g.norm().clamp(min=1e-300)
    elif norm == "linf":
        epsilon = rho * g.sign()
    else:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return _one_step_sharpness(op, epsilon, {"rho": rho, "norm": norm, "adaptive": False})


def asam_sharpness(
    model, loss_fn, loader, rho: float = 0.5, norm: str = "l2", eta: float = 0.01, params: Params = "all",
    **operator_kwargs,
) -> Estimate:
    """One-step ASAM sharpness with s = |θ| + η: ε = ρ s²⊙g/‖s⊙g‖ (``"l2"``) or ρ s⊙sign(g) (``"linf"``)."""
    op = ModelOperator(model, loss_fn, loader, params, **operator_kwargs)
    g = op.gradient
    s = op.flatten(op.target).abs() + eta
    if norm == "l2":
        epsilon = rho * s**2 * g / (s * g).norm().clamp(min=1e-300)
    elif norm == "linf":
        epsilon = rho * s * g.sign()
    else:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return _one_step_sharpness(op, epsilon, {"rho": rho, "norm": norm, "adaptive": True, "eta": eta})



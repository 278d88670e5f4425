"""The curvature and norm measures of the Rényi study (spec §7), one function each.

Model-level functions take ``(model, loader, loss_fn)`` (the order of the sharpness measures;
swapped arguments raise a ``TypeError`` saying which is which) and build the operator themselves;
``operator_kwargs`` (``mode``, ``train_mode``, ``check_deterministic``, ``dtype``, ...) go to
:class:`~quotientsharp.curvature.operators.HessianOperator` (or :class:`GGNOperator` with
``curvature="ggn"``). ``params`` selects the target block (see
:func:`~quotientsharp.curvature.operators.select_parameters`). Scalar results are
:class:`~quotientsharp.curvature.results.Estimate` with the value in ``.value``. Batches follow the
batch rule of :mod:`quotientsharp.validation` (moved to the model's device; floating inputs cast
to the model's dtype).
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
from quotientsharp.types import ParamSelector
from quotientsharp.validation import (
    check_choice,
    check_count,
    check_model_loader_loss,
    check_number,
    conform_batch,
    conform_inputs_for,
    model_dtype_devices,
)


def curvature_operator(
    model: nn.Module, loader: Iterable, loss_fn: LossFn, params: ParamSelector = "all",
    curvature: str = "hessian", **operator_kwargs,
) -> HessianOperator | GGNOperator:
    """The Hessian (``curvature="hessian"``) or GGN (``"ggn"``) operator of the loader loss."""
    check_model_loader_loss("curvature_operator", model, loader, loss_fn)
    if curvature == "hessian":
        return HessianOperator(model, loader, loss_fn, params, **operator_kwargs)
    if curvature == "ggn":
        return GGNOperator(model, loader, loss_fn, params, **operator_kwargs)
    raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")


def _operator(where: str, model, loader, loss_fn, params: ParamSelector, **operator_kwargs):
    """:func:`curvature_operator`, with the call shape checked under the public name ``where``."""
    check_model_loader_loss(where, model, loader, loss_fn)
    return curvature_operator(model, loader, loss_fn, params, **operator_kwargs)


# --- spectral measures -----------------------------------------------------------------------
def hessian_trace(
    model, loader, loss_fn, params: ParamSelector = "all", method: str = "hutchinson", n_probes: int = 100,
    m: int = 15, seed: int = 0, progress: bool = True, **operator_kwargs,
) -> Estimate:
    """Tr H by ``"hutchinson"`` (P probes), ``"hutch++"`` (budget = P matvecs) or ``"slq"`` (f = id).

    ``H = Σ_b (n_b/N) ∇²L_b(θ)`` is the Hessian of the loader-averaged loss over the ``params``
    block (``n`` parameters); Hutchinson averages ``zᵀHz`` over Rademacher ``z ∈ {±1}ⁿ``. Returns an
    :class:`~quotientsharp.curvature.results.Estimate` (``value``, ``stderr`` over probes,
    ``samples`` the per-probe values). Raises ``TypeError`` for swapped arguments and
    ``ValueError`` for an unknown ``method`` or a count below its minimum (``n_probes ≥ 4`` for
    ``"hutch++"``)."""
    check_choice("method", method, ("hutchinson", "hutch++", "slq"), "hessian_trace")
    check_count("n_probes", n_probes, 4 if method == "hutch++" else 1, "hessian_trace")
    check_count("m", m, 1, "hessian_trace")
    op = _operator("hessian_trace", model, loader, loss_fn, params, **operator_kwargs)
    if method == "hutchinson":
        return hutchinson(op, n_probes, seed=seed, progress=progress)
    if method == "hutch++":
        return hutch_plus_plus(op, n_probes, seed=seed, progress=progress)
    if method == "slq":
        return slq(op, m, n_probes, seed=seed, progress=progress).trace()
    raise ValueError(f"method must be 'hutchinson', 'hutch++' or 'slq', got {method!r}")


def hessian_top_eigenvalues(
    model, loader, loss_fn, k: int = 1, params: ParamSelector = "all", method: str = "lanczos",
    which: str = "LA", tol: float | None = None, seed: int = 0, progress: bool = True, **operator_kwargs,
) -> EigenResult:
    """Top-k eigenpairs by ``"lanczos"`` (tol 1e-4, ``which`` LA/SA/LM) or ``"power"`` iteration
    (tol 1e-3, largest ``|λ|``, PyHessian semantics)."""
    check_count("k", k, 1, "hessian_top_eigenvalues")
    check_choice("method", method, ("lanczos", "power"), "hessian_top_eigenvalues")
    if tol is not None:
        check_number("tol", tol, low=0.0, low_open=True, owner="hessian_top_eigenvalues")
    op = _operator("hessian_top_eigenvalues", model, loader, loss_fn, params, **operator_kwargs)
    if method == "lanczos":
        return lanczos(op, k, which, tol=tol or 1e-4, seed=seed, progress=progress)
    if method == "power":
        return power_iteration(op, k, tol=tol or 1e-3, seed=seed, progress=progress)
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")


def hessian_max_eigenvalue(model, loader, loss_fn, params: ParamSelector = "all", **kwargs) -> Estimate:
    """λ_max(H) by Lanczos; ``samples`` holds the residual ‖Hy − λy‖ of the Ritz pair.

    ``H`` is the Hessian of the loader-averaged loss over the ``params`` block; ``kwargs`` go to
    :func:`hessian_top_eigenvalues` (``method``, ``tol``, ``seed``, operator options). Returns an
    :class:`~quotientsharp.curvature.results.Estimate` (``stderr`` is ``None``: deterministic up
    to ``tol``). Raises ``TypeError`` for swapped arguments."""
    check_model_loader_loss("hessian_max_eigenvalue", model, loader, loss_fn)
    result = hessian_top_eigenvalues(model, loader, loss_fn, 1, params, **kwargs)
    return Estimate(float(result.eigenvalues[0]), None, result.residuals, result.config)


def hessian_slq(
    model, loader, loss_fn, params: ParamSelector = "all", m: int = 15, n_probes: int = 100, seed: int = 0,
    progress: bool = True, **operator_kwargs,
) -> SLQResult:
    """One SLQ run (m steps × P Rademacher probes) to derive any spectral sum from."""
    return _slq("hessian_slq", model, loader, loss_fn, params, m, n_probes, seed, progress, **operator_kwargs)


def _slq(where: str, model, loader, loss_fn, params: ParamSelector = "all", m: int = 15, n_probes: int = 100,
         seed: int = 0, progress: bool = True, **operator_kwargs) -> SLQResult:
    """:func:`hessian_slq` with errors naming the public function ``where``."""
    check_count("m", m, 1, where)
    check_count("n_probes", n_probes, 1, where)
    op = _operator(where, model, loader, loss_fn, params, **operator_kwargs)
    result = slq(op, m, n_probes, seed=seed, progress=progress)
    result.config["params"] = op.param_names
    return result


def hessian_log_det(
    model, loader, loss_fn, params: ParamSelector = "all", clamp_min: float | None = None, **slq_kwargs,
) -> Estimate:
    """log det H = Tr log H by SLQ; raises on a node ≤ 0 unless ``clamp_min`` is given."""
    return _slq("hessian_log_det", model, loader, loss_fn, params, **slq_kwargs).log_det(clamp_min)


def hessian_shannon_entropy(
    model, loader, loss_fn, params: ParamSelector = "all", normalizer: str = "abs", **slq_kwargs,
) -> RenyiResult:
    """Shannon spectral entropy (Rényi α → 1) by SLQ."""
    result = _slq("hessian_shannon_entropy", model, loader, loss_fn, params, **slq_kwargs)
    return renyi_entropy(result, "shannon", normalizer)


def hessian_spectral_density(
    model, loader, loss_fn, params: ParamSelector = "all", m: int = 100, n_probes: int = 3,
    n_grid: int = 10_000, **slq_kwargs,
) -> SpectralDensity:
    """Smoothed spectral density (spec §5: m = 100, 3–5 probes for a less noisy plot)."""
    check_count("n_grid", n_grid, 2, "hessian_spectral_density")
    result = _slq("hessian_spectral_density", model, loader, loss_fn, params, m=m, n_probes=n_probes, **slq_kwargs)
    return result.density(n_grid)


def renyi_sharpness(
    model, loader, loss_fn, alpha: float | str | Sequence[float | str] = 0.5, params: ParamSelector = "all",
    normalizer: str = "abs", m: int = 15, n_probes: int = 100, seed: int = 0, **slq_kwargs,
) -> RenyiResult | dict:
    """Rényi entropy/sharpness (``.sharpness`` = −H_α) of the loader-loss Hessian by SLQ.

    A sequence of α values is served by a single SLQ run and returns ``{alpha: RenyiResult}``.
    Keep (m, P, subset, seed) fixed within a study: values with different m are not comparable.
    """
    result = _slq("renyi_sharpness", model, loader, loss_fn, params, m=m, n_probes=n_probes, seed=seed, **slq_kwargs)
    if isinstance(alpha, (str, int, float)):
        return renyi_entropy(result, alpha, normalizer)
    return {a: renyi_entropy(result, a, normalizer) for a in alpha}


def renyi_study_targets(model: nn.Module) -> list:
    """Default Rényi targets: every ``weight`` tensor with ndim > 1 (one block each), then ``"all"``."""
    return [n for n, p in model.named_parameters() if "weight" in n and p.ndim > 1] + ["all"]


# --- norm-based measures ---------------------------------------------------------------------
def parameter_norm(model: nn.Module, params: ParamSelector = "all", include_vectors: bool = True) -> Estimate:
    """‖θ‖₂ over the target block; ``include_vectors=False`` drops 1-D tensors (biases, norm scales)."""
    named = dict(model.named_parameters())
    names = [n for n in select_parameters(model, params) if include_vectors or named[n].ndim > 1]
    if not names:
        raise ValueError("parameter_norm: the target block has no parameter with more than one "
                         "dimension; pass include_vectors=True to measure its vectors")
    squares = torch.stack([named[n].detach().to(torch.float64).pow(2).sum() for n in names])
    return Estimate(float(squares.sum().sqrt()), None, None, {"params": names, "include_vectors": include_vectors})


def fisher_rao_norm(
    model: nn.Module, loader: Iterable, loss_fn: LossFn, params: ParamSelector = "all", labels: str = "empirical",
    seed: int = 0, train_mode: bool = False,
) -> Estimate:
    """Fisher–Rao norm ⟨θ, Fθ⟩ = (1/N) Σ_i (θᵀ ∇_θ ℓ_i)² (empirical Fisher, per-example losses).

    ``labels="model"`` samples y_i ~ softmax(f(x_i)) instead of the true labels (classification).
    θᵀ∇ℓ_i is one forward-mode jvp of the per-example losses in direction θ. ``samples``: the
    per-example squares.
    """
    check_model_loader_loss("fisher_rao_norm", model, loader, loss_fn)
    if labels not in ("empirical", "model"):
        raise ValueError(f"labels must be 'empirical' or 'model', got {labels!r}")
    names = select_parameters(model, params)
    named = dict(model.named_parameters())
    target = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in target}
    generator = torch.Generator().manual_seed(seed)
    squares = []
    with eval_mode(model, train_mode), math_attention():
        for i, batch in enumerate(materialize(loader, next(model.parameters()).device)):
            inputs, targets = split_batch(batch)
            inputs = conform_inputs_for(model, inputs, "fisher_rao_norm", i)
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
        total += targets.numel()  # every prediction: examples, or tokens of per-token outputs
    return correct / total


@torch.no_grad()
def pac_bayes_flatness(
    model: nn.Module, loader: Iterable, params: ParamSelector = "all", target_drop: float = 0.1,
    sigma_max: float = 2.0, depth: int = 15, n_samples: int = 10, tol: float = 0.01, seed: int = 0,
    progress: bool = True,
) -> Estimate:
    """PAC-Bayes flatness 1/σ'², σ' the largest **std** of isotropic Gaussian weight noise whose
    Monte-Carlo mean accuracy drop is ≈ ``target_drop`` (bisection on [0, σ_max], ``depth`` steps,
    ``n_samples`` noise draws, stop when ``|drop − target| < tol``). ``samples``: rows (σ, drop).

    (A public reference implementation passes σ² where a std is expected; here σ is the std.)
    """
    if not isinstance(model, nn.Module) or callable(loader) and not hasattr(loader, "__iter__"):
        raise TypeError("pac_bayes_flatness(model, loader, ...): the 1st argument must be the "
                        f"nn.Module and the 2nd an iterable of batches, got {type(model).__name__} "
                        f"and {type(loader).__name__}")
    for name, count in (("depth", depth), ("n_samples", n_samples)):
        check_count(name, count, 1, "pac_bayes_flatness")
    check_number("target_drop", target_drop, low=0.0, high=1.0, low_open=True, owner="pac_bayes_flatness")
    check_number("sigma_max", sigma_max, low=0.0, low_open=True, owner="pac_bayes_flatness")
    check_number("tol", tol, low=0.0, low_open=True, owner="pac_bayes_flatness")
    dtype, devices = model_dtype_devices(model)
    batches = [conform_batch(b, dtype, devices, "pac_bayes_flatness", i)
               for i, b in enumerate(materialize(loader, next(model.parameters()).device))]
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
    model, loader, loss_fn, rho: float = 0.05, norm: str = "l2", params: ParamSelector = "all", **operator_kwargs,
) -> Estimate:
    """One-step SAM sharpness L(θ+ε) − L(θ): ε = ρ g/‖g‖ (``"l2"``) or ρ sign(g) (``"linf"``), g = ∇L."""
    check_model_loader_loss("sam_sharpness", model, loader, loss_fn)
    check_number("rho", rho, low=0.0, low_open=True, owner="sam_sharpness")
    op = ModelOperator(model, loader, loss_fn, params, **operator_kwargs)
    g = op.gradient
    if norm == "l2":
        epsilon = rho * g / g.norm().clamp(min=1e-300)
    elif norm == "linf":
        epsilon = rho * g.sign()
    else:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return _one_step_sharpness(op, epsilon, {"rho": rho, "norm": norm, "adaptive": False})


def asam_sharpness(
    model, loader, loss_fn, rho: float = 0.5, norm: str = "l2", eta: float = 0.01, params: ParamSelector = "all",
    **operator_kwargs,
) -> Estimate:
    """One-step ASAM sharpness with ``s = |θ| + η``: ε = ρ s²⊙g/‖s⊙g‖ (``"l2"``) or ρ s⊙sign(g) (``"linf"``)."""
    check_model_loader_loss("asam_sharpness", model, loader, loss_fn)
    check_number("rho", rho, low=0.0, low_open=True, owner="asam_sharpness")
    check_number("eta", eta, low=0.0, owner="asam_sharpness")
    op = ModelOperator(model, loader, loss_fn, params, **operator_kwargs)
    g = op.gradient
    s = op.flatten(op.target).abs() + eta
    if norm == "l2":
        epsilon = rho * s**2 * g / (s * g).norm().clamp(min=1e-300)
    elif norm == "linf":
        epsilon = rho * s * g.sign()
    else:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return _one_step_sharpness(op, epsilon, {"rho": rho, "norm": norm, "adaptive": True, "eta": eta})



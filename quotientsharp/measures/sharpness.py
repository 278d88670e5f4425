"""Public API: geodesic, adaptive and Euclidean sharpness (spec part 2 §1).

The three measures are one computation with three :class:`~quotientsharp.Quotient` s:

| measure   | quotient                                         | endpoint ``gamma_xi(1)``        |
|-----------|--------------------------------------------------|---------------------------------|
| geodesic  | GL groups (inv/mix) + adaptive rest, horizontal   | 2nd order on groups, 1st on rest |
| adaptive  | adaptive metric ``sum xi^2 / w^2`` everywhere     | ``w0 + xi``                      |
| Euclidean | Euclidean metric everywhere                       | ``w0 + xi``                      |

Per batch S, ``kind="worst"`` maximises ``L_S(gamma_xi(1)) - L_S(w0)`` over ``||xi||_{w0} <= rho``
(:func:`~quotientsharp.measures.solver.maximize`), ``kind="average"`` averages it over
``xi = rho Pi(whiten(zeta))`` (:func:`~quotientsharp.measures.average.average_increase`); the
result is the mean over batches.

Model state: the model is put in ``eval()`` mode for the measurement (dropout off, BatchNorm uses
and never updates its running statistics) and its flags are restored afterwards. Perturbed
weights are plugged in through ``functional_call``; the module's weights are never written.
Everything runs on the device and in the dtype of the model's parameters.

Shared keyword options (all measures; see :class:`Options`): ``kind``, ``n_iter``,
``n_restarts``, ``n_samples``, ``avg_scale``, ``antithetic``, ``seed``, ``progress``, ``grad_through_geodesic``,
``logit_normalization``, ``momentum``, ``step_mult``, ``solver``, ``ode_steps``, ``ode_tol``;
data parallelism: ``process_group``, ``distributed``, ``split`` (:mod:`quotientsharp.distributed`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import functional as F
from ..adapters.resolve import default_quotient
from ..distributed import KEYWORDS as DP_KEYWORDS
from ..distributed import DataParallel, data_parallel
from ..geodesic import geodesic_order
from ..quotient import Quotient
from ..validation import check_measure_call
from .average import average_increase
from .feasible import BALLS, relative_ball_quotient
from .objective import BatchObjective, LossFn
from .reference import maximize_reference
from .result import SharpnessResult
from .solver import AscentConfig, maximize

Model = nn.Module | Callable[[Mapping[str, torch.Tensor], object], torch.Tensor]


@dataclass
class Options:
    """Options shared by every measure.

    - kind: ``"worst"`` (spec §3) or ``"average"`` (§3.4).
    - n_iter, n_restarts: ascent iterations per run and extra random-init runs (worst case).
    - n_samples, avg_scale: draws per batch and ``"gaussian"`` or ``"sphere"`` (average case).
    - antithetic: average case, evaluate each draw at ``±xi`` (same expectation, the first-order
      term cancels; off by default as in the spec's §3.4 algorithm).
    - seed: the generator of batch i is seeded with ``(seed, i)`` (restarts, zero-gradient
      directions, average-case noise), so populations see identical whitened noise.
    - grad_through_geodesic: differentiate through ``xi -> gamma_xi(1)`` (False: ablation).
    - logit_normalization: centre and L2-normalise the logits before the loss (off by default).
    - momentum, step_mult: APGD momentum and ``eta_0 = 2 rho step_mult``.
    - solver: ``"riemannian"`` (§3.2, every measure) or ``"reference"`` (§3.3, adaptive and
      Euclidean only, the reference code's algorithm).
    - ode_steps, ode_tol: RK4 steps and step-doubling tolerance of ``"exact"`` geodesics without a
      closed form (part 1 §6.5; ``ode_tol=None`` runs ``ode_steps`` once).
    - ball: ``"metric"`` (``||xi||_{w0} <= rho``) or ``"relative"``: each mixed-metric block's norm
      divided by ``||G Hᵀ||²_F`` at w0 (``mix_rel``, spec part 2 §5.1;
      :class:`~quotientsharp.measures.feasible.RelativeBlockBall`).
    """

    kind: str = "worst"
    n_iter: int = 20
    n_restarts: int = 0
    n_samples: int = 20
    avg_scale: str = "gaussian"
    antithetic: bool = False
    seed: int = 0
    progress: bool = True
    grad_through_geodesic: bool = True
    logit_normalization: bool = False
    momentum: float = 0.75
    step_mult: float = 1.0
    solver: str = "riemannian"
    ode_steps: int = 64
    ode_tol: float | None = 1e-10
    ball: str = "metric"

    def __post_init__(self):
        if self.kind not in ("worst", "average"):
            raise ValueError(f"kind must be 'worst' or 'average', got {self.kind!r}")
        if self.solver not in ("riemannian", "reference"):
            raise ValueError(f"solver must be 'riemannian' or 'reference', got {self.solver!r}")
        if self.ball not in BALLS:
            raise ValueError(f"ball must be one of {BALLS}, got {self.ball!r}")


def _options(options: dict) -> tuple[Options, DataParallel]:
    """The :class:`Options` and the data-parallel plan (:mod:`quotientsharp.distributed`)."""
    plan = data_parallel(**{k: options.pop(k) for k in DP_KEYWORDS if k in options})
    return Options(**options), plan


def _base_point(model: Model, quotient: Quotient, params: Mapping | None) -> dict:
    if params is None:
        if not isinstance(model, nn.Module):
            raise ValueError("a plain callable model needs params= (the base point as a dict)")
        return F.named_params(model, quotient.names)
    missing = [n for n in quotient.names if n not in params]
    if missing:
        raise ValueError(f"params lacks {missing}")
    return {n: params[n].detach() for n in quotient.names}


def _names(model: Model, params: Mapping | None) -> list[str]:
    if params is not None:
        return list(params)
    if not isinstance(model, nn.Module):
        raise ValueError("a plain callable model needs params= (the base point as a dict)")
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _batch_seed(seed: int, i: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i)


def _metrics(quotient: Quotient) -> list[str]:
    return [g.metric or type(g).__name__ for g in quotient.groups]


def measure(name: str, model: Model, loader: Iterable, loss_fn: LossFn, rho: float, quotient: Quotient,
            order, rest_order, options: Options, params: Mapping | None = None,
            dp: DataParallel | None = None) -> SharpnessResult:
    """The shared driver of every measure: base point, checks, per-batch solve, aggregation
    (``dp``: this rank's batches, gathered after the solve)."""
    dp = dp or DataParallel()
    check_measure_call(f"{name}_sharpness", model, loader, loss_fn, options)
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive finite number, got {rho!r}")
    w0 = _base_point(model, quotient, params)
    ref = next(iter(w0.values()))
    index, batches, sizes = dp.shard(loader, ref.device)
    dp.check_same(w0, sizes)
    F.check_finite(w0)
    quotient.validate(w0)
    if options.ball == "relative":
        quotient = relative_ball_quotient(quotient, w0)
    if options.solver == "reference" and (quotient.groups or order != 1 or rest_order != 1):
        raise ValueError("solver='reference' reproduces the reference code's adaptive and Euclidean "
                         "sharpness only (no groups, first-order endpoint)")
    ode_kw = {"n_steps": options.ode_steps, "tol": options.ode_tol}
    cfg = AscentConfig(options.n_iter, options.n_restarts, options.momentum, options.step_mult,
                       options.grad_through_geodesic, order, rest_order, ode_kw)
    per_batch, base, errs, extras, traces, ses = [], [], [], [], [], []
    mode = F.eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with mode:
        for i, batch in zip(index, tqdm(batches, desc=f"{name} sharpness", disable=not options.progress,
                                        leave=False)):
            obj = dp.objective(BatchObjective(model, batch, loss_fn, options.logit_normalization), sizes[i],
                               F.batch_size(batch))
            gen = _batch_seed(options.seed, i)
            if options.kind == "average":
                r = average_increase(obj, quotient, w0, rho, options.n_samples, gen, order, rest_order,
                                     options.avg_scale, ode_kw, options.antithetic)
                ses.append(r.stderr)
                extras.append({"stderr": r.stderr, "error_increase": r.error_increase,
                               "max_relative_perturbation": r.max_relative_perturbation,
                               "samples": r.increases})
            else:
                solve = maximize_reference if options.solver == "reference" else maximize
                r = solve(obj, quotient, w0, rho, cfg, gen)
                extras.append({"error_increase": r.error_increase, "xi_norm": r.xi_norm,
                               "n_halvings": r.n_halvings, "n_nonfinite": r.n_nonfinite,
                               "best_loss": r.best_loss, "max_relative_perturbation": r.relative_perturbation})
                traces.append(r.trace)
            per_batch.append(r.increase)
            base.append(r.base_loss)
            errs.append(r.error_increase)
    per_batch, base, errs, extras, traces, ses = dp.gather(index, per_batch, base, errs, extras, traces, ses)
    B = len(per_batch)
    value = sum(per_batch) / B
    if options.kind == "average":
        stderr = math.sqrt(sum(s * s for s in ses)) / B
    else:
        stderr = (math.sqrt(sum((x - value) ** 2 for x in per_batch) / (B - 1) / B) if B > 1 else None)
    error_increase = None if any(e is None for e in errs) else sum(errs) / B
    opts = {k: v for k, v in asdict(options).items() if k != "progress"}
    masked = quotient.rest.masked_count(w0) if quotient.rest is not None else 0
    config = {"measure": name, "rho": float(rho), **opts, "quotient": repr(quotient),
              "metrics": _metrics(quotient), "rest": quotient.rest_kind if quotient.rest else None,
              "order": order, "rest_order": rest_order, "n_batches": B,
              "batch_sizes": sizes, "dtype": str(ref.dtype),
              "device": str(ref.device), "masked_entries": masked}
    return SharpnessResult(value, per_batch, stderr, base, error_increase, extras, traces, config)


def geodesic_sharpness(model: Model, loader: Iterable, loss_fn: LossFn, rho: float, metric: str | None = None,
                       quotient: Quotient | None = None, geodesic: str | int | None = None,
                       rest_geodesic: str | int | None = None, eps_rel: float = 0.0, eps: float = 0.0,
                       allow_euclidean_fallback: bool = False, params: Mapping | None = None,
                       **options) -> SharpnessResult:
    """Geodesic sharpness of the paper (Eq. 4): the ascent on the quotient's horizontal ball.

    Args:
        model: an ``nn.Module``, or a callable ``model(params, inputs) -> outputs`` with ``params=``.
        loader: batches ``(inputs, targets)`` or dicts with ``"labels"``; consumed once.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor`` (mean over the batch).
        rho: radius of the metric ball ``||xi||_{w0} <= rho``.
        metric: ``"mix"`` (default when the quotient is found) or ``"inv"``; with an explicit
            ``quotient``, None keeps its metrics and a value replaces them.
        quotient: the geometry; default ``default_quotient(model, metric, "adaptive", eps_rel, eps)``.
        geodesic: group endpoint order ``"second"``/2, ``"first"``/1, ``"exact"`` (closed form or
            RK4) or ``"ode"``; None: the quotient's ``order`` (2 for a found quotient).
        rest_geodesic: the same for the rest; None: the quotient's ``rest_order`` (1).
        eps_rel, eps: relative and absolute Gram relaxation of a found quotient (spec part 1
            §4.3); default 0, exactly invariant. A dead head then raises
            :class:`~quotientsharp.groups.gl_math.SingularHeadError` saying which ``eps`` helps.
        allow_euclidean_fallback: when no symmetry is found, measure with the rest metric alone
            (adaptive sharpness) and warn, instead of raising.
        params: the base point for a plain callable model.
        **options: see :class:`Options`.

    Returns:
        :class:`SharpnessResult`: ``value`` the mean over batches of
        ``max_{xi in H_w0, ||xi||_w0 <= rho} L_S(gamma_xi(1)) - L_S(w0)`` (worst case; with
        ``kind="average"`` the mean of ``L_S(gamma_xi(1)) - L_S(w0)`` over
        ``xi = rho Pi(whiten(zeta))``, ``zeta ~ N(0, I)``), ``per_batch`` one float per batch,
        ``stderr`` over batches, ``extras`` one dict per batch (``xi_norm``, ...), ``config``.

    Raises:
        TypeError: swapped or wrong-typed ``model``/``loader``/``loss_fn`` (the message says which).
        ValueError: ``rho`` not positive and finite, an unknown option value, a model with no
            symmetry (unless ``allow_euclidean_fallback``), a plain callable without
            ``quotient=``/``params=``, a loss that is not a 0-d tensor or not finite at ``w0``.
        quotientsharp.groups.SingularHeadError: a GL block with a singular Gram matrix (with ``eps = 0``).
    """
    opts, dp = _options(options)
    if quotient is None:
        if not isinstance(model, nn.Module):
            raise ValueError("a plain callable model needs an explicit quotient=")
        quotient = default_quotient(model, metric, "adaptive", eps_rel, eps, owner="geodesic_sharpness")
    elif metric is not None:
        quotient = quotient.with_metric(metric)
    if not quotient.groups:
        if not allow_euclidean_fallback:
            raise ValueError("no symmetry group found in the model, so geodesic sharpness is undefined; "
                             "pass quotient= explicitly, or allow_euclidean_fallback=True to measure "
                             "with the rest metric alone")
        warnings.warn("no symmetry group found: measuring with the rest metric alone", stacklevel=2)
    order = quotient.order if geodesic is None else geodesic_order(geodesic, "geodesic")
    rest_order = quotient.rest_order if rest_geodesic is None else geodesic_order(rest_geodesic, "rest_geodesic")
    return measure("geodesic", model, loader, loss_fn, rho, quotient, order, rest_order, opts, params, dp)


def adaptive_sharpness(model: Model, loader: Iterable, loss_fn: LossFn, rho: float,
                       params: Mapping | None = None, **options) -> SharpnessResult:
    """Adaptive sharpness (Kwon et al. 2021, ``c = |w|``): ``||xi / |w0| ||_2 <= rho``,
    ``endpoint = w0 + xi``. Arguments as :func:`geodesic_sharpness`.

    ``value`` is the mean over batches of ``max_{||xi/|w0| ||_2 <= rho} L_S(w0 + xi) - L_S(w0)``
    (entries with ``w0 = 0`` are held at 0, their number in ``config["masked_entries"]``); returns a
    :class:`SharpnessResult` and raises as :func:`geodesic_sharpness` does (``TypeError`` for
    swapped arguments, ``ValueError`` for a bad ``rho``, option or loss)."""
    q = Quotient([], _names(model, params), rest="adaptive", order=1, rest_order=1)
    opts, dp = _options(options)
    return measure("adaptive", model, loader, loss_fn, rho, q, 1, 1, opts, params, dp)


def euclidean_sharpness(model: Model, loader: Iterable, loss_fn: LossFn, rho: float,
                        params: Mapping | None = None, **options) -> SharpnessResult:
    """Euclidean (Keskar) sharpness: ``||xi||_2 <= rho``, ``endpoint = w0 + xi``. Arguments as
    :func:`geodesic_sharpness`.

    ``value`` is the mean over batches of ``max_{||xi||_2 <= rho} L_S(w0 + xi) - L_S(w0)``; returns
    a :class:`SharpnessResult` and raises as :func:`geodesic_sharpness` does."""
    q = Quotient([], _names(model, params), rest="euclidean", order=1, rest_order=1)
    opts, dp = _options(options)
    return measure("euclidean", model, loader, loss_fn, rho, q, 1, 1, opts, params, dp)

"""The public sharpness entry points against closed forms (issue 18, mutation testing of
``measures/sharpness.py``): argument checks, batching, per-batch aggregation, stderr, error
increase, extras, traces and the recorded config.

Ground truths used here:

- a loss linear in the weights, ``L_S(W) = <G_S, W>``: the worst case over the Euclidean ball is
  ``rho ||G_S||_F`` at ``delta = rho G_S / ||G_S||_F``, over the adaptive ball ``||delta / W|| <= rho``
  it is ``rho ||G_S * W||_F`` at ``delta = rho W * (G_S * W) / ||G_S * W||_F`` (Cauchy-Schwarz); the
  solver reaches both after its first step, so the error increase at the maximiser is computable;
- the mean and standard errors of per-batch values and of the average-case samples, computed here;
- ``(L(w + rho u) + L(w - rho u)) / 2 - L(w) = c rho^2 / 2`` for ``L = c/2 ||w||^2 + <b, w>``, ``||u|| = 1``;
- the exact adaptive geodesic ``w e^{xi / w}`` of a linear loss, whose first feasible ascent point
  ``u = rho c / ||c||`` (``c = G * W``) gives ``sum c (e^u - 1) > rho ||c||``;
- the reference solver's first iterate (spec part 2 §3.3), with the Euclidean projection onto the
  ellipsoid solved here by bisection on its secular equation.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from test_sharpness_common import TinyAttentionClassifier, attention_quotient, attention_setup, one_thread  # noqa: F401
from torch import nn

from quotientsharp import Piece, Quotient
from quotientsharp.groups import HeadScaling, ScaleBlock
from quotientsharp.measures import adaptive_sharpness, euclidean_sharpness, geodesic_sharpness
from quotientsharp.measures.average import average_increase
from quotientsharp.measures.objective import BatchObjective

pytestmark = pytest.mark.usefixtures("one_thread")
D, C = 4, 3


class LinearScores(nn.Module):
    """``(n, D) -> (n, C)`` logits ``x W`` (no bias unless asked)."""

    def __init__(self, W: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.W = nn.Parameter(W.clone())
        self.b = None if bias is None else nn.Parameter(bias.clone())

    def forward(self, x):
        out = x @ self.W
        return out if self.b is None else out + self.b


def margin_loss(out, y):
    """``mean_i out[i, y_i + 1 mod C] - out[i, y_i]``: linear in the logits, so in ``W``."""
    n = torch.arange(out.shape[0])
    return (out[n, (y + 1) % out.shape[1]] - out[n, y]).mean()


def loss_gradient(x, y):
    """``G = dL/dW`` of :func:`margin_loss` for logits ``x W``: ``(1/n) sum_i x_i (e_{y_i+1} - e_{y_i})^T``."""
    E = F.one_hot((y + 1) % C, C).double() - F.one_hot(y, C).double()
    return x.T @ E / x.shape[0]


def error(W, x, y):
    return float(((x @ W).argmax(dim=1) != y).double().mean())


def weights(zeros: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    W = torch.randn(D, C, generator=g, dtype=torch.float64)
    W.view(-1)[:zeros] = 0.0
    return W


def batches(sizes=(8, 5, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g))
            for n in sizes]


def closed_form(measure: str, W, data, rho):
    """Per batch: worst-case increase, base loss, error increase at the maximiser."""
    out = []
    for x, y in data:
        G = loss_gradient(x, y)
        if measure == "euclidean":
            value, delta = rho * float(G.norm()), rho * G / G.norm()
        else:
            c = G * W
            value, delta = rho * float(c.norm()), rho * W * c / c.norm()
        base = float(margin_loss(x @ W, y))
        out.append((value, base, error(W + delta, x, y) - error(W, x, y)))
    return out


MEASURES = {"euclidean": euclidean_sharpness, "adaptive": adaptive_sharpness}


# ------------------------------------------------------------------ worst case: aggregation and fields
@pytest.mark.parametrize("measure", ["euclidean", "adaptive"])
@pytest.mark.parametrize("n_batches", [1, 2, 3])
def test_worst_case_linear_loss_closed_form_and_aggregates(measure, n_batches):
    rho = 2.0
    W = weights(zeros=2)
    data = batches()[:n_batches]
    r = MEASURES[measure](LinearScores(W), data, margin_loss, rho, progress=False)
    exact = closed_form(measure, W, data, rho)
    values = [v for v, _, _ in exact]
    assert r.per_batch == pytest.approx(values, rel=1e-10)
    assert r.value == pytest.approx(sum(values) / n_batches, rel=1e-10)
    assert r.base_loss == pytest.approx([b for _, b, _ in exact], abs=1e-14)
    if n_batches == 1:
        assert r.stderr is None
    else:
        assert r.stderr == pytest.approx(float(np.std(values, ddof=1)) / math.sqrt(n_batches), rel=1e-8)
    errs = [e for _, _, e in exact]
    assert r.error_increase == pytest.approx(sum(errs) / n_batches, abs=1e-14)
    for e, (v, b, de), t in zip(r.extras, exact, r.traces):
        assert e["error_increase"] == pytest.approx(de, abs=1e-14)
        assert e["xi_norm"] == pytest.approx(rho, rel=1e-9)
        assert e["best_loss"] == pytest.approx(b + v, rel=1e-10)
        assert e["n_nonfinite"] == 0 and e["max_relative_perturbation"] is None  # finite loss, no GL block
        # iteration 0 evaluates xi = 0, iteration 1 the maximiser; the first step is 2 rho
        assert t["loss_increase"][0][0] == 0.0 and t["loss_increase"][0][1] == pytest.approx(v, rel=1e-10)
        assert t["step"][0][0] == pytest.approx(2 * rho, rel=1e-15)
    cfg = r.config
    assert cfg["measure"] == measure and cfg["rho"] == rho and cfg["n_batches"] == n_batches
    assert cfg["batch_sizes"] == [8, 5, 7][:n_batches]
    assert cfg["dtype"] == "torch.float64" and cfg["device"] == "cpu"
    assert cfg["rest"] == measure and cfg["metrics"] == [] and cfg["kind"] == "worst"
    assert cfg["order"] == 1 and cfg["rest_order"] == 1 and cfg["n_iter"] == 20 and cfg["solver"] == "riemannian"
    # the recorded quotient agrees with the recorded endpoint orders
    assert cfg["quotient"].endswith(f"order={cfg['order']!r}, rest_order={cfg['rest_order']!r})")
    # the adaptive metric holds the 2 zero weights at 0; the Euclidean one masks nothing
    assert cfg["masked_entries"] == (2 if measure == "adaptive" else 0)


def test_error_increase_is_none_for_regression_and_nonzero_cases_exist():
    """A loss with real-valued targets has no error rate: ``error_increase`` is None (not 0); and the
    classification case above does move the error (else its checks would be vacuous)."""
    W = weights()
    data = [(x, y.double()) for x, y in batches()[:2]]
    loss = lambda out, y: (out.sum(dim=1) * y).mean()  # noqa: E731
    r = euclidean_sharpness(LinearScores(W), data, loss, 0.5, n_iter=2, progress=False)
    assert r.error_increase is None and all(e["error_increase"] is None for e in r.extras)
    for measure in MEASURES:
        errs = [e for _, _, e in closed_form(measure, weights(zeros=2), batches(), 2.0)]
        assert errs[0] != 0 and len(set(errs)) == 3


def test_module_params_subset_and_plain_callable_model():
    """``params=`` chooses the perturbed tensors (the rest keep the module's values); a plain callable
    ``model(params, x)`` needs it."""
    rho, W = 0.3, weights()
    bias = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    data = batches()[:2]
    exact = [v for v, _, _ in closed_form("adaptive", W, data, rho)]
    model = LinearScores(W, bias)  # the bias shifts every logit: the gradient in W is unchanged
    sub = adaptive_sharpness(model, data, margin_loss, rho, params={"W": W}, progress=False)
    assert sub.per_batch == pytest.approx(exact, rel=1e-10)
    full = adaptive_sharpness(model, data, margin_loss, rho, progress=False)
    assert full.value > sub.value * (1 + 1e-6)  # the bias is perturbed too (it enters the margin)

    def fn(p, x):
        return x @ p["W"]

    for measure in ("adaptive", "euclidean"):
        r = MEASURES[measure](fn, data, margin_loss, rho, params={"W": W}, progress=False)
        assert r.per_batch == pytest.approx([v for v, _, _ in closed_form(measure, W, data, rho)], rel=1e-10)
        with pytest.raises(ValueError, match="params"):
            MEASURES[measure](fn, data, margin_loss, rho, progress=False)
    with pytest.raises(ValueError, match="quotient"):
        geodesic_sharpness(fn, data, margin_loss, rho, params={"W": W}, progress=False)
    q = Quotient([], ["W", "V"], rest="adaptive", order=1, rest_order=1)
    with pytest.warns(UserWarning, match="no symmetry"), pytest.raises(ValueError, match="params lacks"):
        geodesic_sharpness(fn, data, margin_loss, rho, quotient=q, params={"W": W}, allow_euclidean_fallback=True,
                           progress=False)


def test_train_mode_module_is_measured_in_eval_mode():
    torch.manual_seed(0)
    W = weights()
    model = nn.Sequential(LinearScores(W), nn.Dropout(0.9))
    model.train()
    data = batches()[:2]
    r = euclidean_sharpness(model, data, margin_loss, 0.7, n_iter=2, progress=False)
    assert r.per_batch == pytest.approx([v for v, _, _ in closed_form("euclidean", W, data, 0.7)], rel=1e-10)
    assert model.training


def test_data_parallel_keywords_in_one_process_change_nothing():
    W, data = weights(), batches()
    plain = adaptive_sharpness(LinearScores(W), data, margin_loss, 0.2, n_iter=2, progress=False)
    for kw in (dict(distributed=False), dict(split="batches"), dict(split="examples", process_group=None)):
        r = adaptive_sharpness(LinearScores(W), data, margin_loss, 0.2, n_iter=2, progress=False, **kw)
        assert r.per_batch == plain.per_batch


# ------------------------------------------------------------------ reference solver
def ellipsoid_projection(y: torch.Tensor, w: torch.Tensor, rho: float) -> torch.Tensor:
    """Euclidean projection of ``y`` onto ``{d: ||d / w|| <= rho}``: ``d = y / (1 + 2 lam / w^2)``
    with ``||d / w|| = rho`` (KKT), ``lam`` by bisection in float64."""
    if float((y / w).norm()) <= rho:
        return y
    lo, hi = 0.0, 1.0
    while float((y / (1 + 2 * hi / w**2) / w).norm()) > rho:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((y / (1 + 2 * mid / w**2) / w).norm()) > rho:
            lo = mid
        else:
            hi = mid
    return y / (1 + 2 * hi / w**2)


@pytest.mark.parametrize("momentum", [0.75, 1.0])
def test_reference_solver_first_iterate(momentum):
    """Spec §3.3 with N = 1: ``z = P(2 rho G |W| / ||G||)``, ``delta = a z`` (momentum after the
    projection, ``delta_{-1} = 0``), loss evaluated there; the Riemannian solver reaches the exact
    maximum ``rho ||G W||`` in the same single iteration."""
    rho, W, data = 0.4, weights(), batches()[:2]
    kw = dict(n_iter=1, momentum=momentum, progress=False)
    ref = adaptive_sharpness(LinearScores(W), data, margin_loss, rho, solver="reference", **kw)
    riem = adaptive_sharpness(LinearScores(W), data, margin_loss, rho, **kw)
    for (x, y), v_ref, v_riem in zip(data, ref.per_batch, riem.per_batch):
        G = loss_gradient(x, y)
        z = ellipsoid_projection(2 * rho * G * W.abs() / G.norm(), W, rho)
        assert v_ref == pytest.approx(momentum * float((G * z).sum()), rel=1e-4)
        assert v_riem == pytest.approx(rho * float((G * W).norm()), rel=1e-10)
        assert v_ref < v_riem * (1 - 1e-3)
    assert ref.config["solver"] == "reference" and ref.config["order"] == 1


def test_reference_solver_refuses_groups_and_higher_orders():
    model, data = attention_setup(n_batches=1)
    for kw in (dict(), dict(geodesic="first")):
        with pytest.raises(ValueError, match="reference"):
            geodesic_sharpness(model, data, F.cross_entropy, 0.1, solver="reference", progress=False, **kw)
    for kw in (dict(geodesic="second"), dict(rest_geodesic="second")):
        with pytest.warns(UserWarning, match="no symmetry"), pytest.raises(ValueError, match="reference"):
            geodesic_sharpness(LinearScores(weights()), batches(), margin_loss, 0.1, allow_euclidean_fallback=True,
                               solver="reference", progress=False, **kw)


# ------------------------------------------------------------------ average case
class Direct(nn.Module):
    """The model output is its parameter ``theta`` (inputs ignored)."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta


def test_average_case_mean_and_standard_errors_from_the_samples():
    W, data = weights(), batches()[:2]
    r = euclidean_sharpness(LinearScores(W), data, margin_loss, 0.3, kind="average", n_samples=6, progress=False)
    ses = []
    for v, e in zip(r.per_batch, r.extras):
        s = np.array(e["samples"])
        assert len(s) == 6 and v == pytest.approx(s.mean(), rel=1e-12)
        assert e["stderr"] == pytest.approx(s.std(ddof=1) / math.sqrt(6), rel=1e-10)
        ses.append(e["stderr"])
        assert e["max_relative_perturbation"] is None
    assert r.value == pytest.approx(sum(r.per_batch) / 2, rel=1e-12)
    assert r.stderr == pytest.approx(math.sqrt(sum(s * s for s in ses)) / 2, rel=1e-10)
    # the spread over batches is not what the average case reports
    assert r.stderr != pytest.approx(float(np.std(r.per_batch, ddof=1)) / math.sqrt(2), rel=1e-3)
    assert r.traces == [] and r.config["kind"] == "average" and r.config["n_samples"] == 6


def test_average_case_error_increase_without_flips_is_zero_not_none():
    W, data = weights(), batches()[:2]
    r = adaptive_sharpness(LinearScores(W), data, margin_loss, 1e-9, kind="average", n_samples=3, progress=False)
    assert r.error_increase == pytest.approx(0.0, abs=1e-15)
    assert [e["error_increase"] for e in r.extras] == pytest.approx([0.0, 0.0], abs=1e-15)


def test_antithetic_sphere_samples_are_the_exact_curvature_term():
    """``L = c/2 ||theta||^2 + <b, theta>``, draws on the Euclidean sphere: each antithetic sample is
    ``c rho^2 / 2`` exactly; the plain draws keep ``rho <grad, u>`` and vary."""
    c, rho = 3.0, 0.2
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    loss = lambda out, y: 0.5 * c * (out**2).sum() + (y * out).sum()  # noqa: E731
    data = [(torch.zeros(5, dtype=torch.float64), b), (torch.zeros(5, dtype=torch.float64), -b)]
    kw = dict(kind="average", avg_scale="sphere", n_samples=4, progress=False)
    anti = euclidean_sharpness(Direct(theta), data, loss, rho, antithetic=True, **kw)
    for e in anti.extras:
        assert e["samples"] == pytest.approx([c * rho**2 / 2] * 4, rel=1e-10)
    plain = euclidean_sharpness(Direct(theta), data, loss, rho, **kw)
    assert max(abs(s - c * rho**2 / 2) for s in plain.extras[0]["samples"]) > 1e-3
    # the worst case of the same quadratic: rho ||c theta + b|| + c rho^2 / 2 (aligned trust region)
    worst = euclidean_sharpness(Direct(theta), data, loss, rho, progress=False)
    assert worst.per_batch == pytest.approx([rho * float((c * theta + s * b).norm()) + c * rho**2 / 2
                                             for s in (1, -1)], rel=1e-8)


def test_average_case_noise_is_seeded_per_batch_index():
    """The draws of batch ``i`` come from a generator seeded with ``seed * 1_000_003 + i``. The pin is
    deliberate: it keeps committed average-case numbers reproducible (the spec asks populations to
    be compared on identical noise); the draws are those of :func:`average_increase` with that
    generator."""
    W, data = weights(), batches()[:2]
    q = Quotient([], ["W"], rest="euclidean", order=1, rest_order=1)
    model = LinearScores(W)
    kw = dict(kind="average", n_samples=3, progress=False)
    r = euclidean_sharpness(model, data, margin_loss, 0.3, seed=7, **kw)
    for i, batch in enumerate(data):
        gen = torch.Generator().manual_seed(7 * 1_000_003 + i)
        expected = average_increase(BatchObjective(model, batch, margin_loss), q, {"W": W}, 0.3, 3, gen, 1, 1)
        assert r.extras[i]["samples"] == pytest.approx(expected.increases, rel=1e-12)
    other = euclidean_sharpness(model, data, margin_loss, 0.3, seed=8, **kw)
    assert other.extras[0]["samples"] != r.extras[0]["samples"]
    same = euclidean_sharpness(model, [data[0], data[0]], margin_loss, 0.3, seed=7, **kw)
    assert same.extras[0]["samples"] != same.extras[1]["samples"]  # same batch, another index


# ------------------------------------------------------------------ options reaching the computation
def test_logit_normalization_is_applied_to_the_loss():
    W, data = weights(), batches()[:2]
    r = adaptive_sharpness(LinearScores(W), data, F.cross_entropy, 0.1, n_iter=2, logit_normalization=True,
                           progress=False)
    for (x, y), base in zip(data, r.base_loss):
        z = x @ W
        z = z - z.mean(dim=1, keepdim=True)
        assert base == pytest.approx(float(F.cross_entropy(z / z.norm(dim=1, keepdim=True), y)), rel=1e-12)
    assert r.config["logit_normalization"] is True


def exact_adaptive_max(c: np.ndarray, rho: float) -> float:
    """``max_{||u|| <= rho} sum c (e^u - 1)`` (SLSQP from the first-order maximiser and its negation)."""
    best = -math.inf
    for start in (rho * c / np.linalg.norm(c), -rho * c / np.linalg.norm(c)):
        res = minimize(lambda u: -np.sum(c * np.expm1(u)), start, jac=lambda u: -c * np.exp(u), method="SLSQP",
                       constraints=[{"type": "ineq", "fun": lambda u: rho**2 - u @ u, "jac": lambda u: -2 * u}],
                       options={"ftol": 1e-15, "maxiter": 500})
        best = max(best, -res.fun)
    return best


def test_exact_and_ode_rest_geodesics():
    """Adaptive rest, linear loss ``<G, W>``: along the exact geodesic ``W e^{xi/W}`` the increase is
    ``sum c (e^u - 1)`` (``c = G W``, ``u = xi / W``, ``||u|| <= rho``), maximised here by SLSQP; RK4 with
    the default tolerance reproduces the exact geodesic, a single RK4 step does not."""
    rho, W, data = 0.5, weights(), batches()[:1]
    x, y = data[0]
    c = (loss_gradient(x, y) * W).numpy().ravel()
    target = exact_adaptive_max(c, rho)
    assert abs(target - rho * np.linalg.norm(c)) > 1e-2 * target  # far from the first-order value
    kw = dict(allow_euclidean_fallback=True, n_iter=20, progress=False)
    with pytest.warns(UserWarning, match="no symmetry"):
        first = geodesic_sharpness(LinearScores(W), data, margin_loss, rho, **kw)
        exact = geodesic_sharpness(LinearScores(W), data, margin_loss, rho, rest_geodesic="exact", **kw)
        ode = geodesic_sharpness(LinearScores(W), data, margin_loss, rho, rest_geodesic="ode", **kw)
        rough = geodesic_sharpness(LinearScores(W), data, margin_loss, rho, rest_geodesic="ode", ode_steps=1,
                                   ode_tol=None, **kw)
        avg = [geodesic_sharpness(LinearScores(W), data, margin_loss, rho, kind="average", n_samples=2, **kw, **o)
               for o in (dict(rest_geodesic="exact"), dict(rest_geodesic="ode", ode_steps=1, ode_tol=None))]
    assert first.value == pytest.approx(rho * np.linalg.norm(c), rel=1e-10) and first.config["rest_order"] == 1
    assert exact.value == pytest.approx(target, rel=1e-5) and exact.config["rest_order"] == "exact"
    assert ode.value == pytest.approx(exact.value, rel=1e-8) and ode.config["rest_order"] == "ode"
    assert abs(rough.value - exact.value) > 1e-7 * exact.value
    assert abs(avg[1].extras[0]["samples"][0] - avg[0].extras[0]["samples"][0]) > 1e-9


def test_grad_through_geodesic_matters_only_beyond_first_order():
    model, data = attention_setup(n_batches=1)
    q = attention_quotient(model, "mix")
    kw = dict(quotient=q, n_iter=4, progress=False)
    default = geodesic_sharpness(model, data, F.cross_entropy, 0.1, **kw)
    through = geodesic_sharpness(model, data, F.cross_entropy, 0.1, grad_through_geodesic=True, **kw)
    ablation = geodesic_sharpness(model, data, F.cross_entropy, 0.1, grad_through_geodesic=False, **kw)
    assert default.per_batch == through.per_batch
    assert abs(ablation.value - default.value) > 1e-9 and ablation.config["grad_through_geodesic"] is False
    W = weights()
    a = adaptive_sharpness(LinearScores(W), batches(), margin_loss, 0.3, n_iter=3, progress=False)
    b = adaptive_sharpness(LinearScores(W), batches(), margin_loss, 0.3, n_iter=3, grad_through_geodesic=False,
                           progress=False)
    assert a.per_batch == b.per_batch  # first-order endpoint: the Jacobian is the identity


# ------------------------------------------------------------------ geodesic_sharpness resolution
def test_geodesic_defaults_metric_and_orders():
    model, data = attention_setup(n_batches=1)
    kw = dict(n_iter=3, progress=False)
    found = geodesic_sharpness(model, data, F.cross_entropy, 0.1, **kw)  # default: mix, eps 0, 2nd order
    hand = geodesic_sharpness(model, data, F.cross_entropy, 0.1, quotient=attention_quotient(model, "mix"), **kw)
    assert found.per_batch == hand.per_batch
    assert found.config["metrics"] == ["mix"] and found.config["measure"] == "geodesic"
    assert found.config["order"] == 2 and found.config["rest_order"] == 1 and found.config["rest"] == "adaptive"
    inv_hand = geodesic_sharpness(model, data, F.cross_entropy, 0.1, quotient=attention_quotient(model, "inv"), **kw)
    inv_found = geodesic_sharpness(model, data, F.cross_entropy, 0.1, metric="inv", **kw)
    inv_swapped = geodesic_sharpness(model, data, F.cross_entropy, 0.1, metric="inv",
                                     quotient=attention_quotient(model, "mix"), **kw)
    assert inv_found.per_batch == inv_hand.per_batch == inv_swapped.per_batch != hand.per_batch
    assert inv_swapped.config["metrics"] == ["inv"]
    first = geodesic_sharpness(model, data, F.cross_entropy, 0.1, geodesic="first", rest_geodesic=1, **kw)
    assert first.config["order"] == 1 and first.config["rest_order"] == 1 and first.per_batch != found.per_batch
    q = attention_quotient(model, "mix")
    assert hand.config["quotient"] == repr(q)
    # an explicit order is the same as a quotient whose default is that order (worst and average case)
    avg = dict(kind="average", n_samples=2, progress=False)
    avg_first = geodesic_sharpness(model, data, F.cross_entropy, 0.01, quotient=q, geodesic="first", **avg)
    avg_q1 = geodesic_sharpness(model, data, F.cross_entropy, 0.01, quotient=q.replace(order=1), **avg)
    avg_q2 = geodesic_sharpness(model, data, F.cross_entropy, 0.01, quotient=q, **avg)
    assert avg_first.per_batch == avg_q1.per_batch != avg_q2.per_batch
    assert first.per_batch == geodesic_sharpness(model, data, F.cross_entropy, 0.1, quotient=q.replace(order=1),
                                                 **kw).per_batch


def test_geodesic_argument_errors_name_the_argument():
    model, data = attention_setup(n_batches=1)
    with pytest.raises(ValueError, match=r"^geodesic must be one of"):
        geodesic_sharpness(model, data, F.cross_entropy, 0.1, geodesic="third", progress=False)
    with pytest.raises(ValueError, match=r"^rest_geodesic must be one of"):
        geodesic_sharpness(model, data, F.cross_entropy, 0.1, rest_geodesic="third", progress=False)
    with pytest.raises(ValueError, match=r"^geodesic_sharpness: metric must be one of"):
        geodesic_sharpness(model, data, F.cross_entropy, 0.1, metric="bogus", progress=False)
    with pytest.raises(ValueError, match="eps_rel"):
        geodesic_sharpness(model, data, F.cross_entropy, 0.1, eps_rel=-1.0, progress=False)
    with pytest.raises(ValueError, match="eps"):
        geodesic_sharpness(model, data, F.cross_entropy, 0.1, eps=-1.0, progress=False)
    narrow = TinyAttentionClassifier(d=4).double()  # same parameter names, other shapes
    with pytest.raises(ValueError, match="'layers.0.q.weight' is only partly covered"):
        geodesic_sharpness(model, data, F.cross_entropy, 0.1, quotient=attention_quotient(narrow), progress=False)


def test_no_symmetry_raises_unless_fallback_then_adaptive():
    W, data = weights(), batches()
    with pytest.raises(ValueError, match="no symmetry"):
        geodesic_sharpness(LinearScores(W), data, margin_loss, 0.4, progress=False)
    with pytest.warns(UserWarning, match="no symmetry"):
        r = geodesic_sharpness(LinearScores(W), data, margin_loss, 0.4, allow_euclidean_fallback=True,
                               progress=False)
    assert r.per_batch == pytest.approx([v for v, _, _ in closed_form("adaptive", W, data, 0.4)], rel=1e-10)


class RowScores(LinearScores):
    """Logits ``x W^T`` with ``W`` of shape ``(C, D)`` (one row per class)."""

    def forward(self, x):
        return x @ self.W.T


def test_group_without_metric_is_recorded_by_its_type_and_no_rest():
    """A quotient whose single group (per-row scaling, no inv/mix metric) covers every parameter:
    ``metrics`` names the group type, there is no rest and nothing is masked."""
    model = RowScores(weights().T)
    q = Quotient.from_model(model, [HeadScaling([ScaleBlock((Piece("W", "rows"),), C, 1)])])
    r = geodesic_sharpness(model, batches()[:1], margin_loss, 0.1, quotient=q, n_iter=2, progress=False)
    assert r.config["metrics"] == ["HeadScaling"] and r.config["rest"] is None
    assert r.config["masked_entries"] == 0 and r.value > 0


# ------------------------------------------------------------------ input errors
@pytest.mark.parametrize("name", ["euclidean", "adaptive"])
def test_bad_inputs_raise_with_the_documented_phrase(name):
    fn, W, data = MEASURES[name], weights(), batches()[:1]
    model = LinearScores(W)
    for rho in (0, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rho must be a positive finite number"):
            fn(model, data, margin_loss, rho, progress=False)
    assert fn(model, data, margin_loss, 2.5, n_iter=1, progress=False).value > 0  # rho > 1 is fine
    with pytest.raises(ValueError, match="empty"):
        fn(model, [], margin_loss, 0.1, progress=False)
    with pytest.raises(TypeError, match=rf"^{name}_sharpness\(model, loader, loss_fn, \.\.\.\): loader and loss_fn"):
        fn(model, margin_loss, data, 0.1, progress=False)
    for option, value in (("n_iter", 0), ("n_samples", 0), ("ode_steps", 0), ("n_restarts", -1),
                          ("momentum", 1.5), ("step_mult", 0.0), ("ode_tol", 0.0)):
        with pytest.raises(ValueError, match=rf"^{name}_sharpness: {option} must be"):
            fn(model, data, margin_loss, 0.1, progress=False, **{option: value})
    for option, value in (("kind", "best"), ("solver", "fast"), ("ball", "cube")):
        with pytest.raises(ValueError, match=rf"^{option} must be"):
            fn(model, data, margin_loss, 0.1, progress=False, **{option: value})
    with pytest.raises(ValueError, match="relative"):  # no group to make relative
        fn(model, data, margin_loss, 0.1, ball="relative", progress=False)
    bad = LinearScores(W)
    with torch.no_grad():
        bad.W[1, 2] = math.nan
    with pytest.raises(ValueError, match="non-finite weights in parameter 'W'"):
        fn(bad, data, margin_loss, 0.1, progress=False)


# ------------------------------------------------------------------ progress bar and config
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_names_the_measure_and_is_silent_when_off(monkeypatch):
    W, data = weights(), batches()
    kw = dict(n_iter=1)
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    off = euclidean_sharpness(LinearScores(W), data, margin_loss, 0.1, progress=False, **kw)
    assert term.getvalue() == ""  # silent even on a terminal
    on = euclidean_sharpness(LinearScores(W), data, margin_loss, 0.1, progress=True, **kw)
    shown = term.getvalue()
    assert "euclidean sharpness" in shown and "0/3" in shown
    assert not shown.endswith("\n")  # the bar is removed when done (leave=False)
    assert on.config == off.config  # the record does not depend on the display


class TwoHeads(LinearScores):
    """Logits ``x W``; a second head ``unused`` that the forward pass never reads."""

    def __init__(self, W, unused):
        super().__init__(W)
        self.unused = nn.Parameter(unused.clone())


def test_parameters_outside_the_quotient_are_not_part_of_the_measurement():
    """Measuring one head of a two-head model: the other head is neither perturbed nor checked (a
    diverged, unused head with inf entries does not stop the measurement)."""
    W, data = weights(), batches()[:2]
    model = TwoHeads(W, torch.full((D, C), math.inf, dtype=torch.float64))
    q = Quotient([], ["W"], rest="euclidean", order=1, rest_order=1)
    with pytest.warns(UserWarning, match="no symmetry"):
        r = geodesic_sharpness(model, data, margin_loss, 0.5, quotient=q, allow_euclidean_fallback=True, n_iter=2,
                               progress=False)
    assert r.per_batch == pytest.approx([v for v, _, _ in closed_form("euclidean", W, data, 0.5)], rel=1e-10)


def test_relative_ball_first_step_lands_on_its_sphere():
    """``ball="relative"`` on the mixed metric: with N = 1 the only point evaluated besides ``xi = 0``
    is the projected first step, of relative norm exactly rho, and at small rho it raises the loss
    (first-order ascent), so it is the reported maximiser."""
    model, data = attention_setup(n_batches=1)
    r = geodesic_sharpness(model, data, F.cross_entropy, 0.01, ball="relative", n_iter=1, progress=False)
    assert r.value > 0 and r.extras[0]["xi_norm"] == pytest.approx(0.01, rel=1e-9)
    assert r.config["ball"] == "relative"

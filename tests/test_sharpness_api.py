"""Public API: state hygiene, determinism, dtypes, results, average case and every input error."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_sharpness_common import attention_quotient, attention_setup, one_thread, snapshot  # noqa: F401
from torch import nn

from quotientsharp.measures import SharpnessResult, adaptive_sharpness, euclidean_sharpness, geodesic_sharpness
from quotientsharp.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")
MEASURES = [geodesic_sharpness, adaptive_sharpness, euclidean_sharpness]


@pytest.mark.parametrize("kind", ["worst", "average"])
def test_weights_untouched_and_mode_restored(kind):
    model, batches = attention_setup(n_batches=2)
    model.train()
    model.head.eval()  # a mixed state must come back as it was
    before = snapshot(model)
    for fn in MEASURES:
        fn(model, batches, F.cross_entropy, 0.1, kind=kind, n_samples=3, n_restarts=1, progress=False)
        after = snapshot(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert model.training and not model.head.training and model.layers[0].training


def test_matches_automatically_found_quotient_and_is_deterministic():
    model, batches = attention_setup(n_batches=2)
    kw = dict(rho=0.1, n_iter=10, n_restarts=1, progress=False)
    found = geodesic_sharpness(model, batches, F.cross_entropy, metric="mix", eps_rel=0.0, **kw)
    hand = geodesic_sharpness(model, batches, F.cross_entropy, quotient=attention_quotient(model, "mix"), **kw)
    assert found.per_batch == hand.per_batch
    again = geodesic_sharpness(model, batches, F.cross_entropy, metric="mix", eps_rel=0.0, **kw)
    assert again.to_dict() == found.to_dict()
    other = geodesic_sharpness(model, batches, F.cross_entropy, metric="mix", eps_rel=0.0, seed=1, **kw)
    assert other.config["seed"] == 1


def test_result_fields_and_json():
    model, batches = attention_setup(n_batches=3)
    r = geodesic_sharpness(model, batches, F.cross_entropy, 0.1, metric="inv", progress=False)
    assert isinstance(r, SharpnessResult)
    assert r.value == pytest.approx(sum(r.per_batch) / 3, rel=1e-14)
    assert r.stderr == pytest.approx(float(np.std(r.per_batch, ddof=1)) / math.sqrt(3), rel=1e-12)
    assert r.error_increase == pytest.approx(sum(e["error_increase"] for e in r.extras) / 3, abs=1e-15)
    for v, b, e, t in zip(r.per_batch, r.base_loss, r.extras, r.traces):
        assert len(t["loss_increase"][0]) == 20 and t["step"][0][0] == pytest.approx(0.2)
        # the value is the best loss seen: at least every traced iterate, and reached at one of them
        # or at the final extra forward; the base loss is recorded as such
        assert v == pytest.approx(e["best_loss"] - b, abs=1e-14) and v >= max(t["loss_increase"][0]) > 0
        assert e["xi_norm"] <= 0.1 * (1 + 1e-9)
        # error rates on 6 examples: increases are multiples of 1/6
        assert abs(6 * e["error_increase"] - round(6 * e["error_increase"])) < 1e-12
        # every halving but one at the last iteration shows as a halved step in the trace
        steps = t["step"][0]
        seen = sum(round(math.log2(a / b)) for a, b in zip(steps, steps[1:]))
        assert all(a == b or a == 2 * b for a, b in zip(steps, steps[1:]))
        assert seen <= e["n_halvings"] <= seen + 1
    d = json.loads(json.dumps(r.to_dict()))
    assert d["config"]["measure"] == "geodesic" and d["config"]["metrics"] == ["inv"]
    assert d["config"]["order"] == 2 and d["config"]["rest_order"] == 1
    assert d["config"]["batch_sizes"] == [6, 6, 6]


def test_float32_model():
    model, batches = attention_setup(dtype=torch.float32)
    r64 = geodesic_sharpness(attention_setup()[0], attention_setup()[1], F.cross_entropy, 0.05, metric="mix",
                             progress=False)
    r32 = geodesic_sharpness(model, batches, F.cross_entropy, 0.05, metric="mix", progress=False)
    assert r32.config["dtype"] == "torch.float32"
    assert r32.base_loss == pytest.approx(r64.base_loss, rel=1e-5)
    assert r32.value == pytest.approx(r64.value, rel=5e-2)  # the float32 ascent path may branch differently


def test_dropout_and_batchnorm_use_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    model.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        model(torch.randn(32, 4, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))]
    before = snapshot(model)  # includes running_mean / running_var / num_batches_tracked
    a = adaptive_sharpness(model, batches, F.cross_entropy, 0.1, progress=False).value
    b = adaptive_sharpness(model, batches, F.cross_entropy, 0.1, progress=False).value
    assert a == b  # dropout off
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats not updated
    model.eval()
    base = F.cross_entropy(model(batches[0][0]), batches[0][1])
    r = adaptive_sharpness(model, batches, F.cross_entropy, 0.1, progress=False)
    assert r.base_loss[0] == pytest.approx(base.item(), rel=1e-12)


def test_average_case():
    model, batches = attention_setup(n_batches=2)
    q = attention_quotient(model, "mix")
    kw = dict(quotient=q, kind="average", n_samples=8, progress=False)
    r = geodesic_sharpness(model, batches, F.cross_entropy, 1e-3, **kw)
    assert len(r.extras[0]["samples"]) == 8 and r.stderr > 0
    assert r.to_dict() == geodesic_sharpness(model, batches, F.cross_entropy, 1e-3, **kw).to_dict()
    # sphere: every draw has norm rho, so the increase is bounded by the worst case
    w = geodesic_sharpness(model, batches, F.cross_entropy, 1e-3, quotient=q, progress=False)
    s = geodesic_sharpness(model, batches, F.cross_entropy, 1e-3, avg_scale="sphere", **{**kw, "quotient": q})
    assert max(max(e["samples"]) for e in s.extras) <= max(w.per_batch)
    with pytest.warns(UserWarning, match="perturbation reaches"):
        geodesic_sharpness(model, batches, F.cross_entropy, 1.0, **kw)


def test_no_symmetry_error_and_fallback():
    torch.manual_seed(0)
    model = MLP([4, 5, 3]).double()
    batches = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match="no symmetry"):
        geodesic_sharpness(model, batches, F.cross_entropy, 0.1, progress=False)
    with pytest.warns(UserWarning, match="no symmetry"):
        g = geodesic_sharpness(model, batches, F.cross_entropy, 0.1, allow_euclidean_fallback=True,
                               geodesic="first", progress=False)
    assert g.value == adaptive_sharpness(model, batches, F.cross_entropy, 0.1, progress=False).value


@pytest.mark.parametrize("fn", MEASURES)
def test_bad_inputs(fn):
    model, batches = attention_setup(n_batches=1)
    with pytest.raises(ValueError, match="rho"):
        fn(model, batches, F.cross_entropy, 0.0, progress=False)
    with pytest.raises(ValueError, match="rho"):
        fn(model, batches, F.cross_entropy, -1.0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        fn(model, [], F.cross_entropy, 0.1, progress=False)
    with pytest.raises(ValueError, match="not finite"):
        fn(model, batches, lambda o, t: F.cross_entropy(o, t) * math.nan, 0.1, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        fn(model, batches, lambda o, t: F.cross_entropy(o, t, reduction="none"), 0.1, progress=False)
    with pytest.raises(ValueError, match="kind"):
        fn(model, batches, F.cross_entropy, 0.1, kind="best", progress=False)
    with pytest.raises(TypeError):
        fn(model, batches, F.cross_entropy, 0.1, not_an_option=1)
    with torch.no_grad():
        model.head.bias[0] = math.inf
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite"):
        fn(model, batches, F.cross_entropy, 0.1, progress=False)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "head.bias")


def test_bad_options():
    model, batches = attention_setup(n_batches=1)
    with pytest.raises(ValueError, match="geodesic"):
        geodesic_sharpness(model, batches, F.cross_entropy, 0.1, geodesic="third", progress=False)
    with pytest.raises(ValueError, match="reference"):
        geodesic_sharpness(model, batches, F.cross_entropy, 0.1, solver="reference", progress=False)
    with pytest.raises(ValueError, match="avg_scale"):
        adaptive_sharpness(model, batches, F.cross_entropy, 0.1, kind="average", avg_scale="cube", progress=False)
    with pytest.raises(ValueError, match="n_iter"):
        adaptive_sharpness(model, batches, F.cross_entropy, 0.1, n_iter=0, progress=False)
    with pytest.raises(ValueError, match="params"):
        adaptive_sharpness(lambda p, x: x, batches, F.cross_entropy, 0.1, progress=False)


def test_progress_bar_can_be_silenced(capsys):
    model, batches = attention_setup(n_batches=1)
    adaptive_sharpness(model, batches, F.cross_entropy, 0.1, n_iter=2, progress=False)
    assert capsys.readouterr().err == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adaptive_sharpness(model, batches, F.cross_entropy, 0.1, n_iter=2, progress=True)


def test_antithetic_average_case_against_closed_form():
    """Euclidean average case of L(W) = mean((Wx)²) (+ a linear term): every antithetic sample is
    δΣδᵀ exactly (Σ = mean xxᵀ, the linear term cancels), so the mean is ρ² tr Σ within its
    standard error; the plain draws keep the linear term and are far noisier."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1, bias=False).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    batches = [(x, torch.zeros(32, dtype=torch.float64))]
    loss = lambda out, y: (out.squeeze(-1) ** 2).mean() + 20.0 * out.mean()  # noqa: E731
    sigma = x.T @ x / 32
    kw = dict(kind="average", n_samples=400, progress=False)
    anti = euclidean_sharpness(model, batches, loss, 0.1, antithetic=True, **kw)
    plain = euclidean_sharpness(model, batches, loss, 0.1, **kw)
    expected = 0.01 * float(torch.trace(sigma))
    assert abs(anti.value - expected) < 4 * anti.stderr
    assert min(anti.extras[0]["samples"]) > 0  # a positive-definite quadratic form, no linear part
    assert plain.stderr > 5 * anti.stderr
    assert anti.config["antithetic"] is True and plain.config["antithetic"] is False


def test_average_case_with_non_finite_draws_raises_instead_of_nan():
    """A network whose attention weights decayed to ~1e-30 (a collapsed SGD run): the mixed
    metric's whitening Q^{-1/2} explodes and the sampled losses are not finite; the average case
    must say so, not return NaN. The same model at healthy scale gives a finite value."""
    model, batches = attention_setup(n_batches=1, dtype=torch.float32)
    kw = dict(kind="average", metric="mix", n_samples=2, progress=False)
    assert math.isfinite(geodesic_sharpness(model, batches, F.cross_entropy, 0.01, **kw).value)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the relative-perturbation warning comes first
        with pytest.raises(ValueError, match="average-case loss is not finite at sample 0"):
            geodesic_sharpness(model, batches, F.cross_entropy, 0.01, **kw)

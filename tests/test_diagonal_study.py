"""Diagonal-network study: population training, Kendall τ, resumable sweeps, analytic sharpness."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from quotientsharp.data.synthetic import diagonal_regression
from quotientsharp.studies import diagonal as D
from quotientsharp.studies.kendall import bootstrap_ci, bootstrap_difference_ci, kendall_tau
from quotientsharp.studies.runner import UnitStore, run_units


def small_config(n_models=5, ode=False):
    """Fast models (α ≥ 0.1, ≤ ~5k GD steps) and a short solver."""
    config = D.study_config(rhos=(0.05,), n_iter=10, n_restarts=1, ode_rhos=[0.05] if ode else [])
    config["models"] = [m for m in D.population(50) if m["alpha"] >= 0.2][:n_models]
    config["n_boot"] = 200
    return config


def without_timing(summary):
    return {k: v for k, v in summary.items() if k != "measure_seconds"}


# --------------------------------------------------------------------------- population training
def test_batched_training_equals_training_alone():
    data = diagonal_regression()
    alphas, cs = [D.ALPHAS[7], D.ALPHAS[9], D.ALPHAS[8]], [0.2, 0.1, 0.5]
    together = D.train_population(data.X_train, data.y_train, alphas, cs)
    for a, c, fit in zip(alphas, cs, together):
        alone = D.train_population(data.X_train, data.y_train, [a], [c])[0]
        assert fit["steps"] == alone["steps"] and fit["converged"]
        assert fit["train_loss"] < 1e-5
        torch.testing.assert_close(fit["u"], alone["u"], rtol=1e-12, atol=0)
        torch.testing.assert_close(fit["v"], alone["v"], rtol=1e-12, atol=0)
    assert len({f["steps"] for f in together}) == 3  # each model stopped on its own


@pytest.mark.parametrize("alpha", [1e-3, 1.0])
def test_first_step_uses_the_floored_step(alpha):
    """From ``u = √2α``, ``v = 0`` the first GD step moves only v: ``v1 = lr · 2Xᵀy · u0`` with
    ``lr = c / (λ_max(XᵀX) · max(2α², 1e-3))`` — the floor binds at α = 1e-3 (2α² = 2e-6), not at α = 1."""
    data = diagonal_regression()
    X, y, c = data.X_train, data.y_train, 0.3
    lam = float(torch.linalg.eigvalsh(X.T @ X)[-1])
    u0 = math.sqrt(2) * alpha
    lr = c / (lam * max(2 * alpha ** 2, 1e-3))
    fit = D.train_population(X, y, [alpha], [c], max_steps=1)[0]
    torch.testing.assert_close(fit["u"], torch.full((X.shape[1],), u0, dtype=X.dtype), rtol=1e-14, atol=0)
    torch.testing.assert_close(fit["v"], lr * 2 * (X.T @ y) * u0, rtol=1e-12, atol=0)
    unfloored = D.train_population(X, y, [alpha], [c], max_steps=1, floor=0.0)[0]
    ratio = float(unfloored["v"].norm() / fit["v"].norm())
    assert ratio == pytest.approx(max(2 * alpha ** 2, 1e-3) / (2 * alpha ** 2), rel=1e-12)


def test_training_step_cap():
    data = diagonal_regression()
    fit = D.train_population(data.X_train, data.y_train, [1.0], [0.5], max_steps=7)[0]
    assert fit["steps"] == 7 and not fit["converged"]


def test_population_spreads_over_grid():
    pop = D.population(10)
    assert len(pop) == 10 and len({m["alpha"] for m in pop}) == 10 and len({m["c"] for m in pop}) == 5
    assert len(D.population(50)) == 50 and D.population(50)[0]["id"] == "a0_c0.1"


# --------------------------------------------------------------------------- Kendall τ
@pytest.mark.parametrize("seed", range(5))
def test_kendall_matches_scipy_without_ties(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.permutation(30).astype(float), rng.permutation(30).astype(float)
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)


def test_kendall_known_values_and_ties():
    x = [1.0, 2.0, 3.0, 4.0]
    assert kendall_tau(x, x) == 1.0
    assert kendall_tau(x, x[::-1]) == -1.0
    assert kendall_tau(x, [1.0, 3.0, 2.0, 4.0]) == pytest.approx(2 / 3)  # 5 concordant, 1 discordant
    with pytest.warns(RuntimeWarning, match="tied"):
        tau = kendall_tau(x, [1.0, 1.0, 2.0, 3.0])
    assert tau == pytest.approx(5 / 6)  # τ-a: the tied pair counts 0 out of 6


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    lo, hi = bootstrap_ci(x, y, n_boot=300, seed=1)
    # the percentile interval of τ-a over resampled models (pairs of distinct original models),
    # by a plain loop over the same resamples
    taus = []
    for idx in np.random.default_rng(1).integers(0, 40, size=(300, 40)):
        pairs = [(i, j) for a, i in enumerate(idx) for j in idx[a + 1:] if i != j]
        taus.append(np.mean([np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs]))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(taus, [0.025, 0.975])), abs=1e-12)
    assert lo < kendall_tau(x, y) < hi and hi - lo > 0.05
    lo, hi = bootstrap_ci(x, y, seed=1)
    assert bootstrap_ci(x, y, seed=1) == (lo, hi)
    assert bootstrap_ci(x, x, seed=1) == (1.0, 1.0)  # duplicated models are not counted as ties


def test_paired_difference_ci_against_a_direct_resampling_loop():
    """τ(x1,y) − τ(x2,y) on the same resampled models, checked against a plain loop over the
    resamples (τ over pairs of distinct original models); x vs itself differs by exactly 0."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=30)
    x1, x2 = y + 0.5 * rng.normal(size=30), y + 2.0 * rng.normal(size=30)
    point, lo, hi = bootstrap_difference_ci(x1, x2, y, n_boot=300, seed=2)
    assert point == pytest.approx(kendall_tau(x1, y) - kendall_tau(x2, y))
    diffs = []
    for idx in np.random.default_rng(2).integers(0, 30, size=(300, 30)):
        pairs = [(i, j) for a, i in enumerate(idx) for j in idx[a + 1:] if i != j]
        tau = lambda x: np.mean([np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs])  # noqa: E731
        diffs.append(tau(x1) - tau(x2))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    assert 0 < lo < point < hi  # x1 is the less noisy copy of y
    assert bootstrap_difference_ci(x1, x1, y, n_boot=50) == (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- resumable sweeps
def test_runner_rejects_changed_config(tmp_path):
    store = UnitStore(tmp_path)
    run_units(store, {"a": {"x": 1}}, lambda key, cfg: {"y": cfg["x"]}, progress=False)
    assert run_units(store, {"a": {"x": 1}}, lambda key, cfg: 1 / 0, progress=False) == {"a": {"y": 1}}
    with pytest.raises(ValueError, match="another configuration"):
        run_units(store, {"a": {"x": 2}}, lambda key, cfg: {}, progress=False)
    assert not list(tmp_path.glob(".*tmp"))


def test_study_end_to_end(tmp_path):
    config = small_config(ode=True)
    summary = D.run_study(tmp_path, config, progress=False)
    assert len(list((tmp_path / "models").glob("*.json"))) == 5
    assert len(list((tmp_path / "train").glob("*.json"))) == 5
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert len((tmp_path / "models.csv").read_text().splitlines()) == 6
    assert {"n_models", "kendall_tau", "ci95", "paper", "per_rho", "config", "headline_rho"} <= set(summary)
    assert summary["n_models"] == 5 and summary["headline_rho"] == 0.05
    assert set(summary["kendall_tau"]) == set(D.MEASURES)
    # τ at the headline ρ recomputed from the per-model files (continuous values, no ties: τ-a = τ-b)
    results = [json.loads((tmp_path / "models" / f"{m['id']}.json").read_text())["result"] for m in config["models"]]
    test_losses = [r["test_loss"] for r in results]
    for name, tau in summary["kendall_tau"].items():
        s = [r["measures"][name]["values"]["0.05"] for r in results]
        assert len(set(s)) == len(s) and len(set(test_losses)) == len(test_losses)
        assert tau == pytest.approx(kendalltau(s, test_losses).statistic, abs=1e-12), name
    first = config["models"][0]["id"]
    unit = json.loads((tmp_path / "models" / f"{first}.json").read_text())
    assert unit["result"]["train"]["converged"] and unit["result"]["test_loss"] > 0
    # the RK4 variant runs on the closed form's solver budget and gives its value (ratio stored)
    plan = config["plan"]
    assert {k: plan["geodesic_inv_ode"][k] for k in ("n_iter", "n_restarts")} == \
        {k: plan["geodesic_inv"][k] for k in ("n_iter", "n_restarts")}
    ratio = unit["result"]["rk4_over_closed_form"]["0.05"]
    assert ratio == pytest.approx(unit["result"]["measures"]["geodesic_inv_ode"]["values"]["0.05"]
                                  / unit["result"]["measures"]["geodesic_inv"]["values"]["0.05"], rel=1e-15)
    assert ratio == pytest.approx(1.0, abs=1e-9)
    lo, hi = summary["rk4_over_closed_form"]["range"]
    assert lo <= ratio <= hi and abs(lo - 1) < 1e-9 and abs(hi - 1) < 1e-9
    assert summary["rk4_over_closed_form"]["per_model"][first] == unit["result"]["rk4_over_closed_form"]
    assert "rk4_over_closed_form@0.05" in (tmp_path / "models.csv").read_text().splitlines()[0]
    # the RK4 geodesic gives the closed form's sharpness on the same solver settings
    weights = json.loads((tmp_path / "train" / f"{first}.json").read_text())["result"]
    data = diagonal_regression()
    u, v = (torch.tensor(weights[n], dtype=torch.float64) for n in ("u", "v"))
    closed = D.measure_model(u, v, data.X_train, data.y_train,
                             {"geodesic_inv": unit["config"]["plan"]["geodesic_inv_ode"]}, unit["config"]["seed"])
    assert closed["geodesic_inv"]["values"]["0.05"] == pytest.approx(
        unit["result"]["measures"]["geodesic_inv_ode"]["values"]["0.05"], rel=1e-10)
    assert "| geodesic_inv |" in D.tau_table(summary)


def test_stored_training_with_another_step_floor_is_refused(tmp_path):
    config = small_config(n_models=2)
    D.run_study(tmp_path, config, progress=False)
    config["train"]["floor"] = 0.0
    with pytest.raises(ValueError, match="another configuration"):
        D.run_study(tmp_path, config, progress=False)


def test_study_resumes_after_interruption(tmp_path, monkeypatch):
    config = small_config()
    real = D.measure_model
    calls = []

    def crashing(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(D, "measure_model", crashing)
    with pytest.raises(KeyboardInterrupt):
        D.run_study(tmp_path / "resumed", config, progress=False)
    done = sorted((tmp_path / "resumed" / "models").glob("*.json"))
    assert len(done) == 2 and not list((tmp_path / "resumed" / "models").glob(".*tmp"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}

    calls.clear()
    monkeypatch.setattr(D, "measure_model", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    resumed = D.run_study(tmp_path / "resumed", config, progress=False)
    assert len(calls) == 3  # only the unfinished models
    assert {p.name: p.stat().st_mtime_ns for p in done} == mtimes

    calls.clear()
    assert D.run_study(tmp_path / "resumed", config, progress=False) == resumed and not calls
    fresh = D.run_study(tmp_path / "fresh", config, progress=False)
    assert without_timing(fresh) == without_timing(resumed)


# --------------------------------------------------------------------------- analytic cases, XᵀX = I
@pytest.fixture(scope="module")
def orthonormal_model():
    """XᵀX = I (d = 8, n = 12), β* = Xᵀy, and weights with |β_i| ≥ 1 and unbalanced u, v."""
    data = diagonal_regression(d=8, n_train=12, seed=3, orthonormal=True)
    gen = torch.Generator().manual_seed(0)
    beta = data.beta_star + torch.where(torch.rand(8, generator=gen) < 0.5, -1.0, 1.0) * (
        1 + torch.rand(8, generator=gen, dtype=torch.float64))
    beta = torch.where(beta.abs() < 1, beta.sign() + beta, beta)
    u = torch.exp(torch.randn(8, generator=gen, dtype=torch.float64))
    return u, beta / u, data


def _measure(name, model, rho, n_restarts=2):
    u, v, data = model
    plan = {name: {"rhos": [rho], "n_iter": 100, "n_restarts": n_restarts}}
    return D.measure_model(u, v, data.X_train, data.y_train, plan, seed=0)[name]["values"][str(rho)]


@pytest.mark.parametrize("rho", [0.01, 0.05])
def test_mixed_metric_matches_closed_form(orthonormal_model, rho):
    u, v, data = orthonormal_model
    assert torch.allclose(data.X_train.T @ data.X_train, torch.eye(8, dtype=torch.float64), atol=1e-12)
    exact = 2 * math.sqrt(2) * rho * float((u * v - data.beta_star).norm()) + 2 * rho ** 2
    assert _measure("geodesic_mix", orthonormal_model, rho) == pytest.approx(exact, rel=1e-6)


def _trust_region_max(g, h, radius):
    """``max gᵀb + bᵀ diag(h) b`` over ``‖b‖ ≤ radius`` (h ≥ 0): ``b = g / (2(λ − h))`` on the sphere."""
    lo, hi = h.max() + 1e-15, h.max() + np.abs(g).sum() / radius + 1
    for _ in range(200):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if np.linalg.norm(g / (2 * (lam - h))) > radius else (lo, lam)
    b = g / (2 * (hi - h))
    return g @ b + b @ (h * b)


@pytest.mark.parametrize("rho", [0.01, 0.05])
def test_mixed_bnorm_matches_trust_region(orthonormal_model, rho):
    """``√2‖b‖ ≤ ρ`` with ``β(1) = β(1 + 2b)``: the increase is ``4bᵀr + 4bᵀdiag(β²)b`` exactly."""
    u, v, data = orthonormal_model
    beta, beta_star = (u * v).numpy(), data.beta_star.numpy()
    exact = _trust_region_max(4 * beta * (beta - beta_star), 4 * beta ** 2, rho / math.sqrt(2))
    assert _measure("geodesic_mix_bnorm", orthonormal_model, rho) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("rho", [0.01, 0.05])
def test_inverse_metric_matches_oracle(orthonormal_model, rho):
    """Oracle: multi-start projected gradient ascent on ``Σ β²(e^{4b} − 1) − 2ββ*(e^{2b} − 1)`` over ``‖b‖ ≤ ρ/√2``,
    started at the first-order maximiser and at random points (spec part 1 §8, item 13)."""
    u, v, data = orthonormal_model
    beta, beta_star = (u * v).numpy(), data.beta_star.numpy()
    radius = rho / math.sqrt(2)

    def increase(b):
        return np.sum(beta ** 2 * np.expm1(4 * b) - 2 * beta * beta_star * np.expm1(2 * b))

    def ascend(b):  # projected gradient ascent on the ball
        for _ in range(20000):
            b = b + 1e-3 * (4 * beta ** 2 * np.exp(4 * b) - 4 * beta * beta_star * np.exp(2 * b))
            b *= min(1.0, radius / np.linalg.norm(b))
        return increase(b)

    r = beta * (beta - beta_star)
    first_order = radius * r / np.linalg.norm(r)
    starts = [first_order] + list(np.random.default_rng(0).normal(size=(8, 8)) * radius / 3)
    oracle = max(ascend(b0) for b0 in starts)
    assert oracle >= increase(first_order) - 1e-12
    value = _measure("geodesic_inv", orthonormal_model, rho)
    assert (1 - 1e-6) * oracle <= value <= oracle + 1e-10


# --------------------------------------------------------------------------- figures
def _figure_script():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "paper_figs" / "diagonal_nets.py"
    spec = importlib.util.spec_from_file_location("paper_figs_diagonal_nets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figures_run_on_a_tiny_study_and_are_readable(tmp_path):
    """paper_figs/diagonal_nets.py on a 5-model study: an overview (6.8 in) and one figure per
    measure (3.3 in), each checked for overlapping tick labels and text under 7 pt before saving;
    titles are human-readable with the paper's τ; the old layout (log axis with labelled minor
    ticks on a narrow range, 10 pt at 4 in) fails the same check."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figs = _figure_script()
    config = D.study_config(rhos=(0.05,), n_iter=3, n_restarts=0, ode_rhos=[0.05])
    config["models"] = [m for m in D.population(50) if m["alpha"] >= 0.2][:5]
    config["n_boot"] = 50
    D.run_study(tmp_path / "study", config, progress=False)
    paths = figs.main([str(tmp_path / "study"), "--out", str(tmp_path / "figs")])
    names = {p.name for p in paths}
    assert {"diag_overview.png", "diag_overview.pdf"} <= names
    assert {f"diag_{m}.png" for m in D.MEASURES} <= names and all(p.stat().st_size > 0 for p in paths)
    assert figs.title("geodesic_inv", -0.5, D.PAPER_TAU) == "geodesic, inverse metric\nτ = −0.50 (paper −0.83)"
    assert "paper" not in figs.title("euclidean", 0.1, D.PAPER_TAU) and "_" not in figs.title("geodesic_mix_bnorm", 0, {})
    # negative control: the previous style on values within 3% of each other
    fig, ax = plt.subplots(figsize=(4, 3.2))
    ax.scatter([11.0, 11.1, 11.2, 11.3], [1, 2, 3, 4])
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(10, 10)))
    ax.tick_params(labelsize=6)
    problems = figs.readability_problems(fig)
    plt.close(fig)
    assert any("overlap" in p for p in problems) and any("< 7" in p for p in problems)

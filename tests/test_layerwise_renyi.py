"""Per-layer Rényi sharpness against dense block Hessians, and the held-out choice of layer and α."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from quotientsharp.curvature import curvature_operator, renyi_sharpness
from quotientsharp.curvature.layerwise import (
    layer_targets,
    layerwise_renyi,
    parse_value_name,
    select_layer_alpha,
    split_halves,
    value_name,
)
from quotientsharp.curvature.renyi import renyi_entropy
from quotientsharp.studies.kendall import kendall_tau

ALPHAS = (0.5, 1.5)


@pytest.fixture(scope="module")
def tanh_mlp():
    """A float64 4→5→3 tanh MLP, briefly trained so that its blocks are not at initialisation, and
    one fixed batch of 40 points."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, [(x, y)]


def dense_block_hessian(model, batch, name):
    """``∂²L/∂θ_l²`` by ``torch.autograd.functional.hessian`` with every other parameter fixed."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = batch

    def loss(theta):
        return F.cross_entropy(functional_call(model, {**params, name: theta}, (x,)), y)

    H = torch.autograd.functional.hessian(loss, params[name])
    n = params[name].numel()
    H = H.reshape(n, n)
    return (H + H.T) / 2


def roundoff_tolerance(eigs, alpha):
    """Float64 bound on |ΔH_α| from the zero eigenvalues of a rank-deficient block (a linear
    last layer under cross-entropy has ``H_ll = Σ (diag p − ppᵀ) ⊗ h hᵀ``, singular along 1):
    they come out as ±ε‖H‖ with ε ~ 1e-15, and ``|θ|^α`` of each adds up to ``(ε‖H‖)^α`` to
    ``S_α``, so ``|ΔH_α| ≲ n (ε‖H‖)^α / (S_α |1 − α|)``, plus 1e-10."""
    lam = eigs.abs()
    s_alpha = float((lam ** alpha).sum())
    return len(eigs) * (1e-15 * float(lam.max())) ** alpha / (s_alpha * abs(1 - alpha)) + 1e-10


def test_layerwise_renyi_with_full_lanczos_on_basis_probes_is_exact(tanh_mlp):
    """The per-layer operator is the dense block (1e-10), and full Lanczos (m = n) from the probes
    ``√n e_i`` integrates ``Tr|H_ll|^α`` exactly: H_α equals the eigenvalues' value up to round-off."""
    model, loader = tanh_mlp
    result = layerwise_renyi(model, loader, F.cross_entropy, alphas=ALPHAS, m=64,
                             probes=lambda n: math.sqrt(n) * torch.eye(n, dtype=torch.float64))
    assert set(result.renyi) == {"0.weight", "2.weight"} and result.n == {"0.weight": 20, "2.weight": 15}
    exact = {}
    for name in layer_targets(model):
        H = dense_block_hessian(model, loader[0], name)
        torch.testing.assert_close(curvature_operator(model, loader, F.cross_entropy, name).to_dense(), H,
                                   rtol=0, atol=1e-10)
        eigs = torch.linalg.eigvalsh(H)
        for a in ALPHAS:
            exact[name, a] = renyi_entropy(eigs, a).estimate
            assert result.renyi[name][a].estimate == pytest.approx(exact[name, a], abs=roundoff_tolerance(eigs, a))
            assert result.values()[value_name(a, name)] == -result.renyi[name][a].estimate
    assert abs(exact["0.weight", 0.5] - exact["2.weight", 0.5]) > 0.1  # the two blocks differ


def test_layerwise_renyi_rademacher_probes_within_their_stderr(tanh_mlp):
    """Full Lanczos (m = n): each probe's quadrature is exactly ``zᵀ|H_ll|^α z``, so the only
    error is the Rademacher (Hutchinson) noise of the P = 40 probes, which the jackknife stderr
    measures: the estimate lies within 4 stderr of the exact value."""
    model, loader = tanh_mlp
    result = layerwise_renyi(model, loader, F.cross_entropy, alphas=ALPHAS, m=64, n_probes=40, seed=3)
    for name in result.renyi:
        eigs = torch.linalg.eigvalsh(dense_block_hessian(model, loader[0], name))
        for a in ALPHAS:
            est, truth = result.renyi[name][a], renyi_entropy(eigs, a).estimate
            assert 0 < est.stderr < 0.1
            assert abs(est.estimate - truth) <= 4 * est.stderr, (name, a, est.estimate, truth, est.stderr)


def test_per_layer_values_invariant_under_relu_layer_rescaling():
    """Bias-free ReLU net, W1 × 3 and W2 / 3: same function, each block scales by 1/c², so the
    per-layer entropies are unchanged up to round-off (same probes) while the full-Hessian one
    moves (spec §6.4)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False)).double()
    g = torch.Generator().manual_seed(3)
    loader = [(torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g))]
    moved = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False)).double()
    with torch.no_grad():
        moved[0].weight.copy_(3 * model[0].weight)
        moved[2].weight.copy_(model[2].weight / 3)
    assert torch.allclose(model(loader[0][0]), moved(loader[0][0]), atol=1e-12)
    kw = dict(alphas=ALPHAS, m=15, n_probes=10, seed=1)
    before = layerwise_renyi(model, loader, F.cross_entropy, **kw).values()
    after = layerwise_renyi(moved, loader, F.cross_entropy, **kw).values()
    assert before.keys() == after.keys() and len(before) == 4
    for name in ("0.weight", "2.weight"):
        eigs = torch.linalg.eigvalsh(dense_block_hessian(model, loader[0], name))
        for a in ALPHAS:
            k = value_name(a, name)
            assert after[k] == pytest.approx(before[k], abs=2 * roundoff_tolerance(eigs, a))
    full = [renyi_sharpness(m_, loader, F.cross_entropy, 0.5, m=15, n_probes=10, seed=1).estimate
            for m_ in (model, moved)]
    assert abs(full[0] - full[1]) > 0.05


def test_layerwise_errors(tanh_mlp):
    model, loader = tanh_mlp
    with pytest.raises(ValueError, match="alpha"):
        layerwise_renyi(model, loader, F.cross_entropy, alphas=[1.0], m=4, n_probes=1)
    with pytest.raises(ValueError, match="no parameter name matches"):
        layerwise_renyi(model, loader, F.cross_entropy, targets={"x": "nope"}, m=4, n_probes=1)
    with pytest.raises(TypeError):
        layerwise_renyi(model, F.cross_entropy, loader)
    with pytest.raises(ValueError, match="ndim > 1"):
        layer_targets(nn.Sequential(nn.LayerNorm(3)))


# --------------------------------------------------------------------------- held-out selection
def test_value_names_round_trip():
    assert parse_value_name(value_name(1.5, "blocks.0.attn.weight")) == ("1.5", "blocks.0.attn.weight")
    assert parse_value_name("renyi_0.5") is None and parse_value_name("layer_renyi_0.5") is None


def test_split_halves_is_a_seeded_partition():
    ids = [f"m{i}" for i in range(11)]
    sel, ev = split_halves(ids, seed=4)
    assert len(sel) == 5 and len(ev) == 6 and set(sel) | set(ev) == set(ids) and not set(sel) & set(ev)
    assert split_halves(ids, seed=4) == (sel, ev) and split_halves(ids, seed=5) != (sel, ev)


def _population(n=24, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"m{i}" for i in range(n)]
    gap = {i: float(g) for i, g in zip(ids, rng.normal(size=n))}
    return ids, gap, rng


def test_selection_finds_the_informative_layer_and_alpha():
    ids, gap, rng = _population()
    good = value_name(1.5, "blocks.1.mlp")
    values = {i: {value_name(a, layer): float(rng.normal()) for a in ALPHAS for layer in ("blocks.0.mlp", "blocks.1.mlp")}
              for i in ids}
    for i in ids:
        values[i][good] = gap[i] + 0.05 * float(rng.normal())
        values[i]["hessian_trace"] = gap[i]  # not a per-layer value: never a candidate
    values[ids[0]][value_name(0.5, "blocks.0.mlp")] = math.nan  # not finite everywhere: dropped
    out = select_layer_alpha(values, gap, seed=1, n_boot=200)
    assert out["choice"] == {"layer": "blocks.1.mlp", "alpha": "1.5", "name": good}
    assert set(out["candidates"]) == {value_name(1.5, "blocks.0.mlp"), value_name(0.5, "blocks.1.mlp"), good}
    assert out["tau_evaluation"] == pytest.approx(kendall_tau([values[i][good] for i in out["evaluation"]],
                                                              [gap[i] for i in out["evaluation"]]))
    assert out["tau_evaluation"] > 0.8 and out["ci95_evaluation"][0] <= out["tau_evaluation"] <= out["ci95_evaluation"][1]
    # sign=-1 looks for the opposite direction: the informative candidate is then the worst
    assert select_layer_alpha(values, gap, seed=1, sign=-1, n_boot=50)["choice"]["name"] != good


def test_selection_reports_the_held_out_half_not_the_fitted_one():
    """A candidate that is perfectly concordant on the selection half and perfectly discordant on
    the evaluation half wins the selection and is reported with τ = −1."""
    ids, gap, rng = _population(n=20, seed=2)
    sel, ev = split_halves(ids, seed=7)
    overfit, honest = value_name(0.5, "a"), value_name(1.5, "b")
    values = {i: {overfit: gap[i] if i in sel else -gap[i], honest: gap[i] + float(rng.normal())} for i in ids}
    out = select_layer_alpha(values, gap, seed=7, n_boot=50)
    assert (out["selection"], out["evaluation"]) == (sel, ev)
    assert out["choice"]["name"] == overfit and out["tau_selection"] == 1.0
    assert out["tau_evaluation"] == -1.0


def test_selection_errors():
    ids, gap, _ = _population(n=3)
    with pytest.raises(ValueError, match="at least 4"):
        select_layer_alpha({i: {value_name(0.5, "a"): 1.0} for i in ids}, gap)
    ids, gap, _ = _population(n=6)
    with pytest.raises(ValueError, match="no per-layer"):
        select_layer_alpha({i: {"renyi_0.5": 1.0} for i in ids}, gap)
    with pytest.raises(ValueError, match="sign"):
        select_layer_alpha({i: {value_name(0.5, "a"): 1.0} for i in ids}, gap, sign=2)


# --------------------------------------------------------------------------- transformer studies
def test_transformer_study_reports_per_layer_renyi_and_the_held_out_choice(tmp_path):
    pytest.importorskip("sklearn")
    from test_transformer_study import tiny_config

    from quotientsharp.studies import transformers as study

    assert "layer_renyi" in study.MEASURES and "layer_renyi" not in study.default_measures()  # opt-in
    config = tiny_config()
    config["models"] = study.population("vit", 4, seed=0, epochs=[1])
    config["plan"]["measures"] = ["layer_renyi"]
    summary = study.run_study(tmp_path, config, progress=False)
    row = summary["models"][0]
    layers = {parse_value_name(n)[1] for n in row["values"]}
    assert "blocks.0.attn.q.weight" in layers and "head.weight" in layers
    assert {parse_value_name(n)[0] for n in row["values"]} == {str(a) for a in config["plan"]["alphas"]}
    assert set(summary["kendall_tau"]["error_gap"]) == set(row["values"])  # a τ per layer and α
    for gap in ("error_gap", "loss_gap"):
        chosen = summary["layer_renyi_selection"][gap]
        assert chosen["choice"]["name"] in row["values"]
        assert len(chosen["selection"]) == len(chosen["evaluation"]) == 2
        assert not set(chosen["selection"]) & set(chosen["evaluation"])

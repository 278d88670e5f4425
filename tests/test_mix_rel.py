"""The relative mixed ball ``ball="relative"`` (``mix_rel``, spec part 2 §5.1): its norm against a
hand-written formula, its gradient, the diagonal-net case (= ``mix_bnorm``), GL invariance."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_diagonal_study import _trust_region_max
from test_sharpness_common import attention_quotient, attention_setup, one_thread  # noqa: F401

from quotientsharp import DiagonalRescaling, Quotient
from quotientsharp import tangent as T
from quotientsharp.data.synthetic import diagonal_regression
from quotientsharp.measures import adaptive_sharpness, geodesic_sharpness, sum_squared_error
from quotientsharp.measures.feasible import HorizontalBall, RelativeBlockBall, relative_ball_quotient
from quotientsharp.models.diagonal import DiagonalNet
from quotientsharp.studies import diagonal as D

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _random_tangent(w, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in w.items()}


def _hand_relative_norm_sq(model, w, xi):
    """``Σ_heads (||ξ_G Hᵀ||² + ||G ξ_Hᵀ||²) / ||G Hᵀ||² + Σ_rest ||ξ ⊘ w||²`` written out for the
    tiny attention classifier: QK head j has ``G = [W_q[j]ᵀ; b_q[j]]``, ``H = [W_k[j]ᵀ; b_k[j]]``,
    VO head j has ``G = [W_v[j]ᵀ; b_v[j]]``, ``H = W_o[:, j]``."""
    total = torch.zeros((), dtype=torch.float64)
    in_blocks = set()
    for i, layer in enumerate(model.layers):
        p, h = f"layers.{i}.", layer.head_dim

        def rows(d, name, j):
            return torch.cat([d[p + name + ".weight"][j * h:(j + 1) * h].T, d[p + name + ".bias"][None, j * h:(j + 1) * h]])

        for j in range(layer.n_heads):
            pairs = [(lambda d: rows(d, "q", j), lambda d: rows(d, "k", j)),
                     (lambda d: rows(d, "v", j), lambda d: d[p + "o.weight"][:, j * h:(j + 1) * h])]
            for get_g, get_h in pairs:
                G, H, xG, xH = get_g(w), get_h(w), get_g(xi), get_h(xi)
                total += ((xG @ H.T).pow(2).sum() + (G @ xH.T).pow(2).sum()) / (G @ H.T).pow(2).sum()
        in_blocks |= {p + s for s in ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "o.weight")}
    for n in w:
        if n not in in_blocks:
            total += (xi[n] / w[n]).pow(2).sum()
    return total


def test_relative_norm_is_the_specs_formula():
    model, _ = attention_setup(seed=2, n_layers=2)
    w = _params(model)
    q = relative_ball_quotient(attention_quotient(model, "mix"), w)
    for seed in range(3):
        xi = _random_tangent(w, seed)  # the formula holds for any tangent vector, horizontal or not
        assert float(q.norm_sq(w, xi)) == pytest.approx(float(_hand_relative_norm_sq(model, w, xi)), rel=1e-12)


def test_relative_gradient_and_whitening_match_the_relative_inner_product():
    """``<grad_rel f, ζ>_rel = <egrad, ζ>`` for horizontal ζ (Riesz), and the whitened draws have
    ``E ||ξ||²_rel = dim H`` like the metric ball's (both are standard Gaussians on H)."""
    model, _ = attention_setup(seed=4)
    w = _params(model)
    base = attention_quotient(model, "mix")
    q = relative_ball_quotient(base, w)
    egrad = _random_tangent(w, 10)
    r = q.riemannian_gradient(w, egrad)
    for seed in range(3):
        zeta = q.horizontal_projection(w, _random_tangent(w, 20 + seed))
        assert float(q.inner(w, r, zeta)) == pytest.approx(float(T.dot(egrad, zeta)), rel=1e-10)
    assert float(base.inner(w, r, r)) != pytest.approx(float(q.inner(w, r, r)), rel=1e-3)  # the ball did change
    g = torch.Generator().manual_seed(0)
    rel = [float(HorizontalBall(q, w, 1.0).norm(HorizontalBall(q, w, 1.0).gaussian(g))) ** 2 for _ in range(400)]
    g = torch.Generator().manual_seed(0)
    met = [float(HorizontalBall(base, w, 1.0).norm(HorizontalBall(base, w, 1.0).gaussian(g))) ** 2 for _ in range(400)]
    assert sum(rel) / 400 == pytest.approx(sum(met) / 400, rel=1e-10)  # same ζ: the same draw in whitened coordinates


# --------------------------------------------------------------------------- diagonal nets: = mix_bnorm
@pytest.fixture(scope="module")
def diagonal_model():
    data = diagonal_regression()
    fit = D.train_population(data.X_train, data.y_train, [D.ALPHAS[8]], [0.3])[0]
    return fit["u"], fit["v"], data


def _diag_net(u, v):
    model = DiagonalNet(len(u), dtype=u.dtype)
    with torch.no_grad():
        model.u.copy_(u)
        model.v.copy_(v)
    return model


def test_relative_ball_is_the_b_norm_on_diagonal_nets(diagonal_model):
    """Blocks of size 1 (G = u_i, H = v_i): ``(ξ_u² v² + u² ξ_v²)/(uv)² = ξ_u²/u² + ξ_v²/v²``, so on
    ``ξ = (u b, v b)`` the relative norm is ``√2||b||`` — the ``mix_bnorm`` ball."""
    u, v, _ = diagonal_model
    w = {"u": u, "v": v}
    q = relative_ball_quotient(Quotient([DiagonalRescaling("u", "v", "mix")], ("u", "v"), order="exact"), w)
    b = torch.randn(len(u), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    assert float(q.norm(w, {"u": u * b, "v": v * b})) == pytest.approx(math.sqrt(2) * float(b.norm()), rel=1e-12)
    bnorm = D.MixedGeodesicBNorm()
    egrad = _random_tangent(w, 3)
    for name in ("u", "v"):  # ascent direction and whitening are the b-norm's too
        torch.testing.assert_close(q.riemannian_gradient(w, egrad)[name], bnorm.riemannian_gradient(w, egrad)[name],
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(q.whiten(w, egrad)[name], bnorm.whiten(w, egrad)[name], rtol=1e-12, atol=0)


@pytest.mark.parametrize("rho", [0.02, 0.1])
def test_relative_ball_sharpness_equals_mix_bnorm_on_a_trained_diagonal_net(diagonal_model, rho):
    u, v, data = diagonal_model
    model, loader = _diag_net(u, v), [(data.X_train, data.y_train)]
    kw = dict(kind="worst", n_iter=100, n_restarts=2, seed=5, progress=False)
    q = Quotient([DiagonalRescaling("u", "v", "mix", "restrict")], ("u", "v"), order="exact")
    rel = geodesic_sharpness(model, loader, sum_squared_error, rho, quotient=q, ball="relative", **kw).value
    bnorm = D.MEASURES["geodesic_mix_bnorm"](model, loader, rho, **kw).value
    metric = geodesic_sharpness(model, loader, sum_squared_error, rho, quotient=q, **kw).value
    assert rel > 0 and rel == pytest.approx(bnorm, rel=1e-9)
    assert abs(metric - rel) > 0.05 * rel  # the metric-norm ball is another ball


@pytest.mark.parametrize("rho", [0.01, 0.05])
def test_relative_ball_matches_the_trust_region_oracle(rho):
    """``XᵀX = I``: ``L(β(1 + 2b)) − L(β) = 4bᵀr + 4bᵀdiag(β²)b`` over ``√2||b|| ≤ ρ`` — exact."""
    data = diagonal_regression(d=8, n_train=12, seed=3, orthonormal=True)
    gen = torch.Generator().manual_seed(1)
    beta = data.beta_star + (1 + torch.rand(8, generator=gen, dtype=torch.float64)) * torch.where(
        torch.rand(8, generator=gen) < 0.5, -1.0, 1.0)
    u = torch.exp(torch.randn(8, generator=gen, dtype=torch.float64))
    model = _diag_net(u, beta / u)
    b, bs = beta.numpy(), data.beta_star.numpy()
    exact = _trust_region_max(4 * b * (b - bs), 4 * b ** 2, rho / math.sqrt(2))
    q = Quotient([DiagonalRescaling("u", "v", "mix", "restrict")], ("u", "v"), order="exact")
    value = geodesic_sharpness(model, [(data.X_train, data.y_train)], sum_squared_error, rho, quotient=q,
                               ball="relative", n_iter=100, n_restarts=2, progress=False).value
    assert value == pytest.approx(exact, rel=1e-6)


# --------------------------------------------------------------------------- invariance, errors
def _transformed(model, quotient, seed, **kw):
    w = _params(model)
    w2 = quotient.action(w, quotient.random_element(w, generator=torch.Generator().manual_seed(seed), **kw))
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(w2[n])
    return out


def test_relative_ball_worst_case_invariant_under_gl_at_cond_1e3():
    model, batches = attention_setup(seed=3, n_batches=2)
    q = attention_quotient(model, "mix", eps_rel=0.0)
    moved = _transformed(model, q, 7, max_cond=1e3)
    x = batches[0][0]
    assert torch.allclose(model(x), moved(x), rtol=0, atol=1e-10)
    # the block scales ||G Hᵀ||²_F themselves are invariant
    s0 = RelativeBlockBall(q.groups[0], _params(model)).scales
    s1 = RelativeBlockBall(attention_quotient(moved, "mix").groups[0], _params(moved)).scales
    for a, b in zip(s0, s1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    kw = dict(rho=0.05, progress=False, ball="relative")
    v0 = geodesic_sharpness(model, batches, F.cross_entropy, quotient=q, **kw).value
    v1 = geodesic_sharpness(moved, batches, F.cross_entropy, quotient=attention_quotient(moved, "mix", eps_rel=0.0),
                            **kw).value
    assert v0 > 0 and abs(v1 - v0) <= 1e-9 * v0
    a0 = adaptive_sharpness(model, batches, F.cross_entropy, rho=0.05, progress=False).value
    a1 = adaptive_sharpness(moved, batches, F.cross_entropy, rho=0.05, progress=False).value
    assert abs(a1 - a0) > 0.05 * a0  # negative control: adaptive sharpness is not invariant


def _draw_matrix(q, w, names):
    """The linear map ``ζ -> Π(whiten_rel(ζ))`` on the group's parameters, as a dense matrix."""
    flat = [(n, i) for n in names for i in range(w[n].numel())]
    cols = []
    for n, i in flat:
        zeta = {m: torch.zeros_like(p) for m, p in w.items()}
        zeta[n].view(-1)[i] = 1.0
        xi = q.horizontal_projection(w, q.whiten(w, zeta))
        cols.append(torch.cat([xi[m].reshape(-1) for m in names]))
    return torch.stack(cols, 1)


def test_relative_ball_average_case_draws_are_gl_equivariant_in_law_at_cond_1e3():
    """The average case draws ``ξ = ρ Π(whiten_rel(ζ))``: a Gaussian with covariance ``C = M Mᵀ``.
    At the moved point ``ψ_A(w0)`` it must be the pushforward's ``J C Jᵀ`` (then, with equivariant
    geodesics, the expected loss increase is exactly invariant; single draws are not, because
    whitening uses symmetric square roots)."""
    model, _ = attention_setup(seed=3)
    w = _params(model)
    q = attention_quotient(model, "mix", eps_rel=0.0)
    elements = q.random_element(w, generator=torch.Generator().manual_seed(7), max_cond=1e3)
    w1 = q.action(w, elements)
    names = q.groups[0].names
    C0 = (lambda M: M @ M.T)(_draw_matrix(relative_ball_quotient(q, w), w, names))
    C1 = (lambda M: M @ M.T)(_draw_matrix(relative_ball_quotient(q, w1), w1, names))
    J = []
    for n in names:
        for i in range(w[n].numel()):
            e = {m: torch.zeros_like(p) for m, p in w.items()}
            e[n].view(-1)[i] = 1.0
            pushed = q.pushforward(w, elements, e)
            J.append(torch.cat([pushed[m].reshape(-1) for m in names]))
    J = torch.stack(J, 1)
    expected = J @ C0 @ J.T
    assert float((C1 - expected).norm() / expected.norm()) <= 1e-9
    plain = (lambda M: M @ M.T)(_draw_matrix(q, w, names))
    assert float((plain - C0).norm() / C0.norm()) > 0.1  # the relative ball draws another Gaussian


def test_relative_ball_errors():
    model, batches = attention_setup(seed=1, n_batches=1)
    with pytest.raises(ValueError, match="metric='mix'"):
        geodesic_sharpness(model, batches, F.cross_entropy, 0.05, quotient=attention_quotient(model, "inv"),
                           ball="relative", progress=False)
    with pytest.raises(ValueError, match="ball must be one of"):
        geodesic_sharpness(model, batches, F.cross_entropy, 0.05, quotient=attention_quotient(model, "mix"),
                           ball="sphere", progress=False)
    with torch.no_grad():  # head 0 of the VO block: H = 0, so G Hᵀ = 0
        model.layers[0].o.weight[:, :model.layers[0].head_dim] = 0
    with pytest.raises(ValueError, match="G Hᵀ is zero"):
        RelativeBlockBall(attention_quotient(model, "mix").groups[0], _params(model))


# --------------------------------------------------------------------------- transformer studies
def test_transformer_study_adds_mix_rel_on_resume_without_touching_stored_measures(tmp_path, monkeypatch):
    """A study measured without ``geodesic_mix_rel`` gains it (worst and average case, and its
    paired Δτ against adaptive) on a rerun that computes only the new units."""
    pytest.importorskip("sklearn")
    from test_transformer_study import tiny_config

    from quotientsharp.studies import transformer_run
    from quotientsharp.studies import transformers as study

    assert {"geodesic_mix_rel", "geodesic_mix_rel_avg"} <= set(study.default_measures())
    assert {("geodesic_mix_rel", "adaptive"), ("geodesic_mix_rel_avg", "adaptive_avg")} <= set(study.COMPARISONS)
    config = tiny_config()
    config["plan"]["measures"] = ["adaptive", "adaptive_avg", "geodesic_mix"]
    study.run_study(tmp_path, config, progress=False)
    stored = sorted(tmp_path.glob("measures/*/*.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in stored}
    calls = []
    real = study.measure_unit
    monkeypatch.setattr(transformer_run, "measure_unit", lambda name, *a: calls.append(name) or real(name, *a))
    config["plan"]["measures"] += ["geodesic_mix_rel", "geodesic_mix_rel_avg"]
    summary = study.run_study(tmp_path, config, progress=False)
    assert sorted(calls) == sorted(["geodesic_mix_rel", "geodesic_mix_rel_avg"] * 3)
    assert {p: p.stat().st_mtime_ns for p in stored} == mtimes
    unit = json.loads((tmp_path / "measures" / config["models"][0]["id"] / "geodesic_mix_rel.json").read_text())
    assert unit["result"]["details"]["config"]["ball"] == "relative"
    assert unit["result"]["details"]["config"]["metrics"] == ["mix"]
    for gap in ("error_gap", "loss_gap"):
        assert {"geodesic_mix_rel", "geodesic_mix_rel_avg"} <= set(summary["kendall_tau"][gap])
        assert {"geodesic_mix_rel - adaptive", "geodesic_mix_rel_avg - adaptive_avg"} <= set(summary["tau_difference"][gap])
    values = [row["values"] for row in summary["models"]]
    assert all(v["geodesic_mix_rel"] > 0 and v["geodesic_mix_rel"] != v["geodesic_mix"] for v in values)

"""The feasible set of the sharpness ascent (``quotientsharp.measures.feasible``, spec part 2
§3.2 and §5.1) against references written here: dense metric matrices, the closed forms of the
diagonal net (spec part 1 §4.4) and the spec's formulas for the relative mixed ball.

    P_S(xi) = restrict( Pi(xi) min(1, rho / ||Pi(xi)||) ),   d = Pi(M^{-1} g) / ||Pi(M^{-1} g)||,
    ||xi||^2_rel = sum_blocks (||xi_G H^T||^2 + ||G xi_H^T||^2) / ||G H^T||^2 + sum_rest ||xi / w||^2.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_sharpness_common import TinyAttentionClassifier, attention_quotient

from quotientsharp import DiagonalRescaling, Quotient
from quotientsharp import tangent as T
from quotientsharp.measures.feasible import (
    MAX_RELATIVE_PERTURBATION,
    HorizontalBall,
    RelativeBlockBall,
    _bilinear_norm_sq,
    _power_of_two_normalized,
    relative_ball_quotient,
    relative_perturbation,
    warn_large_perturbation,
)

DT = torch.float64


# --------------------------------------------------------------------------- dense helpers
def _flat(q, xi):
    return torch.cat([xi[n].reshape(-1).to(DT) for n in q.names])


def _unflat(q, w, x):
    out, i = {}, 0
    for n in q.names:
        k = w[n].numel()
        out[n] = x[i:i + k].reshape(w[n].shape).to(w[n].dtype)
        i += k
    return out


def _dense_projector(M, V):
    """The ``M``-orthogonal projector onto ``{x : Vᵀ M x = 0}`` (columns of ``V`` span the
    vertical space): ``I − V (Vᵀ M V)⁻¹ Vᵀ M``."""
    return torch.eye(M.shape[0], dtype=DT) - V @ torch.linalg.solve(V.T @ M @ V, V.T @ M)


def _close(a, b, rtol=1e-11, atol=0.0):
    for n in b:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol)


class _Float64Outputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the size of every float64 tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == DT:
                self.sizes.append(t.numel())
        return out


# --------------------------------------------------------------------------- diagonal net + rest
def _diag_case(metric, rest="adaptive", domain="restrict", seed=0, d=5):
    """``w = (u, v, c)``: a ``DiagonalRescaling`` on ``(u, v)`` and a rest metric on ``c``; the dense
    metric ``M`` (diagonal: spec part 1 §4.4, §4.5) and vertical basis ``(u e_i, −v e_i)``."""
    g = torch.Generator().manual_seed(seed)

    def away_from_zero(k):
        x = (0.3 + torch.rand(k, generator=g, dtype=DT)) * torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
        return x

    w = {"u": away_from_zero(d), "v": away_from_zero(d) * 2, "c": away_from_zero(3) * 3}
    q = Quotient([DiagonalRescaling("u", "v", metric, domain)], ("u", "v", "c"), rest=rest)
    u, v, c = w["u"], w["v"], w["c"]
    mu, mv = (1 / u ** 2, 1 / v ** 2) if metric == "inv" else (v ** 2, u ** 2)
    mc = 1 / c ** 2 if rest == "adaptive" else torch.ones_like(c)
    M = torch.diag(torch.cat([mu, mv, mc]))
    V = torch.cat([torch.diag(u), -torch.diag(v), torch.zeros(3, d, dtype=DT)])
    return q, w, M, V


def _rand(w, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in w.items()}


def _b_of(w, xi):
    """The ``b`` of a horizontal ``(u b, v b)``, read off both halves (they must agree)."""
    bu, bv = xi["u"] / w["u"], xi["v"] / w["v"]
    torch.testing.assert_close(bu, bv, rtol=1e-12, atol=1e-14)
    return bu


CASES = [("inv", "adaptive"), ("mix", "adaptive"), ("inv", "euclidean"), ("mix", "euclidean")]


@pytest.mark.parametrize("metric,rest", CASES)
def test_norm_is_the_dense_quadratic_form(metric, rest):
    q, w, M, _ = _diag_case(metric, rest)
    ball = HorizontalBall(q, {**w, "unused": torch.zeros(2)}, 0.3)
    assert set(ball.w0) == {"u", "v", "c"} and ball.rho == 0.3
    for seed in range(2):  # any tangent vector, horizontal or not
        x = _flat(q, xi := _rand(w, seed))
        assert ball.norm(xi) == pytest.approx(math.sqrt(float(x @ M @ x)), rel=1e-13)


@pytest.mark.parametrize("metric,rest", CASES)
@pytest.mark.parametrize("scale", [3.0, 0.01])  # outside the ball (shrunk onto the sphere) / inside (unchanged)
def test_project_is_the_dense_metric_projection_onto_the_ball(metric, rest, scale):
    q, w, M, V = _diag_case(metric, rest, domain="extend")
    rho = 0.4
    ball = HorizontalBall(q, w, rho)
    xi = _rand(w, 1, scale)
    before = {n: t.clone() for n, t in xi.items()}
    p = _dense_projector(M, V) @ _flat(q, xi)
    n = math.sqrt(float(p @ M @ p))
    assert (n > rho) == (scale > 1)
    expected = _unflat(q, w, p * min(1.0, rho / n))
    got = ball.project(xi)
    _close(got, expected)
    _b_of(w, got)  # horizontal
    if scale > 1:
        assert ball.norm(got) == pytest.approx(rho, rel=1e-13)  # on the sphere
    for k in xi:
        assert torch.equal(xi[k], before[k])  # the caller's vector is left as it was
    # the nearest feasible point in the metric: no random point of S is closer to xi
    x, y = _flat(q, xi), _flat(q, got)
    gen = torch.Generator().manual_seed(9)
    for _ in range(50):
        z = _dense_projector(M, V) @ torch.randn(x.numel(), generator=gen, dtype=DT)
        z = z * (rho * float(torch.rand((), generator=gen, dtype=DT)) / math.sqrt(float(z @ M @ z)))
        assert float((x - y) @ M @ (x - y)) <= float((x - z) @ M @ (x - z))


def test_project_of_the_mixed_diagonal_ball_clamps_b_at_minus_one_half():
    """``mixed_domain="restrict"``: after the norm projection ``b >= −1/2`` (spec part 2 §3.2);
    ``"extend"`` keeps ``b``. The clamped point stays in the ball."""
    for domain in ("restrict", "extend"):
        q, w, _, _ = _diag_case("mix", domain=domain)
        b = torch.tensor([-3.0, -0.2, 0.1, 0.7, -0.6], dtype=DT)
        xi = {"u": w["u"] * b, "v": w["v"] * b, "c": torch.full((3,), 0.01, dtype=DT)}
        rho = 50.0
        ball = HorizontalBall(q, w, rho)
        assert ball.norm(xi) < rho  # no rescaling: only the clamp acts
        got = ball.project(xi)
        expected_b = b.clamp_min(-0.5) if domain == "restrict" else b
        torch.testing.assert_close(_b_of(w, got), expected_b, rtol=1e-13, atol=0)
        torch.testing.assert_close(got["c"], xi["c"], rtol=0, atol=0)
        assert ball.norm(got) <= rho


@pytest.mark.parametrize("metric,rest", CASES)
def test_shrink_of_a_horizontal_vector_outside_the_ball(metric, rest):
    """``owned=False`` (default): a new vector on the sphere of radius rho, the caller's tensors
    unchanged; ``owned=True``: the same values, written into the caller's tensors (the ascent's
    temporaries are rescaled in place, no new model-sized tensor)."""
    q, w, M, V = _diag_case(metric, rest, domain="extend")
    rho = 0.25
    ball = HorizontalBall(q, w, rho)
    x = _dense_projector(M, V) @ _flat(q, _rand(w, 2))
    n = math.sqrt(float(x @ M @ x))
    assert n > rho
    expected = _unflat(q, w, x * (rho / n))
    xi = _unflat(q, w, x)
    before = {k: t.clone() for k, t in xi.items()}
    out = ball.shrink(xi)
    _close(out, expected)
    assert ball.norm(out) == pytest.approx(rho, rel=1e-13)
    for k in xi:
        assert torch.equal(xi[k], before[k])
    owned = ball.shrink(xi, owned=True)
    _close(owned, expected)
    for k in xi:
        torch.testing.assert_close(xi[k], expected[k], rtol=1e-11, atol=0)  # rescaled in place


def test_shrink_inside_the_ball_returns_the_vector_unchanged():
    q, w, M, V = _diag_case("inv")
    ball = HorizontalBall(q, w, 10.0)
    xi = _unflat(q, w, _dense_projector(M, V) @ _flat(q, _rand(w, 3, 0.1)))
    for owned in (False, True):
        out = ball.shrink(xi, owned=owned)
        for k in xi:
            assert torch.equal(out[k], xi[k])


# --------------------------------------------------------------------------- ascent direction
@pytest.mark.parametrize("metric,rest", CASES)
def test_ascent_direction_is_the_normalised_dense_riemannian_gradient(metric, rest):
    q, w, M, V = _diag_case(metric, rest)
    ball = HorizontalBall(q, w, 0.1)
    egrad = _rand(w, 4)
    before = {k: t.clone() for k, t in egrad.items()}
    r = _dense_projector(M, V) @ torch.linalg.solve(M, _flat(q, egrad))
    expected = _unflat(q, w, r / math.sqrt(float(r @ M @ r)))
    d = ball.ascent_direction(egrad, torch.Generator().manual_seed(0))
    _close(d, expected)
    assert ball.norm(d) == pytest.approx(1.0, rel=1e-13)
    _b_of(w, d)
    for k in egrad:
        assert torch.equal(egrad[k], before[k])


def test_ascent_direction_on_a_flat_metric_with_unit_gradient_is_the_gradient_itself():
    """Euclidean metric, ``||g|| = 1`` exactly: ``d = g`` (not a random direction), and the
    caller's gradient — which the flat metric's Riemannian gradient returns as is — is not
    rescaled in place."""
    q = Quotient([], ["a", "b"], rest="euclidean")
    w = {"a": torch.tensor([1.0, 2.0, 3.0], dtype=DT), "b": torch.tensor([4.0, 5.0], dtype=DT)}
    ball = HorizontalBall(q, w, 1.0)
    for egrad in ({"a": torch.tensor([0.0, 1.0, 0.0], dtype=DT), "b": torch.zeros(2, dtype=DT)},
                  {"a": torch.tensor([0.0, 3.0, 0.0], dtype=DT), "b": torch.tensor([0.0, 4.0], dtype=DT)}):
        before = {k: t.clone() for k, t in egrad.items()}
        d = ball.ascent_direction(egrad, torch.Generator().manual_seed(0))
        nrm = math.sqrt(sum(float((t ** 2).sum()) for t in before.values()))
        for k in egrad:
            assert torch.equal(egrad[k], before[k])
            torch.testing.assert_close(d[k], before[k] / nrm, rtol=1e-15, atol=0)


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_ascent_direction_of_a_zero_gradient_is_a_seeded_random_unit_direction(metric):
    """``Pi(g^{-1} egrad) = 0``: a random horizontal direction of metric norm 1, reproducible
    from the generator: ``Pi(M^{-1/2} zeta)`` normalised, ``zeta`` the generator's standard
    normal draw."""
    q, w, M, V = _diag_case(metric)
    ball = HorizontalBall(q, w, 0.1)
    zero = {n: torch.zeros_like(t) for n, t in w.items()}
    d = ball.ascent_direction(zero, torch.Generator().manual_seed(7))
    zeta = _flat(q, T.randn_like(w, torch.Generator().manual_seed(7)))
    r = _dense_projector(M, V) @ (M.diagonal().rsqrt() * zeta)
    _close(d, _unflat(q, w, r / math.sqrt(float(r @ M @ r))), rtol=1e-10, atol=1e-14)
    assert ball.norm(d) == pytest.approx(1.0, rel=1e-13)


def test_ascent_direction_is_none_for_a_non_finite_gradient():
    q, w, _, _ = _diag_case("inv")
    ball = HorizontalBall(q, w, 0.1)
    for bad in (float("nan"), float("inf")):
        egrad = _rand(w, 5)
        egrad["c"][1] = bad
        assert ball.ascent_direction(egrad, torch.Generator().manual_seed(0)) is None
    w32 = {n: t.float() for n, t in w.items()}
    egrad = {n: t.float() for n, t in _rand(w, 5).items()}
    egrad["u"][0] = float("nan")
    assert HorizontalBall(q, w32, 0.1).ascent_direction(egrad, torch.Generator().manual_seed(0)) is None


def test_ascent_direction_in_float32_without_overflow_stays_in_float32():
    """No overflow: ``d`` is computed in the weights' dtype, close to the float64 formula, and no
    float64 tensor is made (the float64 detour, a model-sized copy of the weights, is only for
    overflow)."""
    q, w, _, _ = _diag_case("mix", "adaptive", seed=3)
    w32 = {n: t.float() for n, t in w.items()}
    egrad = {n: t.float() for n, t in _rand(w, 6).items()}
    ball = HorizontalBall(q, w32, 0.1)
    with _Float64Outputs() as rec:
        d = ball.ascent_direction(egrad, torch.Generator().manual_seed(0))
    assert rec.sizes == []
    u, v, c = (w32[n].double() for n in ("u", "v", "c"))
    M32 = torch.diag(torch.cat([v ** 2, u ** 2, 1 / c ** 2]))
    V32 = torch.cat([torch.diag(u), -torch.diag(v), torch.zeros(3, 5, dtype=DT)])
    r = _dense_projector(M32, V32) @ torch.linalg.solve(M32, _flat(q, egrad))
    for k in d:
        assert d[k].dtype == torch.float32
    torch.testing.assert_close(_flat(q, d), r / torch.sqrt(r @ M32 @ r), rtol=1e-5, atol=1e-7)


def test_ascent_direction_when_float32_overflows_is_computed_in_float64():
    """Adaptive metric, float32 weights of ~1e14: ``egrad w²`` overflows float32 but ``d`` is
    finite; it is the float64 formula ``g w² / sqrt(Σ g² w²)`` rounded to float32."""
    g = torch.Generator().manual_seed(8)
    w = {"a": (1 + torch.rand(6, generator=g, dtype=DT)) * 1e14, "b": torch.tensor([2e13, -3e14], dtype=DT)}
    egrad = {"a": torch.randn(6, generator=g, dtype=DT) * 1e12, "b": torch.tensor([5e11, -1e12], dtype=DT)}
    w32 = {n: t.float() for n, t in w.items()}
    g32 = {n: t.float() for n, t in egrad.items()}
    q = Quotient([], ["a", "b"], rest="adaptive")
    assert not math.isfinite(float(q.norm(w32, q.riemannian_gradient(w32, g32))))  # it does overflow
    ball = HorizontalBall(q, w32, 0.1)
    d = ball.ascent_direction(g32, torch.Generator().manual_seed(0))
    gw, ww = _flat(q, g32), _flat(q, w32)  # the float32 values, in float64
    expected = gw * ww ** 2 / torch.sqrt((gw ** 2 * ww ** 2).sum())
    for k in d:
        assert d[k].dtype == torch.float32
    torch.testing.assert_close(_flat(q, d), expected, rtol=1e-6, atol=0)
    again = ball.ascent_direction(g32, torch.Generator().manual_seed(0))  # reuses the float64 copy
    torch.testing.assert_close(_flat(q, again), expected, rtol=1e-6, atol=0)


def test_ascent_direction_is_none_when_the_unit_direction_itself_overflows_float32():
    """Mixed diagonal metric, float32, subnormal ``v_0 = 1e-39``, ``egrad = e_{v_0}``: in float64
    ``b_0 = 1 / (2 u_0² v_0)``, ``||d||² = 2 (u_0 v_0 b_0)² + ...`` gives the unit direction
    ``d_u0 = 1 / (√2 v_0) ≈ 7e38 > 3.4e38``: not representable in float32, so there is none."""
    u = torch.tensor([1.0, 0.5], dtype=torch.float32)
    v = torch.tensor([1e-39, 2.0], dtype=torch.float32)
    q = Quotient([DiagonalRescaling("u", "v", "mix", "extend")], ("u", "v"))
    egrad = {"u": torch.zeros(2), "v": torch.tensor([1.0, 0.0])}
    w64 = {"u": u.double(), "v": v.double()}
    b0 = 1 / (2 * float(u[0]) ** 2 * float(v[0]))
    assert float(u[0]) * b0 / math.sqrt(2 * (float(u[0]) * float(v[0]) * b0) ** 2) > torch.finfo(torch.float32).max
    d64 = HorizontalBall(q, w64, 0.1).ascent_direction({n: t.double() for n, t in egrad.items()},
                                                       torch.Generator().manual_seed(0))
    assert float(d64["u"][0]) == pytest.approx(1 / (math.sqrt(2) * float(v[0])), rel=1e-12)  # float64: fine
    assert HorizontalBall(q, {"u": u, "v": v}, 0.1).ascent_direction(egrad, torch.Generator().manual_seed(0)) is None


def test_power_of_two_normalisation():
    """``g / 2^e`` with ``2^e`` the power of two just above ``max |g|``: ``max |result|`` in
    ``[1/2, 1)``, exact (multiplying back restores ``g`` bit for bit); 0 stays 0; None if not
    finite."""
    g = {"a": torch.tensor([3.0, -1e-3], dtype=DT), "b": torch.tensor([[-5.5]], dtype=DT), "e": torch.zeros(0, dtype=DT)}
    out = _power_of_two_normalized(g)
    assert max(float(t.abs().max()) for t in out.values() if t.numel()) == 5.5 / 8
    for k in g:
        assert torch.equal(out[k] * 8, g[k]) and out[k].shape == g[k].shape
    one = _power_of_two_normalized({"a": torch.tensor([1.0, -0.25])})
    assert torch.equal(one["a"], torch.tensor([0.5, -0.125]))  # 1 is not below 1: divided by 2
    small = _power_of_two_normalized({"a": torch.tensor([3e-20], dtype=DT)})
    assert 0.5 <= float(small["a"][0]) < 1
    zero = _power_of_two_normalized({"a": torch.zeros(3, dtype=DT), "b": torch.zeros(1, dtype=DT)})
    assert set(zero) == {"a", "b"} and not any(t.any() for t in zero.values())
    assert _power_of_two_normalized({"a": torch.tensor([1.0, float("inf")])}) is None
    assert _power_of_two_normalized({"a": torch.tensor([1.0]), "b": torch.tensor([float("nan")])}) is None


# --------------------------------------------------------------------------- zeros, Gaussian draws
def test_zeros_is_a_zero_of_the_weights_shape_dtype_and_device():
    w = {"u": torch.ones(4, dtype=DT), "v": torch.ones(4, dtype=DT), "m": torch.ones(2, 3, device="meta", dtype=DT)}
    q = Quotient([], ["u", "v", "m"], rest="euclidean")
    z = HorizontalBall(q, w, 0.1).zeros()
    assert list(z) == ["u", "v", "m"]
    for n, t in w.items():
        assert z[n].shape == t.shape and z[n].dtype == DT and z[n].device == t.device
    assert not z["u"].any() and not z["v"].any()


@pytest.mark.parametrize("metric,rest", CASES)
def test_gaussian_and_random_unit_are_whitened_projected_draws(metric, rest):
    """``gaussian = Pi(M^{-1/2} zeta)`` with ``zeta`` the generator's standard normal draw (M is
    diagonal here, so ``M^{-1/2}`` is the whitening of spec part 2 §3.4); ``random_unit`` is it
    divided by its metric norm."""
    q, w, M, V = _diag_case(metric, rest)
    ball = HorizontalBall(q, w, 0.1)
    zeta = _flat(q, T.randn_like(w, torch.Generator().manual_seed(11)))
    r = _dense_projector(M, V) @ (M.diagonal().rsqrt() * zeta)
    _close(ball.gaussian(torch.Generator().manual_seed(11)), _unflat(q, w, r))
    unit = ball.random_unit(torch.Generator().manual_seed(11))
    _close(unit, _unflat(q, w, r / math.sqrt(float(r @ M @ r))))
    assert ball.norm(unit) == pytest.approx(1.0, rel=1e-13)
    _b_of(w, unit)


# --------------------------------------------------------------------------- relative perturbation
def _attention_model(seed=0, d=4, n_heads=2):
    torch.manual_seed(seed)
    model = TinyAttentionClassifier(d=d, n_heads=n_heads).to(DT)
    return model, {n: p.detach() for n, p in model.named_parameters()}


def _heads(model, w):
    """``[(label, G, H), ...]`` of every head, written out by hand: QK head j has
    ``G = [W_q[j]ᵀ; b_q[j]]``, ``H = [W_k[j]ᵀ; b_k[j]]``; VO head j has ``G = [W_v[j]ᵀ; b_v[j]]``,
    ``H = W_o[:, j]``."""
    layer, p = model.layers[0], "layers.0."
    h = layer.head_dim

    def rows(name, j):
        return torch.cat([w[p + name + ".weight"][j * h:(j + 1) * h].T, w[p + name + ".bias"][None, j * h:(j + 1) * h]])

    out = []
    for j in range(layer.n_heads):
        out.append((f"L0.QK/head {j}", rows("q", j), rows("k", j)))
        out.append((f"L0.VO/head {j}", rows("v", j), w[p + "o.weight"][:, j * h:(j + 1) * h]))
    return out


GROUP_NAMES = tuple(f"layers.0.{s}" for s in ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias",
                                               "o.weight"))


def test_relative_perturbation_is_the_largest_block_ratio_over_the_groups():
    model, w = _attention_model(1)
    xi = _rand(w, 12, 0.3)
    expected = max(max(float(xG.norm() / G.norm()), float(xH.norm() / H.norm()))
                   for (_, G, H), (_, xG, xH) in zip(_heads(model, w), _heads(model, xi)))
    q = attention_quotient(model, "mix")
    assert relative_perturbation(q, w, xi) == pytest.approx(expected, rel=1e-13)
    # a group without a scale (diagonal rescaling) is skipped; no group with a scale: None
    wd = {**w, "u": torch.ones(3, dtype=DT), "v": torch.ones(3, dtype=DT)}
    xd = {**xi, "u": torch.full((3,), 100.0, dtype=DT), "v": torch.full((3,), 100.0, dtype=DT)}
    both = Quotient([DiagonalRescaling("u", "v", "inv"), *q.groups], (*q.names, "u", "v"))
    assert relative_perturbation(both, wd, xd) == pytest.approx(expected, rel=1e-13)
    only_diag = Quotient([DiagonalRescaling("u", "v", "inv")], ("u", "v"))
    assert relative_perturbation(only_diag, wd, xd) is None
    assert relative_perturbation(Quotient([], ("u",)), wd, xd) is None


def _warn_from_a_measure(rel):
    warn_large_perturbation(rel, "worst-case")  # stacklevel 2: the warning names this function's caller


def test_large_perturbation_warning_threshold_and_location():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_from_a_measure(0.7); line = __import__("inspect").currentframe().f_lineno  # noqa: E702
        _warn_from_a_measure(MAX_RELATIVE_PERTURBATION)  # not above the threshold
        _warn_from_a_measure(0.3)
        _warn_from_a_measure(None)
    assert len(caught) == 1
    assert "worst-case perturbation reaches 0.7 " in str(caught[0].message) and "smaller rho" in str(caught[0].message)
    # the caller of the function that called warn_large_perturbation (under mutmut, whose
    # trampoline adds two frames per mutated call, the same stacklevel lands in the trampoline)
    where = (caught[0].filename, caught[0].lineno)
    assert where == (__file__, line) or where[0].endswith("mutmut/mutation/trampoline.py")


# --------------------------------------------------------------------------- the relative mixed ball
def test_bilinear_norm_is_the_frobenius_norm_of_the_product_per_head():
    g = torch.Generator().manual_seed(13)
    for n, m, h in ((5, 3, 2), (2, 6, 4)):  # n < h: a wide G
        G = torch.randn(3, n, h, generator=g, dtype=DT)
        H = torch.randn(3, m, h, generator=g, dtype=DT)
        got = _bilinear_norm_sq(G, H)
        assert got.shape == (3,)
        torch.testing.assert_close(got, (G @ H.mT).pow(2).sum((-2, -1)), rtol=1e-12, atol=0)
    G32 = torch.randn(2, 4, 2, generator=g)
    assert _bilinear_norm_sq(G32, G32).dtype == DT


def _diag_relative(seed=0, d=5):
    g = torch.Generator().manual_seed(seed)
    u = (0.2 + torch.rand(d, generator=g, dtype=DT)) * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    v = (0.1 + torch.rand(d, generator=g, dtype=DT)) * 2
    w = {"u": u, "v": v, "c": torch.tensor([0.5, -2.0], dtype=DT)}
    base = Quotient([DiagonalRescaling("u", "v", "mix", "extend")], ("u", "v", "c"))
    return base, relative_ball_quotient(base, w), w


def test_relative_ball_on_a_diagonal_net_is_the_inverse_metric_in_closed_form():
    """Blocks of size 1 (``G = u_i``, ``H = v_i``, ``s_i = (u_i v_i)²``, some below 1):
    ``||xi||²_rel = Σ xi_u²/u² + xi_v²/v²``, so ``g_rel^{-1} egrad = (egrad_u u², egrad_v v²)``,
    ``whiten_rel(zeta) = (zeta_u |u|, zeta_v |v|)``, and the Riemannian gradient is its projection
    ``(u b, v b)``, ``b = (egrad_u u + egrad_v v) / 2`` (spec part 1 §4.4)."""
    base, q, w = _diag_relative()
    u, v = w["u"], w["v"]
    rb = q.groups[0]
    assert isinstance(rb, RelativeBlockBall) and rb.group is base.groups[0]
    assert float((u * v).abs().min()) < 1  # scales below 1 are valid
    torch.testing.assert_close(rb.scales[0], (u * v) ** 2, rtol=1e-15, atol=0)
    xi, egrad, zeta = _rand(w, 14), _rand(w, 15), _rand(w, 16)
    sub = {n: w[n] for n in ("u", "v")}
    expected_sq = float((xi["u"] ** 2 / u ** 2 + xi["v"] ** 2 / v ** 2).sum())
    assert float(rb.norm_sq(sub, xi)) == pytest.approx(expected_sq, rel=1e-13)
    assert float(rb.norm(sub, xi)) == pytest.approx(math.sqrt(expected_sq), rel=1e-13)
    small = {n: 1e-3 * t for n, t in xi.items()}  # a norm below 1
    assert float(rb.norm(sub, small)) == pytest.approx(1e-3 * math.sqrt(expected_sq), rel=1e-13)
    assert float(rb.inner(sub, xi, zeta)) == pytest.approx(
        float((xi["u"] * zeta["u"] / u ** 2 + xi["v"] * zeta["v"] / v ** 2).sum()), rel=1e-12)
    _close(rb.egrad_to_rgrad(sub, egrad), {"u": egrad["u"] * u ** 2, "v": egrad["v"] * v ** 2}, rtol=1e-13)
    b = 0.5 * (egrad["u"] * u + egrad["v"] * v)
    _close(rb.riemannian_gradient(sub, egrad), {"u": u * b, "v": v * b}, rtol=1e-12, atol=1e-15)
    _close(rb.whiten(sub, zeta), {"u": zeta["u"] * u.abs(), "v": zeta["v"] * v.abs()}, rtol=1e-13)
    # the quotient: the rest keeps its adaptive metric
    assert float(q.norm_sq(w, xi)) == pytest.approx(expected_sq + float((xi["c"] ** 2 / w["c"] ** 2).sum()), rel=1e-13)
    # the ball's ascent direction uses the relative metric
    ball = HorizontalBall(q, w, 0.1)
    d = ball.ascent_direction(egrad, torch.Generator().manual_seed(0))
    r = {"u": u * b, "v": v * b, "c": egrad["c"] * w["c"] ** 2}
    _close(d, T.scale(r, 1 / float(q.norm(w, r))), rtol=1e-12, atol=1e-15)


def test_relative_ball_delegates_the_mixed_geometry_and_nothing_else():
    base, q, w = _diag_relative()
    rb, group = q.groups[0], base.groups[0]
    assert rb.names == group.names and rb.metric == "mix" and rb.mixed_domain == "extend"
    xi = _rand(w, 17)
    sub = {n: w[n] for n in ("u", "v")}
    _close(rb.horizontal_projection(sub, xi), group.horizontal_projection(sub, xi), rtol=0)
    for name in ("with_metric", "no_such_attribute"):
        with pytest.raises(AttributeError, match=name):
            getattr(rb, name)
    assert "RelativeBlockBall(DiagonalRescaling(" in repr(rb)


def test_relative_ball_errors_name_the_block():
    _, _, w = _diag_relative()
    with pytest.raises(ValueError, match="needs symmetry groups"):
        relative_ball_quotient(Quotient([], ("u", "v", "c")), w)
    with pytest.raises(ValueError, match="metric='mix'"):
        RelativeBlockBall(DiagonalRescaling("u", "v", "inv"), w)
    for bad in (0.0, float("inf")):
        wb = {**w, "u": w["u"].clone()}
        wb["u"][2] = bad
        with pytest.raises(ValueError, match=r"zero or not finite: \['u\*v\[2\]'\]"):
            RelativeBlockBall(DiagonalRescaling("u", "v", "mix"), wb)
    model, wa = _attention_model(2)
    wa = {**wa, "layers.0.o.weight": wa["layers.0.o.weight"].clone()}
    wa["layers.0.o.weight"][:, 2:4] = 0  # VO head 1: H = 0
    with pytest.raises(ValueError, match=r"\['L0.VO/head 1'\]"):
        RelativeBlockBall(attention_quotient(model, "mix").groups[0], wa)


def _attention_relative_norm_sq(model, w, xi):
    total = torch.zeros((), dtype=DT)
    for (_, G, H), (_, xG, xH) in zip(_heads(model, w), _heads(model, xi)):
        total = total + ((xG @ H.T).pow(2).sum() + (G @ xH.T).pow(2).sum()) / (G @ H.T).pow(2).sum()
    for n in w:
        if n not in GROUP_NAMES:
            total = total + (xi[n] / w[n]).pow(2).sum()
    return total


def test_relative_ball_on_attention_against_dense_matrices():
    """Tiny attention layer (d = 4, 2 heads of dim 2): ``M_rel`` is the Hessian of the spec's
    ``½||xi||²_rel`` written by hand; ``g_rel^{-1} = M_rel^{-1}``, the Riemannian gradient is the
    ``M_rel``-orthogonal projection of it (vertical vectors from the Lie algebra), whitening has
    covariance ``M_rel^{-1}``, and the block scales are ``||G Hᵀ||²_F`` per head."""
    model, w = _attention_model(3)
    base = attention_quotient(model, "mix")
    q = relative_ball_quotient(base, w)
    rb = q.groups[0]
    assert sorted(float(s) for s in torch.cat(rb.scales)) == pytest.approx(
        sorted(float((G @ H.T).pow(2).sum()) for _, G, H in _heads(model, w)), rel=1e-12)

    def quad(x):
        return _attention_relative_norm_sq(model, w, _unflat(q, w, x))

    n_all = sum(t.numel() for t in w.values())
    M = torch.func.hessian(lambda x: 0.5 * quad(x))(torch.zeros(n_all, dtype=DT))
    xi = _rand(w, 18)
    assert float(q.norm_sq(w, xi)) == pytest.approx(float(_flat(q, xi) @ M @ _flat(q, xi)), rel=1e-12)
    egrad = _rand(w, 19)
    r_full = torch.linalg.solve(M, _flat(q, egrad))
    torch.testing.assert_close(_flat(q, q.egrad_to_rgrad(w, egrad)), r_full, rtol=1e-9, atol=1e-12)
    gen = torch.Generator().manual_seed(20)
    V = torch.stack([_flat(q, base.random_vertical(w, gen)) for _ in range(40)], 1)
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    V = U[:, S > 1e-10 * S[0]]
    assert V.shape[1] == 4 * 4  # h² per head, 4 heads
    P = _dense_projector(M, V)
    torch.testing.assert_close(_flat(q, q.riemannian_gradient(w, egrad)), P @ r_full, rtol=1e-9, atol=1e-12)
    W = torch.stack([_flat(q, q.whiten(w, _unflat(q, w, e))) for e in torch.eye(n_all, dtype=DT)], 1)
    torch.testing.assert_close(W @ W.T @ M, torch.eye(n_all, dtype=DT), rtol=0, atol=1e-9)
    ball = HorizontalBall(q, w, 0.05)
    d = ball.ascent_direction(egrad, torch.Generator().manual_seed(0))
    expected = P @ r_full
    torch.testing.assert_close(_flat(q, d), expected / torch.sqrt(expected @ M @ expected), rtol=1e-9, atol=1e-12)


def test_relative_ball_scales_float32_tangents_in_float32():
    """``scale_blocks(vec, p) = S^p vec`` (every block times ``s_block^p``, ``s = ||G Hᵀ||²_F``
    by hand). The scales are float64 (one number per block); a float32 tangent is scaled in
    float32: a float32 result close to the float64 one, and no float64 temporary larger than the
    scales themselves (a model-sized float64 copy would double the ascent's memory on an
    accelerator)."""
    model, w = _attention_model(4)
    _, qd, wd = _diag_relative()
    vec = _rand(w, 21)
    scale_by_name = {}  # per parameter: the block scale of every entry, by hand
    for (label, G, H), (_, xG, xH) in zip(_heads(model, w), _heads(model, vec)):
        scale_by_name[label] = float((G @ H.T).pow(2).sum())
    for q, w64, v64 in ((relative_ball_quotient(attention_quotient(model, "mix"), w), w, vec), (qd, wd, _rand(wd, 22))):
        w32 = {n: t.float() for n, t in w64.items()}
        rb32 = relative_ball_quotient(q.replace(groups=[g.group for g in q.groups]), w32).groups[0]
        v32 = {n: v64[n].float() for n in rb32.names}
        n_scales = sum(s.numel() for s in rb32.scales)
        for p in (1.0, 0.5, -0.5):
            with _Float64Outputs() as rec:
                out = rb32.scale_blocks(v32, p)
            assert max(rec.sizes, default=0) <= n_scales
            if q is qd:
                expected = {n: v64[n] * ((w64["u"] * w64["v"]) ** 2) ** p for n in ("u", "v")}
            else:  # each head's G and H rows times its own s^p
                scaled = {n: v64[n].clone() for n in rb32.names}
                h = model.layers[0].head_dim
                for j in range(model.layers[0].n_heads):
                    cqk, cvo = scale_by_name[f"L0.QK/head {j}"] ** p, scale_by_name[f"L0.VO/head {j}"] ** p
                    rows = slice(j * h, (j + 1) * h)
                    for nm, c in (("q", cqk), ("k", cqk), ("v", cvo)):
                        scaled[f"layers.0.{nm}.weight"][rows] *= c
                        scaled[f"layers.0.{nm}.bias"][rows] *= c
                    scaled["layers.0.o.weight"][:, rows] *= cvo
                expected = scaled
            for k in expected:
                assert out[k].dtype == torch.float32
                torch.testing.assert_close(out[k].double(), expected[k], rtol=1e-6, atol=0)


def test_ascent_direction_is_none_when_it_is_not_finite_even_in_float64():
    """A float32 weight that is infinite (a diverged model): ``egrad w²`` is not finite in either
    precision, so there is no direction (no error)."""
    w = {"a": torch.tensor([1.0, float("inf"), 2.0])}
    q = Quotient([], ["a"], rest="adaptive")
    egrad = {"a": torch.tensor([0.5, 0.25, -1.0])}
    assert HorizontalBall(q, w, 0.1).ascent_direction(egrad, torch.Generator().manual_seed(0)) is None

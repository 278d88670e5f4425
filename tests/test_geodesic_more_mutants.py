"""More behavioural tests of quotientsharp/geodesic.py aimed at surviving mutants (issue 18): the
relaxed Gram matrices of the GL domain check, the trajectory's memory budget, the autograd
linearization of a Christoffel form that ignores some of its inputs, the skipped pullback of a
zero cotangent, the defaults of the stacked GL form and the order names.

References are written out by hand: Gram matrices ``diag(a^2, 0) + eps I`` whose eigenvalues are
known exactly, so the relaxation ``eps = eps_rel tr(X^T X)/h + eps_abs`` of spec part 1 §4.3 is
placed just above or just below the singularity threshold ``SINGULAR_RTOL * lambda_max``; byte
counts of float64 states; derivatives of ``-v^2`` by hand; the GL forms of spec §6.2/§6.3.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_geodesic_mutants import _adaptive_christoffel, _gl_blocks, _gl_gamma_by_hand

from quotientsharp.geodesic import (
    GLBlockODE,
    autograd_linearization,
    geodesic_order,
    geodesic_trajectory,
    gl_stacked_christoffel,
    rk4_geodesic,
    rk4_trajectory,
)
from quotientsharp.groups.gl_math import SINGULAR_RTOL, SingularHeadError

DT = torch.float64


# ------------------------------------------------------------------ relaxed Gram matrices (spec §4.3)
def _singular_block(a: float) -> dict:
    """``X0 = [G; H]`` of one GL block, h = 2: ``G`` has one zero column (``G^T G = diag(a^2, 0)``),
    ``H`` is well conditioned."""
    G = torch.tensor([[[a, 0.0], [0.0, 0.0], [0.0, 0.0]]], dtype=DT)
    H = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]], dtype=DT)
    return {"X0": torch.cat([G, H])}


def _passes(eps_rel: float = 0.0, eps_abs: float = 0.0, a: float = 2.0) -> bool:
    ode = GLBlockODE("inv", [((1, 3, 2), (1, 3, 2))], eps_rel=eps_rel, eps_abs=eps_abs)
    try:
        ode.check(_singular_block(a))
    except SingularHeadError:
        return False
    return True


def test_an_absolute_relaxation_lifts_a_zero_gram_eigenvalue_to_eps():
    """``G^T G + eps I`` has eigenvalues ``(eps, a^2 + eps)``: accepted iff ``eps`` exceeds
    ``SINGULAR_RTOL (a^2 + eps)``; the relaxation is added (not subtracted) with ``eps_rel = 0``."""
    threshold = SINGULAR_RTOL * 4.0
    assert not _passes()
    assert _passes(eps_abs=2 * threshold) and not _passes(eps_abs=threshold / 2)


def test_a_relative_relaxation_is_eps_rel_times_the_mean_gram_eigenvalue():
    """``eps = eps_rel tr(G^T G) / h = eps_rel a^2 / 2`` with ``a = 2``: ``2 eps_rel``, on its own
    (``eps_abs = 0``), on either side of the threshold ``SINGULAR_RTOL * 4``."""
    threshold = SINGULAR_RTOL * 4.0
    assert _passes(eps_rel=threshold)            # eps = 2 threshold
    assert not _passes(eps_rel=threshold / 3)    # eps = 2/3 threshold
    assert _passes(eps_rel=threshold / 3, eps_abs=threshold)  # the two add up


# ------------------------------------------------------------------ memory budget of a trajectory
def test_the_memory_budget_counts_bytes_of_float64_states():
    """A state ``(w, v)`` of 2 float64 numbers each is 32 bytes: 8 steps keep their stage
    pullbacks (about 8 states per step) within 2048 bytes, every step state within 256, and every
    ``ceil(sqrt 8) = 3``-rd below that."""
    w, xi = {"a": torch.tensor([1.0, 2.0], dtype=DT)}, {"a": torch.tensor([0.3, -0.5], dtype=DT)}

    def run(budget):
        return geodesic_trajectory(_adaptive_christoffel, w, xi, n_steps=8, tol=None, memory_budget=budget)

    assert run(2048).stages is not None
    for budget in (2047, 256):  # every step state but the last (the end is kept apart)
        kept = run(budget)
        assert kept.stages is None and (kept.stride, len(kept.checkpoints)) == (1, 8)
    sparse = run(255)  # the states after steps 3 and 6
    assert (sparse.stride, len(sparse.checkpoints)) == (math.ceil(math.sqrt(8)), 3)
    for traj in (kept, sparse):  # the same exact adjoint either way
        want = run(2048).vjp({"a": torch.ones(2, dtype=DT)})
        got = traj.vjp({"a": torch.ones(2, dtype=DT)})
        for a, b in zip(got, want):
            torch.testing.assert_close(a["a"], b["a"], rtol=1e-13, atol=0)


# ------------------------------------------------------------------ autograd linearization
def test_linearization_of_a_constant_christoffel_pulls_back_zeros():
    """A Christoffel form with no graph (flat metric): the pullback is zero for ``w`` and ``v``."""
    w, v = {"a": torch.tensor([1.0, 2.0], dtype=DT)}, {"a": torch.tensor([0.5, -1.0], dtype=DT)}
    gam, pullback = autograd_linearization(lambda w_, v_: {n: torch.zeros_like(x) for n, x in w_.items()})(w, v)
    assert torch.equal(gam["a"], torch.zeros(2, dtype=DT))
    dw, dv = pullback({"a": torch.tensor([3.0, 4.0], dtype=DT)})
    assert torch.equal(dw["a"], torch.zeros(2, dtype=DT)) and torch.equal(dv["a"], torch.zeros(2, dtype=DT))


def test_linearization_of_a_christoffel_that_ignores_the_base_point():
    """``Gamma(w, v) = -v^2`` does not read ``w``: ``d/dw <c, Gamma> = 0`` (not an error), and
    ``d/dv <c, Gamma> = -2 v c``."""
    w, v = {"a": torch.tensor([1.0, 2.0], dtype=DT)}, {"a": torch.tensor([0.5, -1.0], dtype=DT)}
    c = {"a": torch.tensor([3.0, 4.0], dtype=DT)}
    gam, pullback = autograd_linearization(lambda w_, v_: {n: -x ** 2 for n, x in v_.items()})(w, v)
    dw, dv = pullback(c)
    assert torch.equal(gam["a"], -v["a"] ** 2)
    assert torch.equal(dw["a"], torch.zeros(2, dtype=DT))
    torch.testing.assert_close(dv["a"], -2 * v["a"] * c["a"], rtol=1e-15, atol=0)


def test_the_vjp_skips_the_pullback_of_a_zero_cotangent():
    """Without a velocity cotangent, the last stage of the last step gets a zero cotangent on
    ``Gamma``: its pullback is not called (4 n - 1 calls for n steps), and the VJP is exact."""
    base, calls = autograd_linearization(_adaptive_christoffel), []

    def linearize(w_, v_):
        gam, pb = base(w_, v_)
        return gam, lambda c: (calls.append(1), pb(c))[1]

    w, xi = {"a": torch.tensor([1.0, 2.0], dtype=DT)}, {"a": torch.tensor([0.3, -0.5], dtype=DT)}
    traj = geodesic_trajectory(_adaptive_christoffel, w, xi, n_steps=5, tol=None, linearize=linearize)
    assert traj.stages is not None
    dw, dxi = traj.vjp({"a": torch.ones(2, dtype=DT)})
    assert len(calls) == 4 * 5 - 1
    reference = geodesic_trajectory(_adaptive_christoffel, w, xi, n_steps=5, tol=None, memory_budget=0)
    torch.testing.assert_close(dxi["a"], reference.vjp({"a": torch.ones(2, dtype=DT)})[1]["a"], rtol=1e-13, atol=0)


# ------------------------------------------------------------------ stacked GL form, order names
@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_stacked_gl_christoffel_is_unrelaxed_by_default(metric):
    """``X = [G; H]`` with both factors of 5 rows: the default is the unrelaxed form (Eq. 11/12)."""
    G, _, xG, _, g = _gl_blocks(5)
    H, xH = torch.randn(G.shape, generator=g, dtype=DT), torch.randn(G.shape, generator=g, dtype=DT)
    gam, pullback = gl_stacked_christoffel(metric, torch.cat([G, H]), torch.cat([xG, xH]))
    assert pullback is None
    wG, wH = _gl_gamma_by_hand(metric, G, H, xG, xH)
    torch.testing.assert_close(gam, torch.cat([wG, wH]), rtol=1e-12, atol=1e-12)


def test_geodesic_order_names_every_accepted_spelling():
    with pytest.raises(ValueError, match=r"^geodesic order must be one of 1, 'first', 'retraction', 2, 'second', "
                                         r"'second_order', 'exact', 'ode'; got 3$"):
        geodesic_order(3)
    with pytest.raises(ValueError, match=r"^geodesic order must be one of .*; got \[1\]$"):
        geodesic_order([1])  # unhashable
    with pytest.raises(ValueError, match=r"^order must be one of"):
        geodesic_order(True, "order")  # a bool is not the order 1
    assert [geodesic_order(k) for k in ("retraction", "second_order", "ode")] == [1, 2, "ode"]


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_stacked_pullback_of_a_taller_cotangent_when_rows_equal_the_head_dimension(metric):
    """State blocks of ``r = h = 3`` rows and a cotangent of 5 rows (the state zero-padded there):
    the gradient of ``<c, Gamma>`` at the padded state, by autograd of the hand-written forms."""
    g = torch.Generator().manual_seed(6)
    G, H, xG, xH = (torch.randn(2, 3, 3, generator=g, dtype=DT) for _ in range(4))
    c = torch.randn(4, 5, 3, generator=g, dtype=DT)
    _, pullback = gl_stacked_christoffel(metric, torch.cat([G, H]), torch.cat([xG, xH]), record=True)
    pad = lambda X: torch.nn.functional.pad(X, (0, 0, 0, 2)).requires_grad_(True)  # noqa: E731
    leaves = [pad(G), pad(H), pad(xG), pad(xH)]
    oG, oH = _gl_gamma_by_hand(metric, *leaves)
    dG, dH, dxG, dxH = torch.autograd.grad((oG * c[:2]).sum() + (oH * c[2:]).sum(), leaves)
    got_X, got_xX = pullback(c)
    torch.testing.assert_close(got_X, torch.cat([dG, dH]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_xX, torch.cat([dxG, dxH]), rtol=1e-10, atol=1e-10)


def test_rk4_defaults_are_t1_and_64_steps():
    """``rk4_geodesic`` / ``rk4_trajectory`` without ``t`` and ``n_steps``: 64 steps over [0, 1]
    (the same numbers as asking for them), within RK4's error of ``w exp(xi / w)``."""
    w, xi = {"a": torch.tensor([1.0, 2.0], dtype=DT)}, {"a": torch.tensor([0.3, -0.5], dtype=DT)}
    steps = []
    end, _ = rk4_geodesic(_adaptive_christoffel, w, xi, on_step=steps.append)
    assert len(steps) == 64
    assert torch.equal(end["a"], rk4_geodesic(_adaptive_christoffel, w, xi, 1.0, 64)[0]["a"])
    torch.testing.assert_close(end["a"], w["a"] * torch.exp(xi["a"] / w["a"]), rtol=1e-10, atol=0)
    traj = rk4_trajectory(_adaptive_christoffel, w, xi)
    assert (traj.t, traj.n_steps) == (1.0, 64) and traj.end_velocity is not None  # velocity=True
    torch.testing.assert_close(traj.end["a"], end["a"], rtol=1e-15, atol=0)  # foreach vs plain rounding


# ------------------------------------------------------------------ the packed GL ODE
def _two_heads(singular: tuple[str, int, str] | None = None, dtype=DT) -> tuple[list, list]:
    """One stack of 2 GL blocks (h = 2, 3 rows: no QR basis) and a velocity; ``singular =
    (side, head, kind)`` breaks one factor: ``"rank1"`` (all ones: its Cholesky fails on the
    negative 2nd pivot -4.4e-16, ``info = 2``) or ``"nan"`` (a NaN first column: ``info = 1``)."""
    g = torch.Generator().manual_seed(8)
    G, H = torch.randn(2, 3, 2, generator=g, dtype=DT), torch.randn(2, 3, 2, generator=g, dtype=DT)
    if singular is not None:
        side, head, kind = singular
        X = G if side == "G" else H
        if kind == "rank1":
            X[head] = 1.0
        else:
            X[head, :, 0] = float("nan")
    xG, xH = 0.1 * torch.randn(2, 3, 2, generator=g, dtype=DT), 0.1 * torch.randn(2, 3, 2, generator=g, dtype=DT)
    return [(G.to(dtype), H.to(dtype))], [(xG.to(dtype), xH.to(dtype))]


def _ode(**kw) -> GLBlockODE:
    return GLBlockODE("inv", [((2, 3, 2), (2, 3, 2))], labels=lambda: [["L0/head 0", "L0/head 1"]], **kw)


SIDES = {"G": r"G \(W_Q / W_V side\)", "H": r"H \(W_K / W_O side\)"}


@pytest.mark.parametrize("side,head", [("H", 1), ("H", 0), ("G", 0), ("G", 1)])
def test_the_domain_check_names_the_side_and_the_head(side, head):
    """Two heads, one factor of rank 1: the message names its side and head (its label, or
    ``block <head>`` without labels)."""
    w, _, _ = _ode().compress(*_two_heads((side, head, "rank1")))
    with pytest.raises(SingularHeadError, match=rf"singular Gram matrix of {SIDES[side]} in L0/head {head}:"):
        _ode().check(w)
    with pytest.raises(SingularHeadError, match=rf"singular Gram matrix of {SIDES[side]} in block {head}:"):
        GLBlockODE("inv", [((2, 3, 2), (2, 3, 2))]).check(w)


def test_the_ode_integrates_its_own_relaxation():
    """``GLBlockODE(eps_rel, eps_abs).christoffel`` is the stacked form with those two
    relaxations (distinct values, so a swap shows), and differs from the unrelaxed form."""
    ode = _ode(eps_rel=0.3, eps_abs=0.2)
    w, v, _ = ode.compress(*_two_heads())
    got = ode.christoffel(w, v)["X0"]
    torch.testing.assert_close(got, gl_stacked_christoffel("inv", w["X0"], v["X0"], 0.3, 0.2)[0], rtol=0, atol=0)
    assert not torch.allclose(got, gl_stacked_christoffel("inv", w["X0"], v["X0"], 0.2, 0.3)[0])
    assert not torch.allclose(got, gl_stacked_christoffel("inv", w["X0"], v["X0"])[0])


@pytest.mark.parametrize("kind", ["rank1", "nan"])
@pytest.mark.parametrize("side,head", [("H", 1), ("H", 0), ("G", 0), ("G", 1)])
@pytest.mark.parametrize("evaluate", ["christoffel", "linearize"])
def test_a_gram_matrix_singular_at_a_stage_is_reported_by_finish(evaluate, side, head, kind):
    """Stages at a regular, a broken and a regular state record their Cholesky ``info``:
    ``finish`` raises naming the broken factor's side and head, even though the endpoint it is
    given is regular; a run with regular stages only passes."""
    good, v, _ = _ode().compress(*_two_heads())
    bad, _, _ = _ode().compress(*_two_heads((side, head, kind)))
    for ode, where in ((_ode(), f"L0/head {head}"), (GLBlockODE("inv", [((2, 3, 2), (2, 3, 2))]), f"block {head}")):
        ode.start()
        for state in (good, bad, good):
            getattr(ode, evaluate)(state, v)
        with pytest.raises(SingularHeadError, match=rf"singular Gram matrix of {SIDES[side]} in {where} on the way"):
            ode.finish(good)
        ode.start()
        getattr(ode, evaluate)(good, v)
        ode.finish(good)  # no failed stage, regular end: no error


def test_compress_packs_float32_blocks_in_float64():
    ode = _ode()
    w, v, bases = ode.compress(*_two_heads(dtype=torch.float32))
    assert w["X0"].dtype == torch.float64 and v["X0"].dtype == torch.float64 and bases == [[None, None]]
    w64, v64, _ = ode.compress(*_two_heads())
    torch.testing.assert_close(w["X0"], w64["X0"], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ compressed coordinates, end to end
# Stacks of GL blocks with more rows than 2h (a QR basis), exactly 2h, and fewer (zero-padded),
# G and H of different heights, two stacks of head dimension 2 and one of head dimension 3.
SHAPES = [((2, 7, 2), (2, 4, 2)), ((1, 3, 2), (1, 5, 2)), ((1, 3, 3), (1, 8, 3))]


def _raw(seed: int, scale: float = 1.0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [tuple(scale * torch.randn(s, generator=g, dtype=DT) for s in pair) for pair in SHAPES]


def _hand_christoffel(metric):
    """Eq. 11/12 on every raw block, independently of the packing."""
    def gamma(w, v):
        out = {}
        for s in range(len(SHAPES)):
            out[f"G{s}"], out[f"H{s}"] = _gl_gamma_by_hand(metric, w[f"G{s}"], w[f"H{s}"], v[f"G{s}"], v[f"H{s}"])
        return out
    return gamma


def _as_dict(stacks) -> dict:
    return {f"{side}{s}": X for s, pair in enumerate(stacks) for side, X in zip("GH", pair)}


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_compressed_gl_geodesic_and_its_vjp_are_the_raw_blocks(metric):
    """compress -> RK4 of the packed ODE -> expand, and the VJP through compress_cotangent /
    expand_cotangent, equal RK4 of the hand-written forms on the raw blocks and its autograd
    gradient (the compression is exact)."""
    w, xi, cot = _raw(10), _raw(11, 0.2), _raw(12)
    ode = GLBlockODE(metric, [(G.shape, H.shape) for G, H in w])
    wc, vc, bases = ode.compress(w, xi)
    assert [[b is not None for b in pair] for pair in bases] == [[True, False], [False, True], [False, True]]
    traj = geodesic_trajectory(ode.christoffel, wc, vc, 1.0, 16, None, linearize=ode.linearize, velocity=False)
    dtypes = [DT] * len(SHAPES)
    end = ode.expand(traj.end, bases, dtypes)
    cc, perps = ode.compress_cotangent(cot, bases)
    dw, dv = traj.vjp(cc)
    dws, dvs = ode.expand_cotangent(dw, bases, perps, dtypes), ode.expand_cotangent(dv, bases, perps, dtypes)

    leaves_w = {n: x.clone().requires_grad_(True) for n, x in _as_dict(w).items()}
    leaves_v = {n: x.clone().requires_grad_(True) for n, x in _as_dict(xi).items()}
    ref, _ = rk4_geodesic(_hand_christoffel(metric), leaves_w, leaves_v, 1.0, 16)
    c = _as_dict(cot)
    grads = torch.autograd.grad(sum((ref[n] * c[n]).sum() for n in ref), [*leaves_w.values(), *leaves_v.values()])
    ref_dw, ref_dv = dict(zip(leaves_w, grads[:len(leaves_w)])), dict(zip(leaves_v, grads[len(leaves_w):]))
    for got, want in ((end, ref), (dws, ref_dw), (dvs, ref_dv)):
        got = _as_dict(got)
        for n in want:
            assert got[n].shape == want[n].shape, n
            torch.testing.assert_close(got[n], want[n].detach(), rtol=1e-9, atol=1e-11)


def test_compressed_coordinates_return_blocks_in_their_own_dtypes():
    """float32 blocks are packed in float64 and come back in float32, points and cotangents."""
    w, xi, cot = ([tuple(x.float() for x in pair) for pair in _raw(s, a)] for s, a in ((10, 1.0), (11, 0.2), (12, 1.0)))
    ode = GLBlockODE("inv", [(G.shape, H.shape) for G, H in w])
    wc, vc, bases = ode.compress(w, xi)
    assert {x.dtype for x in (*wc.values(), *vc.values())} == {torch.float64}
    dtypes = [torch.float32] * len(SHAPES)
    cc, perps = ode.compress_cotangent(cot, bases)
    assert {x.dtype for x in cc.values()} == {torch.float64}
    for blocks in (ode.expand(wc, bases, dtypes), ode.expand_cotangent(cc, bases, perps, dtypes)):
        assert {x.dtype for pair in blocks for x in pair} == {torch.float32}
    back = _as_dict(ode.expand(wc, bases, dtypes))
    for n, x in _as_dict(w).items():
        torch.testing.assert_close(back[n], x, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the discrete adjoint of a trajectory
BUDGETS = [None, 2047, 0]  # stage pullbacks kept, every step state kept, every ceil(sqrt n)-th


@pytest.mark.parametrize("budget", BUDGETS)
def test_vjp_of_the_end_velocity_is_the_closed_forms(budget):
    """``gamma'(1) = xi exp(xi / w)`` for the adaptive metric: ``d/dxi = exp(xi/w) (1 + xi/w)``,
    ``d/dw = -(xi/w)^2 exp(xi/w)``, added to the endpoint's ``exp(xi/w) (1 - xi/w)`` and
    ``exp(xi/w)``; float32 cotangents give the float64 result of their values."""
    w, xi = torch.tensor([1.0, 2.0], dtype=DT), torch.tensor([0.3, -0.5], dtype=DT)
    def vjp(ce, cv):  # a fresh trajectory each time: kept stage pullbacks are used once
        traj = geodesic_trajectory(_adaptive_christoffel, {"a": w}, {"a": xi}, n_steps=8, tol=None,
                                   memory_budget=budget)
        return traj.vjp({"a": ce}, {"a": cv})

    ce, cv = torch.tensor([0.7, -1.3], dtype=DT), torch.tensor([-0.4, 0.9], dtype=DT)
    dw, dxi = vjp(ce, cv)
    e, r = torch.exp(xi / w), xi / w
    torch.testing.assert_close(dw["a"], ce * e * (1 - r) - cv * r ** 2 * e, rtol=1e-6, atol=0)
    torch.testing.assert_close(dxi["a"], ce * e + cv * e * (1 + r), rtol=1e-6, atol=0)
    ce32, cv32 = ce.float(), cv.float()
    got, want = vjp(ce32, cv32), vjp(ce32.double(), cv32.double())
    assert all(torch.equal(a["a"], b["a"]) and a["a"].dtype == DT for a, b in zip(got, want))


def test_vjp_refuses_a_velocity_cotangent_without_an_end_velocity():
    w, xi = {"a": torch.tensor([1.0, 2.0], dtype=DT)}, {"a": torch.tensor([0.3, -0.5], dtype=DT)}
    traj = geodesic_trajectory(_adaptive_christoffel, w, xi, n_steps=4, tol=None, velocity=False)
    with pytest.raises(ValueError, match="integrated without its end velocity"):
        traj.vjp({"a": torch.ones(2, dtype=DT)}, {"a": torch.ones(2, dtype=DT)})


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("velocity", [True, False])
def test_the_adjoint_linearizes_each_stage_once(budget, velocity):
    """``4 n`` stage linearizations for ``n`` steps, ``4 n - 1`` without the end velocity (the
    last stage only feeds it), whether kept during the integration or recomputed by the VJP;
    from sparse checkpoints (after steps 3 and 6 of 8) the VJP recomputes the 2 + 2 + 1 step
    states between them once (4 Gamma each)."""
    base, calls, gammas = autograd_linearization(_adaptive_christoffel), [], []

    def linearize(w_, v_):
        calls.append(1)
        return base(w_, v_)

    def christoffel(w_, v_):
        gammas.append(1)
        return _adaptive_christoffel(w_, v_)

    w, xi = {"a": torch.tensor([1.0, 2.0], dtype=DT)}, {"a": torch.tensor([0.3, -0.5], dtype=DT)}
    traj = geodesic_trajectory(christoffel, w, xi, n_steps=8, tol=None, memory_budget=budget,
                               linearize=linearize, velocity=velocity)
    gammas.clear()
    traj.vjp({"a": torch.ones(2, dtype=DT)})
    assert len(calls) == 4 * 8 - (0 if velocity else 1)
    assert len(gammas) == (4 * 5 if budget == 0 else 0)

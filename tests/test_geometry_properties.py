"""The generic geometry property suite (spec part 1 §8), run on every built-in group, every model
adapter and a user-defined group, in float64 with eps = 0."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from geometry_cases import DT, all_cases, attention_cases, diagonal_case, user_case

from quotientsharp import tangent as T
from quotientsharp.geodesic import rk4_geodesic
from quotientsharp.groups.base import SymmetryGroup, geodesic_error_slopes

BASE = all_cases(0)
EXTRA = [c for s in (1, 2) for c in attention_cases("inv", s)[:2] + attention_cases("mix", s)[:2]
         + [diagonal_case("inv", s), diagonal_case("mix", s), user_case(s)]]  # more seeds and shapes


def by(pred, seeds=True):
    """Parametrize over the cases satisfying ``pred``; ``seeds=False`` (expensive checks) keeps
    seed 0 only."""
    cases = BASE + (EXTRA if seeds else [])
    sel = [(c, f"{c.id}-{i}") for i, c in enumerate(cases) if pred(c)]
    return pytest.mark.parametrize("case", [c for c, _ in sel], ids=[i for _, i in sel])


CASES = BASE + EXTRA


def rel(a, b):
    """Relative distance of two tangent dicts (or tensors)."""
    if isinstance(a, dict):
        d = T.sub(a, b)
        return float(torch.sqrt(T.dot(d, d)) / (torch.sqrt(T.dot(b, b)) + 1e-300))
    return float((a - b).abs().max() / (b.abs().max() + 1e-300))


def rand_tangent(case, seed=0):
    return T.randn_like(case.w, torch.Generator().manual_seed(1000 + seed))


def random_vertical(case, seed=0):
    from torch.utils._pytree import tree_map
    gen = torch.Generator().manual_seed(2000 + seed)
    om = tree_map(lambda z: torch.randn(z.shape, generator=gen, dtype=z.dtype), case.group.algebra_zeros(case.w))
    return case.group.vertical(case.w, om)


def egrad(case, w=None):
    w = case.w if w is None else w
    p = {n: t.clone().requires_grad_(True) for n, t in w.items()}
    loss = case.loss_fn(p)
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


def rand_element(case, seed, max_cond=30.0):
    """A random group element; GL elements get condition number ``max_cond``. Exact identities
    lose about cond(A)^2 * cond(P) * 1e-16 to round-off, hence a moderate default."""
    kw = {"max_cond": max_cond} if "attention" in case.tags else {}
    return case.group.random_element(case.w, generator=torch.Generator().manual_seed(seed), **kw)


def has_vertical(c):
    return c.group.function_preserving


# ----------------------------------------------------------------------------- 1. action
@by(lambda c: c.group.function_preserving)
def test_action_preserves_outputs(case):
    g = rand_element(case, 7, max_cond=1e3)
    ok, why = case.group.check_function_invariance(case.model_fn, case.w, g, rtol=1e-10)
    assert ok, why


@by(lambda c: "attention" in c.tags)
def test_extract_insert_round_trip_is_bit_exact(case):
    back = case.group.insert({n: torch.zeros_like(t) for n, t in case.w.items()}, case.group.extract(case.w))
    for n in case.group.names:
        assert torch.equal(back[n], case.w[n]), n


@by(lambda c: "bias" in c.tags)
def test_action_without_biases_changes_outputs(case):
    g = rand_element(case, 3)
    moved = case.group.action(case.w, g)
    weights_only = {n: (moved[n] if n.endswith("weight") else case.w[n]) for n in case.w}
    assert rel(case.model_fn(weights_only), case.model_fn(case.w)) > 1e-3


def test_positive_rescaling_metric_is_invariant_under_relu_neuron_rescaling():
    case = [c for c in CASES if c.id == "positive-rescaling"][0]
    a = torch.exp(torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=DT))
    g = {"W1": a[:, None].expand(5, 4), "W2": (1 / a)[None, :].expand(2, 5)}
    moved = case.group.action(case.w, g)
    assert rel(case.model_fn(moved), case.model_fn(case.w)) < 1e-12  # a symmetry of the ReLU net
    ok, why = case.group.check_metric_invariance(case.w, g, rand_tangent(case, 0), rand_tangent(case, 1))
    assert ok, why


# ----------------------------------------------------------------------------- 2. vertical
@by(has_vertical)
def test_vertical_vectors_are_loss_null_directions(case):
    nu = random_vertical(case)
    gr = egrad(case)
    assert abs(float(T.dot(gr, nu))) <= 1e-10 * float(torch.sqrt(T.dot(gr, gr) * T.dot(nu, nu)))
    ts = np.logspace(-4, -2, 5)
    base = float(case.loss_fn(case.w))
    diffs = [abs(float(case.loss_fn(T.add(case.w, nu, t))) - base) for t in ts]
    if max(diffs) <= 1e-13 * abs(base):  # the orbit is the straight line itself (a scale group): flat
        return
    slope = np.polyfit(np.log(ts), np.log(diffs), 1)[0]
    assert 1.9 <= slope <= 2.1, slope


# ----------------------------------------------------------------------------- 3. projection
@by(lambda c: True)
def test_projection_is_idempotent_orthogonal_and_self_adjoint(case):
    G, w = case.group, case.w
    a, b = rand_tangent(case, 0), rand_tangent(case, 1)
    pa = G.horizontal_projection(w, a)
    ok, why = G.check_projection(w, a, tol=1e-10)
    assert ok, why
    assert rel(G.horizontal_projection(w, pa), pa) < 1e-10
    lhs, rhs = G.inner(w, pa, b), G.inner(w, a, G.horizontal_projection(w, b))
    assert abs(float(lhs - rhs)) <= 1e-10 * float(G.norm(w, a) * G.norm(w, b))
    if has_vertical(case):
        nu = random_vertical(case)
        pn = G.horizontal_projection(w, nu)
        assert float(torch.sqrt(T.dot(pn, pn))) <= 1e-10 * float(torch.sqrt(T.dot(nu, nu)))
        # a - Pi a is vertical: least-squares fit on the vertical basis leaves no residual
        V = G.vertical_basis(w)
        r = T.flatten(T.sub(a, pa), G.names)
        res = r - V @ torch.linalg.lstsq(V, r[:, None]).solution[:, 0]
        assert float(res.norm()) <= 1e-9 * float(r.norm())


@by(lambda c: "attention" in c.tags and c.group.metric == "inv" and c.oracle)
def test_printed_sylvester_equation_is_not_horizontal(case):
    """Regression guard: the paper's ``A Lam + Lam A^T = B`` does not give a horizontal vector."""
    from quotientsharp.groups import gl_math as M
    G_, w = case.group, case.w
    xi = rand_tangent(case)
    (G, H), = G_.extract(w)[:1]
    (xG, xH), = G_.extract(xi)[:1]
    f = M.gl_factors(G, H, "inv", 0.0, 0.0)
    lams = []
    for i in range(G.shape[0]):
        A = (f.P[i] @ f.Q[i]).numpy()
        B = (f.P[i] @ H[i].T @ xH[i] - xG[i].T @ G[i] @ f.Q[i]).numpy()
        lams.append(torch.from_numpy(scipy.linalg.solve_sylvester(A, A.T, B)))
    lam = torch.stack(lams)
    wrong = [(xG + G @ lam, xH - H @ lam.transpose(-1, -2))] + G_.extract(xi)[1:]
    vec = G_.insert({n: torch.zeros_like(t) for n, t in xi.items()}, wrong)
    assert float(G_.is_horizontal(w, vec)) >= 1e-3


# ----------------------------------------------------------------------------- 4. invariance
@by(lambda c: True)
def test_metric_invariance_and_equivariance(case):
    G, w = case.group, case.w
    g = rand_element(case, 11)
    wg = {**case.params, **G.action(w, g)}
    a, b = rand_tangent(case, 0), rand_tangent(case, 1)
    ok, why = G.check_metric_invariance(w, g, a, b, tol=1e-9)
    assert ok, why
    push = lambda v: G.pushforward(w, g, v)  # noqa: E731
    assert rel(G.horizontal_projection(wg, push(a)), push(G.horizontal_projection(w, a))) < 1e-9
    assert rel(G.christoffel(wg, push(a)), push(G.christoffel(w, a))) < 1e-9
    if case.group.function_preserving:  # the gradient of an invariant loss transforms as a covector
        r0 = G.egrad_to_rgrad(w, egrad(case))
        r1 = G.egrad_to_rgrad(wg, egrad(case, {n: wg[n] for n in G.names}))
        assert rel(r1, push(r0)) < 1e-9


@by(lambda c: c.group.function_preserving)
def test_second_order_endpoint_is_equivariant(case):
    G, w = case.group, case.w
    g = rand_element(case, 5)
    xi = G.horizontal_projection(w, rand_tangent(case))
    xi = T.scale(xi, 0.1 / G.norm(w, xi))
    wg = G.action(w, g)
    end = G.geodesic(w, xi, order=2)
    end_g = G.geodesic(wg, G.pushforward(w, g, xi), order=2)
    assert rel(end_g, G.action(end, g)) < 1e-9
    assert rel(case.model_fn(end_g), case.model_fn(end)) < 1e-9


# ----------------------------------------------------------------------------- 5. gradient
@by(lambda c: True)
def test_riemannian_gradient(case):
    G, w = case.group, case.w
    gr = egrad(case)
    r = G.egrad_to_rgrad(w, gr)
    z = rand_tangent(case, 3)
    assert abs(float(G.inner(w, r, z) - T.dot(gr, z))) <= 1e-10 * float(G.norm(w, r) * G.norm(w, z))
    if has_vertical(case):
        assert float(G.is_horizontal(w, r)) <= 1e-10
    for s in range(5):  # steepest ascent: DL[z] <= ||grad|| ||z|| (Cauchy-Schwarz)
        z = rand_tangent(case, 10 + s)
        assert float(T.dot(gr, z)) <= float(G.norm(w, r) * G.norm(w, z)) * (1 + 1e-12)


# ----------------------------------------------------------------------------- 6. closed forms
@by(lambda c: c.oracle and type(c.group).horizontal_projection is not SymmetryGroup.horizontal_projection,
    seeds=False)
def test_closed_forms_match_generic_defaults(case):
    G, w = case.group, case.w
    a = rand_tangent(case)
    assert rel(G.horizontal_projection(w, a), SymmetryGroup.horizontal_projection(G, w, a)) < 1e-9
    assert rel(G.egrad_to_rgrad(w, a), SymmetryGroup.egrad_to_rgrad(G, w, a)) < 1e-9
    assert rel(G.christoffel(w, a), SymmetryGroup.christoffel(G, w, a)) < 1e-9
    # whitening: whiten is linear with covariance L L^T = M^{-1}
    D = sum(t.numel() for t in w.values())
    cols = [T.flatten(G.whiten(w, T.unflatten(e, w)), G.names) for e in torch.eye(D, dtype=DT)]
    L = torch.stack(cols, 1)
    Minv = torch.linalg.inv(G.metric_matrix(w))
    assert rel(L @ L.T, Minv) < 1e-9


def test_generic_christoffel_matches_finite_difference_symbols():
    """``Gamma^l_{ij} xi^i xi^j`` with metric derivatives by central differences."""
    from quotientsharp import AttentionGL, GLBlock, Piece
    g = torch.Generator().manual_seed(0)
    w = {"G": torch.randn(4, 2, generator=g, dtype=DT), "H": torch.randn(3, 2, generator=g, dtype=DT)}
    for metric in ("inv", "mix"):
        grp = AttentionGL([GLBlock((Piece("G", "cols"),), (Piece("H", "cols"),), 1, 2)], metric, eps_rel=0)
        xi = T.randn_like(w, g)
        x0, D, h = T.flatten(w), 14, 1e-5
        dM = []
        for k in range(D):
            e = torch.zeros(D, dtype=DT)
            e[k] = h
            dM.append((grp.metric_matrix(T.unflatten(x0 + e, w)) - grp.metric_matrix(T.unflatten(x0 - e, w))) / (2 * h))
        dM = torch.stack(dM)  # dM[l, i, j] = d_l M_ij
        v = T.flatten(xi)
        term = torch.einsum("lij,l,j->i", dM, v, v) - 0.5 * torch.einsum("ijl,j,l->i", dM, v, v)
        gamma_fd = torch.linalg.solve(grp.metric_matrix(w), term)
        closed = T.flatten(grp.christoffel(w, xi))
        assert rel(closed, gamma_fd) < 1e-6
        assert rel(T.flatten(SymmetryGroup.christoffel(grp, w, xi)), gamma_fd) < 1e-6


# ----------------------------------------------------------------------------- 7-9. geodesics
def unit_horizontal(case, seed=0, relative=0.5):
    """A horizontal vector of metric norm ``relative``; on attention blocks it is instead rescaled
    (a geodesic reparametrisation) to ``||xi||_F = relative * ||w||_F``, because the mixed metric
    scales like ``|w|^4`` and small-weight models (HF init std 0.02) would otherwise get huge
    steps."""
    xi = case.group.horizontal_projection(case.w, rand_tangent(case, seed))
    if "attention" in case.tags:
        return T.scale(xi, relative * torch.sqrt(T.dot(case.w, case.w) / T.dot(xi, xi)))
    return T.scale(xi, relative / case.group.norm(case.w, xi))


@by(lambda c: not isinstance(c.group, __import__("quotientsharp").Euclidean), seeds=False)
def test_geodesic_orders(case):
    xi = unit_horizontal(case)
    slopes = geodesic_error_slopes(case.group, case.w, xi, orders=(1, 2))
    assert 2.8 <= slopes[2] <= 3.2, slopes
    assert 1.8 <= slopes[1] <= 2.2, slopes
    a = case.group.geodesic_ode(case.w, xi, t=0.2, n_steps=128, tol=None)
    b = case.group.geodesic_ode(case.w, xi, t=0.2, n_steps=256, tol=None)
    assert rel(a, b) < 1e-12 * max(1.0, float(torch.sqrt(T.dot(case.w, case.w))))


@by(lambda c: has_vertical(c) and c.oracle, seeds=False)
def test_horizontal_geodesics_stay_horizontal_with_constant_speed(case):
    G = case.group
    xi = unit_horizontal(case, relative=0.2)
    speed0 = float(G.norm_sq(case.w, xi))
    for t in (0.1, 0.2):
        wt, vt = rk4_geodesic(G.christoffel, case.w, xi, t=t, n_steps=64)
        assert float(G.is_horizontal(wt, vt)) <= 1e-12
        assert abs(float(G.norm_sq(wt, vt)) - speed0) <= 1e-10 * speed0


@by(lambda c: c.exact_geodesic)
def test_closed_form_geodesics_match_rk4(case):
    G = case.group
    xi = unit_horizontal(case, relative=0.1)
    if hasattr(G, "to_b"):
        assert float((1 + 2 * G.to_b(case.w, xi)).min()) > 0.2
    exact = G.geodesic_exact(case.w, xi)
    ode = G.geodesic_ode(case.w, xi, n_steps=256, tol=None)
    assert rel(exact, ode) < 1e-12


# ----------------------------------------------------------------------------- relaxation
def test_relaxation_breaks_invariance_only_at_order_eps():
    case = attention_cases("inv", 0)[0]
    errs = []
    for eps_rel in (1e-2, 1e-4, 1e-6):
        G = case.group.with_metric("inv", eps_rel=eps_rel)
        g = G.random_element(case.w, generator=torch.Generator().manual_seed(1), max_cond=10.0)
        a = rand_tangent(case)
        errs.append(abs(float(G.inner(case.w, a, a) - G.inner(G.action(case.w, g), G.pushforward(case.w, g, a),
                                                          G.pushforward(case.w, g, a)))))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-3 * errs[0]

"""Behavioural tests of the simple groups (``PositiveRescaling``, ``Euclidean``, ``DiagonalRescaling``,
``HeadScaling``) that close the gaps a mutation run found (issue 18, item 1).

Ground truths: the formulas of spec part 1 §4.4-§4.5 and part 6 §4 written out by hand (head slices
cut out of the tensors by explicit indexing, not by the group's ``extract``), the generic defaults of
:class:`SymmetryGroup` (``M^{-1}`` by dense solve, the Christoffel term by autodiff of ``inner``
alone, RK4 on the spec's Christoffel formulas written out by hand) and errors that bad input must
raise. All in float64.
"""
from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from tensor_checks import assert_close_tree, gen, randn

from quotientsharp import DiagonalRescaling, Euclidean, PositiveRescaling, SymmetryGroup
from quotientsharp import tangent as T
from quotientsharp.geodesic import integrate_geodesic
from quotientsharp.groups.attention import Piece
from quotientsharp.groups.diagonal import DiagonalRescalingInv, DiagonalRescalingMix
from quotientsharp.groups.scaling import HeadScaling, ScaleBlock

DT = torch.float64


def close(a, b, rtol=1e-12, atol=1e-14):
    assert_close_tree(a, b, rtol, atol)


def generic_christoffel(group, w, xi):
    """``Gamma(xi, xi)`` by autodiff of ``group.inner`` alone (the base-class default)."""
    return SymmetryGroup.christoffel(group, w, xi)


def spec_gamma_adaptive(w, xi):
    """Spec part 1 §6.4: ``-xi^2 / w`` (for ``w`` without zeros); cheap enough for RK4 oracles."""
    return {n: -xi[n] ** 2 / w[n] for n in xi}


def spec_gamma_diag(metric):
    """Spec part 1 §6.4: inverse ``(-xi_u^2/u, -xi_v^2/v)``; mixed
    ``(2 xi_u xi_v/v - u xi_v^2/v^2, 2 xi_u xi_v/u - v xi_u^2/u^2)``."""
    def gam(w, xi):
        u, v, xu, xv = w["u"], w["v"], xi["u"], xi["v"]
        if metric == "inv":
            return {"u": -xu ** 2 / u, "v": -xv ** 2 / v}
        return {"u": 2 * xu * xv / v - u * xv ** 2 / v ** 2, "v": 2 * xu * xv / u - v * xu ** 2 / u ** 2}
    return gam


def spec_gamma_heads(w, xi):
    """Spec part 6 §4, per head slice (cut by hand): ``(|xi|^2 W - 2 <W, xi> xi) / ||W||^2``."""
    return from_slices([((x * x).sum() * W - 2 * (W * x).sum() * x) / W.pow(2).sum()
                        for W, x in zip(head_slices(w), head_slices(xi))], w)


# ============================================================================ PositiveRescaling / Euclidean
def adaptive_point(seed=0):
    """Two tensors, one with exact zeros (masked coordinates)."""
    a = randn(3, 4, seed=seed)
    a[0, 1] = 0.0
    a[2, 3] = 0.0
    return {"a": a, "b": randn(5, seed=seed + 1) + 0.1}


def masked_reference_inner(w, xi, zeta):
    """``sum xi zeta / w^2`` with ``0/0 := 0`` where ``w = 0`` (spec §4.5)."""
    return sum(torch.where(w[n] != 0, xi[n] * zeta[n] / torch.where(w[n] != 0, w[n], 1.0) ** 2, 0.0).sum()
               for n in w)


def test_adaptive_metric_is_the_masked_formula_and_invariant_under_positive_rescaling():
    grp = PositiveRescaling(["a", "b"])
    w = adaptive_point()
    xi, zeta = T.randn_like(w, gen(2)), T.randn_like(w, gen(3))
    close(grp.inner(w, xi, zeta), masked_reference_inner(w, xi, zeta))
    # only the masked entries of xi would make the unmasked formula blow up: they are ignored
    assert torch.isfinite(grp.inner(w, xi, zeta))
    # no zero anywhere: the plain formula
    w1 = {"a": w["a"] + (w["a"] == 0) * 0.5, "b": w["b"]}
    close(grp.inner(w1, xi, zeta), sum((xi[n] * zeta[n] / w1[n] ** 2).sum() for n in w1))
    # invariance: g_{a w}(a xi, a zeta) = g_w(xi, zeta), action and pushforward are elementwise products
    g = grp.random_element(w, scale=0.7, generator=gen(4))
    assert all(bool((g[n] > 0).all()) for n in grp.names)
    close(grp.action(w, g), {n: w[n] * g[n] for n in grp.names})
    close(grp.pushforward(w, g, xi), {n: xi[n] * g[n] for n in grp.names})
    close(grp.inner(grp.action(w, g), grp.pushforward(w, g, xi), grp.pushforward(w, g, zeta)),
          grp.inner(w, xi, zeta))
    # masked_count / kernel_dimension: the number of zero weights (spec: report them)
    assert grp.masked_count(w) == 2 == grp.kernel_dimension(w)
    assert grp.masked_count(w1) == 0 == grp.kernel_dimension(w1)


def test_adaptive_metric_masks_zeros_in_every_chunk_of_a_large_tensor():
    """A tensor over ``T.CHUNK`` elements is summed chunk by chunk: a zero weight in the second
    chunk must be masked there too (else ``xi^2 / tiny`` overflows)."""
    n = T.CHUNK + 8
    w = {"big": torch.linspace(0.5, 1.5, n, dtype=DT)}
    w["big"][3] = 0.0
    w["big"][T.CHUNK + 5] = 0.0
    xi = {"big": torch.full((n,), 0.25, dtype=DT)}
    zeta = {"big": torch.full((n,), -2.0, dtype=DT)}
    grp = PositiveRescaling(["big"])
    close(grp.inner(w, xi, zeta), masked_reference_inner(w, xi, zeta), rtol=1e-10)
    assert grp.masked_count(w) == 2
    # a tensor of exactly CHUNK elements is a single chunk (index 0)
    w2 = {"big": w["big"][:T.CHUNK].clone()}
    w2["big"][T.CHUNK - 1] = 0.0
    x2, z2 = {"big": xi["big"][:T.CHUNK]}, {"big": zeta["big"][:T.CHUNK]}
    close(grp.inner(w2, x2, z2), masked_reference_inner(w2, x2, z2), rtol=1e-10)


def test_adaptive_projection_and_riemannian_gradient_zero_the_masked_entries():
    grp = PositiveRescaling(["a", "b"])
    w = adaptive_point()
    xi = T.randn_like(w, gen(5))
    mask = {n: (w[n] != 0).to(DT) for n in w}
    p = grp.horizontal_projection(w, xi)
    close(p, {n: xi[n] * mask[n] for n in w}, rtol=0, atol=0)
    assert p["a"].shape == (3, 4)
    # a tensor already zero at its masked entries (and a tensor without zeros) comes back as is
    p2 = grp.horizontal_projection(w, p)
    assert p2["a"] is p["a"] and p2["b"] is p["b"]
    # the input is not modified
    assert bool((xi["a"][w["a"] == 0] != 0).all())
    # Riemannian gradient: egrad * w^2, defined by g(rgrad, z) = <egrad, z> on unmasked coordinates
    egrad = T.randn_like(w, gen(6))
    r = grp.egrad_to_rgrad(w, egrad)
    close(r, {n: egrad[n] * w[n] ** 2 for n in w})
    z = T.randn_like(w, gen(7))
    close(grp.inner(w, r, z), sum((egrad[n] * z[n] * mask[n]).sum() for n in w))
    egrad_copy = {n: t.clone() for n, t in egrad.items()}
    rg = grp.riemannian_gradient(w, egrad)
    close(rg, {n: egrad[n] * w[n] ** 2 * mask[n] for n in w})
    assert bool((rg["a"][w["a"] == 0] == 0).all())
    close(egrad, egrad_copy, rtol=0, atol=0)
    # a non-contiguous gradient (a transposed view) is handled and not modified
    eg_t = {"a": randn(4, 3, seed=8).T, "b": egrad["b"]}
    keep = eg_t["a"].clone()
    rg_t = grp.riemannian_gradient(w, eg_t)
    close(rg_t["a"], keep * w["a"] ** 2 * mask["a"])
    close(eg_t["a"], keep, rtol=0, atol=0)


def test_adaptive_christoffel_geodesic_and_whiten_against_independent_references():
    grp = PositiveRescaling(["a", "b"])
    w = adaptive_point()
    xi = grp.horizontal_projection(w, T.scale(T.randn_like(w, gen(9)), 0.3))
    nz = {n: torch.where(w[n] != 0, w[n], 1.0) for n in w}
    # Gamma(xi, xi) = -xi^2 / w (0 at masked entries), and equal to autodiff of the metric where w != 0
    gam = grp.christoffel(w, xi)
    close(gam, {n: torch.where(w[n] != 0, -xi[n] ** 2 / nz[n], 0.0) for n in w})
    w1 = {"a": w["a"] + (w["a"] == 0) * 0.5, "b": w["b"]}
    xi1 = T.randn_like(w, gen(10))
    close(grp.christoffel(w1, xi1), generic_christoffel(grp, w1, xi1), rtol=1e-10)
    # a masked coordinate with a nonzero velocity still has Gamma = 0 (no division by 0)
    xin = T.randn_like(w, gen(11))
    gn = grp.christoffel(w, xin)
    assert bool((gn["a"][w["a"] == 0] == 0).all())
    # geodesic: w exp(t xi / w), and w at masked entries; RK4 on the spec's Christoffel term agrees
    for t in (1.0, 0.5, -0.7):
        close(grp.geodesic_exact(w, xi, t), {n: w[n] * torch.exp(t * xi[n] / nz[n]) for n in w})
        ode = integrate_geodesic(spec_gamma_adaptive, w1, xi1, t, n_steps=128, tol=None)
        close(grp.geodesic_exact(w1, xi1, t), ode, rtol=1e-7, atol=1e-9)
    close(grp.geodesic_exact(w, xi), {n: w[n] * torch.exp(xi[n] / nz[n]) for n in w})
    # whiten: zeta |w|, covariance g^{-1} = diag(w^2), so its metric norm is |zeta| on unmasked coords
    zeta = T.randn_like(w, gen(12))
    close(grp.whiten(w, zeta), {n: zeta[n] * w[n].abs() for n in w})
    close(grp.norm_sq(w1, grp.whiten(w1, zeta)), sum((zeta[n] ** 2).sum() for n in w))


def test_trivial_groups_algebra_vertical_and_is_horizontal():
    for grp in (PositiveRescaling(["b"]), Euclidean(["b"])):  # a single name: names[0] is the only one
        w = {"b": randn(5, seed=1)}
        z = grp.algebra_zeros(w)
        assert z.shape == (0,) and z.dtype == DT and z.device == w["b"].device
        z32 = grp.algebra_zeros({"b": w["b"].float()})
        assert z32.dtype == torch.float32
        assert grp.algebra_basis(w) == []
        v = grp.vertical(w, z)
        close(v, {"b": torch.zeros(5, dtype=DT)}, rtol=0, atol=0)
        h = grp.is_horizontal(w, {"b": randn(5, seed=2)})
        assert h.dtype == DT and h.shape == () and float(h) == 0.0
        # the generic is_horizontal (no algebra element) gives the same float64 zero
        assert SymmetryGroup.is_horizontal(grp, w, {"b": randn(5, seed=2)}).dtype == h.dtype


def test_euclidean_group_is_translation_with_the_flat_metric():
    grp = Euclidean(["a", "b"])
    w = adaptive_point()
    xi, zeta, c = T.randn_like(w, gen(1)), T.randn_like(w, gen(2)), T.randn_like(w, gen(3))
    close(grp.action(w, c), {n: w[n] + c[n] for n in w}, rtol=0, atol=0)
    close(grp.pushforward(w, c, xi), xi, rtol=0, atol=0)
    close(grp.inner(w, xi, zeta), sum((xi[n] * zeta[n]).sum() for n in w))
    close(grp.horizontal_projection(w, xi), xi, rtol=0, atol=0)
    close(grp.egrad_to_rgrad(w, xi), xi, rtol=0, atol=0)
    close(grp.christoffel(w, xi), generic_christoffel(grp, w, xi), rtol=0, atol=1e-15)
    close(grp.geodesic_exact(w, xi, 0.3), {n: w[n] + 0.3 * xi[n] for n in w})
    close(grp.geodesic_exact(w, xi), {n: w[n] + xi[n] for n in w})
    close(grp.whiten(w, zeta), zeta, rtol=0, atol=0)
    assert grp.kernel_dimension(w) == 0 == grp.masked_count(w)


@pytest.mark.parametrize("cls", [PositiveRescaling, Euclidean])
def test_trivial_random_element_is_reproducible_and_has_the_documented_spread(cls):
    """Euclidean: translations ``scale * z``; PositiveRescaling: ``exp(scale * z)``; ``z`` standard
    normal float64 draws from the generator; dtype follows ``w``; default ``scale = 1``."""
    grp = cls(["a", "b"])
    w = {"a": torch.zeros(200, 100, dtype=DT), "b": torch.zeros(3, dtype=torch.float32)}
    log = (lambda x: x.log()) if cls is PositiveRescaling else (lambda x: x)
    g1 = grp.random_element(w, 0.3, generator=gen(5))
    g2 = grp.random_element(w, 0.3, generator=gen(5))
    close(g1, g2, rtol=0, atol=0)
    assert g1["a"].dtype == DT and g1["b"].dtype == torch.float32 and g1["a"].shape == (200, 100)
    z = torch.randn(200, 100, generator=gen(5), dtype=DT)
    close(log(g1["a"]), 0.3 * z, rtol=1e-13, atol=1e-15)
    gd = grp.random_element(w, generator=gen(5))
    close(log(gd["a"]), z, rtol=1e-13, atol=1e-15)
    s = log(grp.random_element(w)["a"])  # default generator: standard normal spread
    assert abs(float(s.std()) - 1.0) < 0.03 and abs(float(s.mean())) < 0.03
    assert not torch.equal(s, log(grp.random_element(w)["a"]))
    # the draw does not depend on torch's default device (it is made where the generator lives)
    with torch.device("meta"):
        gm = grp.random_element(w, 0.3, generator=gen(5))
    close(gm, g1, rtol=0, atol=0)
    with torch.device("meta"):
        gm = grp.random_element(w, 0.3)
    assert gm["a"].device.type == "cpu" and bool(torch.isfinite(gm["a"]).all())


# ============================================================================ DiagonalRescaling
def diag_point(seed=0, d=6):
    u, v = randn(d, seed=seed), randn(d, seed=seed + 1)
    return {"u": u, "v": v}


def test_diagonal_constructor_errors_repr_pickle_and_with_metric():
    with pytest.raises(ValueError, match="metric must be 'inv' or 'mix', got 'euclid'"):
        DiagonalRescaling("u", "v", "euclid")
    with pytest.raises(ValueError, match="has metric 'mix', got 'inv'"):
        DiagonalRescalingMix("u", "v", "inv")
    with pytest.raises(ValueError, match="mixed_domain must be 'restrict' or 'extend', got 'clip'"):
        DiagonalRescaling("u", "v", "mix", mixed_domain="clip")
    g = DiagonalRescaling("p", "q", "mix", mixed_domain="extend")
    assert type(g) is DiagonalRescalingMix and g.names == ("p", "q") and g.u == "p" and g.v == "q"
    assert g.mixed_domain == "extend" and repr(g) == "DiagonalRescaling('p', 'q', metric='mix')"
    assert type(DiagonalRescaling()) is DiagonalRescalingInv and DiagonalRescaling().mixed_domain == "restrict"
    h = pickle.loads(pickle.dumps(g))
    assert type(h) is DiagonalRescalingMix and (h.u, h.v, h.mixed_domain) == ("p", "q", "extend")
    i = g.with_metric("inv")
    assert type(i) is DiagonalRescalingInv and (i.u, i.v, i.mixed_domain) == ("p", "q", "extend")
    assert g.with_metric("mix", mixed_domain="restrict").mixed_domain == "restrict"
    with pytest.raises(ValueError, match=r"'p' and 'q' of equal shape, got \(3,\) and \(4,\)"):
        g.validate({"p": torch.ones(3, dtype=DT), "q": torch.ones(4, dtype=DT)})
    g.validate({"p": torch.ones(3, dtype=DT), "q": torch.ones(3, dtype=DT)})
    with pytest.raises(ValueError, match="non-finite"):
        g.validate({"p": torch.tensor([1.0, math.inf], dtype=DT), "q": torch.ones(2, dtype=DT)})


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_diagonal_metric_projection_and_gradient_against_the_spec(metric):
    grp = DiagonalRescaling("u", "v", metric)
    w = diag_point()
    u, v = w["u"], w["v"]
    xi, zeta = T.randn_like(w, gen(3)), T.randn_like(w, gen(4))
    a, c = (1 / u ** 2, 1 / v ** 2) if metric == "inv" else (v ** 2, u ** 2)
    close(grp.inner(w, xi, zeta), (xi["u"] * zeta["u"] * a).sum() + (xi["v"] * zeta["v"] * c).sum())
    # action / pushforward / invariance, for a group element with negative entries too
    g = grp.random_element(w, generator=gen(5))
    close(grp.action(w, g), {"u": u * g, "v": v / g})
    close(grp.pushforward(w, g, xi), {"u": xi["u"] * g, "v": xi["v"] / g})
    close(grp.inner(grp.action(w, g), grp.pushforward(w, g, xi), grp.pushforward(w, g, zeta)),
          grp.inner(w, xi, zeta), rtol=1e-11)
    close(grp.beta(grp.action(w, g)), grp.beta(w))
    # vertical space {(u c, -v c)}; algebra zeros shaped like u
    om = randn(6, seed=6)
    close(grp.vertical(w, om), {"u": u * om, "v": -v * om})
    assert grp.algebra_zeros(w).shape == (6,) and grp.algebra_zeros(w).dtype == DT
    assert grp.kernel_dimension(w) == 6
    # projection: b = (xi_u/u + xi_v/v)/2, Pi = (u b, v b); g-orthogonal to the vertical space
    b = 0.5 * (xi["u"] / u + xi["v"] / v)
    close(grp.to_b(w, xi), b)
    close(grp.from_b(w, b), {"u": u * b, "v": v * b})
    p = grp.horizontal_projection(w, xi)
    close(p, {"u": u * b, "v": v * b})
    close(p, SymmetryGroup.horizontal_projection(grp, w, xi), rtol=1e-10, atol=1e-12)
    assert float(grp.is_horizontal(w, p)) < 1e-12
    # norms of a horizontal vector (spec): inv 2|b|^2, mix 2|beta b|^2
    ref = 2 * (b ** 2).sum() if metric == "inv" else 2 * ((u * v * b) ** 2).sum()
    close(grp.norm_sq(w, p), ref)
    # Riemannian gradient: M^{-1} grad by dense solve
    egrad = T.randn_like(w, gen(7))
    close(grp.egrad_to_rgrad(w, egrad), SymmetryGroup.egrad_to_rgrad(grp, w, egrad), rtol=1e-10, atol=1e-12)
    # whiten: covariance M^{-1}
    W = torch.stack([T.flatten(grp.whiten(w, T.unflatten(e, w)), grp.names) for e in torch.eye(12, dtype=DT)], 1)
    close(W @ W.T, torch.linalg.inv(grp.metric_matrix(w)), rtol=1e-10, atol=1e-12)
    assert bool((W.diagonal() > 0).all())


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_diagonal_christoffel_and_geodesic_against_autodiff_and_rk4_on_the_spec_christoffel(metric):
    grp = DiagonalRescaling("u", "v", metric)
    w = {n: torch.sign(x) * (0.5 + x.abs()) for n, x in diag_point(seed=2).items()}  # |u|, |v| >= 0.5
    xi = T.randn_like(w, gen(8))
    close(grp.christoffel(w, xi), generic_christoffel(grp, w, xi), rtol=1e-10, atol=1e-12)
    h = grp.horizontal_projection(w, T.scale(xi, 0.2))
    for t in (1.0, 0.6):
        ode = integrate_geodesic(spec_gamma_diag(metric), w, h, t, n_steps=128, tol=None)
        close(grp.geodesic_exact(w, h, t), ode, rtol=1e-7, atol=1e-9)
    ode = integrate_geodesic(spec_gamma_diag(metric), w, h, 1.0, n_steps=128, tol=None)
    close(grp.geodesic_exact(w, h), ode, rtol=1e-7, atol=1e-9)
    b = grp.to_b(w, h)
    end = grp.geodesic_exact(w, h, 0.5)
    beta = (w["u"] * w["v"]) * (torch.exp(b) if metric == "inv" else (1 + b))  # beta e^{2bt} / beta(1 + 2bt)
    close(grp.beta(end), beta, rtol=1e-12)


def test_diagonal_inverse_geodesic_is_componentwise_exponential_for_any_xi():
    grp = DiagonalRescaling("u", "v", "inv")
    w = diag_point(seed=3)
    xi = T.scale(T.randn_like(w, gen(9)), 0.4)  # not horizontal
    for t in (1.0, -0.3):
        close(grp.geodesic_exact(w, xi, t), {n: w[n] * torch.exp(t * xi[n] / w[n]) for n in w})
    zeta = T.randn_like(w, gen(10))
    close(grp.whiten(w, zeta), {n: zeta[n] * w[n].abs() for n in w})
    close(grp.egrad_to_rgrad(w, zeta), {n: zeta[n] * w[n] ** 2 for n in w})


def test_diagonal_mixed_geodesic_domain_and_restriction():
    grp = DiagonalRescaling("u", "v", "mix")
    w = {"u": torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT), "v": torch.tensor([2.0, 1.0, -1.5, 0.25], dtype=DT)}
    b = torch.tensor([0.3, -0.5, -0.9, 1.2], dtype=DT)
    h = grp.from_b(w, b)
    close(grp.to_b(w, h), b)
    s = 1 + 2 * b
    end = grp.geodesic_exact(w, h)
    # u sqrt(1 + 2b), v sqrt|1 + 2b| sign(1 + 2b): beta(1) = beta (1 + 2b), the extended form
    close(end["u"], w["u"] * s.abs().sqrt())
    close(end["v"], w["v"] * s.abs().sqrt() * torch.sign(s))
    close(grp.beta(end), w["u"] * w["v"] * s)
    assert float(end["u"][1]) == 0.0 and float(end["v"][1]) == 0.0
    # t scales b: at t = 0.25, s = 1 + b/2
    close(grp.geodesic_exact(w, h, 0.25)["u"], w["u"] * (1 + 0.5 * b).sqrt())
    # at s = 0 (b = -1/2) the endpoint is 0 and its gradient is finite (set to 0)
    bb = b.clone().requires_grad_(True)
    e = grp.geodesic_exact(w, grp.from_b(w, bb))
    (e["u"].sum() + e["v"].sum()).backward()
    assert bool(torch.isfinite(bb.grad).all()) and float(bb.grad[1]) == 0.0
    # restrict: clamp b >= -1/2; extend: xi unchanged (a copy of the dict)
    r = grp.restrict_to_domain(w, h)
    close(grp.to_b(w, r), b.clamp_min(-0.5))
    close(r, grp.from_b(w, b.clamp_min(-0.5)))
    ext = DiagonalRescaling("u", "v", "mix", mixed_domain="extend")
    r2 = ext.restrict_to_domain(w, h)
    assert r2 is not h and r2["u"] is h["u"] and r2["v"] is h["v"]
    # the inverse metric has no domain restriction
    inv = grp.with_metric("inv")
    r3 = inv.restrict_to_domain(w, h)
    close(r3, h, rtol=0, atol=0)


def test_diagonal_zero_entries_are_masked_with_a_warning_and_stay_finite():
    w = {"u": torch.tensor([1.0, 0.0, 2.0], dtype=DT), "v": torch.tensor([0.5, 3.0, 0.0], dtype=DT)}
    xi = {"u": torch.tensor([0.2, 0.7, -0.1], dtype=DT), "v": torch.tensor([0.4, -0.3, 0.9], dtype=DT)}
    for metric in ("inv", "mix"):
        grp = DiagonalRescaling("u", "v", metric)
        with pytest.warns(UserWarning, match="2 entries with u\\*v = 0"):
            p = grp.horizontal_projection(w, xi)
        close(grp.to_b(w, xi), torch.tensor([0.5 * (0.2 / 1.0 + 0.4 / 0.5), 0.0, 0.0], dtype=DT))
        # b = (0.2/1 + 0.4/0.5)/2 = 0.5 at the only entry with u v != 0: Pi = (u b, v b) there, 0 elsewhere
        close(p, {"u": torch.tensor([0.5, 0.0, 0.0], dtype=DT), "v": torch.tensor([0.25, 0.0, 0.0], dtype=DT)})
        assert float(p["v"][1]) == 0.0 and float(p["u"][2]) == 0.0
        # every closed form stays finite at the zeros and keeps a zero coordinate at zero
        outs = [grp.inner(w, xi, xi), grp.egrad_to_rgrad(w, xi), grp.whiten(w, xi), grp.christoffel(w, xi),
                grp.geodesic_exact(w, p)]
        for o in outs:
            for tt in (o.values() if isinstance(o, dict) else [o]):
                assert bool(torch.isfinite(tt).all())
        ge = grp.geodesic_exact(w, p, 0.7)
        assert float(ge["u"][1]) == 0.0 and float(ge["v"][2]) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiagonalRescaling("u", "v", "inv").horizontal_projection(diag_point(d=3), xi)  # no zero: no warning


def test_diagonal_zero_weights_in_closed_forms():
    """Values at ``u = 0`` or ``v = 0`` (``_safe``: the division is by 1 there, never by 0)."""
    w = {"u": torch.tensor([0.0, 2.0], dtype=DT), "v": torch.tensor([3.0, 0.0], dtype=DT)}
    xi = {"u": torch.tensor([0.5, 0.25], dtype=DT), "v": torch.tensor([-1.0, 2.0], dtype=DT)}
    inv = DiagonalRescaling("u", "v", "inv")
    ge = inv.geodesic_exact(w, xi, 0.5)
    close(ge, {"u": torch.tensor([0.0, 2.0 * math.exp(0.5 * 0.25 / 2.0)], dtype=DT),
               "v": torch.tensor([3.0 * math.exp(-0.5 / 3.0), 0.0], dtype=DT)})
    mix = DiagonalRescaling("u", "v", "mix")
    # mixed egrad_to_rgrad divides by v^2 (u^2), by 1 where that is 0
    close(mix.egrad_to_rgrad(w, xi), {"u": torch.tensor([0.5 / 9.0, 0.25], dtype=DT),
                                      "v": torch.tensor([-1.0, 2.0 / 4.0], dtype=DT)})
    close(mix.whiten(w, xi), {"u": torch.tensor([0.5 / 3.0, 0.25], dtype=DT),
                              "v": torch.tensor([-1.0, 2.0 / 2.0], dtype=DT)})


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_diagonal_random_element_signs_magnitudes_and_reproducibility(metric):
    """``a in (R \\ {0})^d``: random sign, magnitude ``exp(scale z)``; same generator, same element."""
    grp = DiagonalRescaling("u", "v", metric)
    w = {"u": torch.zeros(20000, dtype=DT), "v": torch.zeros(20000, dtype=DT)}
    a = grp.random_element(w, 0.4, generator=gen(1))
    close(a, grp.random_element(w, 0.4, generator=gen(1)), rtol=0, atol=0)
    assert a.dtype == DT and a.shape == (20000,)
    frac_neg = float((a < 0).double().mean())
    assert abs(frac_neg - 0.5) < 0.02
    m = a.abs().log()
    assert abs(float(m.std()) - 0.4) < 0.02 and abs(float(m.mean())) < 0.02
    close(m, 0.4 * torch.randn(20000, generator=gen(1), dtype=DT), rtol=1e-13, atol=1e-15)
    md = grp.random_element(w, generator=gen(1)).abs().log()
    assert abs(float(md.std()) - 1.0) < 0.03
    a32 = grp.random_element({"u": torch.zeros(4), "v": torch.zeros(4)}, generator=gen(1))
    assert a32.dtype == torch.float32
    d1, d2 = grp.random_element(w), grp.random_element(w)
    assert not torch.equal(d1, d2) and abs(float(d1.abs().log().std()) - 1.0) < 0.03
    with torch.device("meta"):
        am = grp.random_element(w, 0.4, generator=gen(1))
        an = grp.random_element(w, 0.4)
    close(am, a, rtol=0, atol=0)
    assert an.device.type == "cpu" and bool(torch.isfinite(an).all())


# ============================================================================ HeadScaling
def scaling_problem(seed=0, shares_tensors=False):
    """Three blocks: query rows + bias (2 heads of 2), key rows + bias (same shape: one stack with
    the query block), and an input-major weight ``C`` (5 x 6) with 3 heads of 2 (its own stack)."""
    blocks = [ScaleBlock((Piece("Wq", "rows"), Piece("bq", "bias")), 2, 2, label="layer0/q"),
              ScaleBlock((Piece("Wk", "rows"), Piece("bk", "bias")), 2, 2, label="layer0/k", kind="key scale"),
              ScaleBlock((Piece("C", "cols"),), 3, 2, label="solo")]
    grp = HeadScaling(blocks, shares_tensors=shares_tensors)
    g = gen(seed)
    w = {"Wq": torch.randn(4, 3, generator=g, dtype=DT), "bq": torch.randn(4, generator=g, dtype=DT),
         "Wk": torch.randn(4, 3, generator=g, dtype=DT), "bk": torch.randn(4, generator=g, dtype=DT),
         "C": torch.randn(5, 6, generator=g, dtype=DT)}
    return grp, w


def head_slices(w):
    """The 7 head slices by hand: ``[W_i^T; b_i]`` (4 x 2) for q and k, ``C[:, 2i:2i+2]`` (5 x 2)."""
    out = []
    for W, b in (("Wq", "bq"), ("Wk", "bk")):
        for i in range(2):
            out.append(torch.cat([w[W][2 * i:2 * i + 2].T, w[b][2 * i:2 * i + 2][None]], 0))
    for i in range(3):
        out.append(w["C"][:, 2 * i:2 * i + 2])
    return out


def from_slices(slices, like):
    """Inverse of :func:`head_slices` (by hand)."""
    out = {n: torch.zeros_like(t) for n, t in like.items()}
    k = 0
    for W, b in (("Wq", "bq"), ("Wk", "bk")):
        for i in range(2):
            out[W][2 * i:2 * i + 2] = slices[k][:3].T
            out[b][2 * i:2 * i + 2] = slices[k][3]
            k += 1
    for i in range(3):
        out["C"][:, 2 * i:2 * i + 2] = slices[k]
        k += 1
    return out


def test_head_scaling_layout_repr_and_summaries():
    grp, w = scaling_problem()
    assert grp.names == ("Wq", "bq", "Wk", "bk", "C") and grp.shares_tensors is False
    assert repr(grp) == "HeadScaling(3 blocks, 7 heads)"
    assert grp.block_summaries() == [("layer0", "QK", "ℝ₊ × 2 heads"), ("layer0", "QK", "key scale"),
                                     ("solo", "QK", "ℝ₊ × 3 heads")]
    assert grp.stacks is None
    Ws = grp.extract(w)  # validates on first use
    assert grp.stacks == [[0, 1], [2]]
    assert [tuple(W.shape) for W in Ws] == [(4, 4, 2), (3, 5, 2)]
    ref = head_slices(w)
    close(list(Ws[0]) + list(Ws[1]), ref, rtol=0, atol=0)
    # insert is the exact inverse of extract, and writes into the given base
    back = grp.insert({n: torch.zeros_like(t) for n, t in w.items()}, Ws)
    close(back, w, rtol=0, atol=0)
    # algebra: one (B_s,) tensor per stack, in w's dtype
    z = grp.algebra_zeros(w)
    assert [tuple(t.shape) for t in z] == [(4,), (3,)] and all(t.dtype == DT and not t.any() for t in z)
    assert [tuple(t.shape) for t in grp.algebra_zeros({n: t.float() for n, t in w.items()})] == [(4,), (3,)]
    assert grp.algebra_zeros({n: t.float() for n, t in w.items()})[0].dtype == torch.float32
    # a name used by two blocks is listed once
    two = HeadScaling([ScaleBlock((Piece("W", "rows"),), 1, 2), ScaleBlock((Piece("W", "rows", offset=2),), 1, 2)])
    assert two.names == ("W",)
    two.validate({"W": randn(4, 3)})
    assert two.stacks == [[0, 1]]
    with pytest.raises(ValueError, match="at least one block"):
        HeadScaling([])


def test_head_scaling_stack_of_three_blocks_round_trips():
    """Three blocks of one shape (1, 2 and 1 heads of 2 rows of ``W``) form one stack of 4 heads:
    extract lists the hand slices in block order, and insert writes each block's heads back to
    its own rows (the offset into the stack accumulates over all earlier blocks)."""
    grp = HeadScaling([ScaleBlock((Piece("W", "rows"),), 1, 2),
                       ScaleBlock((Piece("W", "rows", offset=2),), 2, 2),
                       ScaleBlock((Piece("W", "rows", offset=6),), 1, 2)])
    w = {"W": randn(8, 3, seed=5)}
    (W,) = grp.extract(w)
    assert grp.stacks == [[0, 1, 2]]
    close(list(W), [w["W"][2 * i:2 * i + 2].T for i in range(4)], rtol=0, atol=0)
    marked = [W * torch.arange(1.0, 5.0, dtype=DT)[:, None, None]]  # head i scaled by i + 1
    back = grp.insert({"W": torch.zeros_like(w["W"])}, marked)
    close(back["W"], w["W"] * torch.arange(1.0, 5.0, dtype=DT).repeat_interleave(2)[:, None], rtol=0, atol=0)


def test_head_scaling_validate_errors():
    grp, w = scaling_problem()
    bad = HeadScaling([ScaleBlock((Piece("Wq", "rows"),), 3, 2, label="L/q")])
    with pytest.raises(ValueError, match=r"L/q: parameter 'Wq' of shape \(4, 3\) has no room for 3 heads of size 2 at"
                                         r" offset 0"):
        bad.validate(w)
    # exactly filling the tensor is fine; one index past is not
    HeadScaling([ScaleBlock((Piece("bq", "bias"),), 2, 2)]).validate(w)
    with pytest.raises(ValueError, match="no room"):
        HeadScaling([ScaleBlock((Piece("bq", "bias", offset=1),), 2, 2)]).validate(w)
    cols = HeadScaling([ScaleBlock((Piece("C", "cols"),), 4, 2)])
    with pytest.raises(ValueError, match="no room"):
        cols.validate(w)  # 8 columns needed, C has 6 (rows: 5 would be enough)
    rows = HeadScaling([ScaleBlock((Piece("C", "rows"),), 3, 2)])
    with pytest.raises(ValueError, match="no room"):
        rows.validate(w)  # 6 rows needed, C has 5 (columns: 6 would be enough)
    # overlap (covered twice) and partial cover (not covered) are errors unless shares_tensors
    over = HeadScaling([ScaleBlock((Piece("bq", "bias"),), 2, 2), ScaleBlock((Piece("bq", "bias", offset=2),), 1, 2)])
    with pytest.raises(ValueError, match="'bq' must be covered exactly once"):
        over.validate(w)
    part = HeadScaling([ScaleBlock((Piece("bq", "bias"),), 1, 2)])
    with pytest.raises(ValueError, match="'bq' must be covered exactly once"):
        part.validate(w)
    HeadScaling([ScaleBlock((Piece("bq", "bias"),), 1, 2)], shares_tensors=True).validate(w)
    with pytest.raises(ValueError, match="covered exactly once"):
        HeadScaling([ScaleBlock((Piece("bq", "bias"),), 2, 2), ScaleBlock((Piece("bq", "bias", offset=2),), 1, 2)],
                    shares_tensors=True).validate(w)
    # a strided piece (two query heads of one KV group) covers the tensor exactly once
    strided = HeadScaling([ScaleBlock((Piece("bq", "bias", offset=0, stride=4),), 1, 2),
                           ScaleBlock((Piece("bq", "bias", offset=2, stride=4),), 1, 2)])
    strided.validate(w)
    # a valid group re-validates a new shape: the cover check runs again
    grp.validate(w)
    w2 = dict(w, C=randn(5, 8))
    with pytest.raises(ValueError, match="'C' must be covered exactly once"):
        grp.validate(w2)
    with pytest.raises(KeyError, match="lacks"):
        grp.validate({n: t for n, t in w.items() if n != "C"})


def test_head_scaling_geometry_against_hand_formulas():
    grp, w = scaling_problem()
    Wi = head_slices(w)
    n2 = [W.pow(2).sum() for W in Wi]
    xi, zeta = T.randn_like(w, gen(1)), T.randn_like(w, gen(2))
    X, Z = head_slices(xi), head_slices(zeta)
    # metric <xi, zeta>_F / ||W||^2 per head
    close(grp.inner(w, xi, zeta), sum((x * z).sum() / n for x, z, n in zip(X, Z, n2)))
    # projection: xi - (<xi, W>/||W||^2) W
    p = grp.horizontal_projection(w, xi)
    close(p, from_slices([x - (x * W).sum() / n * W for x, W, n in zip(X, Wi, n2)], w))
    close(p, SymmetryGroup.horizontal_projection(grp, w, xi), rtol=1e-10, atol=1e-12)
    assert float(grp.is_horizontal(w, p)) < 1e-12
    # Riemannian gradient ||W||^2 grad, = M^{-1} grad
    close(grp.egrad_to_rgrad(w, xi), from_slices([n * x for x, n in zip(X, n2)], w))
    close(grp.egrad_to_rgrad(w, xi), SymmetryGroup.egrad_to_rgrad(grp, w, xi), rtol=1e-10, atol=1e-12)
    # Christoffel term (|xi|^2 W - 2 <W, xi> xi) / ||W||^2, = autodiff of the metric
    close(grp.christoffel(w, xi), from_slices([((x * x).sum() * W - 2 * (W * x).sum() * x) / n
                                               for x, W, n in zip(X, Wi, n2)], w))
    close(grp.christoffel(w, xi), generic_christoffel(grp, w, xi), rtol=1e-10, atol=1e-12)
    # whiten ||W|| zeta
    close(grp.whiten(w, zeta), from_slices([n.sqrt() * z for z, n in zip(Z, n2)], w))
    # vertical: omega_i W_i
    om = [randn(4, seed=3), randn(3, seed=4)]
    oms = list(om[0]) + list(om[1])
    close(grp.vertical(w, om), from_slices([o * W for o, W in zip(oms, Wi)], w))
    assert grp.kernel_dimension(w) == 7
    # relative perturbation: max_i ||xi_i|| / ||W_i||
    close(grp.relative_perturbation(w, xi), max(x.norm() / W.norm() for x, W in zip(X, Wi)))
    assert grp.relative_perturbation(w, xi).dtype == DT


def test_head_scaling_action_invariance_and_random_element():
    grp, w = scaling_problem()
    Wi = head_slices(w)
    s = grp.random_element(w, generator=gen(3))
    assert [tuple(t.shape) for t in s] == [(4,), (3,)] and all(t.dtype == DT for t in s)
    close(s, grp.random_element(w, generator=gen(3)), rtol=0, atol=0)
    ss = list(s[0]) + list(s[1])
    moved = grp.action(w, s)
    close(moved, from_slices([a * W for a, W in zip(ss, Wi)], w))
    xi, zeta = T.randn_like(w, gen(1)), T.randn_like(w, gen(2))
    X = head_slices(xi)
    px = grp.pushforward(w, s, xi)
    close(px, from_slices([a * x for a, x in zip(ss, X)], w))
    close(grp.inner(moved, px, grp.pushforward(w, s, zeta)), grp.inner(w, xi, zeta), rtol=1e-12)
    # parameters outside the head slices (shares_tensors) are kept by action, zero in pushforward
    part = HeadScaling([ScaleBlock((Piece("bq", "bias"),), 1, 2)], shares_tensors=True)
    wb = {"bq": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)}
    close(part.action(wb, [torch.tensor([2.0], dtype=DT)]), {"bq": torch.tensor([2.0, 4.0, 3.0, 4.0], dtype=DT)})
    close(part.pushforward(wb, [torch.tensor([2.0], dtype=DT)], wb), {"bq": torch.tensor([2.0, 4.0, 0, 0], dtype=DT)})
    close(part.vertical(wb, [torch.tensor([0.5], dtype=DT)]), {"bq": torch.tensor([0.5, 1.0, 0, 0], dtype=DT)})
    close(part.horizontal_projection(wb, wb), {"bq": torch.zeros(4, dtype=DT)})
    # spread: scale exp(u), u uniform in [-log(c)/2, log(c)/2], c = max_cond (default e^2)
    big = HeadScaling([ScaleBlock((Piece("b", "bias"),), 4000, 1)])
    wbig = {"b": torch.ones(4000, dtype=DT)}
    r = big.random_element(wbig, generator=gen(4))[0].log()
    assert float(r.min()) >= -1.0 and float(r.max()) <= 1.0 and float(r.min()) < -0.99 and float(r.max()) > 0.99
    assert abs(float(r.mean())) < 0.05
    r = big.random_element(wbig, scale=3.0, max_cond=4.0, generator=gen(4))[0]
    lr = (r / 3.0).log()
    assert float(lr.min()) >= -math.log(2) - 1e-12 and float(lr.max()) <= math.log(2) + 1e-12
    assert float(lr.max() - lr.min()) > 0.99 * math.log(4)
    u = torch.rand(4000, generator=gen(4), dtype=DT)
    close(r, 3.0 * torch.exp(math.log(4.0) * (u - 0.5)), rtol=1e-13, atol=0)
    r1, r2 = big.random_element(wbig)[0], big.random_element(wbig)[0]
    assert not torch.equal(r1, r2) and float(r1.log().abs().max()) <= 1.0
    r32 = big.random_element({"b": torch.ones(4000)}, generator=gen(4))[0]
    assert r32.dtype == torch.float32
    with torch.device("meta"):
        rm = big.random_element(wbig, generator=gen(4))[0]
        rn = big.random_element(wbig)[0]
    close(rm, big.random_element(wbig, generator=gen(4))[0], rtol=0, atol=0)
    assert rn.device.type == "cpu" and bool(torch.isfinite(rn).all())


def test_head_scaling_geodesic_closed_form_and_rk4_on_the_spec_christoffel():
    grp, w = scaling_problem(seed=1)
    Wi = head_slices(w)
    xi = T.scale(T.randn_like(w, gen(5)), 0.3)  # not horizontal: the closed form holds for any xi
    for t in (1.0, 0.4):
        ref = []
        for W, x in zip(Wi, head_slices(xi)):
            n2 = W.pow(2).sum()
            a = (W * x).sum() / n2
            perp = x - a * W
            phi = perp.norm() / W.norm()
            ref.append(math.e ** float(a * t) * (torch.cos(phi * t) * W + torch.sin(phi * t) * W.norm() * perp / perp.norm()))
        close(grp.geodesic_exact(w, xi, t), from_slices(ref, w), rtol=1e-12, atol=1e-14)
        ode = integrate_geodesic(spec_gamma_heads, w, xi, t, n_steps=64, tol=None)
        close(grp.geodesic_exact(w, xi, t), ode, rtol=1e-7, atol=1e-9)
    ode1 = integrate_geodesic(spec_gamma_heads, w, xi, 1.0, n_steps=64, tol=None)
    close(grp.geodesic_exact(w, xi), ode1, rtol=1e-7, atol=1e-9)
    # horizontal xi: a great circle at constant head norms
    h = grp.horizontal_projection(w, xi)
    end = grp.geodesic_exact(w, h, 0.8)
    close(torch.stack([E.norm() for E in head_slices(end)]), torch.stack([W.norm() for W in Wi]))
    # parameters outside the head slices are kept (shares_tensors)
    part = HeadScaling([ScaleBlock((Piece("bq", "bias"),), 1, 2)], shares_tensors=True)
    wb = {"bq": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)}
    e = part.geodesic_exact(wb, {"bq": torch.tensor([0.1, 0.2, 0.5, 0.5], dtype=DT)})
    close(e["bq"][2:], wb["bq"][2:], rtol=0, atol=0)
    close(e["bq"][:2], math.e ** 0.1 * wb["bq"][:2])


def test_head_scaling_float32_results_follow_the_tangent_dtype():
    grp, w = scaling_problem(seed=2)
    w32 = {n: t.float() for n, t in w.items()}
    xi32 = {n: t.float() for n, t in T.randn_like(w, gen(6)).items()}
    for fn in (grp.horizontal_projection, grp.egrad_to_rgrad, grp.christoffel, grp.whiten, grp.geodesic_exact):
        out = fn(w32, xi32)
        assert all(out[n].dtype == torch.float32 for n in grp.names)
        ref = fn(w, {n: t.double() for n, t in xi32.items()})
        close({n: out[n].double() for n in grp.names}, ref, rtol=1e-5, atol=1e-6)
    ip = grp.inner(w32, xi32, xi32)
    assert ip.dtype == torch.float32
    close(ip.double(), grp.inner(w, {n: t.double() for n, t in xi32.items()}, {n: t.double() for n, t in xi32.items()}),
          rtol=1e-6, atol=0)


def test_head_scaling_degenerate_heads():
    grp, w = scaling_problem()
    grp.check_domain(w)
    w0 = {n: t.clone() for n, t in w.items()}
    w0["C"][:, 2:4] = 0.0  # head 1 of stack 1
    with pytest.raises(ValueError, match="head slice 1 of stack 1 is zero"):
        grp.check_domain(w0)
    w1 = {n: t.clone() for n, t in w.items()}
    w1["Wk"][2:4] = 0.0
    w1["bk"][2:4] = 0.0  # head 3 of stack 0 (k head 1)
    with pytest.raises(ValueError, match="head slice 3 of stack 0 is zero"):
        grp.check_domain(w1)
    assert grp.kernel_dimension(w0) == 6 == SymmetryGroup.kernel_dimension(grp, w0)
    # a zero head with a nonzero perturbation: a huge but finite ratio; zero over zero: 0
    xi = T.randn_like(w, gen(7))
    assert 1e250 < float(grp.relative_perturbation(w0, xi)) < math.inf
    xi0 = {n: t.clone() for n, t in xi.items()}
    xi0["C"][:, 2:4] = 0.0
    X = head_slices(xi0)
    close(grp.relative_perturbation(w0, xi0),
          max(x.norm() / W.norm() for x, W in zip(X, head_slices(w0)) if W.norm() > 0))


# ============================================================================ added after the mutmut run of 2026-12-01
def test_diagonal_random_sign_is_exactly_fair_at_one_half():
    """The sign is ``-1`` for a float32 uniform ``u < 1/2`` (2^23 of the 2^24 values) and ``+1``
    for ``u >= 1/2``: exactly fair. Seed 12328 draws ``u = 0.5`` exactly at entry 1634 of a
    4096-vector (after the 4096 float64 normals of the magnitudes)."""
    g = gen(12328)
    torch.randn(4096, generator=g, dtype=DT)
    u = torch.rand(4096, generator=g)
    assert float(u[1634]) == 0.5
    for metric in ("inv", "mix"):
        grp = DiagonalRescaling("u", "v", metric)
        a = grp.random_element({"u": torch.zeros(4096, dtype=DT), "v": torch.zeros(4096, dtype=DT)},
                               generator=gen(12328))
        assert float(a[1634]) > 0
        close(torch.sign(a), torch.where(u < 0.5, -1.0, 1.0).to(DT), rtol=0, atol=0)


def test_algebra_zeros_live_on_the_weights_device_not_the_default_device():
    w = {"b": randn(5, seed=1)}
    grp, ws = scaling_problem()
    grp.validate(ws)  # the layout check itself builds tensors on the default device
    with torch.device("meta"):
        for g in (PositiveRescaling(["b"]), Euclidean(["b"])):
            z = g.algebra_zeros(w)
            assert z.device.type == "cpu" and z.shape == (0,)
        zs = grp.algebra_zeros(ws)
        assert [t.device.type for t in zs] == ["cpu", "cpu"]
    close(zs, [torch.zeros(4, dtype=DT), torch.zeros(3, dtype=DT)], rtol=0, atol=0)


def test_head_scaling_summaries_use_the_last_label_component_and_small_heads_count():
    nested = HeadScaling([ScaleBlock((Piece("b", "bias"),), 2, 2, label="enc/layer.0/attn/q")])
    assert nested.block_summaries() == [("enc/layer.0/attn", "QK", "ℝ₊ × 2 heads")]
    flat_label = HeadScaling([ScaleBlock((Piece("b", "bias"),), 2, 2, label="plain")])
    assert flat_label.block_summaries() == [("plain", "QK", "ℝ₊ × 2 heads")]
    # a nonzero head counts however small its norm (here all 7 heads have ||W||^2 < 1)
    grp, w = scaling_problem()
    small = {n: 1e-3 * t for n, t in w.items()}
    assert all(float(W.pow(2).sum()) < 1 for W in head_slices(small))
    assert grp.kernel_dimension(small) == 7
    w1 = {n: t.clone() for n, t in small.items()}
    w1["C"][:, 4:6] = 0.0
    assert grp.kernel_dimension(w1) == 6


def test_head_scaling_float64_elements_on_float32_weights_are_rounded_first():
    """A float64 scale (or log-scale velocity) applied to float32 weights is rounded to float32 and
    then multiplies the slice, in ``action``, ``pushforward`` and ``vertical`` alike: for this
    linear action ``pushforward(w, s, w) == action(w, s) == vertical(w, s)`` bit for bit."""
    grp, w = scaling_problem(seed=3)
    w32 = {n: t.float() for n, t in w.items()}
    s = [torch.tensor([0.37, 1.91, 2.63, 0.77], dtype=DT), torch.tensor([1.13, 0.51, 2.29], dtype=DT)]
    ss = [float(x) for x in torch.cat(s).float()]
    ref = from_slices([a * W for a, W in zip(ss, head_slices(w32))], w32)
    act, push, vert = grp.action(w32, s), grp.pushforward(w32, s, w32), grp.vertical(w32, s)
    for out in (act, push, vert):
        assert all(out[n].dtype == torch.float32 for n in grp.names)
        close(out, ref, rtol=0, atol=0)


def test_head_scaling_random_scales_live_on_the_weights_device():
    """Drawn with the (CPU) generator, then moved to the weights' device (meta weights here)."""
    grp, w = scaling_problem()
    grp.validate(w)  # the layout (validation reads values, which meta tensors have none of)
    wm = {n: t.to("meta") for n, t in w.items()}
    s = grp.random_element(wm, generator=gen(3))
    assert [t.device.type for t in s] == ["meta", "meta"] and [tuple(t.shape) for t in s] == [(4,), (3,)]
    assert all(t.dtype == DT for t in s)
    assert [t.device.type for t in grp.random_element(wm)] == ["meta", "meta"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA generator")
def test_random_elements_are_drawn_where_the_generator_lives():
    w = {"u": torch.zeros(8, dtype=DT), "v": torch.zeros(8, dtype=DT)}
    for grp in (DiagonalRescaling("u", "v"), PositiveRescaling(["u", "v"]), Euclidean(["u", "v"])):
        a = grp.random_element(w, 0.5, generator=torch.Generator(device="cuda").manual_seed(0))
        for t in (a.values() if isinstance(a, dict) else [a]):
            assert t.device.type == "cpu" and t.dtype == DT and bool(torch.isfinite(t).all())
    grp, ws = scaling_problem()
    s = grp.random_element(ws, generator=torch.Generator(device="cuda").manual_seed(0))
    assert [t.device.type for t in s] == ["cpu", "cpu"] and all(t.dtype == DT for t in s)


def test_head_scaling_reused_on_other_shapes_restacks():
    """Wider query rows: the query block no longer stacks with the key block. The group that saw
    the first shapes must give what a fresh group gives (it kept the old stacks)."""
    grp, w = scaling_problem()
    xi = T.randn_like(w, gen(40))
    p1 = grp.horizontal_projection(w, xi)
    w2 = dict(w, Wq=randn(4, 5, seed=41))
    xi2 = T.randn_like(w2, gen(42))
    fresh, _ = scaling_problem()
    close(grp.horizontal_projection(w2, xi2), fresh.horizontal_projection(w2, xi2))
    assert len(grp.stacks) == 3
    close(grp.horizontal_projection(w, xi), p1)  # and back


def test_head_scaling_insert_works_first():
    """``insert`` on a fresh group (no ``extract`` before it) lays the slices out by itself."""
    grp, w = scaling_problem()
    other, _ = scaling_problem()
    close(other.insert(w, grp.extract(w)), w, rtol=0, atol=0)


def test_head_scaling_domain_is_the_nonzero_heads_only():
    """A head whose entries cancel in any odd power (1, -1) is not zero: no error; a zero head is."""
    grp, w = scaling_problem()
    w = {n: t.clone() for n, t in w.items()}
    w["Wq"][0:2] = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=DT)
    w["bq"][0:2] = 0.0
    grp.check_domain(w)
    w["Wq"][0, :2] = 0.0
    with pytest.raises(ValueError, match="head slice 0 of stack 0 is zero"):
        grp.check_domain(w)


def test_diagonal_default_names_and_the_zero_count_of_its_warning():
    """``DiagonalRescaling()`` acts on ``u`` and ``v``; the warning counts the entries with
    ``u v = 0`` (an entry with ``u = 1`` is not one of them)."""
    assert DiagonalRescaling().names == ("u", "v")
    w = {"u": torch.tensor([1.0, 0.0, 1.0], dtype=DT), "v": torch.tensor([1.0, 1.0, 2.0], dtype=DT)}
    xi = {"u": torch.tensor([0.2, 0.7, -0.1], dtype=DT), "v": torch.tensor([0.4, -0.3, 0.9], dtype=DT)}
    with pytest.warns(UserWarning, match="DiagonalRescaling: 1 entries with u\\*v = 0"):
        DiagonalRescaling().horizontal_projection(w, xi)


def test_adaptive_closed_forms_at_w_equal_one_and_their_gradients_at_masked_entries():
    """At ``w = 1`` the geodesic is ``exp(t xi)`` (not frozen); at ``w = 0`` the Christoffel term
    and the geodesic are constant, so their gradients there are 0, not NaN (the safe divisor)."""
    grp = PositiveRescaling(["a"])
    w = {"a": torch.tensor([1.0, 0.0, -2.0], dtype=DT)}
    xi = {"a": torch.tensor([0.3, 0.5, 0.4], dtype=DT, requires_grad=True)}
    close(grp.geodesic_exact(w, xi, 0.5)["a"].detach(),
          torch.tensor([math.exp(0.15), 0.0, -2.0 * math.exp(-0.1)], dtype=DT))
    for f in (lambda: grp.christoffel(w, xi)["a"], lambda: grp.geodesic_exact(w, xi, 0.5)["a"]):
        (g,) = torch.autograd.grad(f().sum(), xi["a"])
        assert bool(torch.isfinite(g).all()) and float(g[1]) == 0.0

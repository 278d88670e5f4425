"""Behaviour of :class:`Quotient` and the tangent-dict helpers checked against closed forms (issue 18,
mutation testing of ``quotient.py`` and ``tangent.py``).

The composite quotient of these tests has two symmetry groups and an adaptive rest, with their
parameters interleaved in ``NAMES`` so that a mix-up of blocks or of the output order shows:

* ``DiagonalRescaling("u", "v")`` (spec part 1 §4.4, §6.4): inverse metric
  ``sum xi_u zeta_u/u^2 + xi_v zeta_v/v^2``, projection ``b = (xi_u/u + xi_v/v)/2``,
  ``Pi xi = (u b, v b)``, ``Gamma = (-xi_u^2/u, -xi_v^2/v)``, exact geodesic ``w exp(t xi/w)``;
* ``LayerRescaling("W1", "W2")`` (the user group of ``geometry_cases``, generic base-class defaults):
  metric ``<eta1, zeta1>/|W1|^2 + <eta2, zeta2>/|W2|^2``; each block is the cylinder
  ``R x S^{n-1}`` in ``(log |W|, W/|W|)``, so its geodesic is the closed form of :func:`cylinder_geodesic`
  and ``Gamma(xi, xi) = -2 (<xi, W>/|W|^2) xi + |xi|^2 W/|W|^2`` (conformally flat metric
  ``e^{2 sigma} I``, ``sigma = -log |W|``);
* the rest ``("a", "c")``: adaptive metric ``sum xi zeta / w^2`` (spec §4.5), ``Gamma = -xi^2/w``.

Every reference below is written from those formulas, not from the library's code. float64.
"""
from __future__ import annotations

import math

import pytest
import torch
from geometry_cases import LayerRescaling, PooledAttention
from torch import nn

from quotientsharp import DiagonalRescaling, Euclidean, PositiveRescaling, Quotient
from quotientsharp import tangent as T
from quotientsharp.adapters import find_symmetries

DT = torch.float64
NAMES = ("a", "u", "W1", "v", "c", "W2")


def _point(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def away(*shape):  # magnitudes in [0.5, 1.5], random signs: full rank, no zero weights
        return torch.sign(torch.randn(*shape, generator=g, dtype=DT)) * (0.5 + torch.rand(*shape, generator=g, dtype=DT))

    return {"a": away(3), "u": away(4), "W1": away(3, 2), "v": away(4), "c": away(2), "W2": away(2, 3)}


def _vec(seed: int, size: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    return {n: size * torch.randn(t.shape, generator=g, dtype=DT) for n, t in _point().items()}


class FastLayerRescaling(LayerRescaling):
    """The user group with its Christoffel term in closed form (the conformal formula of the module
    docstring): the RK4 geodesics of the base class then cost milliseconds."""

    def christoffel(self, w, xi):
        out = {}
        for n in self.names:
            r2 = w[n].pow(2).sum()
            out[n] = -2 * (xi[n] * w[n]).sum() / r2 * xi[n] + xi[n].pow(2).sum() / r2 * w[n]
        return out


def _quotient(generic: bool = False, **kw) -> Quotient:
    layer = (LayerRescaling if generic else FastLayerRescaling)("W1", "W2")
    return Quotient([layer, DiagonalRescaling("u", "v", "inv")], NAMES, **kw)


def _close(a: dict, b: dict, tol: float = 1e-12) -> None:
    assert list(a) == list(b)
    for n in a:
        assert a[n].shape == b[n].shape and a[n].dtype == b[n].dtype, n
        assert torch.allclose(a[n], b[n], rtol=tol, atol=tol), (n, (a[n] - b[n]).abs().max())


def _flat(d: dict) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in NAMES])


def _unflat(x: torch.Tensor) -> dict:
    out, i = {}, 0
    for n, t in _point().items():
        out[n] = x[i:i + t.numel()].reshape(t.shape)
        i += t.numel()
    return {n: out[n] for n in NAMES}


# ----------------------------------------------------------------------------- references
def ref_metric_diag(w: dict) -> torch.Tensor:
    """Diagonal of the (diagonal) total metric, flattened in NAMES order."""
    diag = {"a": 1 / w["a"] ** 2, "c": 1 / w["c"] ** 2, "u": 1 / w["u"] ** 2, "v": 1 / w["v"] ** 2,
            "W1": torch.full_like(w["W1"], 1 / float(w["W1"].pow(2).sum())),
            "W2": torch.full_like(w["W2"], 1 / float(w["W2"].pow(2).sum()))}
    return _flat(diag)


def ref_inner(w, xi, zeta) -> torch.Tensor:
    return (ref_metric_diag(w) * _flat(xi) * _flat(zeta)).sum()


def ref_projection(w, xi) -> dict:
    b = 0.5 * (xi["u"] / w["u"] + xi["v"] / w["v"])
    nu = {"W1": w["W1"], "W2": -w["W2"]}  # vertical vector of the layer rescaling, g(nu, nu) = 2
    c = ((xi["W1"] * w["W1"]).sum() / w["W1"].pow(2).sum() - (xi["W2"] * w["W2"]).sum() / w["W2"].pow(2).sum()) / 2
    out = {"a": xi["a"], "c": xi["c"], "u": w["u"] * b, "v": w["v"] * b,
           "W1": xi["W1"] - c * nu["W1"], "W2": xi["W2"] - c * nu["W2"]}
    return {n: out[n] for n in NAMES}


def ref_christoffel(w, xi) -> dict:
    out = {n: -xi[n] ** 2 / w[n] for n in ("a", "c", "u", "v")}
    for n in ("W1", "W2"):
        r2 = w[n].pow(2).sum()
        out[n] = -2 * (xi[n] * w[n]).sum() / r2 * xi[n] + xi[n].pow(2).sum() / r2 * w[n]
    return {n: out[n] for n in NAMES}


def cylinder_geodesic(W: torch.Tensor, xi: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """Geodesic of ``<eta, zeta>/|W|^2``: ``log|W|`` moves linearly, ``W/|W|`` on a great circle."""
    r = W.norm()
    e = W / r
    rate = (xi * W).sum() / r ** 2
    perp = xi - (xi * e).sum() * e
    phi = perp.norm() / r
    return r * torch.exp(rate * t) * (torch.cos(phi * t) * e + torch.sin(phi * t) * perp / perp.norm())


def ref_geodesic(w, xi, t, order, rest_order) -> dict:
    """Groups at ``order`` (2 or "exact"), rest at ``rest_order`` (1, 2 or "exact")."""
    gam = ref_christoffel(w, xi)
    out = {}
    for n in NAMES:
        o = rest_order if n in ("a", "c") else order
        if o == 1:
            out[n] = w[n] + t * xi[n]
        elif o == 2:
            out[n] = w[n] + t * xi[n] - 0.5 * t * t * gam[n]
        elif n in ("W1", "W2"):
            out[n] = cylinder_geodesic(w[n], xi[n], t)
        else:  # adaptive and diag-inverse: w exp(t xi / w) coordinatewise
            out[n] = w[n] * torch.exp(t * xi[n] / w[n])
    return out


# ----------------------------------------------------------------------------- construction
def test_construction_splits_groups_and_rest_in_name_order():
    q = _quotient()
    assert q.names == NAMES
    assert isinstance(q.rest, PositiveRescaling) and q.rest.names == ("a", "c")
    assert q.rest_kind == "adaptive" and (q.order, q.rest_order) == (2, 1)
    assert q.all_groups == q.groups + [q.rest] and len(q.groups) == 2
    assert isinstance(_quotient(rest="euclidean").rest, Euclidean)
    full = Quotient([DiagonalRescaling("u", "v")], ["u", "v"])
    assert full.rest is None and full.all_groups == full.groups
    # order names are canonicalised
    q2 = _quotient(order="second", rest_order="retraction")
    assert (q2.order, q2.rest_order) == (2, 1)


def test_construction_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"^rest must be one of \['adaptive', 'euclidean'\], got 'flat'"):
        _quotient(rest="flat")
    with pytest.raises(ValueError, match=r"acts on 'u', which is not among"):
        Quotient([DiagonalRescaling("u", "v")], ["a", "v"])
    with pytest.raises(ValueError, match=r"parameter 'v' is claimed by both DiagonalRescaling\('u', 'v'"):
        Quotient([DiagonalRescaling("u", "v"), DiagonalRescaling("c", "v")], NAMES)
    with pytest.raises(ValueError, match=r"^order must be one of"):
        _quotient(order=3)
    with pytest.raises(ValueError, match=r"^rest_order must be one of"):
        _quotient(rest_order=5)


def test_repr_and_summary():
    q = _quotient()
    groups = ", ".join(repr(g) for g in q.groups)
    assert repr(q) == f"Quotient([{groups}], rest=PositiveRescaling(2), order=2, rest_order=1)"
    full = Quotient([DiagonalRescaling("u", "v")], ["u", "v"], order="exact")
    assert repr(full) == "Quotient([DiagonalRescaling('u', 'v', metric='inv')], rest=none, order='exact', rest_order=1)"
    # groups without block descriptions are listed by their repr, then the rest metric
    assert q.summary().splitlines() == [repr(q.groups[0]), repr(q.groups[1]), "rest: adaptive metric on 2 parameters"]
    assert full.summary() == "DiagonalRescaling('u', 'v', metric='inv')"


def test_summary_lists_attention_blocks_per_layer_before_other_groups():
    torch.manual_seed(0)
    model = PooledAttention(4, 2).to(DT)
    att = find_symmetries(model, metric="inv", eps_rel=0.0).groups[0]
    names = [n for n, _ in model.named_parameters()] + ["u", "v"]
    q = Quotient([att, DiagonalRescaling("u", "v")], names, rest="euclidean")
    rows = att.block_summaries()
    assert {layer for layer, _, _ in rows} == {"att"} and sorted(p for _, p, _ in rows) == ["QK", "VO"]
    text = dict((p, d) for _, p, d in rows)
    assert q.summary().splitlines() == [f"att: QK: {text['QK']}; VO: {text['VO']}",
                                        "DiagonalRescaling('u', 'v', metric='inv')",
                                        "rest: euclidean metric on 1 parameters"]


def test_from_model_covers_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)
    q = Quotient.from_model(model, order="exact", rest_order=2)
    assert q.names == ("0.weight", "1.weight", "1.bias") and q.groups == []
    assert isinstance(q.rest, PositiveRescaling) and q.rest.names == q.names
    assert (q.order, q.rest_order) == ("exact", 2)
    q = Quotient.from_model(model, [DiagonalRescaling("1.weight", "0.weight")], rest="euclidean")
    assert isinstance(q.rest, Euclidean) and q.rest.names == ("1.bias",) and len(q.groups) == 1


def test_replace_changes_only_what_is_given():
    q = _quotient()
    r = q.replace(order="exact")
    assert (r.order, r.rest_order, r.rest_kind, r.groups, r.names) == ("exact", 1, "adaptive", q.groups, NAMES)
    r = q.replace(rest="euclidean", rest_order=2)
    assert (r.order, r.rest_order, r.rest_kind) == (2, 2, "euclidean") and isinstance(r.rest, Euclidean)
    r = q.replace(groups=[q.groups[1]])
    assert r.groups == [q.groups[1]] and r.rest.names == ("a", "W1", "c", "W2")
    r = _quotient(order=1, rest_order="exact", rest="euclidean").replace()
    assert (r.order, r.rest_order, r.rest_kind) == (1, "exact", "euclidean")


def test_with_metric_forwards_options_to_the_groups():
    q = _quotient()
    mix = q.with_metric("mix", mixed_domain="extend")
    assert mix.groups[1].metric == "mix" and mix.groups[1].mixed_domain == "extend"
    assert mix.groups[0] is q.groups[0]  # a one-metric group returns itself
    assert q.with_metric("mix").groups[1].mixed_domain == "restrict"


# ----------------------------------------------------------------------------- validation
def test_validate_and_check_tangent():
    q, w = _quotient(), _point()
    assert q.validate(w) is None
    with pytest.raises(ValueError, match=r"lacks \['W2'\]"):
        q.validate({n: w[n] for n in NAMES[:-1]})
    with pytest.raises(ValueError, match="mix devices or dtypes"):
        q.validate({**w, "a": w["a"].float()})
    with pytest.raises(ValueError, match="non-finite weights in parameter 'u'"):
        q.validate({**w, "u": torch.full_like(w["u"], math.nan)})
    xi = _vec(0)
    assert q.check_tangent(w, xi) is None
    with pytest.raises(ValueError, match=r"^tangent vector is missing parameter\(s\) \['c'\]"):
        q.check_tangent(w, {n: xi[n] for n in NAMES if n != "c"})
    with pytest.raises(ValueError, match=r"^step has parameter\(s\) \['z'\]"):
        q.check_tangent(w, {**xi, "z": xi["a"]}, "step")
    with pytest.raises(ValueError, match=r"^step\['u'\] has dtype torch.float32"):
        q.check_tangent(w, {**xi, "u": xi["u"].float()}, what="step")


def test_tangent_check_functions():
    p = {"x": torch.zeros(2, dtype=DT), "y": torch.zeros(3, dtype=DT)}
    assert T.check_tangent(p, {"x": torch.ones(2, dtype=DT), "y": torch.ones(3, dtype=DT)}) is None
    with pytest.raises(ValueError, match=r"^tangent vector is missing parameter\(s\) \['y'\]"):
        T.check_tangent(p, {"x": torch.ones(2, dtype=DT)})
    with pytest.raises(ValueError, match=r"^tangent vector has parameter\(s\) \['z'\]"):
        T.check_tangent(p, {"x": p["x"], "y": p["y"], "z": p["x"]})
    # names restrict the check to a subset
    assert T.check_tangent(p, {"x": p["x"]}, ["x"]) is None
    with pytest.raises(ValueError, match=r"\['x'\] has shape \(3,\), parameter has \(2,\)"):
        T.check_tangent(p, {"x": p["y"], "y": p["y"]})
    with pytest.raises(ValueError, match=r"\['y'\] has dtype torch.float32, parameter has torch.float64"):
        T.check_tangent(p, {"x": p["x"], "y": p["y"].float()})
    with pytest.raises(ValueError, match=r"\['y'\] is on meta, parameter is on cpu"):
        T.check_tangent(p, {"x": p["x"], "y": p["y"].to("meta")})
    assert T.check_consistent(p) is None
    with pytest.raises(ValueError, match=r"\(x: torch.float64 on cpu, y: torch.float32 on cpu\)"):
        T.check_consistent({"x": p["x"], "y": p["y"].float()})
    with pytest.raises(ValueError, match="mix devices or dtypes"):
        T.check_consistent({"x": p["x"], "y": p["y"].to("meta")})


# ----------------------------------------------------------------------------- metric and projection
def test_metric_projection_gradient_and_christoffel_match_closed_forms():
    q, w, xi, zeta = _quotient(generic=True), _point(), _vec(0), _vec(1)
    assert torch.allclose(q.inner(w, xi, zeta), ref_inner(w, xi, zeta), rtol=1e-13)
    small = T.scale(xi, 0.1)  # norm < 1: a clamp at 1 would show
    assert float(ref_inner(w, small, small)) < 0.5
    assert torch.allclose(q.norm_sq(w, small), ref_inner(w, small, small), rtol=1e-13)
    assert torch.allclose(q.norm(w, small), ref_inner(w, small, small).sqrt(), rtol=1e-13)
    _close(q.horizontal_projection(w, xi), ref_projection(w, xi), 1e-12)
    egrad = _vec(2)
    rgrad = _unflat(_flat(egrad) / ref_metric_diag(w))  # g^{-1} egrad
    _close(q.egrad_to_rgrad(w, egrad), rgrad)
    _close(q.riemannian_gradient(w, egrad), ref_projection(w, rgrad), 1e-12)
    _close(q.christoffel(w, xi), ref_christoffel(w, xi), 1e-10)
    assert float(q.is_horizontal(w, ref_projection(w, xi))) < 1e-12
    assert float(q.is_horizontal(w, xi)) > 1e-3


def test_whiten_has_covariance_inverse_metric():
    """``whiten`` is linear; its matrix K must satisfy ``K K^T = M^{-1}`` (M the dense metric)."""
    q, w = _quotient(), _point()
    D = _flat(w).numel()
    K = torch.stack([_flat(q.whiten(w, _unflat(e))) for e in torch.eye(D, dtype=DT)], 1)
    assert torch.allclose(K @ K.T, torch.diag(1 / ref_metric_diag(w)), rtol=1e-12, atol=1e-12)
    assert list(q.whiten(w, _vec(0))) == list(NAMES)


def test_restrict_to_domain_clamps_the_mixed_diagonal_only():
    """``mixed_domain="restrict"``: ``b >= -1/2`` on the mixed diagonal block; identity elsewhere."""
    w = _point()
    q = _quotient().with_metric("mix")
    b = torch.tensor([-1.5, -0.2, 0.3, -0.7], dtype=DT)
    xi = {**_vec(0), "u": w["u"] * b, "v": w["v"] * b}
    out = q.restrict_to_domain(w, xi)
    clamped = b.clamp_min(-0.5)
    _close(out, {**xi, "u": w["u"] * clamped, "v": w["v"] * clamped})
    _close(_quotient().restrict_to_domain(w, xi), xi)


# ----------------------------------------------------------------------------- group
def test_vertical_vectors_follow_the_lie_algebra_elements():
    q, w = _quotient(), _point()
    om_diag = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=DT)
    om_layer = torch.tensor([0.7], dtype=DT)
    nu = q.vertical(w, [om_layer, om_diag])
    ref = {n: torch.zeros_like(w[n]) for n in NAMES}
    ref.update(u=w["u"] * om_diag, v=-w["v"] * om_diag, W1=0.7 * w["W1"], W2=-0.7 * w["W2"])
    _close(nu, ref)
    only_diag = q.vertical(w, [None, om_diag])
    _close(only_diag, {**ref, "W1": torch.zeros_like(w["W1"]), "W2": torch.zeros_like(w["W2"])})
    assert float(q.norm(w, q.horizontal_projection(w, nu))) < 1e-12


def test_random_vertical_is_reproducible_and_vertical():
    q, w = _quotient(), _point()
    v1 = q.random_vertical(w, torch.Generator().manual_seed(3))
    v2 = q.random_vertical(w, torch.Generator().manual_seed(3))
    _close(v1, v2, 0.0)
    # the documented draw: standard normal algebra elements in group order, in float64 on the generator
    g = torch.Generator().manual_seed(3)
    om_layer = torch.randn(1, generator=g, dtype=DT)
    om_diag = torch.randn(4, generator=g, dtype=DT)
    _close(v1, q.vertical(w, [om_layer, om_diag]), 0.0)
    assert float(q.norm(w, q.horizontal_projection(w, v1))) < 1e-12 < float(q.norm(w, v1))
    free = q.random_vertical(w)  # without a generator: the global one, still vertical
    assert float(q.norm(w, q.horizontal_projection(w, free))) < 1e-12 < float(q.norm(w, free))


def test_random_vertical_and_randn_like_draw_on_the_generator_device():
    """Draws come from the CPU generator, whatever the default device, and land on the
    parameters' device (the meta device stands in for an accelerator)."""
    qd, w = Quotient([DiagonalRescaling("u", "v")], ["a", "u", "v"]), _point()
    with torch.device("meta"):
        v = qd.random_vertical(w, torch.Generator().manual_seed(0))
        r = T.randn_like(w, torch.Generator().manual_seed(0))
    assert all(t.device.type == "cpu" for t in v.values()) and all(t.device.type == "cpu" for t in r.values())
    _close(v, qd.random_vertical(w, torch.Generator().manual_seed(0)), 0.0)
    _close(r, T.randn_like(w, torch.Generator().manual_seed(0)), 0.0)
    wm = {n: t.to("meta") for n, t in w.items()}
    for out in (qd.random_vertical(wm), qd.random_vertical(wm, torch.Generator().manual_seed(0)),
                T.randn_like(wm, torch.Generator().manual_seed(0))):
        assert all(t.device.type == "meta" and t.dtype == DT for t in out.values())
        assert all(out[n].shape == w[n].shape for n in out)


def test_random_element_action_and_pushforward():
    q, w = _quotient(), _point()
    els = q.random_element(w, generator=torch.Generator().manual_seed(1))
    assert len(els) == 3 and els[2] is None  # the adaptive rest is not a symmetry
    a, g = els[0], els[1]
    assert float(a) > 0 and g.shape == (4,) and bool((g != 0).all())
    # reproducible; the default scale is 1
    again = q.random_element(w, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], a) and torch.equal(again[1], g)
    wide = q.random_element(w, 3.0, torch.Generator().manual_seed(1))
    assert torch.allclose(wide[1].abs().log(), 3.0 * g.abs().log(), rtol=1e-12)
    moved = q.action(w, els)
    ref = {**w, "W1": a * w["W1"], "W2": w["W2"] / a, "u": g * w["u"], "v": w["v"] / g}
    _close(moved, ref)
    xi = _vec(0)
    _close(q.pushforward(w, els, xi), {**xi, "W1": a * xi["W1"], "W2": xi["W2"] / a,
                                       "u": g * xi["u"], "v": xi["v"] / g})
    # the quotient's metric is invariant under the action (spec §6.7)
    pushed = q.pushforward(w, els, xi)
    assert torch.allclose(q.norm_sq(moved, pushed), q.norm_sq(w, xi), rtol=1e-12)
    _close(q.action(w, [None, None, None]), w, 0.0)


def test_random_element_forwards_group_options():
    """``max_cond`` reaches ``AttentionGL.random_element``: each A then has condition number max_cond."""
    torch.manual_seed(0)
    model = PooledAttention(4, 2).to(DT)
    q = find_symmetries(model, metric="inv", eps_rel=0.0)
    w = {n: p.detach() for n, p in model.named_parameters()}
    els = q.random_element(w, generator=torch.Generator().manual_seed(0), max_cond=50.0)
    conds = torch.cat([torch.linalg.cond(A).reshape(-1) for A in els[0]])
    assert torch.allclose(conds, torch.full_like(conds, 50.0), rtol=1e-9)


# ----------------------------------------------------------------------------- geodesics
def test_geodesic_orders_per_block_match_closed_forms():
    q, w = _quotient(), _point()
    xi = ref_projection(w, _vec(0))  # horizontal: the exact diagonal geodesic is then exact
    _close(q.geodesic(w, xi), ref_geodesic(w, xi, 1.0, 2, 1), 1e-10)
    _close(q.geodesic(w, xi, 0.5), ref_geodesic(w, xi, 0.5, 2, 1), 1e-10)
    _close(q.geodesic(w, xi, order="first", rest_order="second"), ref_geodesic(w, xi, 1.0, 1, 2), 1e-10)
    _close(q.geodesic(w, xi, order="exact", rest_order="exact"), ref_geodesic(w, xi, 1.0, "exact", "exact"), 1e-9)
    _close(_quotient(order="exact", rest_order=2).geodesic(w, xi, 0.7),
           ref_geodesic(w, xi, 0.7, "exact", 2), 1e-9)
    _close(q.geodesic(w, xi, order="ode", rest_order="ode"), ref_geodesic(w, xi, 1.0, "exact", "exact"), 1e-8)
    with pytest.raises(ValueError, match=r"^order must be one of"):
        q.geodesic(w, xi, order=4)
    with pytest.raises(ValueError, match=r"^rest_order must be one of"):
        q.geodesic(w, xi, rest_order=4)


@pytest.mark.parametrize("order", ["exact", "ode"])
def test_geodesic_integrator_options_reach_the_integrated_blocks(order):
    """One unchecked RK4 step (``n_steps=1, tol=None``) is measurably off the closed form on the
    layer block, whose exact geodesic is integrated; the closed-form blocks are unaffected."""
    q, w = _quotient(), _point()
    xi = ref_projection(w, _vec(0, size=0.8))
    ref = ref_geodesic(w, xi, 1.0, "exact", 1)
    crude = q.geodesic(w, xi, order=order, n_steps=1, tol=None)
    err = max(float((crude[n] - ref[n]).abs().max()) for n in ("W1", "W2"))
    assert err > 1e-6
    for n in ("a", "c") + (("u", "v") if order == "exact" else ()):
        assert torch.allclose(crude[n], ref[n], rtol=1e-12, atol=1e-12)
    fine = q.geodesic(w, xi, order=order)
    assert max(float((fine[n] - ref[n]).abs().max()) for n in ("W1", "W2")) < 1e-9


def _ref_vjp(w, xi, cot, order, rest_order):
    x = _flat(xi).requires_grad_(True)
    out = ref_geodesic(w, _unflat(x), 1.0, order, rest_order)
    (g,) = torch.autograd.grad(_flat(out), x, _flat(cot))
    return _unflat(g)


def test_geodesic_vjp_matches_autograd_of_the_closed_forms():
    q, w = _quotient(), _point()
    xi, cot = ref_projection(w, _vec(0)), _vec(3)
    _close(q.geodesic_vjp(w, xi, cot), _ref_vjp(w, xi, cot, 2, 1), 1e-10)
    _close(q.geodesic_vjp(w, xi, cot, order="first", rest_order="second"), _ref_vjp(w, xi, cot, 1, 2), 1e-10)
    _close(_quotient(rest_order="exact").geodesic_vjp(w, xi, cot, order="exact"),
           _ref_vjp(w, xi, cot, "exact", "exact"), 1e-8)
    _close(q.geodesic_vjp(w, xi, cot, order="ode", rest_order="ode"), _ref_vjp(w, xi, cot, "exact", "exact"), 1e-8)
    with pytest.raises(ValueError, match=r"^order must be one of"):
        q.geodesic_vjp(w, xi, cot, order=0)
    with pytest.raises(ValueError, match=r"^rest_order must be one of"):
        q.geodesic_vjp(w, xi, cot, rest_order=0)


@pytest.mark.parametrize("order", ["exact", "ode"])
def test_geodesic_vjp_integrator_options_reach_the_integrated_blocks(order):
    q, w = _quotient(), _point()
    xi, cot = ref_projection(w, _vec(0, size=0.8)), _vec(3)
    ref = _ref_vjp(w, xi, cot, "exact", 1)
    crude = q.geodesic_vjp(w, xi, cot, order=order, n_steps=1, tol=None)
    assert max(float((crude[n] - ref[n]).abs().max()) for n in ("W1", "W2")) > 1e-6
    assert torch.allclose(crude["a"], cot["a"], rtol=0, atol=0)  # rest at order 1: the identity
    fine = q.geodesic_vjp(w, xi, cot, order=order)
    assert max(float((fine[n] - ref[n]).abs().max()) for n in ("W1", "W2")) < 1e-8


# ----------------------------------------------------------------------------- tangent helpers
def test_tangent_arithmetic():
    a, b = _vec(0), _vec(1)
    _close(T.add(a, b), {n: a[n] + b[n] for n in a}, 0)
    _close(T.add(a, b, -2.5), {n: a[n] - 2.5 * b[n] for n in a}, 1e-15)
    _close(T.sub(a, b), {n: a[n] - b[n] for n in a}, 0)
    _close(T.scale(a, 3.0), {n: 3.0 * a[n] for n in a}, 0)
    _close(T.scale(a, torch.tensor(-0.5, dtype=DT)), {n: -0.5 * a[n] for n in a}, 0)
    _close(T.zeros_like(a), {n: torch.zeros_like(a[n]) for n in a}, 0)
    c = _vec(2)
    ref = {n: 2.0 * a[n] - 3.0 * b[n] + 0.5 * c[n] for n in a}
    before = {n: t.clone() for n, t in a.items()}
    _close(T.lincomb((2.0, a), (-3.0, b), (0.5, c)), ref, 1e-14)
    _close(T.lincomb((1.0, a)), a, 0)
    _close(a, before, 0)  # inputs untouched
    for c0 in (1.0, 2.0, 3.0):
        own = {n: t.clone() for n, t in a.items()}
        out = T.lincomb_(c0, own, (-3.0, b), (0.5, c))
        assert out is own
        _close(own, {n: c0 * a[n] - 3.0 * b[n] + 0.5 * c[n] for n in a}, 1e-14)
    own = {n: t.clone() for n, t in a.items()}
    assert T.scale_(own, -2.0) is own
    _close(own, {n: -2.0 * a[n] for n in a}, 0)
    dot = sum((a[n] * b[n]).sum() for n in a)
    assert torch.allclose(T.dot(a, b), dot, rtol=1e-14)
    assert list(T.restrict(a, ["v", "a"])) == ["v", "a"]


def test_flatten_unflatten_order_and_dtype():
    a = _vec(0)
    flat = T.flatten(a, ["v", "a"])
    assert torch.equal(flat, torch.cat([a["v"], a["a"]]))
    assert torch.equal(T.flatten(a), torch.cat([a[n].reshape(-1) for n in a]))
    vec = torch.arange(float(flat.numel()), dtype=torch.float32)
    like = {"v": a["v"], "a": a["a"]}
    out = T.unflatten(vec, like)
    assert list(out) == ["v", "a"] and out["v"].dtype == torch.float32
    assert torch.equal(out["v"], vec[:4]) and torch.equal(out["a"], vec[4:])


def test_randn_like_draws_from_the_generator_in_name_order():
    a = {"x": torch.zeros(2, 3, dtype=DT), "y": torch.zeros(4, dtype=torch.float32)}
    r = T.randn_like(a, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(r["x"], torch.randn(2, 3, generator=g, dtype=DT))
    assert torch.equal(r["y"], torch.randn(4, generator=g, dtype=torch.float32))
    free = T.randn_like(a)
    assert [(t.shape, t.dtype) for t in free.values()] == [(t.shape, t.dtype) for t in a.values()]
    assert float(free["x"].abs().sum()) > 0


def _square(x):
    return x * x


def _cube(x):
    return x * x * x


@pytest.mark.parametrize("chunk", [4, T.CHUNK])
def test_chunked_sum_sums_chunk_by_chunk_with_masked_chunks(chunk, monkeypatch):
    """``sum fn(x)``; chunks listed in ``masked_chunks`` use ``masked_fn``; a small or
    non-contiguous tensor is one chunk (index 0)."""
    monkeypatch.setattr(T, "CHUNK", chunk)
    n = 2 * chunk + 3  # three chunks, the last one short
    x = torch.linspace(-1.0, 2.0, n, dtype=DT)
    y = torch.linspace(0.5, 1.5, n, dtype=DT)
    chunks = [slice(0, chunk), slice(chunk, 2 * chunk), slice(2 * chunk, n)]
    assert torch.allclose(T.chunked_sum(_square, x), (x * x).sum(), rtol=1e-13)
    assert torch.allclose(T.chunked_sum(torch.mul, x, y), (x * y).sum(), rtol=1e-13)
    for masked in ({1}, {0, 2}, set()):
        ref = sum(float((x[s] ** 3 if i in masked else x[s] ** 2).sum()) for i, s in enumerate(chunks))
        got = T.chunked_sum(_square, x, masked_fn=_cube, masked_chunks=masked)
        assert math.isclose(float(got), ref, rel_tol=1e-12), masked
    # a small tensor is chunk 0
    s = x[:chunk]
    assert torch.allclose(T.chunked_sum(_square, s, masked_fn=_cube, masked_chunks=[0]), (s ** 3).sum(), rtol=1e-13)
    assert torch.allclose(T.chunked_sum(_square, s, masked_fn=_cube), (s ** 2).sum(), rtol=1e-13)
    # a large non-contiguous tensor is one chunk
    m = torch.linspace(-1.0, 1.0, 2 * n, dtype=DT).reshape(2, n).T
    assert not m.is_contiguous()
    assert torch.allclose(T.chunked_sum(_square, m), (m * m).sum(), rtol=1e-13)
    assert torch.allclose(T.chunked_sum(_square, m, masked_fn=_cube, masked_chunks=[0]), (m ** 3).sum(), rtol=1e-13)
    # dot goes through it on every tensor
    a, b = {"p": x, "q": s}, {"p": y, "q": 2 * s}
    assert torch.allclose(T.dot(a, b), (x * y).sum() + 2 * (s * s).sum(), rtol=1e-13)


def test_generic_christoffel_pullback_in_the_rk4_adjoint():
    """Regression: the base class's autodiff Christoffel term must be differentiable in ``w`` (its
    dense metric was detached, so the RK4 adjoint of a user-defined group was off by ~1e-3). The
    same RK4 map with the closed-form Christoffel term gives the reference."""
    w = _point()
    xi, cot = ref_projection(w, _vec(0, size=0.8)), _vec(3)
    kw = dict(order="ode", rest_order=1, n_steps=4, tol=None)
    generic = _quotient(generic=True).geodesic_vjp(w, xi, cot, **kw)
    fast = _quotient().geodesic_vjp(w, xi, cot, **kw)
    _close(generic, fast, 1e-11)
    exact = _ref_vjp(w, xi, cot, "exact", 1)
    assert max(float((fast[n] - exact[n]).abs().max()) for n in ("W1", "W2")) < 1e-3

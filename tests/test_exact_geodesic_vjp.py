"""The integrated ("exact"/"ode") geodesic of the GL attention blocks and its vector-Jacobian
product (spec part 1 §6.5): the closed-form Christoffel pullback, the endpoint against the
reference RK4 on parameter dicts, the discrete adjoint against autograd through every RK4 step
and against finite differences (float64)."""
from __future__ import annotations

import pytest
import torch
from geometry_cases import LayerRescaling

from quotientsharp import tangent as T
from quotientsharp.adapters import find_symmetries
from quotientsharp.geodesic import GLBlockODE, gl_block_christoffel, rk4_geodesic
from quotientsharp.groups import AttentionGL
from quotientsharp.groups.attention import GLBlock, Piece
from quotientsharp.groups.base import geodesic_error_slopes
from quotientsharp.groups.gl_math import SingularHeadError, gl_christoffel, gl_factors
from quotientsharp.models import TinyViT

DT = torch.float64


def _tinyvit_group(metric: str, eps_rel: float = 0.0):
    """The AttentionGL group of a 2-layer TinyViT in float64 (a QK and a VO stack of different
    shapes, so the packed ODE merges and row-pads them) and its weights."""
    torch.manual_seed(0)
    model = TinyViT(image_size=4, patch_size=2, d_model=8, depth=2, n_heads=2, mlp_dim=8).to(DT)
    q = find_symmetries(model, metric, eps_rel=eps_rel)
    (gl,) = [g for g in q.groups if isinstance(g, AttentionGL)]
    w = {n: p.detach() for n, p in model.named_parameters() if n in gl.names}
    return gl, w


def _horizontal(gl, w, seed: int, radius: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    xi = gl.horizontal_projection(w, {n: torch.randn(w[n].shape, generator=g, dtype=DT) for n in gl.names})
    return T.scale(xi, radius / float(gl.norm(w, xi)))


def _random_like(d: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(x.shape, generator=g, dtype=DT) for n, x in d.items()}


def _rel(a: dict, b: dict) -> float:
    d = T.sub(a, b)
    return float(torch.sqrt(T.dot(d, d)) / torch.sqrt(T.dot(b, b)))


def _reference_vjp(gl, w, xi, cot, n_steps):
    """Autograd through every step of the plain RK4 on parameter dicts (today's reference)."""
    leaf = {n: xi[n].clone().requires_grad_(True) for n in gl.names}
    end, _ = rk4_geodesic(gl.christoffel, w, leaf, 1.0, n_steps)
    grads = torch.autograd.grad([end[n] for n in gl.names], [leaf[n] for n in gl.names],
                                [cot[n] for n in gl.names])
    return dict(zip(gl.names, grads)), {n: end[n].detach() for n in gl.names}


@pytest.mark.parametrize("metric", ["mix", "inv"])
@pytest.mark.parametrize("eps_rel,eps_abs", [(0.0, 0.0), (0.1, 0.01)])
def test_block_christoffel_and_pullback(metric, eps_rel, eps_abs):
    g = torch.Generator().manual_seed(1)
    G, H = torch.randn(3, 7, 4, generator=g, dtype=DT), torch.randn(3, 6, 4, generator=g, dtype=DT)
    xG, xH, cG, cH = (torch.randn(x.shape, generator=g, dtype=DT) for x in (G, H, G, H))
    gG, gH, pullback = gl_block_christoffel(metric, G, H, xG, xH, eps_rel, eps_abs, record=True)
    f = gl_factors(G, H, metric, eps_rel, eps_abs, for_projection=False)
    rG, rH = gl_christoffel(metric, f, G, H, xG, xH)
    assert torch.allclose(gG, rG, rtol=1e-12, atol=1e-12) and torch.allclose(gH, rH, rtol=1e-12, atol=1e-12)
    args = [x.clone().requires_grad_(True) for x in (G, H, xG, xH)]
    oG, oH, _ = gl_block_christoffel(metric, *args, eps_rel, eps_abs)
    ref = torch.autograd.grad((oG * cG).sum() + (oH * cH).sum(), args)
    for got, want in zip(pullback(cG, cH), ref):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    # zero-padded rows (how GLBlockODE merges stacks) leave Gamma and the pullback unchanged
    pad = lambda X: torch.nn.functional.pad(X, (0, 0, 0, 2))  # noqa: E731
    pG, pH, ppb = gl_block_christoffel(metric, pad(G), pad(H), pad(xG), pad(xH), eps_rel, eps_abs, record=True)
    assert torch.allclose(pG[:, :7], gG, rtol=1e-13, atol=1e-13) and pG[:, 7:].abs().max() == 0
    for got, want in zip(ppb(pad(cG), pad(cH)), ref):
        assert torch.allclose(got[:, :want.shape[1]], want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    # a cotangent with more rows than the state (the state zero there) equals the padded state's
    eG, eH = torch.randn(3, 9, 4, generator=g, dtype=DT), torch.randn(3, 8, 4, generator=g, dtype=DT)
    for got, want in zip(pullback(eG, eH), ppb(eG, eH)):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_endpoint_and_vjp_match_autograd_through_rk4(metric):
    gl, w = _tinyvit_group(metric, eps_rel=0.05)
    assert len(gl.extract(w)) == 2  # a QK and a VO stack, merged into one padded batch
    xi = _horizontal(gl, w, 0, 0.3)
    cot = _random_like(xi, 1)
    got = gl.geodesic_vjp(w, xi, cot, order="exact", n_steps=8, tol=None)
    want, end_ref = _reference_vjp(gl, w, xi, cot, 8)
    end = gl.geodesic(w, xi, order="exact", n_steps=8, tol=None)
    assert _rel(end, end_ref) < 1e-12
    assert _rel(got, want) < 1e-10
    # the curvature matters at this radius: the exact VJP is not the order-2 one
    assert _rel(gl.geodesic_vjp(w, xi, cot, order=2), want) > 1e-4


def test_default_tolerance_endpoint_and_vjp_against_fine_reference_and_finite_differences():
    gl, w = _tinyvit_group("mix")
    xi = _horizontal(gl, w, 2, 0.2)
    cot = _random_like(xi, 3)
    end = gl.geodesic_ode(w, xi)  # step doubling from 64 steps to tol = 1e-10
    fine, _ = rk4_geodesic(gl.christoffel, w, xi, 1.0, 256)
    scale = float(torch.sqrt(T.dot(xi, xi)))
    d = T.sub(end, fine)
    assert float(torch.sqrt(T.dot(d, d))) < 1e-10 * scale
    got = gl.geodesic_vjp(w, xi, cot, order="ode")
    for seed in (4, 5):
        direction = _random_like(xi, seed)
        h = 1e-5
        plus = gl.geodesic_ode(w, T.add(xi, direction, h))
        minus = gl.geodesic_ode(w, T.add(xi, direction, -h))
        fd = float(T.dot(cot, T.sub(plus, minus))) / (2 * h)
        assert abs(float(T.dot(got, direction)) - fd) < 1e-8 * abs(fd)


def test_autograd_through_the_integrated_geodesic_uses_the_adjoint():
    gl, w = _tinyvit_group("inv")
    xi = _horizontal(gl, w, 6, 0.3)
    cot = _random_like(xi, 7)
    wl = {n: w[n].clone().requires_grad_(True) for n in gl.names}
    xl = {n: xi[n].clone().requires_grad_(True) for n in gl.names}
    end = gl.geodesic(wl, xl, order="ode", n_steps=4, tol=None)
    grads = torch.autograd.grad([end[n] for n in gl.names], [*wl.values(), *xl.values()],
                                [cot[n] for n in gl.names])
    # reference: autograd through every step of the plain RK4, w.r.t. the base point and xi
    wr = {n: w[n].clone().requires_grad_(True) for n in gl.names}
    xr = {n: xi[n].clone().requires_grad_(True) for n in gl.names}
    ref_end, _ = rk4_geodesic(gl.christoffel, wr, xr, 1.0, 4)
    ref = torch.autograd.grad([ref_end[n] for n in gl.names], [*wr.values(), *xr.values()],
                              [cot[n] for n in gl.names])
    k = len(gl.names)
    assert _rel(dict(zip(gl.names, grads[:k])), dict(zip(gl.names, ref[:k]))) < 1e-10
    assert _rel(dict(zip(gl.names, grads[k:])), dict(zip(gl.names, ref[k:]))) < 1e-10


def test_vjp_recomputes_for_another_or_modified_velocity():
    gl, w = _tinyvit_group("mix")
    xi1, xi2 = _horizontal(gl, w, 8, 0.3), _horizontal(gl, w, 9, 0.3)
    cot = _random_like(xi1, 10)
    gl.geodesic_ode(w, xi1, n_steps=4, tol=None)  # kept for xi1
    want2, _ = _reference_vjp(gl, w, xi2, cot, 4)
    assert _rel(gl.geodesic_vjp(w, xi2, cot, order="ode", n_steps=4, tol=None), want2) < 1e-10
    gl.geodesic_ode(w, xi1, n_steps=4, tol=None)
    for n in gl.names:  # an in-place change of xi1 (its version) invalidates the kept integration
        xi1[n].mul_(0.5)
    want1, _ = _reference_vjp(gl, w, xi1, cot, 4)
    assert _rel(gl.geodesic_vjp(w, xi1, cot, order="ode", n_steps=4, tol=None), want1) < 1e-10


@pytest.mark.parametrize("budget", [0, 1 << 40])
def test_checkpointed_adjoint_equals_stored_one(budget, monkeypatch):
    import quotientsharp.geodesic as geo
    gl, w = _tinyvit_group("inv")
    xi = _horizontal(gl, w, 11, 0.3)
    cot = _random_like(xi, 12)
    want, _ = _reference_vjp(gl, w, xi, cot, 10)
    monkeypatch.setattr(geo, "TRAJECTORY_MEMORY_BUDGET", budget)  # 0: sqrt(n) checkpoints
    gl.geodesic_ode(w, xi, n_steps=10, tol=None)
    stored = gl._ode_cache[2].traj
    assert _rel(gl.geodesic_vjp(w, xi, cot, order="ode", n_steps=10, tol=None), want) < 1e-10
    assert gl._ode_cache is None  # the kept integration is released once its VJP is served
    assert (stored.stages is None) == (budget == 0)
    assert len(stored.checkpoints) == (3 if budget == 0 else 1)  # stride ceil(sqrt(10)) = 4: steps 0, 4, 8


def test_second_order_geodesic_matches_the_integrated_one_to_third_order():
    for metric in ("mix", "inv"):
        gl, w = _tinyvit_group(metric)
        xi = _horizontal(gl, w, 13, 1.0)
        slopes = geodesic_error_slopes(gl, w, xi, orders=(1, 2))
        assert abs(slopes[1] - 2) < 0.2 and abs(slopes[2] - 3) < 0.2, slopes


def test_generic_group_exact_vjp_through_the_adjoint():
    g = LayerRescaling("a", "b")
    gen = torch.Generator().manual_seed(14)
    w = {"a": torch.randn(3, 2, generator=gen, dtype=DT), "b": torch.randn(2, 3, generator=gen, dtype=DT)}
    xi = {n: 0.3 * torch.randn(x.shape, generator=gen, dtype=DT) for n, x in w.items()}
    cot = _random_like(xi, 15)
    got = g.geodesic_vjp(w, xi, cot, order="ode", n_steps=6, tol=None)
    want, _ = _reference_vjp(g, w, xi, cot, 6)
    assert _rel(got, want) < 1e-10


def test_a_gram_matrix_turning_singular_on_the_way_is_an_error():
    ode = GLBlockODE("inv", [((1, 3, 2), (1, 3, 2))], labels=lambda: [["blk/head 0"]])
    G = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]], dtype=DT)
    ode.check({"X0": torch.cat([G, G])})  # full rank: fine
    with pytest.raises(SingularHeadError, match="singular Gram matrix of G.*blk/head 0"):
        ode.check({"X0": torch.cat([G * torch.tensor([1.0, 0.0], dtype=DT), G])})
    with pytest.raises(SingularHeadError, match="singular Gram matrix of H.*blk/head 0"):
        ode.check({"X0": torch.cat([G, 0 * G])})
    with pytest.raises(SingularHeadError, match="no longer finite"):
        ode.check({"X0": torch.cat([G, G * float("nan")])})
    # through the group: a base point with a dead head is refused before integrating
    gl = AttentionGL([GLBlock((Piece("G", "cols"),), (Piece("H", "cols"),), 1, 2)], "inv")
    xi = {"G": torch.ones(3, 2, dtype=DT), "H": torch.ones(3, 2, dtype=DT)}
    with pytest.raises(SingularHeadError, match="singular Gram matrix"):
        gl.geodesic_ode({"G": torch.zeros(3, 2, dtype=DT), "H": G[0]}, xi, n_steps=2, tol=None)


def test_zero_velocity_endpoint_and_vjp():
    gl, w = _tinyvit_group("mix")
    xi = {n: torch.zeros_like(w[n]) for n in gl.names}
    cot = _random_like(xi, 16)
    end = gl.geodesic(w, xi, order="exact", n_steps=4, tol=None)
    assert all(torch.equal(end[n], w[n]) for n in gl.names)
    want, _ = _reference_vjp(gl, w, xi, cot, 4)  # the RK4 map's Jacobian at xi = 0 is I
    assert _rel(gl.geodesic_vjp(w, xi, cot, order="exact", n_steps=4, tol=None), want) < 1e-14


def test_inside_torch_func_transforms_the_plain_rk4_agrees_with_the_adjoint():
    gl, w = _tinyvit_group("mix")
    xi = _horizontal(gl, w, 17, 0.3)
    cot, direction = _random_like(xi, 18), _random_like(xi, 19)
    _, jd = torch.func.jvp(lambda x: gl.geodesic_ode(w, x, n_steps=4, tol=None), (xi,), (direction,))
    jtc = gl.geodesic_vjp(w, xi, cot, order="ode", n_steps=4, tol=None)
    a, b = float(T.dot(cot, jd)), float(T.dot(jtc, direction))
    assert abs(a - b) < 1e-10 * abs(a)

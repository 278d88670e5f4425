"""Behavioural tests of the generic defaults of :class:`SymmetryGroup` (``groups/base.py``) that close
the gaps a mutation run found (issue 18).

Every toy group below writes only the four required methods (plus, for cheap ODE runs, a
closed-form Christoffel term), so each other method is the base-class default. Ground truths are
written by hand from dense matrices:

* :class:`Dense`: two tensors ``a`` (2 x 2) and ``b`` (3,), flattened as ``[a.ravel(), b]``; metric
  ``M(w) = S + diag(w^2)`` with a fixed SPD ``S``, so ``Gamma(xi, xi) = M^{-1} (w * xi^2)`` (from
  ``Gamma^l = 1/2 g^{ls} (d_m g_sn + d_n g_sm - d_s g_mn) xi^m xi^n`` with ``d_k g_ij =
  2 w_k delta_ik delta_jk``); a rank-deficient vertical space (four algebra elements in two
  leaves, two of them generating the same vector), so ``V^T M V`` is singular;
* :class:`LogPairClosedGamma` (``geometry_cases``): the log metric ``sum xi^2 / w^2``, ``Gamma = -xi^2 / w``, geodesic ``w e^{t xi/w}``;
* :class:`Weighted`: ``sum xi zeta w^2`` with translations, a metric that is *not* invariant (so the
  ``check_*`` diagnostics have known nonzero errors).
All in float64 unless a test is about float32.
"""
from __future__ import annotations

import math

import pytest
import torch
from geometry_cases import LogPairClosedGamma, log_geodesic, log_pair_point
from tensor_checks import assert_close_tree, gen, rk4_step
from torch.func import vmap

from quotientsharp import SymmetryGroup
from quotientsharp.groups import geodesic_error_slope, geodesic_error_slopes

DT = torch.float64


def close(a, b, rtol=1e-12, atol=1e-13):
    assert_close_tree(a, b, rtol, atol, ordered=True)  # the defaults must keep the names' order


def flat(t: dict) -> torch.Tensor:
    """``[a.ravel(), b]`` by hand (the order of ``Dense.names``)."""
    return torch.cat([t["a"].reshape(-1), t["b"].reshape(-1)])


def unflat(x: torch.Tensor) -> dict:
    return {"a": x[:4].reshape(2, 2), "b": x[4:]}


def reversed_keys(t: dict) -> dict:
    """The same tangent vector with its keys in the other order (a dict API must not care)."""
    return {n: t[n] for n in reversed(list(t))}


# ============================================================================ toy groups
S0 = torch.tensor([[2.0, 0.3, 0.0, 0.1, 0.0, 0.2, 0.0],
                   [0.3, 1.5, 0.4, 0.0, 0.1, 0.0, 0.0],
                   [0.0, 0.4, 1.8, 0.2, 0.0, 0.3, 0.1],
                   [0.1, 0.0, 0.2, 2.2, 0.5, 0.0, 0.0],
                   [0.0, 0.1, 0.0, 0.5, 1.7, 0.2, 0.3],
                   [0.2, 0.0, 0.3, 0.0, 0.2, 1.9, 0.4],
                   [0.0, 0.0, 0.1, 0.0, 0.3, 0.4, 2.1]], dtype=DT)
E_A = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=DT)
C_B = torch.tensor([0.5, -1.0, 1.5], dtype=DT)


class Dense(SymmetryGroup):
    """Metric ``S + diag(w^2)``; algebra ``(p (2,), q (2,))`` with vertical vector
    ``(p0 + q1) X + p1 Y + q0 Z``, ``X = (a, 0)``, ``Y = (0, b)``, ``Z = (E_A, C_B)`` (rank 3 of 4)."""

    def __init__(self):
        super().__init__(["a", "b"])

    def action(self, w, g):
        return {"a": g * w["a"], "b": w["b"] + g}

    def algebra_zeros(self, w):
        return (torch.zeros(2, dtype=w["a"].dtype), torch.zeros(2, dtype=w["a"].dtype))

    def vertical(self, w, omega):
        p, q = omega
        s = p[0] + q[1]
        # keys deliberately not in the order of self.names: results are read by name
        return {"b": p[1] * w["b"] + q[0] * C_B.to(w["b"].dtype),
                "a": s * w["a"] + q[0] * E_A.to(w["a"].dtype)}

    def inner(self, w, xi, zeta):
        x, z, ww = flat(xi), flat(zeta), flat(w)
        return x @ (S0.to(ww.dtype) @ z) + (x * z * ww * ww).sum()


def dense_point(seed=0, dtype=DT):
    g = gen(seed)
    w = {"a": torch.randn(2, 2, generator=g, dtype=DT), "b": torch.randn(3, generator=g, dtype=DT)}
    xi = {"a": torch.randn(2, 2, generator=g, dtype=DT), "b": torch.randn(3, generator=g, dtype=DT)}
    return {n: t.to(dtype) for n, t in w.items()}, {n: t.to(dtype) for n, t in xi.items()}


def dense_M(w):
    return S0.to(flat(w).dtype) + torch.diag(flat(w) ** 2)


def dense_V(w):
    X = torch.cat([w["a"].reshape(-1), torch.zeros(3, dtype=DT)])
    Y = torch.cat([torch.zeros(4, dtype=DT), w["b"]])
    Z = torch.cat([E_A.reshape(-1), C_B])
    return torch.stack([X, Y, Z, X], 1)  # columns: p0, p1, q0, q1


def dense_projector(w):
    """``I - Vr (Vr^T M Vr)^{-1} Vr^T M`` with ``Vr`` the three independent columns."""
    M, Vr = dense_M(w), dense_V(w)[:, :3]
    return torch.eye(7, dtype=DT) - Vr @ torch.linalg.inv(Vr.T @ M @ Vr) @ Vr.T @ M


class Weighted(SymmetryGroup):
    """Translations ``x -> x + g`` with the non-invariant metric ``sum xi zeta x^2``; no algebra."""

    def __init__(self):
        super().__init__(("x",))

    def action(self, w, g):
        return {"x": w["x"] + g}

    def vertical(self, w, omega):
        return {"x": torch.zeros_like(w["x"])}

    def algebra_zeros(self, w):
        return torch.zeros(0, dtype=w["x"].dtype)

    def inner(self, w, xi, zeta):
        return (xi["x"] * zeta["x"] * w["x"] ** 2).sum()


# ============================================================================ construction, defaults, validation
def test_construction_errors_repr_and_plain_defaults():
    with pytest.raises(ValueError, match=r"^Weighted: parameter names repeat: \('x', 'y', 'x'\)$"):
        SymmetryGroup.__init__(Weighted.__new__(Weighted), ["x", "y", "x"])
    with pytest.raises(ValueError, match=r"^Weighted: acts on no parameter$"):
        SymmetryGroup.__init__(Weighted.__new__(Weighted), [])
    with pytest.raises(TypeError):
        SymmetryGroup(["x"])  # abstract
    g = Dense()
    assert g.names == ("a", "b") and isinstance(g.names, tuple)
    assert repr(g) == "Dense(2 parameters)" and repr(Weighted()) == "Weighted(1 parameters)"
    assert g.function_preserving is True and g.has_closed_form_geodesic is False and g.metric is None
    w, xi = dense_point()
    with pytest.raises(NotImplementedError, match=r"^Dense does not implement random_element$"):
        g.random_element(w)
    assert g.with_metric("mix") is g and g.with_metric("inv", eps=1.0) is g
    assert g.masked_count(w) == 0 and g.relative_perturbation(w, xi) is None and g.block_summaries() == []
    r = g.restrict_to_domain(w, xi)
    assert r == xi and r is not xi
    assert g.check_domain(w) is None


def test_restrict_and_validate():
    g = Dense()
    w, _ = dense_point()
    extra = {"b": w["b"], "zz": torch.full((2,), math.nan, dtype=DT), "a": w["a"]}
    r = g.restrict(extra)
    assert list(r) == ["a", "b"] and r["a"] is w["a"] and r["b"] is w["b"]
    g.validate(extra)  # a non-finite entry the group does not act on is ignored
    with pytest.raises(KeyError, match=r"Dense acts on \['b'\], which the given dict lacks"):
        g.restrict({"a": w["a"]})
    with pytest.raises(KeyError, match=r"Dense acts on \['a', 'b'\], which the given dict lacks"):
        g.validate({})
    for bad in (math.nan, math.inf, -math.inf):
        b = w["b"].clone()
        b[1] = bad
        with pytest.raises(ValueError, match=r"^Dense: non-finite weights in parameter 'b'$"):
            g.validate({"a": w["a"], "b": b})
    a = w["a"].clone()
    a[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"non-finite weights in parameter 'a'"):
        g.validate({"a": a, "b": w["b"]})
    with pytest.raises(ValueError, match="mix devices or dtypes"):
        g.validate({"a": w["a"], "b": w["b"].float()})


# ============================================================================ metric
def test_metric_matrix_norm_and_norm_sq():
    g = Dense()
    w, xi = dense_point()
    M = g.metric_matrix(w)
    assert M.shape == (7, 7) and M.dtype == DT and not M.requires_grad
    close(M, dense_M(w))
    close(g.norm_sq(w, xi), flat(xi) @ dense_M(w) @ flat(xi))
    close(g.norm(w, xi), (flat(xi) @ dense_M(w) @ flat(xi)).sqrt())
    w32 = {n: t.float() for n, t in w.items()}
    M32 = g.metric_matrix(w32)
    assert M32.dtype == torch.float32
    close(M32.double(), dense_M(w), rtol=1e-6, atol=1e-6)
    # extra entries of w are ignored
    close(g.metric_matrix({**w, "zz": torch.ones(5, dtype=DT)}), dense_M(w))
    # built on w's device, not on torch's default device
    with torch.device("meta"):
        Mm = g.metric_matrix(w)
    assert Mm.device.type == "cpu"
    close(Mm, dense_M(w))


def test_norm_clamps_negative_round_off_to_zero():
    class Negative(Weighted):
        def inner(self, w, xi, zeta):
            return -(xi["x"] * zeta["x"]).sum()

    g = Negative()
    x = {"x": torch.tensor([2.0], dtype=DT)}
    assert float(g.norm_sq(x, x)) == -4.0
    n = g.norm(x, x)
    assert float(n) == 0.0 and not math.copysign(1.0, float(n)) < 0


def test_metric_matrix_is_differentiable_only_when_w_requires_grad_and_grad_is_on():
    g = Dense()
    w, _ = dense_point()
    wg = {n: t.clone().requires_grad_(True) for n, t in w.items()}
    M = g.metric_matrix(wg)
    assert M.requires_grad
    close(M.detach(), dense_M(w))
    # d/dw sum_ij M_ij = d/dw sum w^2 = 2 w
    ga, gb = torch.autograd.grad(M.sum(), [wg["a"], wg["b"]])
    close(ga, 2 * w["a"])
    close(gb, 2 * w["b"])
    with torch.no_grad():
        assert not g.metric_matrix(wg).requires_grad
    assert not g.metric_matrix(w).requires_grad


# ============================================================================ vertical space
def test_algebra_basis_vertical_basis_and_kernel_dimension():
    g = Dense()
    w, _ = dense_point()
    basis = g.algebra_basis(w)
    expect = [((1, 0), (0, 0)), ((0, 1), (0, 0)), ((0, 0), (1, 0)), ((0, 0), (0, 1))]
    assert len(basis) == 4
    for e, (p, q) in zip(basis, expect):
        assert isinstance(e, tuple) and len(e) == 2
        close(e[0], torch.tensor(p, dtype=DT), rtol=0, atol=0)
        close(e[1], torch.tensor(q, dtype=DT), rtol=0, atol=0)
    V = g.vertical_basis(w)
    assert V.shape == (7, 4) and V.dtype == DT
    close(V, dense_V(w), rtol=0, atol=0)
    assert g.kernel_dimension(w) == 3
    assert g.kernel_dimension({n: t.float() for n, t in w.items()}) == 3

    # a matrix-shaped leaf is enumerated in row-major order
    class Mat(Weighted):
        def algebra_zeros(self, w):
            return {"m": torch.zeros(2, 2, dtype=DT)}

        def vertical(self, w, omega):
            return {"x": omega["m"].reshape(-1) * w["x"]}

    m = Mat()
    wx = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)}
    close(m.vertical_basis(wx), torch.diag(wx["x"]), rtol=0, atol=0)
    assert [int(e["m"].argmax()) for e in m.algebra_basis(wx)] == [0, 1, 2, 3]
    assert m.kernel_dimension(wx) == 4
    wz = {"x": torch.tensor([1.0, 0.0, 3.0, 0.0], dtype=DT)}
    assert m.kernel_dimension(wz) == 2

    # no algebra element: an empty (D, 0) basis in w's dtype
    z = Weighted()
    for dt in (DT, torch.float32):
        Vz = z.vertical_basis({"x": torch.ones(5, dtype=dt)})
        assert Vz.shape == (5, 0) and Vz.dtype == dt
    assert z.kernel_dimension({"x": torch.ones(5, dtype=DT)}) == 0
    assert z.algebra_basis({"x": torch.ones(5, dtype=DT)}) == []


def test_is_horizontal_is_the_largest_normalised_metric_cosine():
    g = Dense()
    w, xi = dense_point(1)
    M, V = dense_M(w), dense_V(w)
    x = flat(xi)
    cos = [abs(float(x @ M @ V[:, k])) / (float(x @ M @ x) ** 0.5 * float(V[:, k] @ M @ V[:, k]) ** 0.5)
           for k in range(4)]
    h = g.is_horizontal(w, xi)
    assert h.dtype == DT and h.shape == ()
    assert float(h) == pytest.approx(max(cos), rel=1e-12)
    assert 0.01 < float(h) < 1.0
    close(g.is_horizontal(w, reversed_keys(xi)), h)
    # horizontal vectors (the hand projector) give ~0; the zero vector gives exactly 0
    assert float(g.is_horizontal(w, unflat(dense_projector(w) @ x))) < 1e-13
    z = g.is_horizontal(w, {n: torch.zeros_like(t) for n, t in xi.items()})
    assert float(z) == 0.0
    # a non-horizontal vector so small that its squared norm underflows to 0 is not reported as
    # horizontal (the 1e-300 guard only keeps 0/0 away)
    lw, lxi = log_pair_point()
    tiny = {n: 1e-301 * t for n, t in lxi.items()}
    assert float(LogPairClosedGamma().norm(lw, tiny)) == 0.0 and float(LogPairClosedGamma().is_horizontal(lw, tiny)) > 0
    # float32 in, float64 out
    h32 = g.is_horizontal(*(dict((n, t.float()) for n, t in d.items()) for d in (w, xi)))
    assert h32.dtype == DT and float(h32) == pytest.approx(max(cos), rel=1e-5)
    # a vertical vector has cosine 1 with itself
    nu = g.vertical(w, (torch.tensor([0.0, 1.0], dtype=DT), torch.zeros(2, dtype=DT)))
    assert float(g.is_horizontal(w, nu)) == pytest.approx(1.0, rel=1e-12)
    # no algebra: 0 (float64)
    hz = Weighted().is_horizontal({"x": torch.ones(3, dtype=torch.float32)}, {"x": torch.ones(3, dtype=torch.float32)})
    assert hz.dtype == DT and float(hz) == 0.0


# ============================================================================ projection, gradient, Christoffel, whiten
def test_generic_projection_is_the_metric_orthogonal_projector_even_for_a_singular_gram():
    g = Dense()
    w, xi = dense_point(2)
    P = dense_projector(w)
    p = g.horizontal_projection(w, xi)
    assert list(p) == ["a", "b"] and p["a"].shape == (2, 2) and p["b"].shape == (3,)
    close(flat(p), P @ flat(xi), rtol=1e-10, atol=1e-12)
    close(g.horizontal_projection(w, reversed_keys(xi)), p, rtol=1e-10, atol=1e-12)
    # a vertical vector projects to 0, a horizontal one to itself
    nu = g.vertical(w, (torch.tensor([0.3, -0.2], dtype=DT), torch.tensor([0.7, 0.1], dtype=DT)))
    close(flat(g.horizontal_projection(w, nu)), torch.zeros(7, dtype=DT), rtol=0, atol=1e-12)
    close(g.horizontal_projection(w, p), p, rtol=1e-10, atol=1e-12)
    # no vertical space: a new dict holding the same tensors
    z = Weighted()
    xz = {"x": torch.ones(3, dtype=DT)}
    pz = z.horizontal_projection({"x": torch.ones(3, dtype=DT)}, xz)
    assert pz == xz and pz is not xz and pz["x"] is xz["x"]


def test_generic_egrad_to_rgrad_and_riemannian_gradient():
    g = Dense()
    w, eg = dense_point(3)
    M = dense_M(w)
    r = g.egrad_to_rgrad(w, eg)
    assert list(r) == ["a", "b"]
    close(flat(r), torch.linalg.solve(M, flat(eg)), rtol=1e-10, atol=1e-12)
    close(g.egrad_to_rgrad(w, reversed_keys(eg)), r, rtol=1e-10, atol=1e-12)
    # defining property g(rgrad, z) = <egrad, z>_F on every basis vector z
    for k in range(7):
        z = unflat(torch.eye(7, dtype=DT)[k])
        assert float(g.inner(w, r, z)) == pytest.approx(float(flat(eg)[k]), rel=1e-10, abs=1e-12)
    rg = g.riemannian_gradient(w, eg)
    close(flat(rg), dense_projector(w) @ torch.linalg.solve(M, flat(eg)), rtol=1e-10, atol=1e-12)


def test_generic_christoffel_is_the_closed_form_of_the_dense_metric():
    g = Dense()
    w, xi = dense_point(4)
    ref = torch.linalg.solve(dense_M(w), flat(w) * flat(xi) ** 2)
    gam = g.christoffel(w, xi)
    assert list(gam) == ["a", "b"]
    close(flat(gam), ref, rtol=1e-10, atol=1e-12)
    # the log metric: -xi^2 / w (generic default vs the closed form)
    lw, lxi = log_pair_point()
    close(SymmetryGroup.christoffel(LogPairClosedGamma(), lw, lxi), {n: -lxi[n] ** 2 / lw[n] for n in ("u", "v")}, rtol=1e-12)
    # a tangent whose keys come in another order than the group's names (it raised inside jvp)
    close(g.christoffel(w, reversed_keys(xi)), gam, rtol=1e-12)
    close(SymmetryGroup.geodesic_2nd(LogPairClosedGamma(), lw, reversed_keys(lxi)),
          {n: lw[n] + lxi[n] + 0.5 * lxi[n] ** 2 / lw[n] for n in ("u", "v")}, rtol=1e-12)
    # geodesic_ode_rhs: (v, -Gamma(v, v)), a new dict for v
    dv, dacc = g.geodesic_ode_rhs(w, xi)
    assert dv == xi and dv is not xi
    close(flat(dacc), -ref, rtol=1e-10, atol=1e-12)


def test_generic_whiten_has_covariance_inverse_metric():
    g = Dense()
    w, zeta = dense_point(5)
    M = dense_M(w)
    L = torch.linalg.cholesky(M)
    out = g.whiten(w, zeta)
    assert list(out) == ["a", "b"]
    close(flat(out), torch.linalg.solve_triangular(L.T, flat(zeta)[:, None], upper=True)[:, 0], rtol=1e-10)
    close(g.whiten(w, reversed_keys(zeta)), out, rtol=1e-10)
    W = torch.stack([flat(g.whiten(w, unflat(e))) for e in torch.eye(7, dtype=DT)], 1)
    close(W @ W.T, torch.linalg.inv(M), rtol=1e-10, atol=1e-12)
    assert float(g.norm(w, out)) == pytest.approx(float(flat(zeta).norm()), rel=1e-12)


def test_generic_pushforward_is_the_tangent_map_of_the_action():
    g = Dense()
    w, xi = dense_point(6)
    c = torch.tensor(1.7, dtype=DT)
    pf = g.pushforward(w, c, xi)
    close(pf, {"a": c * xi["a"], "b": xi["b"]})
    close(g.pushforward({**w, "zz": torch.ones(1, dtype=DT)}, c, xi), pf)
    close(g.pushforward(w, c, reversed_keys(xi)), pf)  # tangent keys in another order


# ============================================================================ cache
class Cached(Weighted):
    def __init__(self):
        super().__init__()
        self.builds = 0

    def stat(self, w):
        def build(wr):
            self.builds += 1
            assert list(wr) == ["x"]
            return wr["x"].sum()
        return self._cached(w, build)


def test_cached_memoises_on_identity_and_version_of_the_named_tensors():
    g = Cached()
    x = torch.tensor([1.0, 2.0], dtype=DT)
    assert g.stat({"x": x}) == 3.0 and g.builds == 1
    assert g.stat({"x": x, "other": torch.ones(1)}) == 3.0 and g.builds == 1  # same tensor, new dict
    x.add_(1.0)  # in place: a new version
    assert g.stat({"x": x}) == 5.0 and g.builds == 2
    assert g.stat({"x": x}) == 5.0 and g.builds == 2
    y = x.clone()
    assert g.stat({"x": y}) == 5.0 and g.builds == 3  # another tensor
    assert g.stat({"x": x}) == 5.0 and g.builds == 4  # one entry only
    # tensors requiring grad are never cached (and leave the cache alone)
    xg = x.clone().requires_grad_(True)
    g.stat({"x": xg})
    g.stat({"x": xg})
    assert g.builds == 6
    assert g.stat({"x": x}) == 5.0 and g.builds == 6
    # inside a torch.func transform: never cached
    before = g.builds
    batch = torch.arange(6, dtype=DT).reshape(3, 2)
    for _ in range(2):
        close(vmap(lambda t: g.stat({"x": t}))(batch), batch.sum(1))
    assert g.builds == before + 2
    assert g.stat({"x": x}) == 5.0 and g.builds == before + 2  # the cache still holds x


def test_cached_is_not_fooled_by_a_reused_id():
    """The cache pins its tensors, so a new tensor can never take a cached one's id."""
    g = Cached()
    for k in range(30):
        assert g.stat({"x": torch.full((4,), float(k), dtype=DT)}) == 4.0 * k
    assert g.builds == 30


# ============================================================================ geodesics
def test_geodesic_orders_and_second_order_formula():
    g = Dense()
    w, xi = dense_point(7)
    gam = torch.linalg.solve(dense_M(w), flat(w) * flat(xi) ** 2)
    for t in (1.0, 0.3, -0.6):
        ref = flat(w) + t * flat(xi) - 0.5 * t * t * gam
        close(flat(g.geodesic_2nd(w, xi, t)), ref, rtol=1e-10, atol=1e-12)
        for name in (2, "second", "second_order"):
            close(flat(g.geodesic(w, xi, t, order=name)), ref, rtol=1e-10, atol=1e-12)
        for name in (1, "first", "retraction"):
            close(g.geodesic(w, xi, t, order=name), {n: w[n] + t * xi[n] for n in ("a", "b")}, rtol=0, atol=1e-15)
    close(flat(g.geodesic_2nd(w, xi)), flat(w) + flat(xi) - 0.5 * gam, rtol=1e-10, atol=1e-12)
    close(flat(g.geodesic(w, xi)), flat(w) + flat(xi) - 0.5 * gam, rtol=1e-10, atol=1e-12)  # default order 2, t 1
    out = g.geodesic({**w, "zz": torch.ones(1, dtype=DT)}, xi, order=1)
    assert list(out) == ["a", "b"]
    with pytest.raises(ValueError, match=r"geodesic order must be one of .*; got 3"):
        g.geodesic(w, xi, order=3)
    with pytest.raises(ValueError, match="geodesic order must be one of"):
        g.geodesic_vjp(w, xi, xi, order="third")


def test_geodesic_ode_and_exact_forward_their_options_and_check_the_domain():
    g = LogPairClosedGamma()
    w, xi = log_pair_point(1)
    # one RK4 step, no step doubling: exactly the hand step (n_steps and tol are passed through)
    one = rk4_step(g.christoffel, w, xi, 0.7)  # its closed-form Gamma, stepped by hand
    close(g.geodesic_ode(w, xi, 0.7, n_steps=1, tol=None), one, rtol=1e-13)
    close(g.geodesic_exact(w, xi, 0.7, n_steps=1, tol=None), one, rtol=1e-13)
    close(g.geodesic(w, xi, 0.7, order="exact", n_steps=1, tol=None), one, rtol=1e-13)
    close(g.geodesic(w, xi, 0.7, order="ode", n_steps=1, tol=None), one, rtol=1e-13)
    # a group's own closed form answers order="exact"; order="ode" still integrates

    class Closed(LogPairClosedGamma):
        def geodesic_exact(self, w, xi, t=1.0, **ode_kw):
            assert ode_kw == {"n_steps": 1, "tol": None}
            return log_geodesic(w, xi, t)

    close(Closed().geodesic(w, xi, 0.7, order="exact", n_steps=1, tol=None), log_geodesic(w, xi, 0.7), rtol=0, atol=0)
    close(Closed().geodesic(w, xi, 0.7, order="ode", n_steps=1, tol=None), one, rtol=1e-13)
    assert float((one["u"] - log_geodesic(w, xi, 0.7)["u"]).abs().max()) > 1e-8
    # defaults: t = 1 and step doubling to 1e-10: the closed form
    ref = log_geodesic(w, xi)
    close(g.geodesic_ode(w, xi), ref, rtol=1e-9, atol=1e-10)
    close(g.geodesic_exact(w, xi), ref, rtol=1e-9, atol=1e-10)
    close(g.geodesic(w, xi, order="ode"), ref, rtol=1e-9, atol=1e-10)
    close(g.geodesic_ode(w, xi, 0.4), log_geodesic(w, xi, 0.4), rtol=1e-9, atol=1e-10)
    # the default n_steps = 64 (tol None): RK4 error ~ (1/64)^4, far below one step's
    e64 = g.geodesic_ode(w, xi, tol=None)
    err64 = max(float((e64[n] - ref[n]).abs().max()) for n in ref)
    e32 = g.geodesic_ode(w, xi, n_steps=32, tol=None)
    err32 = max(float((e32[n] - ref[n]).abs().max()) for n in ref)
    assert err64 < err32 / 8
    # a long step (||xi|| ~ 2.6): 64 RK4 steps miss by ~4e-9, the default step doubling to
    # tol = 1e-10 reaches ~1e-12; spec §6.5: n = 64 by default
    xib = {n: 4 * t for n, t in xi.items()}
    refb = log_geodesic(w, xib)
    assert max(float((g.geodesic_ode(w, xib)[n] - refb[n]).abs().max()) for n in refb) < 1e-11
    assert max(float((g.geodesic_ode(w, xib, tol=None)[n] - refb[n]).abs().max()) for n in refb) > 1e-9
    close(g.geodesic_ode(w, xib, tol=None), g.geodesic_ode(w, xib, n_steps=64, tol=None), rtol=0, atol=0)
    # check_domain is called along the integration
    calls = []

    class Checked(LogPairClosedGamma):
        def check_domain(self, p):
            calls.append(1)
            if float(p["u"].min()) > 1.0:
                raise ValueError("left the domain")

    wc = {"u": torch.full((2,), 0.9, dtype=DT), "v": torch.full((2,), -1.0, dtype=DT)}
    xc = {"u": torch.full((2,), 0.5, dtype=DT), "v": torch.zeros(2, dtype=DT)}
    with pytest.raises(ValueError, match="left the domain"):
        Checked().geodesic_ode(wc, xc, n_steps=4, tol=None)
    Checked().geodesic_ode(wc, xc, 0.1, n_steps=4, tol=None)
    assert len(calls) >= 4


def test_geodesic_vjp_against_hand_jacobians():
    g = Dense()
    w, xi = dense_point(8)
    c = {"a": torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=DT), "b": torch.tensor([1.0, -0.4, 0.8], dtype=DT)}
    # order 1: the identity (a new dict of the cotangent's tensors)
    v1 = g.geodesic_vjp(w, xi, c, order="first")
    assert list(v1) == ["a", "b"] and v1["a"] is c["a"]
    # order 2: J = I - M^{-1} diag(w xi), so J^T c = c - diag(w xi) M^{-1} c
    Minv_c = torch.linalg.solve(dense_M(w), flat(c))
    ref = flat(c) - flat(w) * flat(xi) * Minv_c
    with torch.no_grad():  # the vjp turns grad mode on itself
        v2 = g.geodesic_vjp(w, xi, c)
    assert list(v2) == ["a", "b"] and not v2["a"].requires_grad
    close(flat(v2), ref, rtol=1e-10, atol=1e-12)
    close(flat(g.geodesic_vjp(w, xi, c, order=2)), ref, rtol=1e-10, atol=1e-12)
    assert not xi["a"].requires_grad  # the input is not turned into a leaf
    # exact / ode orders with options: the log geodesic w e^{xi/w} has J^T c = c e^{xi/w}
    lg = LogPairClosedGamma()
    lw, lxi = log_pair_point(2)
    lc = {"u": torch.tensor([1.0, -2.0, 0.5], dtype=DT), "v": torch.tensor([0.3, 0.7, -1.1], dtype=DT)}
    refl = {n: lc[n] * torch.exp(lxi[n] / lw[n]) for n in ("u", "v")}
    close(lg.geodesic_vjp(lw, lxi, lc, order="exact"), refl, rtol=1e-8, atol=1e-9)
    close(lg.geodesic_vjp(lw, lxi, lc, order="ode", n_steps=128, tol=None), refl, rtol=1e-8, atol=1e-9)
    # n_steps is forwarded: one step is far from the closed form
    v_one = lg.geodesic_vjp(lw, lxi, lc, order="ode", n_steps=1, tol=None)
    assert max(float((v_one[n] - refl[n]).abs().max()) for n in refl) > 1e-6

    # a component of xi that no output depends on gets a zero cotangent, not None
    class Frozen(LogPairClosedGamma):
        def geodesic_2nd(self, w, xi, t=1.0):
            return {"u": w["u"] + t * xi["u"], "v": w["v"] + t * xi["u"]}

    vf = Frozen().geodesic_vjp(lw, lxi, lc)
    close(vf, {"u": lc["u"] + lc["v"], "v": torch.zeros(3, dtype=DT)}, rtol=0, atol=0)


def test_geodesic_error_slopes_against_the_closed_form_geodesic():
    g = LogPairClosedGamma()
    w, xi = log_pair_point(3)
    ts = (0.2, 0.1, 0.05, 0.025)
    x = torch.tensor([math.log(t) for t in ts], dtype=DT)

    def fit(order):
        errs = []
        for t in ts:
            ex = log_geodesic(w, xi, t)
            gg = g.geodesic(w, xi, t, order=order)
            errs.append(math.log(float(torch.sqrt(sum(((gg[n] - ex[n]) ** 2).sum() for n in ex)))))
        y = torch.tensor(errs, dtype=DT)
        A = torch.stack([x, torch.ones_like(x)], 1)
        return float(torch.linalg.lstsq(A, y[:, None]).solution[0, 0])

    s = geodesic_error_slopes(g, w, xi)
    assert list(s) == [1, 2]
    assert s[1] == pytest.approx(fit(1), abs=1e-6) and s[2] == pytest.approx(fit(2), abs=1e-6)
    assert 1.8 < s[1] < 2.2 and 2.8 < s[2] < 3.2
    s2 = geodesic_error_slopes(g, w, xi, ts=(0.1, 0.05), orders=(2,), n_steps=64)
    assert list(s2) == [2]
    assert geodesic_error_slope(g, w, xi) == pytest.approx(s[2], abs=1e-12)
    assert geodesic_error_slope(g, w, xi, order=1) == pytest.approx(s[1], abs=1e-12)
    assert geodesic_error_slope(g, w, xi, order="first") == pytest.approx(s[1], abs=1e-12)
    assert geodesic_error_slope(g, w, xi, ts=(0.1, 0.05)) == pytest.approx(s2[2], abs=1e-6)
    ok, msg = g.check_geodesic_order(w, xi)
    assert ok and msg == f"error slope {s[2]:.3f} (expected 3)"
    ok, msg = g.check_geodesic_order(w, xi, order=1)
    assert ok and msg == f"error slope {s[1]:.3f} (expected 2)"
    ok, msg = g.check_geodesic_order(w, xi, ts=(0.1, 0.05, 0.025))
    assert ok and msg.endswith("(expected 3)")

    class FirstOnly(LogPairClosedGamma):
        def geodesic_2nd(self, w, xi, t=1.0):
            return {n: w[n] + t * xi[n] for n in self.names}

    ok, msg = FirstOnly().check_geodesic_order(w, xi)
    assert not ok and msg == f"error slope {s[1]:.3f} (expected 3)"


def test_geodesic_error_slopes_uses_one_fixed_step_rk4_reference_per_t():
    """The reference is ``geodesic(order="ode", n_steps=n_steps, tol=None)`` (default 32 steps, no
    step doubling), once per ``t``; each order is evaluated at the same ``t``."""
    calls = []

    class Spy(LogPairClosedGamma):
        def geodesic_ode(self, w, xi, t=1.0, n_steps=64, tol=1e-10):
            calls.append(("ode", t, n_steps, tol))
            return log_geodesic(w, xi, t)

        def geodesic_2nd(self, w, xi, t=1.0):
            calls.append((2, t))
            return super().geodesic_2nd(w, xi, t)

    w, xi = log_pair_point(3)
    s = geodesic_error_slopes(Spy(), w, xi, orders=(2,))
    assert calls == [c for t in (0.2, 0.1, 0.05, 0.025) for c in (("ode", t, 32, None), (2, t))]
    # with an exact reference the slope is the float64 least-squares fit of log error on log t
    ts = (0.2, 0.1, 0.05, 0.025)
    x = torch.tensor([math.log(t) for t in ts], dtype=DT)
    y = torch.tensor([math.log(float(torch.sqrt(sum(((LogPairClosedGamma().geodesic_2nd(w, xi, t)[n] - log_geodesic(w, xi, t)[n]) ** 2)
                                                     .sum() for n in ("u", "v"))))) for t in ts], dtype=DT)
    fit = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), y[:, None]).solution[0, 0]
    assert abs(s[2] - float(fit)) < 1e-12
    calls.clear()
    geodesic_error_slopes(Spy(), w, xi, ts=(0.3, 0.1), orders=(2,), n_steps=5)
    assert calls == [("ode", 0.3, 5, None), (2, 0.3), ("ode", 0.1, 5, None), (2, 0.1)]


# ============================================================================ diagnostics
def test_check_function_invariance_values_messages_and_boundary():
    g = Weighted()

    def fn(p):  # reads a parameter the group does not act on
        return p["x"] * p["c"]

    w = {"x": torch.tensor([2.0], dtype=DT), "c": torch.tensor([2.0], dtype=DT)}
    half = torch.tensor([0.5], dtype=DT)
    # fn: 4 -> 5, relative change exactly 1/4
    ok, msg = g.check_function_invariance(fn, w, half, rtol=0.25)
    assert ok is True and msg == "relative output change 2.500e-01 (tol 2e-01)"
    assert g.check_function_invariance(fn, w, half, rtol=0.2499)[0] is False
    ok, msg = g.check_function_invariance(fn, w, half)
    assert ok is False and msg == "relative output change 2.500e-01 (tol 1e-10)"
    # default rtol 1e-10: a relative change of 1e-3 fails, 1e-12 passes
    wb = {"x": torch.tensor([1000.0], dtype=DT), "c": torch.tensor([1.0], dtype=DT)}
    assert g.check_function_invariance(fn, wb, torch.tensor([1.0], dtype=DT))[0] is False
    assert g.check_function_invariance(fn, wb, torch.tensor([1e-9], dtype=DT))[0] is True
    # a zero output that becomes nonzero is an enormous relative change, not a pass
    wz = {"x": torch.tensor([0.0], dtype=DT), "c": torch.tensor([2.0], dtype=DT)}
    ok, msg = g.check_function_invariance(fn, wz, half, rtol=1.0)
    assert ok is False and msg.startswith("relative output change 1.000e+300")
    ok, msg = g.check_function_invariance(fn, wz, torch.tensor([0.0], dtype=DT), rtol=0.0)
    assert ok is True and msg == "relative output change 0.000e+00 (tol 0e+00)"
    # w itself is not modified
    assert float(w["x"]) == 2.0


def test_check_metric_invariance_values_messages_and_boundary():
    g = Weighted()
    one = {"x": torch.tensor([1.0], dtype=DT)}
    # a = 1 * 1 * 1^2 = 1, b = 1 * 1 * 2^2 = 4: relative change 3
    ok, msg = g.check_metric_invariance(one, torch.tensor([1.0], dtype=DT), one, one, tol=3.0)
    assert ok is True and msg == "relative metric change 3.00e+00 (tol 3e+00)"
    assert g.check_metric_invariance(one, torch.tensor([1.0], dtype=DT), one, one, tol=2.999)[0] is False
    ok, msg = g.check_metric_invariance(one, torch.tensor([1.0], dtype=DT), one, one)
    assert ok is False and msg == "relative metric change 3.00e+00 (tol 1e-10)"
    # default tol 1e-10: (1000.5 / 1000)^2 - 1 ~ 1e-3 fails
    wb = {"x": torch.tensor([1000.0], dtype=DT)}
    assert g.check_metric_invariance(wb, torch.tensor([0.5], dtype=DT), one, one)[0] is False
    assert g.check_metric_invariance(wb, torch.tensor([0.0], dtype=DT), one, one) == (
        True, "relative metric change 0.00e+00 (tol 1e-10)")
    # g_w(xi, zeta) = 0 but the transformed value is 1: an enormous change, not a pass
    w0 = {"x": torch.tensor([0.0, 1.0], dtype=DT)}
    e0 = {"x": torch.tensor([1.0, 0.0], dtype=DT)}
    ok, msg = g.check_metric_invariance(w0, torch.tensor([1.0, 0.0], dtype=DT), e0, e0, tol=1.0)
    assert ok is False and msg == "relative metric change 1.00e+300 (tol 1e+00)"
    # an invariant metric (the log metric under rescaling) passes
    lg = LogPairClosedGamma()
    lw, lxi = log_pair_point(4)
    a = torch.tensor([2.0, -0.5, 3.0], dtype=DT)
    ok, msg = lg.check_metric_invariance(lw, a, lxi, {n: t.flip(0) for n, t in lxi.items()})
    assert ok and msg.startswith("relative metric change")


def test_check_projection_values_messages_and_boundary():
    # identity projection, no algebra: idempotence error and leakage are exactly 0 (tol 0 passes)
    z = Weighted()
    wz = {"x": torch.tensor([1.0, 2.0], dtype=DT)}
    xz = {"x": torch.tensor([0.5, -1.0], dtype=DT)}
    assert z.check_projection(wz, xz, tol=0.0) == (True, "idempotence error 0.00e+00, vertical leakage 0.00e+00 "
                                                         "(tol 0e+00)")

    class Doubling(Weighted):  # not idempotent: Pi = 2 id, so ||Pi Pi xi - Pi xi|| / ||Pi xi|| = 1
        def horizontal_projection(self, w, xi):
            return {"x": 2 * xi["x"]}

    ok, msg = Doubling().check_projection(wz, xz, tol=0.5)
    assert ok is False and msg == "idempotence error 1.00e+00, vertical leakage 0.00e+00 (tol 5e-01)"
    assert Doubling().check_projection(wz, xz, tol=1.0)[0] is True
    # Pi xi = 0: an idempotence error of exactly 0 (not a division by 0 or a negative zero)
    assert Doubling().check_projection(wz, {"x": torch.zeros(2, dtype=DT)}, tol=0.0) == (
        True, "idempotence error 0.00e+00, vertical leakage 0.00e+00 (tol 0e+00)")

    class Leaky(LogPairClosedGamma):  # idempotent (identity) but not horizontal
        def horizontal_projection(self, w, xi):
            return dict(xi)

    lw, lxi = log_pair_point(5)
    leak = float(LogPairClosedGamma().is_horizontal(lw, lxi))
    ok, msg = Leaky().check_projection(lw, lxi)
    assert ok is False and msg == f"idempotence error 0.00e+00, vertical leakage {leak:.2e} (tol 1e-10)"
    assert Leaky().check_projection(lw, lxi, tol=leak)[0] is True
    # the generic projection passes its own check at the default tol
    g = Dense()
    w, xi = dense_point(9)
    ok, msg = g.check_projection(w, xi)
    assert ok, msg

"""Direct tests of core functions that no other core test reached (issue 18, mutation score).

Each function is called in-process and checked against an independent reference: a dense
matrix, a closed form (the log metric ``sum xi^2 / x^2`` has geodesics ``x e^{xi t / x}``), the
generic autodiff defaults of :class:`SymmetryGroup`, the numerical rank of a vertical basis, or a
dense ``torch.autograd.functional.hessian``. The distributed helpers run on simulated ranks:
threads that exchange tensors through a barrier, with ``torch.distributed``'s collectives
patched (no process group is created).
"""
from __future__ import annotations

import json
import threading

import pytest
import torch
from geometry_cases import LogPair, LogPairClosedGamma, log_geodesic, log_pair_point
from torch.func import functional_call

from quotientsharp import tangent as T
from quotientsharp.curvature import QuotientHessianOperator
from quotientsharp.curvature.measures import hessian_slq
from quotientsharp.curvature.operators import LinearOperator, MatrixOperator, _cast_floating
from quotientsharp.curvature.quotient_hessian import quotient_hessian_spectral_density
from quotientsharp.groups import (
    AttentionGL,
    DiagonalRescaling,
    Euclidean,
    GLBlock,
    HeadScaling,
    JointGroup,
    Piece,
    PositiveRescaling,
    ScaleBlock,
    SingularHeadError,
    SymmetryGroup,
    geodesic_error_slope,
)
from quotientsharp.models import MLP
from quotientsharp.optim import saf as saf_module
from quotientsharp.optim.utils import all_reduce_mean

DT = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a, b) -> float:
    a = T.flatten(a) if isinstance(a, dict) else a
    b = T.flatten(b) if isinstance(b, dict) else b
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ============================================================================ SymmetryGroup defaults
class FlatDense(SymmetryGroup):
    """A constant, non-diagonal metric ``xi^T S zeta`` on one vector ``x`` (no symmetry)."""

    def __init__(self, S: torch.Tensor):
        super().__init__(("x",))
        self.S = S

    def action(self, w, g):
        return dict(w)

    def vertical(self, w, omega):
        return {"x": torch.zeros_like(w["x"])}

    def algebra_zeros(self, w):
        return torch.zeros(0, dtype=w["x"].dtype)

    def inner(self, w, xi, zeta):
        return xi["x"] @ self.S @ zeta["x"]


class WrongSecondOrder(LogPairClosedGamma):
    """A deliberately wrong second-order geodesic: the ``-t^2/2 Gamma`` term is dropped."""

    def geodesic_2nd(self, w, xi, t=1.0):
        return {n: w[n] + t * xi[n] for n in self.names}


def test_generic_whiten_has_covariance_inverse_metric_and_unit_metric_norm():
    """whiten(zeta) = L^{-T} zeta with L L^T = M: columns W satisfy W W^T = M^{-1}, and
    ||whiten(zeta)||_M = ||zeta||_2 (a non-diagonal S catches a transposed factor)."""
    g = gen(1)
    B = torch.randn(4, 4, generator=g, dtype=DT)
    S = B @ B.T + 0.5 * torch.eye(4, dtype=DT)
    grp = FlatDense(S)
    w = {"x": torch.randn(4, generator=g, dtype=DT), "unused": torch.zeros(2, dtype=DT)}
    W = torch.stack([grp.whiten(w, {"x": e})["x"] for e in torch.eye(4, dtype=DT)], 1)
    torch.testing.assert_close(W @ W.T, torch.linalg.inv(S), rtol=1e-12, atol=1e-12)
    zeta = {"x": torch.randn(4, generator=g, dtype=DT)}
    out = grp.whiten(w, zeta)
    assert set(out) == {"x"} and out["x"].shape == (4,)
    assert float(grp.norm(w, out)) == pytest.approx(float(zeta["x"].norm()), rel=1e-12)
    # the log metric: M^{-1} = diag(u^2, v^2), so whiten(zeta) = |x| zeta per coordinate
    lp = LogPair()
    wl, _ = log_pair_point()
    z = {"u": torch.randn(3, generator=g, dtype=DT), "v": torch.randn(3, generator=g, dtype=DT)}
    assert rel(lp.whiten(wl, z), {n: wl[n].abs() * z[n] for n in ("u", "v")}) < 1e-12


def test_generic_geodesic_ode_rhs_is_the_closed_form_and_integrates_to_the_geodesic():
    w, xi = log_pair_point()
    dw, dv = LogPair().geodesic_ode_rhs(w, xi)  # the generic (autodiff) Christoffel term
    assert rel(dw, xi) == 0.0 and dw is not xi
    assert rel(dv, {n: xi[n] ** 2 / w[n] for n in ("u", "v")}) < 1e-12  # -Gamma(v, v) = v^2 / x
    # our own RK4 on (w', v') = rhs reaches the closed-form geodesic x e^{xi t / x} at t = 1
    grp = LogPairClosedGamma()
    x, v, n = dict(w), dict(xi), 100
    h = 1.0 / n
    for _ in range(n):
        k1 = grp.geodesic_ode_rhs(x, v)
        k2 = grp.geodesic_ode_rhs(T.add(x, k1[0], h / 2), T.add(v, k1[1], h / 2))
        k3 = grp.geodesic_ode_rhs(T.add(x, k2[0], h / 2), T.add(v, k2[1], h / 2))
        k4 = grp.geodesic_ode_rhs(T.add(x, k3[0], h), T.add(v, k3[1], h))
        x = T.lincomb((1.0, x), (h / 6, k1[0]), (h / 3, k2[0]), (h / 3, k3[0]), (h / 6, k4[0]))
        v = T.lincomb((1.0, v), (h / 6, k1[1]), (h / 3, k2[1]), (h / 3, k3[1]), (h / 6, k4[1]))
    assert rel(x, log_geodesic(w, xi, 1.0)) < 1e-9


def test_geodesic_error_slope_and_check_geodesic_order():
    grp = LogPairClosedGamma()
    w, xi = log_pair_point(2)
    assert abs(geodesic_error_slope(grp, w, xi) - 3.0) < 0.15  # default order 2
    assert abs(geodesic_error_slope(grp, w, xi, order=1) - 2.0) < 0.15
    ok, msg = grp.check_geodesic_order(w, xi)
    assert ok and "expected 3" in msg
    ok1, msg1 = grp.check_geodesic_order(w, xi, order=1)
    assert ok1 and "expected 2" in msg1
    # dropping the Christoffel term leaves a first-order method: slope 2, the check fails
    bad = WrongSecondOrder()
    assert abs(geodesic_error_slope(bad, w, xi) - 2.0) < 0.15
    ok, msg = bad.check_geodesic_order(w, xi)
    assert not ok and "expected 3" in msg
    slope = float(msg.split("error slope ")[1].split()[0])
    assert abs(slope - 2.0) < 0.15


# ============================================================================ HeadScaling / JointGroup
def joint_problem(metric: str = "mix", seed: int = 0):
    """One fused tensor ``Wqk`` (4 x 6): columns 0-3 two scaled heads (h = 2), columns 4-5 the G
    factor of a GL(2) block whose H factor is ``O`` (3 x 2)."""
    scales = HeadScaling([ScaleBlock((Piece("Wqk", "cols"),), 2, 2, label="l/q")], shares_tensors=True)
    gl = AttentionGL([GLBlock((Piece("Wqk", "cols", offset=4),), (Piece("O", "cols"),), 1, 2)], metric,
                     eps_rel=0.0, shares_tensors=True)
    joint = JointGroup([scales, gl])
    g = gen(seed)
    w = {"Wqk": torch.randn(4, 6, generator=g, dtype=DT), "O": torch.randn(3, 2, generator=g, dtype=DT)}
    joint.validate(w)
    return joint, w


def test_head_scaling_whiten_and_kernel_dimension():
    grp, w = joint_problem()
    hs = grp.parts[0]
    w = {"Wqk": w["Wqk"]}
    # whiten: ||W_i|| zeta on each head slice, zero elsewhere; covariance = M^{-1} on the slices
    zeta = T.randn_like(w, gen(3))
    out = hs.whiten(w, zeta)
    for i in range(2):
        cols = slice(2 * i, 2 * i + 2)
        torch.testing.assert_close(out["Wqk"][:, cols], w["Wqk"][:, cols].norm() * zeta["Wqk"][:, cols],
                                   rtol=1e-13, atol=0)
    assert out["Wqk"][:, 4:].abs().max() == 0
    cols = [T.flatten(hs.whiten(w, T.unflatten(e, w)), hs.names) for e in torch.eye(24, dtype=DT)]
    Wm = torch.stack(cols, 1)
    M = hs.metric_matrix({"Wqk": w["Wqk"]})
    idx = torch.tensor([r * 6 + c for r in range(4) for c in range(4)])  # the head-slice coordinates
    torch.testing.assert_close((Wm @ Wm.T)[idx][:, idx], torch.linalg.inv(M[idx][:, idx]), rtol=1e-12, atol=1e-12)
    # kernel_dimension: one direction per nonzero head = the numerical rank of the vertical basis
    assert hs.kernel_dimension(w) == 2 == SymmetryGroup.kernel_dimension(hs, w)
    w0 = {**w, "Wqk": w["Wqk"].clone()}
    w0["Wqk"][:, 2:4] = 0.0
    assert hs.kernel_dimension(w0) == 1 == SymmetryGroup.kernel_dimension(hs, w0)


def test_joint_group_hooks_against_generic_references():
    grp, w = joint_problem("mix")
    xi = grp.horizontal_projection(w, T.scale(T.randn_like(w, gen(4)), 0.1))
    # geodesic_2nd: w + t xi - t^2/2 Gamma(xi, xi), Gamma by autodiff of the joint metric alone
    gam = SymmetryGroup.christoffel(grp, w, xi)
    for t in (1.0, 0.5):
        ref = {n: w[n] + t * xi[n] - 0.5 * t * t * gam[n] for n in grp.names}
        assert rel(grp.geodesic_2nd(w, xi, t), ref) < 1e-10
    assert rel(grp.geodesic_2nd(w, xi), {n: w[n] + xi[n] - 0.5 * gam[n] for n in grp.names}) < 1e-10
    # geodesic_exact: RK4 on the joint Christoffel term (itself equal to the autodiff one above)
    from quotientsharp.geodesic import integrate_geodesic
    assert rel(grp.christoffel(w, xi), gam) < 1e-10
    for t in (1.0, 0.5):
        ode = integrate_geodesic(grp.christoffel, w, xi, t, n_steps=32, tol=None)
        assert rel(grp.geodesic_exact(w, xi, t), ode) < 1e-8
    ode1 = integrate_geodesic(grp.christoffel, w, xi, 1.0, n_steps=32, tol=None)
    assert rel(grp.geodesic_exact(w, xi), ode1) < 1e-8
    # whiten: covariance M^{-1} of the joint metric, metric norm = Euclidean norm of zeta
    D = 30
    W = torch.stack([T.flatten(grp.whiten(w, T.unflatten(e, w)), grp.names) for e in torch.eye(D, dtype=DT)], 1)
    torch.testing.assert_close(W @ W.T, torch.linalg.inv(grp.metric_matrix(w)), rtol=1e-9, atol=1e-12)
    zeta = T.randn_like(w, gen(5))
    assert float(grp.norm(w, grp.whiten(w, zeta))) == pytest.approx(float(T.flatten(zeta).norm()), rel=1e-10)
    # kernel_dimension: the numerical rank of the vertical basis (2 head scales + h^2 = 4)
    assert grp.kernel_dimension(w) == 6 == SymmetryGroup.kernel_dimension(grp, w)
    w0 = {**w, "Wqk": w["Wqk"].clone()}
    w0["Wqk"][:, 0:2] = 0.0
    assert grp.kernel_dimension(w0) == 5 == SymmetryGroup.kernel_dimension(grp, w0)


def test_joint_group_check_domain_with_metric_and_masked_count():
    grp, w = joint_problem("mix")
    assert grp.check_domain(w) is None
    w0 = {**w, "Wqk": w["Wqk"].clone()}
    w0["Wqk"][:, 2:4] = 0.0
    with pytest.raises(ValueError, match="head slice 1 of stack 0 is zero"):
        grp.check_domain(w0)
    w1 = {**w, "Wqk": w["Wqk"].clone()}
    w1["Wqk"][:, 4:6] = 0.0  # a dead GL head: its Gram matrix is singular
    with pytest.raises(SingularHeadError):
        grp.check_domain(w1)
    # with_metric: the GL part changes metric (and takes the keywords), the scale part is unchanged
    inv = grp.with_metric("inv", eps_rel=0.25)
    assert isinstance(inv, JointGroup) and inv.metric == "inv" and grp.metric == "mix"
    assert inv.parts[0] is grp.parts[0]
    assert inv.parts[1].metric == "inv" and inv.parts[1].eps_rel == 0.25
    ref = AttentionGL(grp.parts[1].blocks, "inv", eps_rel=0.25, shares_tensors=True)
    xi, zeta = T.randn_like(w, gen(6)), T.randn_like(w, gen(7))
    on_gl = {n: torch.zeros_like(t) for n, t in xi.items()}
    on_gl["Wqk"][:, 4:], on_gl["O"] = xi["Wqk"][:, 4:], xi["O"]
    expect = grp.parts[0].inner(w, {"Wqk": xi["Wqk"]}, {"Wqk": zeta["Wqk"]}) + ref.inner(w, on_gl, zeta)
    assert float(inv.inner(w, on_gl, zeta)) == pytest.approx(float(ref.inner(w, on_gl, zeta)), rel=1e-12)
    assert float(inv.inner(w, xi, zeta)) == pytest.approx(float(expect), rel=1e-12)
    # masked_count: the sum of the parts' masked coordinates (zero weights under the adaptive metric)
    assert grp.masked_count(w) == 0
    pr = JointGroup([PositiveRescaling(["a"]), PositiveRescaling(["b"])])
    wa = {"a": torch.tensor([0.0, 1.0, 0.0], dtype=DT), "b": torch.tensor([[2.0, 0.0]], dtype=DT)}
    assert pr.masked_count(wa) == 3


# ============================================================================ small group helpers
def test_diagonal_beta_is_u_times_v_and_invariant():
    g = gen(8)
    grp = DiagonalRescaling("p", "q", "inv")
    w = {"p": torch.randn(5, generator=g, dtype=DT), "q": torch.randn(5, generator=g, dtype=DT)}
    torch.testing.assert_close(grp.beta(w), w["p"] * w["q"], rtol=0, atol=0)
    a = grp.random_element(w, generator=g)
    torch.testing.assert_close(grp.beta({**w, **grp.action(w, a)}), grp.beta(w), rtol=1e-13, atol=0)


def test_trivial_groups_have_zero_vertical_vectors():
    w = {"a": torch.randn(2, 3, dtype=DT), "b": torch.randn(4, dtype=DT)}
    for grp in (PositiveRescaling(["a", "b"]), Euclidean(["a", "b"])):
        out = grp.vertical(w, grp.algebra_zeros(w))
        assert set(out) == {"a", "b"}
        for n in ("a", "b"):
            assert out[n].shape == w[n].shape and out[n].dtype == DT and out[n].abs().max() == 0


# ============================================================================ operators
class StrictOperator(LinearOperator):
    """A dense operator whose matvec accepts only vectors and matmat only matrices."""

    def __init__(self, A):
        self.A, self.shape = A, tuple(A.shape)

    def matvec(self, v):
        assert v.ndim == 1
        return self.A @ v

    def matmat(self, V):
        assert V.ndim == 2
        return self.A @ V


def test_operator_matmul_and_matrix_to_dense():
    g = gen(11)
    B = torch.randn(5, 5, generator=g, dtype=DT)
    A = B + B.T
    op = StrictOperator(A)
    v, V = torch.randn(5, generator=g, dtype=DT), torch.randn(5, 3, generator=g, dtype=DT)
    torch.testing.assert_close(op @ v, A @ v, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(op @ V, A @ V, rtol=1e-14, atol=1e-14)
    m32 = A.float()
    mop = MatrixOperator(m32)
    D = mop.to_dense()
    assert D.dtype == DT
    torch.testing.assert_close(D, m32.double(), rtol=0, atol=0)
    torch.testing.assert_close(mop.to_dense(chunk_size=2), m32.double(), rtol=0, atol=0)
    D[0, 0] = 1e6  # a copy: the operator is unchanged
    torch.testing.assert_close(mop @ torch.eye(5, dtype=DT), m32.double(), rtol=0, atol=0)


def test_cast_floating_casts_only_floating_tensors_in_nested_batches():
    batch = {"x": torch.ones(2, dtype=torch.float32), "ids": torch.arange(3),
             "pair": (torch.zeros(1, dtype=torch.float16), [torch.ones(1, dtype=torch.float32), 7])}
    out = _cast_floating(batch, DT)
    assert set(out) == {"x", "ids", "pair"}
    assert out["x"].dtype == DT and torch.equal(out["x"], torch.ones(2, dtype=DT))
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], torch.arange(3))
    assert isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list)
    assert out["pair"][0].dtype == DT and out["pair"][1][0].dtype == DT and out["pair"][1][1] == 7
    assert _cast_floating("text", DT) == "text"


# ============================================================================ SLQ entry points
def mse(out, target):
    return ((out - target) ** 2).mean()


def mlp_problem(sizes, n=10, dtype=DT, seed=0, batches=1):
    torch.manual_seed(seed)
    model = MLP(sizes, activation="tanh").to(dtype)
    g = gen(seed)
    loader = [(torch.randn(n, sizes[0], generator=g, dtype=dtype), torch.randn(n, sizes[-1], generator=g, dtype=dtype))
              for _ in range(batches)]
    return model, loader


def dense_hessian(model, loader):
    """The Hessian of the (batch-size weighted) loader loss by autograd over the flat parameters, float64."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    m64 = model.double() if next(model.parameters()).dtype == DT else __import__("copy").deepcopy(model).double()
    flat0 = T.flatten(params, names)
    N = sum(x.shape[0] for x, _ in loader)

    def loss(flat):
        p = T.unflatten(flat, params)
        return sum(x.shape[0] / N * mse(functional_call(m64, p, (x.double(),)), y.double()) for x, y in loader)

    return names, torch.autograd.functional.hessian(loss, flat0, vectorize=True)


def test_hessian_slq_full_krylov_nodes_are_the_dense_eigenvalues():
    """With m = n the Lanczos tridiagonal is similar to H: each probe's nodes are H's eigenvalues.
    The model is float32 and dtype=float64 goes to the operator (the batches are cast)."""
    model, loader = mlp_problem([2, 3, 1], dtype=torch.float32)
    names, H = dense_hessian(model, loader)
    ev = torch.linalg.eigvalsh(H)
    res = hessian_slq(model, loader, mse, m=13, n_probes=2, seed=4, progress=False, dtype=DT)
    assert res.n == 13 and res.nodes.shape == (2, 13) and res.config["seed"] == 4
    for p in range(2):
        assert (res.nodes[p].sort().values - ev).abs().max() <= 1e-10 * ev.abs().max()
    # a parameter block: the nodes are the eigenvalues of the principal sub-block of H
    block = ["0.weight"]
    res_b = hessian_slq(model, loader, mse, params=block, m=6, n_probes=1, progress=False, dtype=DT)
    ev_b = torch.linalg.eigvalsh(H[:6, :6])
    assert res_b.config["params"] == block
    assert (res_b.nodes[0].sort().values - ev_b).abs().max() <= 1e-10 * ev_b.abs().max()


def test_hessian_slq_defaults_and_errors(capsys):
    model, loader = mlp_problem([8, 12, 1])  # n = 121 > the default m
    _, H = dense_hessian(model, loader)
    ev = torch.linalg.eigvalsh(H)
    res = hessian_slq(model, loader, mse)
    assert res.config["m"] == 15 and res.config["n_probes"] == 100 and res.config["seed"] == 0
    assert res.nodes.shape == (100, 15) and res.n == 121
    assert res.config["params"] == [n for n, _ in model.named_parameters()]
    tol = 1e-9 * float(ev.abs().max())  # Ritz values interlace: inside [lambda_min, lambda_max]
    assert float(res.nodes.min()) >= float(ev[0]) - tol and float(res.nodes.max()) <= float(ev[-1]) + tol
    assert "Lanczos" in capsys.readouterr().err  # progress=True by default: a tqdm bar on stderr
    with pytest.raises(ValueError, match="hessian_slq"):
        hessian_slq(model, loader, mse, m=0)
    with pytest.raises(ValueError, match="hessian_slq"):
        hessian_slq(model, loader, mse, n_probes=0)
    with pytest.raises(TypeError, match=r"hessian_slq\(model, loader, loss_fn"):
        hessian_slq(model, mse, loader)


def test_quotient_hessian_spectral_density_defaults_and_support():
    """No continuous symmetry (tanh MLP, Euclidean rest): A = H, n_h = 121. The extreme Ritz values
    of m = 100 steps have converged, so the grid spans [lambda_min, lambda_max] +- padding."""
    model, loader = mlp_problem([8, 12, 1])
    _, H = dense_hessian(model, loader)
    ev = torch.linalg.eigvalsh(H)
    dens = quotient_hessian_spectral_density(model, loader, mse, rest="euclidean", progress=False)
    assert dens.config["m"] == 100 and dens.config["n_probes"] == 3 and dens.config["n_grid"] == 10_000
    assert dens.grid.numel() == 10_000 and dens.density.numel() == 10_000
    scale = float(ev.abs().max())
    assert abs(float(dens.grid[0]) - (float(ev[0]) - 0.01)) <= 1e-8 * scale
    assert abs(float(dens.grid[-1]) - (float(ev[-1]) + 0.01)) <= 1e-8 * scale
    assert float(torch.trapezoid(dens.density, dens.grid)) == pytest.approx(1.0, abs=1e-12)
    d2 = quotient_hessian_spectral_density(model, loader, mse, m=20, n_probes=2, n_grid=50, rest="euclidean",
                                           seed=5, progress=False)
    assert d2.config["m"] == 20 and d2.config["n_probes"] == 2 and d2.config["seed"] == 5 and d2.grid.numel() == 50
    # to_dict: JSON-ready, tensors as lists
    rec = d2.to_dict()
    assert set(rec) == {"grid", "density", "variance", "mass_before_normalisation", "config"}
    assert rec["grid"] == d2.grid.tolist() and rec["density"] == d2.density.tolist()
    assert rec["variance"] == d2.variance and rec["config"]["n_grid"] == 50
    assert json.loads(json.dumps(rec)) == rec


def test_quotient_hessian_reuse_batch_products_keeps_max_batches():
    model, loader = mlp_problem([3, 4, 1], batches=2)
    op = QuotientHessianOperator(model, loader, mse, rest="euclidean")
    _, H = dense_hessian(model, loader)
    v = torch.randn(op.n, generator=gen(12), dtype=DT)
    with op.reuse_batch_products(1):
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
        assert len(op.hessian._product_cache) == 1
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.hessian._product_cache is None
    with op.reuse_batch_products():
        op.matvec(v)
        assert len(op.hessian._product_cache) == 2


# ============================================================================ distributed helpers
class SimulatedRanks:
    """``world`` ranks as threads; ``all_gather``/``all_reduce`` exchange through a barrier."""

    def __init__(self, world: int):
        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world

    def get_world_size(self, group=None):
        return self.world

    def _exchange(self, t):
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def all_gather(self, outs, t, group=None):
        for o, s in zip(outs, self._exchange(t)):
            o.copy_(s)

    def all_reduce(self, t, op=None, group=None):
        assert op is None  # SUM, the default
        t.copy_(sum(self._exchange(t)))

    def run(self, fn, args_by_rank):
        results, errors = [None] * self.world, []

        def body(r):
            self.local.rank = r
            try:
                results[r] = fn(*args_by_rank[r])
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return results


def simulate(monkeypatch, world):
    ranks = SimulatedRanks(world)
    for name in ("get_world_size", "all_gather", "all_reduce"):
        monkeypatch.setattr(torch.distributed, name, getattr(ranks, name))
    return ranks


def test_all_gather_rows_concatenates_unequal_batches_in_rank_order(monkeypatch):
    ranks = simulate(monkeypatch, 3)
    g = gen(13)
    idx = [torch.tensor([3, 1]), torch.tensor([7, 0, 5, 9]), torch.tensor([2])]
    rows = [torch.randn(len(i), 4, generator=g, dtype=DT) for i in idx]
    out = ranks.run(saf_module._all_gather_rows, list(zip(idx, rows)))
    for got_idx, got_rows in out:
        assert got_idx.dtype == torch.int64 and torch.equal(got_idx, torch.cat(idx))
        torch.testing.assert_close(got_rows, torch.cat(rows), rtol=0, atol=0)
    one = simulate(monkeypatch, 1)
    (i1, r1), = one.run(saf_module._all_gather_rows, [(idx[1], rows[1])])
    assert torch.equal(i1, idx[1]) and torch.equal(r1, rows[1])


def test_all_reduce_mean_averages_over_ranks_and_keeps_inputs(monkeypatch):
    ranks = simulate(monkeypatch, 2)
    g = gen(14)
    per_rank = [[torch.randn(2, 3, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)] for _ in range(2)]
    copies = [[t.clone() for t in ts] for ts in per_rank]
    out = ranks.run(lambda ts: all_reduce_mean(ts), [(ts,) for ts in per_rank])
    for r in range(2):
        assert [t.shape for t in out[r]] == [(2, 3), (4,)]
        for k in range(2):
            torch.testing.assert_close(out[r][k], (copies[0][k] + copies[1][k]) / 2, rtol=1e-15, atol=1e-15)
            assert torch.equal(per_rank[r][k], copies[r][k])  # inputs untouched

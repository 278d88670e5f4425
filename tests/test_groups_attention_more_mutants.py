"""More behavioural tests of ``AttentionGL`` aimed at surviving mutants (issue 18), on the five
hand-written layouts of ``test_groups_attention_mutants`` (separate projections, packed
``nn.MultiheadAttention``, GPT-2 ``Conv1D``, grouped-query attention, GPT-NeoX fused QKV).

References: the weights themselves (writing back the factors cut out of float64 weights into
float32 weights must give those weights rounded to float32, in every layout).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from test_groups_attention_mutants import CASES

import quotientsharp.groups.attention as attention
from quotientsharp import SymmetryGroup
from quotientsharp.groups.attention import AttentionGL, GLBlock, Piece, insert_pieces
from quotientsharp.groups.gl_math import SingularHeadError
from quotientsharp.groups.residual import SubAlgebra


@contextlib.contextmanager
def warnings_as_errors():
    """Every warning raises, torch's warn-once ones included (an earlier test may have used up
    their one warning)."""
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        torch.set_warn_always(always)


def normal_like(d: dict, g: torch.Generator, scale: float = 1.0) -> dict:
    """``scale * N(0, 1)`` draws from ``g`` shaped like the tensors of ``d`` (and of their dtypes)."""
    return {n: scale * torch.randn(x.shape, generator=g, dtype=x.dtype) for n, x in d.items()}


@pytest.fixture
def integrations(monkeypatch) -> list:
    """A list that grows by one at every RK4 integration ``AttentionGL`` runs."""
    runs = []
    integrate = attention.geodesic_trajectory
    monkeypatch.setattr(attention, "geodesic_trajectory", lambda *a, **k: (runs.append(1), integrate(*a, **k))[1])
    return runs


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_factors_written_into_float32_weights_are_cast_to_them(case):
    """``insert`` of float64 factors into float32 weights keeps each weight's dtype: the result is
    the float64 weights (whose factors they are) rounded to float32."""
    c = case()
    group = AttentionGL(c.blocks, "inv")
    w32 = {n: x.float() for n, x in c.w.items()}
    out = group.insert(w32, group.extract(c.w))
    for n, x in c.w.items():
        assert out[n].dtype == torch.float32, n
        assert torch.equal(out[n], x.float()), n


def _factor_after_a_bias(strided: bool):
    """One GL block (2 heads of size 2) whose G factor is a bias followed by two weights of 3 and
    5 input rows: contiguous heads (runs), or heads at stride 3 (strided pieces, in weights of 6
    rows that the group shares with nothing else)."""
    g = torch.Generator().manual_seed(3)
    n = 6 if strided else 4
    w = {"qb": torch.randn(n, generator=g, dtype=torch.float64), "q": torch.randn(n, 3, generator=g, dtype=torch.float64),
         "q2": torch.randn(n, 5, generator=g, dtype=torch.float64), "k": torch.randn(n, 3, generator=g, dtype=torch.float64)}
    kw = {"offset": 0, "stride": 3} if strided else {}
    block = GLBlock(G=(Piece("qb", "bias", **kw), Piece("q", "rows", **kw), Piece("q2", "rows", **kw)),
                    H=(Piece("k", "rows", **kw),), n_heads=2, head_dim=2, label="b")
    return w, AttentionGL([block], "inv", shares_tensors=strided)


@pytest.mark.parametrize("strided", [False, True])
def test_insert_writes_every_piece_from_its_own_rows(strided):
    """G = [qb; q^T; q2^T] per head (1 + 3 + 5 rows): writing back the factors of other weights
    gives those weights (on the heads' rows), and the rows of G are the pieces in order."""
    w, group = _factor_after_a_bias(strided)
    other = {n: x + 1.0 for n, x in w.items()}
    out = group.insert(w, group.extract(other))
    heads = [0, 1, 3, 4] if strided else [0, 1, 2, 3]
    for n in w:
        assert torch.equal(out[n][heads], other[n][heads]), n
        rest = [i for i in range(w[n].shape[0]) if i not in heads]
        assert torch.equal(out[n][rest], w[n][rest]), n
    (G, _), = group.extract(w)
    first = heads[:2]
    torch.testing.assert_close(G[0], torch.cat([w["qb"][first][None], w["q"][first].T, w["q2"][first].T]), rtol=0, atol=0)


@pytest.mark.parametrize("piece", [Piece("o", "cols"), Piece("b", "bias")])
def test_a_factor_with_fewer_rows_than_the_head_dim_is_refused(piece):
    """The rows a piece adds to its factor: ``p.shape[0]`` for columns of ``o`` (here 1, not the
    4 columns it spans), 1 for a bias; fewer than ``h = 2`` rows is a degenerate orbit."""
    w = {"v": torch.randn(4, 3, dtype=torch.float64), "o": torch.randn(1, 4, dtype=torch.float64),
         "b": torch.randn(4, dtype=torch.float64)}
    block = GLBlock(G=(Piece("v", "rows"),), H=(piece,), n_heads=2, head_dim=2, label="vo")
    group = AttentionGL([block], "inv", shares_tensors=True)
    with pytest.raises(ValueError, match=r"^vo: factor H has 1 rows < head dim 2"):
        group.validate({"v": w["v"], piece.name: w[piece.name]})


def test_norm_of_a_riemannian_gradient_changed_in_place_is_recomputed():
    """``norm_sq(w, d)`` of ``d = riemannian_gradient(w, egrad)`` may reuse ``<egrad, d>``, but
    only while ``d`` is unmodified: after ``d *= 2`` in place it is ``g(2d, 2d) = 4 g(d, d)``, the
    metric's own ``inner``."""
    c = CASES[0]()
    group = AttentionGL(c.blocks, "inv")
    g = torch.Generator().manual_seed(5)
    egrad = normal_like(c.w, g)
    d = group.riemannian_gradient(c.w, egrad)
    before = group.norm_sq(c.w, d)
    torch.testing.assert_close(before, group.inner(c.w, d, d), rtol=1e-12, atol=0)
    for x in d.values():
        x.mul_(2.0)
    torch.testing.assert_close(group.norm_sq(c.w, d), 4 * before, rtol=1e-12, atol=0)
    d = group.riemannian_gradient(c.w, egrad)  # now the weights change too: g at the new weights
    w = c.w
    for x in (*w.values(), *d.values()):
        x.mul_(1.5)
    torch.testing.assert_close(group.norm_sq(w, d), group.inner(w, d, d), rtol=1e-12, atol=0)


def test_a_singular_head_is_named_on_the_differentiable_path_too():
    """Weights that require grad take the extract path (no views): a dead head still raises
    naming its layer and head."""
    c = CASES[0]()
    group = AttentionGL(c.blocks, "inv")
    w = {n: x.clone() for n, x in c.w.items()}
    w["l1.k"][2:4] = 0.0
    w["l1.kb"][2:4] = 0.0
    w = {n: x.requires_grad_(True) for n, x in w.items()}
    xi = {n: torch.ones_like(x) for n, x in w.items()}
    with warnings_as_errors():  # the check reads its eigenvalues without a graph
        with pytest.raises(SingularHeadError, match=r"H \(W_K / W_O side\) in l1/qk/head 1"):
            group.horizontal_projection(w, xi)


def test_float32_weights_get_float64_gram_matrices():
    """An ill-conditioned head (two rows of W_Q 1e-3 apart: G^T G has a condition number of about
    1e6) in float32 weights: the projection agrees with the float64 computation on the same float32
    values to 1e-3 of its scale (measured: 7e-5); float32 Gram matrices are off by 0.2."""
    c = CASES[0]()
    w = {n: x.clone() for n, x in c.w.items()}
    w["l0.q"][1] = w["l0.q"][0] + 1e-3 * w["l0.q"][1]
    w["l0.qb"][1] = w["l0.qb"][0] + 1e-3 * w["l0.qb"][1]
    w32 = {n: x.float() for n, x in w.items()}
    w64 = {n: x.double() for n, x in w32.items()}
    g = torch.Generator().manual_seed(2)
    xi64 = {n: torch.randn(x.shape, generator=g, dtype=torch.float64) for n, x in w.items()}
    xi32 = {n: x.float() for n, x in xi64.items()}
    group = AttentionGL(c.blocks, "inv")
    want = group.horizontal_projection(w64, {n: x.double() for n, x in xi32.items()})
    got = group.horizontal_projection(w32, xi32)
    scale = max(float(x.abs().max()) for x in want.values())
    for n in want:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), want[n], rtol=0, atol=1e-3 * scale)


def test_a_group_reused_on_weights_of_other_shapes_integrates_their_geodesic():
    """The same group on models of residual width 2, 3 and 4 (factors of at most 2h = 4 rows:
    zero-padded, not QR-compressed): each exact geodesic is the plain RK4 of the group's
    Christoffel form (the base class's integration) on those weights."""
    c = CASES[0]()
    group = AttentionGL(c.blocks, "inv")
    g = torch.Generator().manual_seed(9)
    for width in (2, 3, 4):
        def shape(n, x):  # W_Q, W_K, W_V read the residual stream; W_O writes back into it
            return x.shape if x.ndim == 1 else ((width, x.shape[1]) if n.endswith(".o") else (x.shape[0], width))
        w = {n: torch.randn(shape(n, x), generator=g, dtype=x.dtype) for n, x in c.w.items()}
        xi = normal_like(w, g, 0.05)
        got = group.geodesic_ode(w, xi, n_steps=16, tol=None)
        want = SymmetryGroup.geodesic_ode(group, w, xi, 1.0, 16, None)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-11)


def test_a_relaxed_group_integrates_its_relaxed_geodesic():
    """``eps_rel`` and ``eps`` reach the packed ODE: the exact geodesic of a relaxed group is the
    plain RK4 of its own (relaxed) Christoffel form, and differs from the unrelaxed one."""
    c = CASES[0]()
    g = torch.Generator().manual_seed(4)
    xi = normal_like(c.w, g, 0.05)
    relaxed = AttentionGL(c.blocks, "inv", eps_rel=0.3, eps=0.2)
    got = relaxed.geodesic_ode(c.w, xi, n_steps=16, tol=None)
    want = SymmetryGroup.geodesic_ode(relaxed, c.w, xi, 1.0, 16, None)
    plain = AttentionGL(c.blocks, "inv").geodesic_ode(c.w, xi, n_steps=16, tol=None)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-11)
    assert any(not torch.allclose(got[n], plain[n], rtol=1e-6, atol=0) for n in got)


def test_the_kept_integration_serves_only_its_own_velocity(integrations):
    """``geodesic_vjp(order="exact")`` reuses the integration ``geodesic_ode`` kept for the same
    ``w`` and ``xi`` (no second integration); for another velocity (a new tensor whose version
    counter is also 0) it integrates anew: the adjoint of a fresh group."""
    c = CASES[0]()
    g = torch.Generator().manual_seed(6)
    xi1, xi2, cot = (normal_like(c.w, g, s) for s in (0.05, 0.08, 1.0))
    group = AttentionGL(c.blocks, "inv")
    group.geodesic_ode(c.w, xi1, n_steps=16, tol=None)
    group.geodesic_vjp(c.w, xi1, cot, order="exact", n_steps=16, tol=None)
    assert len(integrations) == 1
    got = group.geodesic_vjp(c.w, xi2, cot, order="exact", n_steps=16, tol=None)
    assert len(integrations) == 2
    group.geodesic_ode(c.w, xi1)  # the defaults of both (64 steps, tol 1e-10) are the same run
    group.geodesic_vjp(c.w, xi1, cot, order="exact")
    assert len(integrations) == 3
    want = AttentionGL(c.blocks, "inv").geodesic_vjp(c.w, xi2, cot, order="exact", n_steps=16, tol=None)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)


def _three_stacked_blocks(g: torch.Generator) -> tuple[dict, AttentionGL]:
    """Three layers of equal shapes (2 heads of size 2 each) whose QK blocks form one stack."""
    w, blocks = {}, []
    for layer in range(3):
        for n in "qk":
            w[f"l{layer}.{n}"] = torch.randn(4, 3, generator=g, dtype=torch.float64)
        blocks.append(GLBlock(G=(Piece(f"l{layer}.q", "rows"),), H=(Piece(f"l{layer}.k", "rows"),), n_heads=2,
                              head_dim=2, label=f"l{layer}/qk"))
    group = AttentionGL(blocks, "inv")
    assert group._stacks(w) == [[0, 1, 2]]
    return w, group


def test_three_blocks_in_one_stack_on_the_views_path():
    """Three layers of equal shapes stack their QK blocks: the views path (plain tensors; each
    block's heads at its own offset in the stack) gives the extract path's projection (tensors
    that require grad)."""
    g = torch.Generator().manual_seed(12)
    w, group = _three_stacked_blocks(g)
    xi = normal_like(w, g)
    fast = group.horizontal_projection(w, xi)
    traced = group.horizontal_projection({n: x.clone().requires_grad_(True) for n, x in w.items()}, xi)
    for n in w:
        torch.testing.assert_close(fast[n], traced[n].detach(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("op", ["horizontal_projection", "christoffel", "geodesic_2nd"])
def test_the_views_path_writes_outputs_for_non_contiguous_weights(op):
    """Weights held as transposed views (non-contiguous): the views path's outputs are fresh
    contiguous tensors its reshaped views write into, so it gives the extract path's result
    (tensors that require grad)."""
    c = CASES[0]()
    w = {n: (x.T.contiguous().T if x.ndim == 2 else x) for n, x in c.w.items()}
    assert not all(x.is_contiguous() for x in w.values())
    g = torch.Generator().manual_seed(13)
    xi = normal_like(w, g, 0.1)
    group = AttentionGL(c.blocks, "inv")
    fast = getattr(group, op)(w, xi)
    traced = getattr(group, op)({n: x.clone().requires_grad_(True) for n, x in w.items()}, xi)
    for n in w:
        torch.testing.assert_close(fast[n], traced[n].detach(), rtol=1e-12, atol=1e-13)


def test_a_tangent_output_takes_the_dtype_of_its_vector():
    """A float32 tangent at float64 weights: the projection is a float32 tangent (the point's
    dtype is for points: ``geodesic_2nd`` returns float64)."""
    c = CASES[0]()
    xi = {n: torch.ones(x.shape, dtype=torch.float32) for n, x in c.w.items()}
    group = AttentionGL(c.blocks, "inv")
    assert {x.dtype for x in group.horizontal_projection(c.w, xi).values()} == {torch.float32}
    assert {x.dtype for x in group.geodesic_2nd(c.w, xi).values()} == {torch.float64}


def test_insert_writes_each_of_three_stacked_blocks_from_its_own_heads():
    """The stacked factors hold block ``i``'s heads at rows ``2i, 2i + 1``: writing back the
    factors of other weights gives those weights, layer by layer."""
    g = torch.Generator().manual_seed(14)
    w, group = _three_stacked_blocks(g)
    other = normal_like(w, g)
    (G, H), = group.extract(other)
    torch.testing.assert_close(G[4:6], other["l2.q"].reshape(2, 2, 3).transpose(1, 2), rtol=0, atol=0)
    out = group.insert(w, [(G, H)])
    for n in w:
        assert torch.equal(out[n], other[n]), n


def test_norm_after_the_egrad_of_a_riemannian_gradient_changed_in_place_is_recomputed():
    """The shortcut ``g(d, d) = <egrad, d>`` holds only for the ``egrad`` that ``d`` was computed
    from: after ``egrad *= 3`` in place, ``norm_sq(w, d)`` is still the metric's ``g(d, d)``."""
    c = CASES[0]()
    group = AttentionGL(c.blocks, "inv")
    g = torch.Generator().manual_seed(15)
    egrad = normal_like(c.w, g)
    d = group.riemannian_gradient(c.w, egrad)
    want = group.inner(c.w, d, d)
    torch.testing.assert_close(group.norm_sq(c.w, d), want, rtol=1e-12, atol=0)
    for x in egrad.values():
        x.mul_(3.0)
    torch.testing.assert_close(group.norm_sq(c.w, d), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("which", ["w", "xi", "zeta"])
def test_the_metric_is_differentiable_in_each_argument_alone(which):
    """``inner(w, xi, zeta)`` and ``norm_sq(w, xi)`` with only one argument requiring grad (the
    same tensors the metric just read without grad, so their cached Gram matrices are at hand):
    the gradients are those of the fully traced computation (every argument requiring grad)."""
    c = CASES[0]()
    group = AttentionGL(c.blocks, "inv")
    g = torch.Generator().manual_seed(16)
    args = {"w": c.w, "xi": normal_like(c.w, g), "zeta": normal_like(c.w, g)}
    traced = {k: {n: x.clone().requires_grad_(True) for n, x in d.items()} for k, d in args.items()}
    names = list(c.w)
    want_inner = torch.autograd.grad(group.inner(*traced.values()), [traced[which][n] for n in names])
    want_norm = (torch.autograd.grad(group.norm_sq(traced["w"], traced["xi"]), [traced[which][n] for n in names])
                 if which != "zeta" else None)
    group.inner(*args.values())  # plain tensors: the views path caches their Gram matrices
    group.norm_sq(args["w"], args["xi"])
    for x in args[which].values():
        x.requires_grad_(True)
    got = torch.autograd.grad(group.inner(*args.values()), [args[which][n] for n in names])
    for n, a, b in zip(names, got, want_inner):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)
    if want_norm is not None:
        got = torch.autograd.grad(group.norm_sq(args["w"], args["xi"]), [args[which][n] for n in names])
        for n, a, b in zip(names, got, want_norm):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)


def test_geodesic_vjp_defaults_to_order_2_and_is_the_identity_at_order_1(monkeypatch):
    """The default order is the second-order geodesic's (``c - 1/2 (D Gamma)^T c``, not ``c``),
    in closed form: no autograd through ``geodesic`` (which fails here), and equal to the base
    class's autograd VJP; order 1 (``w + xi``) has the identity as its Jacobian."""
    c = CASES[0]()
    group = AttentionGL(c.blocks, "inv")
    g = torch.Generator().manual_seed(17)
    xi, cot = (normal_like(c.w, g, s) for s in (0.3, 1.0))
    autograd = SymmetryGroup.geodesic_vjp(group, c.w, xi, cot, order=2)

    def no_autograd(*args, **kwargs):
        raise AssertionError("the order-2 VJP went through autograd of geodesic()")
    monkeypatch.setattr(group, "geodesic", no_autograd)
    default = group.geodesic_vjp(c.w, xi, cot)
    second = group.geodesic_vjp(c.w, xi, cot, order=2)
    first = group.geodesic_vjp(c.w, xi, cot, order=1)
    for n in c.w:
        assert torch.equal(default[n], second[n]), n
        assert torch.equal(first[n], cot[n]), n
        torch.testing.assert_close(second[n], autograd[n], rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(second[n], cot[n], rtol=1e-6, atol=0) for n in c.w)


def test_the_ode_order_reuses_the_kept_integration_too(integrations):
    """``order="ode"`` is served like ``"exact"``: by the adjoint of the integration that
    ``geodesic_ode`` kept (no second run), equal to a fresh group's."""
    c = CASES[0]()
    g = torch.Generator().manual_seed(18)
    xi, cot = (normal_like(c.w, g, s) for s in (0.05, 1.0))
    group = AttentionGL(c.blocks, "inv")
    group.geodesic_ode(c.w, xi, n_steps=16, tol=None)
    got = group.geodesic_vjp(c.w, xi, cot, order="ode", n_steps=16, tol=None)
    assert len(integrations) == 1
    want = AttentionGL(c.blocks, "inv").geodesic_vjp(c.w, xi, cot, order="exact", n_steps=16, tol=None)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14)


def test_the_exact_geodesic_keeps_its_options_under_torch_func_and_autograd():
    """With 4 steps the tolerance matters (step doubling to 1e-6 changes the endpoint, and differs
    from the default 1e-10's): the endpoint at
    ``t = 0.7`` inside ``torch.func.grad`` (the base class's RK4 on ``christoffel``) and with
    weights that require grad (the adjoint node) is the packed integration's with the same ``t``,
    ``n_steps`` and ``tol``; at ``t = 1`` the ``torch.func`` gradient is the discrete adjoint's
    VJP."""
    c = CASES[0]()
    group = AttentionGL(c.blocks, "inv")
    g = torch.Generator().manual_seed(19)
    xi, cot = (normal_like(c.w, g, s) for s in (0.4, 1.0))
    opts = {"n_steps": 4, "tol": 1e-6}

    def loss(v, t):
        end = group.geodesic_ode(c.w, v, t, **opts)
        return sum((end[n] * cot[n]).sum() for n in end), end
    for t in (0.7, 1.0):
        want = group.geodesic_ode(c.w, xi, t, **opts)
        for other in (None, 1e-10):
            end = group.geodesic_ode(c.w, xi, t, n_steps=4, tol=other)
            assert any(not torch.allclose(want[n], end[n], rtol=1e-8, atol=0) for n in want)
        with warnings_as_errors():  # the step-doubling test reads its error estimates without a graph
            grad, end = torch.func.grad(loss, has_aux=True)(xi, t)
        traced = group.geodesic_ode({n: x.clone().requires_grad_(True) for n, x in c.w.items()}, xi, t, **opts)
        for n in want:
            torch.testing.assert_close(end[n], want[n], rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(traced[n].detach(), want[n], rtol=1e-12, atol=1e-14)
    vjp = group.geodesic_vjp(c.w, xi, cot, order="exact", **opts)
    for n in vjp:
        torch.testing.assert_close(grad[n], vjp[n], rtol=1e-8, atol=1e-10)


def test_random_element_with_a_condition_number_is_reproducible_from_its_generator():
    """Heads of size 3 (one singular value drawn log-uniformly between 1 and ``max_cond``): the
    same seed gives the same elements, another seed others; the extreme singular values are 1
    and 50, the middle one ``50^u`` for the generator's uniform draw ``u``."""
    w = {"q": torch.randn(6, 4, dtype=torch.float64), "k": torch.randn(6, 4, dtype=torch.float64)}
    group = AttentionGL([GLBlock(G=(Piece("q", "rows"),), H=(Piece("k", "rows"),), n_heads=2, head_dim=3,
                                 label="qk")], "inv")
    a, b, other = (group.random_element(w, max_cond=50.0, generator=torch.Generator().manual_seed(s))[0]
                   for s in (7, 7, 8))
    assert torch.equal(a, b)
    s = torch.linalg.svdvals(a)
    torch.testing.assert_close(s[:, 0], torch.full((2,), 50.0, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(s[:, 2], torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=0)
    assert bool(((s[:, 1] > 1) & (s[:, 1] < 50)).all())
    # log-uniform: log s / log 50 is the generator's uniform draw after the Gaussian matrix
    g = torch.Generator().manual_seed(7)
    torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    u = torch.rand(2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.log(s[:, 1]) / math.log(50.0), u[:, 1], rtol=1e-13, atol=0)
    assert not torch.allclose(torch.linalg.svdvals(other)[:, 1], s[:, 1])


def test_algebra_zeros_take_the_weights_dtype_on_full_and_sub_algebra_stacks():
    """Float64 weights: float64 zeros of shape ``(B, h, h)`` (full gl) and ``(B, dim)`` (a
    sub-algebra stack)."""
    c = CASES[0]()
    full = AttentionGL(c.blocks, "inv").algebra_zeros(c.w)
    assert [(tuple(z.shape), z.dtype) for z in full] == [((4, 2, 2), torch.float64)] * 2
    w = {"q": torch.randn(4, 5, dtype=torch.float64), "k": torch.randn(4, 5, dtype=torch.float64)}
    rotary = AttentionGL([GLBlock(G=(Piece("q", "rows"),), H=(Piece("k", "rows"),), n_heads=1, head_dim=4,
                                  label="qk", algebra=SubAlgebra.rotary(4))], "inv")
    z, = rotary.algebra_zeros(w)
    assert (tuple(z.shape), z.dtype) == ((1, SubAlgebra.rotary(4).dim), torch.float64)
    assert not bool(z.any())


@pytest.mark.parametrize("traced", ["d", "w"])
def test_norm_of_a_riemannian_gradient_made_to_require_grad_is_differentiated_as_the_metric(traced):
    """``d = riemannian_gradient(w, egrad)`` on plain tensors, then ``d`` (with ``egrad``) or ``w``
    set to require grad: ``norm_sq(w, d)`` is ``g_w(d, d)`` with the gradients of the metric's
    ``inner`` on fresh leaves (``2 M d`` in ``d``, none in ``egrad``), not those of the shortcut
    ``<egrad, d>`` (``egrad`` in ``d``, nothing in ``w``)."""
    c = CASES[0]()
    group = AttentionGL(c.blocks, "inv")
    g = torch.Generator().manual_seed(20)
    egrad = normal_like(c.w, g)
    d = group.riemannian_gradient(c.w, egrad)
    leaves = [*d.values(), *egrad.values()] if traced == "d" else list(c.w.values())
    for x in leaves:
        x.requires_grad_(True)
    value = group.norm_sq(c.w, d)
    got = torch.autograd.grad(value, leaves, allow_unused=True)
    fresh_w, fresh_d = ({n: x.detach().clone().requires_grad_(True) for n, x in t.items()} for t in (c.w, d))
    want_value = group.inner(fresh_w, fresh_d, fresh_d)
    want = torch.autograd.grad(want_value, list((fresh_d if traced == "d" else fresh_w).values()))
    for n, a, b in zip(c.w, got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)
    assert all(e is None for e in got[len(want):])
    torch.testing.assert_close(value.detach(), want_value.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["rows", "cols"])
def test_a_weight_slice_of_a_vector_is_refused_by_name(kind):
    """``rows`` and ``cols`` pieces slice matrices: a 1-D tensor there is a clear ``ValueError``
    naming the parameter and the slice kind (not an ``IndexError`` from its missing dimension)."""
    w = {"q": torch.randn(4, 3, dtype=torch.float64), "k": torch.randn(4, dtype=torch.float64)}
    group = AttentionGL([GLBlock(G=(Piece("q", "rows"),), H=(Piece("k", kind),), n_heads=2, head_dim=2,
                                 label="qk")], "inv")
    with pytest.raises(ValueError, match=rf"^qk: parameter 'k' of shape \(4,\) does not fit a '{kind}' slice"):
        group.validate(w)


@pytest.mark.parametrize("kind", ["rows", "cols", "bias"])
def test_strided_heads_are_written_with_indices_on_the_weights_device(kind):
    """``insert_pieces`` of heads at a stride builds its head index on the weight's device: here
    the ``meta`` device (a CPU stand-in for a GPU), which refuses a CPU index."""
    shape, rows = {"rows": ((6, 3), 3), "cols": ((3, 6), 3), "bias": ((6,), 1)}[kind]
    out = {"q": torch.zeros(shape, device="meta")}
    insert_pieces(out, (Piece("q", kind, offset=0, stride=3),), torch.ones(2, rows, 2, device="meta"), 2, 2)
    assert out["q"].device.type == "meta" and tuple(out["q"].shape) == shape

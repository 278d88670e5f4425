"""The fast path of ``AttentionGL`` (issue 17): lazy ``gl_math.Blocks`` over views of the parameter
tensors, Gram matrices and tall products in the weights' dtype, ``h x h`` algebra in float64,
results written straight into the output tensors. Checked against the straightforward float64
formulas (the pre-issue-17 code: extract every stack, promote to float64, apply the printed
formulas, insert), against the extract/insert path the group takes under autograd, in float64
(round-off) and float32 (float32 round-off), on every attention layout of the geometry cases."""
from __future__ import annotations

import pytest
import scipy.linalg
import torch
from geometry_cases import attention_cases, modern_cases
from test_sharpness_common import TinyAttentionClassifier, attention_blocks

from quotientsharp import tangent as T
from quotientsharp.groups import gl_math as M
from quotientsharp.groups.attention import AttentionGL
from quotientsharp.groups.joint import JointGroup


def _gl_groups(cases):
    out = []
    for c in cases:
        g = c.group.parts[0] if isinstance(c.group, JointGroup) else c.group
        if isinstance(g, AttentionGL):
            out.append((c.id, g, {n: c.params[n] for n in g.names}))
    return out


def _deep_case(metric):
    """Three layers: every stack holds three blocks (QK and VO of each layer)."""
    torch.manual_seed(3)
    model = TinyAttentionClassifier(d=8, n_heads=2, n_layers=3).double()
    g = AttentionGL(attention_blocks(model), metric)
    return f"deep3-{metric}", g, {n: p.detach() for n, p in model.named_parameters() if n in g.names}


CASES = [c for m in ("inv", "mix") for c in _gl_groups(attention_cases(m) + modern_cases(m)) + [_deep_case(m)]]
IDS = [c[0] for c in CASES]


def rel(a: dict, b: dict) -> float:
    d = T.sub({n: a[n].double() for n in b}, b)
    return float(torch.sqrt(T.dot(d, d)) / torch.sqrt(T.dot(b, b)))


def vectors(w: dict, seed: int = 0):
    """A tangent ``xi`` (a tenth of the weights' scale), a cotangent ``c`` and a gradient ``e``."""
    g = torch.Generator().manual_seed(seed)
    scale = {n: float(t.double().pow(2).mean().sqrt()) for n, t in w.items()}
    return [{n: s * scale[n] * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
             for n, t in w.items()} for s in (0.1, 1.0, 1.0)]


# ----------------------------------------------------------------------------- the old formulas
def _sym(X):
    return X + X.mT


def _ref_christoffel(metric, G, H, xG, xH):
    """Eqs. 11 / 12 as printed in spec §6.2-6.3, float64."""
    P_inv, Q_inv = torch.linalg.inv(G.mT @ G), torch.linalg.inv(H.mT @ H)
    if metric == "inv":
        return (-xG @ P_inv @ _sym(xG.mT @ G) + G @ P_inv @ (xG.mT @ xG),
                -xH @ Q_inv @ _sym(xH.mT @ H) + H @ Q_inv @ (xH.mT @ xH))
    return ((xG @ _sym(xH.mT @ H) - G @ (xH.mT @ xH)) @ Q_inv,
            (xH @ _sym(xG.mT @ G) - H @ (xG.mT @ xG)) @ P_inv)


def _ref_vjp(metric, G, H, xG, xH, cG, cH):
    """``c - 1/2 (D Gamma)^T c`` by autograd through :func:`_ref_christoffel`."""
    with torch.enable_grad():
        x = [xG.clone().requires_grad_(), xH.clone().requires_grad_()]
        gG, gH = _ref_christoffel(metric, G, H, *x)
        dG, dH = torch.autograd.grad((gG * cG).sum() + (gH * cH).sum(), x)
    return cG - 0.5 * dG, cH - 0.5 * dH


def _ref_project(metric, G, H, xG, xH):
    """Spec §4.1: mix closed form; inv ``A X + X A = B`` by scipy, head by head."""
    P, Q = G.mT @ G, H.mT @ H
    if metric == "mix":
        lam = 0.5 * (xH.mT @ H @ torch.linalg.inv(Q) - torch.linalg.inv(P) @ G.mT @ xG)
    else:
        A, B = P @ Q, P @ H.mT @ xH - xG.mT @ G @ Q
        lam = torch.stack([torch.from_numpy(scipy.linalg.solve_sylvester(a, a, b)).mT
                           for a, b in zip(A.numpy(), B.numpy())])
    return xG + G @ lam, xH - H @ lam.mT


def _ref_rgrad(metric, G, H, dG, dH):
    P, Q = G.mT @ G, H.mT @ H
    return (dG @ P, dH @ Q) if metric == "inv" else (dG @ torch.linalg.inv(Q), dH @ torch.linalg.inv(P))


def _ref_whiten(metric, G, H, zG, zH):
    def power(S, p):
        ev, V = torch.linalg.eigh(S)
        return V @ torch.diag_embed(ev ** p) @ V.mT
    P, Q = G.mT @ G, H.mT @ H
    return (zG @ power(P, 0.5), zH @ power(Q, 0.5)) if metric == "inv" else (zG @ power(Q, -0.5), zH @ power(P, -0.5))


def _ref_inner(metric, G, H, xG, xH, zG, zH):
    P, Q = G.mT @ G, H.mT @ H
    a, b = (torch.linalg.inv(P), torch.linalg.inv(Q)) if metric == "inv" else (Q, P)
    return float(sum(torch.einsum("bij,bji->", a, X.mT @ Z) for a, X, Z in ((a, xG, zG), (b, xH, zH))))


def reference(group: AttentionGL, method: str, w: dict, *vecs: dict):
    """``method`` by the old formulas on the float64 stacks of ``extract``, reassembled by ``insert``."""
    w64 = {n: t.double() for n, t in w.items()}
    v64 = [{n: t.double() for n, t in v.items()} for v in vecs]
    bw, bv = group.extract(w64), [group.extract(v) for v in v64]
    m = group.metric
    if method == "inner":
        return sum(_ref_inner(m, *bw[s], *bv[0][s], *bv[1][s]) for s in range(len(bw)))
    res = []
    for s, (G, H) in enumerate(bw):
        x = [b[s] for b in bv]
        if method == "christoffel":
            res.append(_ref_christoffel(m, G, H, *x[0]))
        elif method == "geodesic_2nd":
            gG, gH = _ref_christoffel(m, G, H, *x[0])
            res.append((G + x[0][0] - 0.5 * gG, H + x[0][1] - 0.5 * gH))
        elif method == "geodesic_vjp":
            res.append(_ref_vjp(m, G, H, *x[0], *x[1]))
        elif method == "horizontal_projection":
            res.append(_ref_project(m, G, H, *x[0]))
        elif method == "egrad_to_rgrad":
            res.append(_ref_rgrad(m, G, H, *x[0]))
        elif method == "riemannian_gradient":
            res.append(_ref_project(m, G, H, *_ref_rgrad(m, G, H, *x[0])))
        elif method == "whiten":
            res.append(_ref_whiten(m, G, H, *x[0]))
    base = w64 if method == "geodesic_2nd" else {n: torch.zeros_like(t) for n, t in w64.items()}
    return group.insert(base, res)


def call(group: AttentionGL, method: str, w: dict, *vecs: dict):
    if method == "inner":
        return float(group.inner(w, *vecs).detach())
    return getattr(group, method)(w, *vecs)


def _full_gl(group: AttentionGL) -> bool:
    return all(b.algebra is None for b in group.blocks)


METHODS = {  # method: indices of (xi, c, e) it takes
    "christoffel": (0,), "geodesic_2nd": (0,), "geodesic_vjp": (0, 1), "egrad_to_rgrad": (2,),
    "whiten": (2,), "inner": (0, 2), "horizontal_projection": (2,), "riemannian_gradient": (2,),
}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fast_path_equals_the_old_float64_formulas(case):
    """float64: every hot method equals the straightforward formulas to round-off; float32 weights
    and vectors: equal to the float64 formulas on the same (float32) inputs to float32 round-off."""
    _, group, w = case
    vecs = vectors(w)
    for method, idx in METHODS.items():
        if method in ("horizontal_projection", "riemannian_gradient") and not _full_gl(group):
            continue  # sub-algebra projections: checked against the extract path below
        args = [vecs[i] for i in idx]
        ref = reference(group, method, w, *args)
        out = call(group, method, w, *args)
        if method == "inner":
            assert out == pytest.approx(ref, rel=1e-11), method
        else:
            assert rel(out, ref) <= 1e-11, method
        w32 = {n: t.float() for n, t in w.items()}
        a32 = [{n: t.float() for n, t in v.items()} for v in args]
        ref32 = reference(group, method, w32, *a32)
        out32 = call(group.with_metric(group.metric), method, w32, *a32)
        if method == "inner":
            assert out32 == pytest.approx(ref32, rel=1e-5), method
        else:
            assert all(t.dtype == torch.float32 for t in out32.values())
            assert rel(out32, ref32) <= 1e-5, method


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fast_path_equals_the_extract_insert_path(case):
    """The views path (plain tensors) and the path autograd takes (``requires_grad`` inputs:
    :meth:`extract`, float64 stacks, :meth:`insert`) agree, sub-algebra stacks included; and the
    views path really runs without :meth:`extract`."""
    _, group, w = case
    vecs = vectors(w, seed=1)
    group.norm_sq(w, vecs[0])  # base point cached (its extraction happens once per w)

    def no_extract(*a, **k):
        raise AssertionError("the fast path extracted a stack")

    for method, idx in METHODS.items():
        args = [vecs[i] for i in idx]
        group.extract = no_extract
        try:
            fast = call(group, method, w, *args)
        finally:
            del group.extract
        traced = [{n: t.clone().requires_grad_() for n, t in v.items()} for v in args]
        slow = call(group, method, w, *traced)
        if method == "inner":
            assert fast == pytest.approx(slow, rel=1e-12), method
        else:
            assert rel(fast, {n: t.detach() for n, t in slow.items()}) <= 1e-12, method


def test_shared_tensors_keep_the_other_parts_slices():
    """A GL part of a joint group (``shares_tensors``): tangent outputs are 0 and the geodesic is
    ``w`` on the slices the part does not own (the fused q/k rows of a timm QKV)."""
    (_, group, w), = [c for c in CASES if c[1].shares_tensors and c[1].metric == "mix"][:1]
    xi, c, _ = vectors(w)
    own = group.insert({n: torch.zeros_like(t) for n, t in w.items()},
                       group.extract({n: torch.ones_like(t) for n, t in w.items()}))
    assert any(bool((t == 0).any()) for t in own.values())  # the case does share a tensor
    for out, outside in ((group.christoffel(w, xi), 0.0), (group.geodesic_vjp(w, xi, c), 0.0),
                         (group.riemannian_gradient(w, c), 0.0), (group.geodesic_2nd(w, xi), None)):
        for n, t in out.items():
            mask = own[n] == 0
            expect = w[n][mask] if outside is None else torch.zeros_like(t[mask])
            assert torch.equal(t[mask], expect), n


def _random_views(gen, B=5, h=3, dtype=torch.float64):
    """A factor of ``B`` heads split into a transposed weight view (two head ranges), a strided
    column view and a one-row bias view, like a layer's ``W_q``, ``W_o`` and ``b_q``."""
    W1 = torch.randn(2 * h, 7, generator=gen, dtype=dtype)      # heads 0-1, "rows" layout
    W2 = torch.randn(3 * h, 7, generator=gen, dtype=dtype)      # heads 2-4
    C = torch.randn(4, 2 * B * h, generator=gen, dtype=dtype)   # "cols" at stride 2h
    b = torch.randn(B * h, generator=gen, dtype=dtype)          # bias
    parts = [(0, 2, W1.reshape(2, h, 7).mT), (2, 5, W2.reshape(3, h, 7).mT),
             (0, 5, C.unfold(1, h, 2 * h).transpose(0, 1)), (0, 5, b.reshape(B, 1, h))]
    dense = torch.cat([torch.cat([parts[0][2], parts[1][2]]), parts[2][2], parts[3][2]], dim=1)
    return parts, dense, (W1, W2, C, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lazy_blocks_algebra_matches_dense_tensors(dtype):
    """``Blocks``: Gram matrices and a written linear combination equal the dense computation."""
    gen = torch.Generator().manual_seed(0)
    B, h = 5, 3
    (px, X, _), (py, Y, _) = _random_views(gen, B, h, dtype), _random_views(gen, B, h, dtype)
    layout = ("test",)
    vx, vy = M.Views(px, B, h, layout), M.Views(py, B, h, layout)
    bx, by = M.Blocks.of(vx), M.Blocks.of(vy)
    A, C = (torch.randn(B, h, h, generator=gen, dtype=torch.float64) for _ in range(2))
    X64, Y64 = X.double(), Y.double()
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    combo = 2.0 * bx - by @ A + bx @ C - 0.5 * by
    dense = 2.0 * X64 - Y64 @ A + X64 @ C - 0.5 * Y64
    gram = combo.mT @ (bx @ C - by)
    ref = dense.mT @ (X64 @ C - Y64)
    assert gram.dtype == torch.float64
    assert float((gram - ref).abs().max()) <= tol * float(ref.abs().max())
    raw = _random_views(gen, B, h, dtype)[2]
    out_raw = [torch.full_like(t, float("nan")) for t in raw]
    W1, W2, Cm, b = out_raw
    out_parts = [(0, 2, W1.reshape(2, h, 7).mT), (2, 5, W2.reshape(3, h, 7).mT),
                 (0, 5, Cm.unfold(1, h, 2 * h).transpose(0, 1)), (0, 5, b.reshape(B, 1, h))]
    combo.write(M.Views(out_parts, B, h, layout))
    written = torch.cat([torch.cat([out_parts[0][2], out_parts[1][2]]), out_parts[2][2], out_parts[3][2]], dim=1)
    assert written.dtype == dtype
    assert float((written.double() - dense).abs().max()) <= tol * float(dense.abs().max())
    # the columns of C between the heads' strided slices are not written
    gaps = Cm.reshape(4, B, 2, h)[:, :, 1]
    assert bool(torch.isnan(gaps).all())
    with pytest.raises(ValueError, match="layouts"):
        M.Blocks.of(M.Views(px, B, h, ("other",))).mT @ by


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_gram_cache_is_shared_and_follows_in_place_changes(metric):
    """The Christoffel term and its vjp at the same ``xi`` share ``xi^T G`` and ``xi^T H`` (the vjp
    computes only its new Gram matrices); an in-place change of ``xi`` is seen."""
    _, group, w = _deep_case(metric)
    xi, c, _ = vectors(w)
    group.christoffel(w, xi)
    computed = []
    put = group._gram_cache.put
    group._gram_cache.put = lambda X, Y, value: (computed.append(1), put(X, Y, value))
    try:
        out = group.geodesic_vjp(w, xi, c)
    finally:
        del group._gram_cache.put
    n_stacks = len(group.extract(w))
    assert len(computed) == 4 * n_stacks  # xi^T c and w^T c per factor; xi^T w from the Christoffel term
    assert rel(out, reference(group, "geodesic_vjp", w, xi, c)) <= 1e-11
    # the Riemannian gradient of that output: G^T e from the vjp's own Gram matrices, none computed
    computed.clear()
    group._gram_cache.put = lambda X, Y, value: (computed.append(1), put(X, Y, value))
    try:
        d = group.riemannian_gradient(w, out)
    finally:
        del group._gram_cache.put
    assert not computed
    assert rel(d, reference(group, "riemannian_gradient", w, out)) <= 1e-11
    for t in xi.values():
        t.mul_(3.0)
    out = group.geodesic_vjp(w, xi, c)
    assert rel(out, reference(group, "geodesic_vjp", w, xi, c)) <= 1e-11
    for t in out.values():  # an output changed in place is no longer the recorded combination
        t.mul_(0.5)
    assert rel(group.riemannian_gradient(w, out), reference(group, "riemannian_gradient", w, out)) <= 1e-11


@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith(("deep3", "llama", "timm-vit-qknorm"))],
                         ids=lambda c: c[0])
def test_norm_of_the_riemannian_gradient(case):
    """``norm_sq`` of the last ``riemannian_gradient`` output (taken as ``<egrad, d>_F``) equals the
    metric's value; after an in-place change of ``d`` the metric is evaluated again."""
    _, group, w = case
    _, _, e = vectors(w, seed=2)
    d = group.riemannian_gradient(w, e)
    ref = reference(group, "inner", w, d, d)
    assert float(group.norm_sq(w, d)) == pytest.approx(ref, rel=1e-11)
    for t in d.values():
        t.mul_(2.0)
    assert float(group.norm_sq(w, d)) == pytest.approx(4 * ref, rel=1e-11)
    d = group.riemannian_gradient(w, e)
    for t in e.values():  # a changed egrad invalidates it too
        t.mul_(5.0)
    assert float(group.norm_sq(w, d)) == pytest.approx(ref, rel=1e-11)


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_non_contiguous_inputs(metric):
    """Transposed (column-major) weights and vectors: read through views, written into fresh
    contiguous outputs."""
    _, group, w = _deep_case(metric)
    flip = lambda d: {n: t.mT.contiguous().mT if t.ndim == 2 else t for n, t in d.items()}  # noqa: E731
    wt = flip(w)
    assert any(not t.is_contiguous() for t in wt.values())
    xi, c, e = (flip(v) for v in vectors(w))
    for method, args in (("geodesic_2nd", (xi,)), ("geodesic_vjp", (xi, c)), ("riemannian_gradient", (e,))):
        out = call(group, method, wt, *args)
        assert rel(out, reference(group, method, w, *args)) <= 1e-11, method
        assert all(t.is_contiguous() for t in out.values()), method

"""Behavioural tests of the residual sub-algebras of modern attention (:class:`SubAlgebra`, spec part 6
§3) and of :class:`JointGroup` (fused QKV with QK-norm, part 6 §4-§5) that close the gaps a mutation
run found (issue 18).

Ground truths, all float64 and written independently of the code under test:

* the generators of part 6 §3 (per plane ``e_j e_j^T + e_j' e_j'^T`` and ``e_j' e_j^T - e_j e_j'^T``,
  ``gl`` on the unrotated coordinates) as dense matrices typed in by hand;
* rotary logits computed by hand (rotation of every plane at every position), which the residual
  group must leave unchanged and a full GL(h) element must break;
* the projection ``xi - V (V^T M V)^{-1} V^T M xi`` with ``V`` the hand-built vertical vectors
  ``(-G E, H E^T)`` and ``M`` the Hessian of part 1's metric formula written out by hand;
* for the joint group: the product structure (metric = sum, vertical space = direct sum), the
  generic defaults of :class:`SymmetryGroup` (``M^{-1}`` by dense solve, the Christoffel term by
  autodiff of ``inner``), a classical RK4 step typed in by hand on that Christoffel term, the cylinder
  geodesic of part 6 §4, and finite differences for the vector-Jacobian products.
"""
from __future__ import annotations

import math
import pickle

import pytest
import torch
from geometry_cases import LayerRescaling
from tensor_checks import assert_close_tree, gen, randn, rk4_step

from quotientsharp import DiagonalRescaling, Euclidean, PositiveRescaling, SymmetryGroup
from quotientsharp import tangent as T
from quotientsharp.groups.attention import AttentionGL, GLBlock, Piece
from quotientsharp.groups.joint import JointGroup
from quotientsharp.groups.residual import SubAlgebra
from quotientsharp.groups.scaling import HeadScaling, ScaleBlock

DT = torch.float64


def close(a, b, rtol=1e-12, atol=1e-14):
    assert_close_tree(a, b, rtol, atol)


def rel(a: dict, b: dict) -> float:
    d = T.sub(a, b)
    return float(torch.sqrt(T.dot(d, d) / T.dot(b, b)))


def unit(h, i, j):
    E = torch.zeros(h, h, dtype=DT)
    E[i, j] = 1.0
    return E


def hand_basis(h, planes=(), free=(), extra=()):
    """The generators of part 6 §3, dense, in the documented order (planes, extra, free block)."""
    out = []
    for j, k in planes:
        out.append(unit(h, j, j) + unit(h, k, k))
        out.append(unit(h, k, j) - unit(h, j, k))
    for ents in extra:
        E = torch.zeros(h, h, dtype=DT)
        for i, j, v in ents:
            E[i, j] += v
        out.append(E)
    out.extend(unit(h, a, b) for a in free for b in free)
    return out


# ============================================================================ SubAlgebra: structure
def test_subalgebra_names_dimensions_and_descriptions():
    full = SubAlgebra.full(4)
    assert full.name == "GL(4)" and full.describe() == "GL(4)"
    assert full.free == (0, 1, 2, 3) and full.planes == () and full.dim == 16 and full.n_sparse == 0
    rot = SubAlgebra.rotary(8)
    assert rot.name == "rotary ℂ*^4 [half]" and rot.describe() == rot.name
    assert rot.planes == ((0, 4), (1, 5), (2, 6), (3, 7)) and rot.free == ()
    assert rot.dim == 8 == rot.n_sparse
    part = SubAlgebra.rotary(8, 4, "interleaved")
    assert part.name == "rotary ℂ*^2 ⊕ GL(4) [interleaved]"
    assert part.planes == ((0, 1), (2, 3)) and part.free == (4, 5, 6, 7)
    assert part.n_sparse == 4 and part.dim == 4 + 16
    half = SubAlgebra.rotary(6, 4)  # rotate_half on the first 4 coordinates: j pairs with j + 2
    assert half.planes == ((0, 2), (1, 3)) and half.free == (4, 5) and half.name == "rotary ℂ*^2 ⊕ GL(2) [half]"
    assert SubAlgebra.rotary(6, 6, "interleaved").planes == ((0, 1), (2, 3), (4, 5))
    # from_basis: 3 matrices of size 2 (k != h, so the count is the number of matrices)
    basis = torch.stack([unit(2, 0, 0), unit(2, 1, 1), 0.25 * unit(2, 0, 1)])
    fb = SubAlgebra.from_basis(basis)
    assert fb.name == "span of 3 matrices" and fb.describe() == "span of 3 matrices"
    assert fb.head_dim == 2 and fb.dim == 3 == fb.n_sparse
    assert fb.extra == (((0, 0, 1.0),), ((1, 1, 1.0),), ((0, 1, 0.25),))
    assert SubAlgebra.from_basis(basis, name="upper triangular").name == "upper triangular"
    assert SubAlgebra.from_basis(basis, "b").describe() == "b"
    # unnamed: the generic description
    anon = SubAlgebra(3, planes=((0, 2),), free=(1,))
    assert anon.name == "" and anon.describe() == "sub-algebra of gl(3) of dimension 3"


def test_subalgebra_rejects_bad_layouts_with_exact_messages():
    with pytest.raises(ValueError) as e:
        SubAlgebra.rotary(8, layout="neox")
    assert str(e.value) == "rotary layout must be one of ('half', 'interleaved'), got 'neox'"
    for r in (3, 0, 10, -2):
        with pytest.raises(ValueError) as e:
            SubAlgebra.rotary(8, r)
        assert str(e.value) == f"rotary dimension {r} must be even and in (0, head_dim=8]"
    SubAlgebra.rotary(8, 8)  # the boundaries are valid
    SubAlgebra.rotary(8, 2)
    with pytest.raises(ValueError) as e:
        SubAlgebra(4, planes=((0, 1),), free=(1, 2))
    assert str(e.value) == ("SubAlgebra: planes ((0, 1),) and free coordinates (1, 2) must be disjoint "
                            "indices in [0, 4)")
    for bad in (dict(free=(4,)), dict(free=(-1,)), dict(planes=((0, 4),)), dict(planes=((2, 2),))):
        with pytest.raises(ValueError, match=r"must be disjoint indices in \[0, 4\)"):
            SubAlgebra(4, **bad)
    SubAlgebra(4, planes=((0, 3),), free=(1, 2))  # 0 and h - 1 are valid indices


def test_sparse_basis_and_matrix_are_the_hand_written_generators():
    alg = SubAlgebra(5, planes=((0, 3),), free=(1, 4), extra=(((2, 2, 2.0),),))
    assert alg.sparse_entries() == [[(0, 0, 1.0), (3, 3, 1.0)], [(3, 0, 1.0), (0, 3, -1.0)], [(2, 2, 2.0)]]
    ref = hand_basis(5, alg.planes, alg.free, alg.extra)
    Es = alg.sparse_basis()
    assert Es.dtype == DT and Es.shape == (3, 5, 5)
    close(Es, torch.stack(ref[:3]), rtol=0, atol=0)
    assert alg.sparse_basis(torch.float32).dtype == torch.float32
    assert alg.sparse_basis(device="meta").device.type == "meta"
    coef = randn(4, alg.dim, seed=1)
    expect = torch.einsum("ba,aij->bij", coef, torch.stack(ref))
    close(alg.matrix(coef), expect, rtol=1e-15, atol=1e-15)
    with torch.device("meta"):  # every index lives on coef's device, whatever the default device
        close(alg.matrix(coef), expect, rtol=1e-15, atol=1e-15)
    # the free block is read row-major: coefficient 3 + (a * 2 + b) sits at (free[a], free[b])
    one = torch.zeros(1, alg.dim, dtype=DT)
    one[0, 3 + 1] = 1.0  # (a, b) = (0, 1) -> entry (1, 4)
    close(alg.matrix(one)[0], unit(5, 1, 4), rtol=0, atol=0)
    # an algebra without a free block, and one without sparse generators
    rot = SubAlgebra.rotary(4)
    c = randn(2, 4, seed=2)
    close(rot.matrix(c), torch.einsum("ba,aij->bij", c, torch.stack(hand_basis(4, rot.planes))), rtol=1e-15, atol=0)
    gl = SubAlgebra.full(3)
    c = randn(2, 9, seed=3)
    close(gl.matrix(c), c.reshape(2, 3, 3), rtol=0, atol=0)
    # repeated entries of one generator add up (as in the projection's sparse sums)
    dup = SubAlgebra(2, extra=(((0, 1, 1.0), (0, 1, 2.0), (1, 0, -1.0)),))
    close(dup.sparse_basis()[0], torch.tensor([[0.0, 3.0], [-1.0, 0.0]], dtype=DT), rtol=0, atol=0)


def test_from_basis_reads_the_entries_exactly():
    g = gen(4)
    basis = torch.randn(3, 4, 4, generator=g, dtype=DT) * (torch.rand(3, 4, 4, generator=g) < 0.5)
    alg = SubAlgebra.from_basis(basis)
    close(alg.sparse_basis(), basis, rtol=0, atol=0)
    assert alg.head_dim == 4 and alg.planes == () and alg.free == ()


# ============================================================================ SubAlgebra: random elements
def plane_blocks(A, planes):
    """``(a, b)`` per plane of ``A = a I + b J`` on ``(j, j')``, and the residual off the complex form."""
    a = torch.stack([A[:, j, j] for j, _ in planes], 1)
    b = torch.stack([A[:, k, j] for j, k in planes], 1)
    off = max(float((A[:, k, k] - A[:, j, j]).abs().max() + (A[:, j, k] + A[:, k, j]).abs().max())
              for j, k in planes)
    return a, b, off


def test_rotary_random_element_is_a_complex_scalar_per_plane_and_gl_on_the_rest():
    alg = SubAlgebra.rotary(6, 4)  # planes (0, 2), (1, 3); free (4, 5)
    for max_cond, hi in ((None, math.e), (1e3, 1e3)):
        A = alg.random_element(64, gen(1), max_cond)
        assert A.shape == (64, 6, 6) and A.dtype == DT and A.device.type == "cpu"
        a, b, off = plane_blocks(A, alg.planes)
        assert off == 0.0
        mod = torch.sqrt(a * a + b * b)
        assert float(mod.min()) >= 1.0 - 1e-12 and float(mod.max()) <= hi * (1 + 1e-12)
        # the range is used: without max_cond the moduli are exp(U[0, 1]), not exp(U[0, 2])
        assert float(mod.max()) > (20.0 if max_cond else 2.0)
        # the free block: singular values in [1, max_cond]; no mixing between planes and free block
        F = A[:, 4:, 4:]
        sv = torch.linalg.svdvals(F)
        assert float(sv.min()) >= 1.0 - 1e-12 and float(sv.max()) <= hi * (1 + 1e-10)
        assert float(sv.max()) > (20.0 if max_cond else 2.0)
        mask = torch.ones(6, 6, dtype=torch.bool)
        mask[4:, 4:] = False
        for j, k in alg.planes:
            for r in (j, k):
                for c in (j, k):
                    mask[r, c] = False
        assert float(A[:, mask].abs().max()) == 0.0
    # independent draws per batch entry: moduli, angles, singular values and singular vectors
    A = alg.random_element(3, gen(2), 10.0)
    a, b, _ = plane_blocks(A, alg.planes)
    assert len({round(float(x), 12) for x in (a * a + b * b)[:, 0]}) == 3
    assert len({round(float(x), 12) for x in torch.atan2(b, a)[:, 0]}) == 3
    F = A[:, 4:, 4:]
    sv = torch.linalg.svdvals(F)
    assert float((sv[0] - sv[1]).abs().max()) > 1e-3
    S0, S1 = F[0].T @ F[0], F[1].T @ F[1]  # shared right singular vectors would make these commute
    assert float((S0 @ S1 - S1 @ S0).abs().max()) > 1e-3


def test_rotary_random_element_angles_are_uniform_on_the_circle():
    A = SubAlgebra.rotary(2).random_element(4000, gen(3))
    ang = torch.atan2(A[:, 1, 0], A[:, 0, 0]) % (2 * math.pi)
    quarter = torch.floor(ang / (math.pi / 2)).long()
    frac = torch.bincount(quarter, minlength=4).double() / 4000
    assert float((frac - 0.25).abs().max()) < 0.03, frac
    assert abs(float(torch.cos(ang).mean())) < 0.05 and abs(float(torch.sin(ang).mean())) < 0.05


def test_subalgebra_random_element_is_reproducible_and_uses_the_generator_device():
    alg = SubAlgebra(5, planes=((0, 1),), free=(2, 3, 4))
    A = alg.random_element(4, gen(5), 100.0)
    torch.manual_seed(123)  # the global generator plays no part
    torch.rand(7)
    close(alg.random_element(4, gen(5), 100.0), A, rtol=0, atol=0)
    assert float((alg.random_element(4, gen(6), 100.0) - A).abs().max()) > 1e-3
    # without a generator: the global one (reproducible by seeding it)
    torch.manual_seed(7)
    B = alg.random_element(4)
    torch.manual_seed(7)
    close(alg.random_element(4), B, rtol=0, atol=0)
    assert B.device.type == "cpu" and B.dtype == DT
    # dtype / device of the result
    A32 = alg.random_element(4, gen(5), 100.0, dtype=torch.float32)
    assert A32.dtype == torch.float32
    close(A32, A.float(), rtol=0, atol=0)
    assert alg.random_element(2, gen(5), device="meta").device.type == "meta"
    # every tensor is made on the generator's device, whatever the default device
    with torch.device("meta"):
        M = alg.random_element(4, gen(5), 100.0)
    assert M.device.type == "cpu"
    close(M, A, rtol=0, atol=0)
    ex = SubAlgebra.from_basis(torch.stack([unit(2, 0, 0), unit(2, 1, 1)]))
    E = ex.random_element(3, gen(8))
    with torch.device("meta"):
        M = ex.random_element(3, gen(8))
    assert M.device.type == "cpu"
    close(M, E, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA generator")
def test_subalgebra_random_element_follows_a_cuda_generator():
    alg = SubAlgebra(4, planes=((0, 1),), free=(2, 3))
    A = alg.random_element(3, torch.Generator(device="cuda").manual_seed(0), 10.0)
    assert A.device.type == "cuda" and A.dtype == DT
    assert alg.random_element(3, torch.Generator(device="cuda").manual_seed(0), 10.0, device="cpu").device.type == "cpu"


def test_random_element_of_extra_generators_is_their_exponential():
    # diag(1, 0) and diag(0, 1): the group of positive diagonal matrices, exp of N(0, 1) entries
    alg = SubAlgebra.from_basis(torch.stack([unit(2, 0, 0), unit(2, 1, 1)]))
    A = alg.random_element(5, gen(9))
    assert A.shape == (5, 2, 2)
    assert float(A[:, 0, 1].abs().max()) == 0.0 == float(A[:, 1, 0].abs().max())
    d = torch.log(torch.diagonal(A, dim1=1, dim2=2))
    assert len({round(float(x), 12) for x in d.reshape(-1)}) == 10  # independent per entry and batch
    close(alg.random_element(5, gen(9)), A, rtol=0, atol=0)
    torch.manual_seed(0)
    close(alg.random_element(5, gen(9)), A, rtol=0, atol=0)
    # exp(c I) for the scalar algebra: c ~ N(0, 1) per batch entry
    scal = SubAlgebra.from_basis(torch.eye(3, dtype=DT)[None])
    S = scal.random_element(3000, gen(10))
    c = torch.log(S[:, 0, 0])
    close(S, torch.exp(c)[:, None, None] * torch.eye(3, dtype=DT), rtol=1e-13, atol=0)
    assert abs(float(c.mean())) < 0.06 and abs(float(c.std()) - 1.0) < 0.05
    # the exponential of a non-diagonal generator: rotations exp(t J)
    so2 = SubAlgebra.from_basis((unit(2, 1, 0) - unit(2, 0, 1))[None])
    R = so2.random_element(4, gen(11))
    close(R.transpose(1, 2) @ R, torch.eye(2, dtype=DT).expand(4, 2, 2), rtol=0, atol=1e-14)
    close(torch.linalg.det(R), torch.ones(4, dtype=DT), rtol=0, atol=1e-14)
    assert float((R[:, 1, 0] - R[0, 1, 0]).abs().max()) > 1e-3


def test_random_element_with_planes_and_extra_generators_keeps_the_plane_factor():
    """Planes and extra generators together: the plane block is still ``m (cos t I + sin t J)``
    with a random modulus and angle per entry (the extra generators scale coordinates 2, 3, 4)."""
    alg = SubAlgebra(5, planes=((0, 1),), extra=(((2, 2, 1.0),), ((3, 3, 1.0),), ((4, 4, 1.0),)))
    A = alg.random_element(6, gen(12), 50.0)
    a, b, off = plane_blocks(A, alg.planes)
    assert off == 0.0
    mod = torch.sqrt(a * a + b * b)[:, 0]
    assert float(mod.min()) >= 1.0 - 1e-12 and float(mod.max()) <= 50.0 * (1 + 1e-12)
    assert float(mod.max() - mod.min()) > 1e-2
    assert float(A[:, 0:2, 2:].abs().max()) == 0.0 == float(A[:, 2:, 0:2].abs().max())


def test_random_element_is_the_identity_where_no_generator_acts_and_stays_invertible():
    """A coordinate outside the planes and the free block: exp of the algebra is 1 there (the
    element started from zeros, so it was singular, and with extra generators ``A @ exp`` too)."""
    A = SubAlgebra(3, planes=((0, 1),)).random_element(4, gen(13))
    assert float((A[:, 2, 2] - 1).abs().max()) == 0.0
    assert float(A[:, 2, :2].abs().max()) == 0.0 == float(A[:, :2, 2].abs().max())
    alg = SubAlgebra(3, planes=((0, 1),), extra=(((2, 2, 1.0),),))
    A = alg.random_element(4, gen(14))
    assert float(torch.linalg.det(A).abs().min()) > 1e-6
    assert bool((A[:, 2, 2] > 0).all()) and float((A[:, 2, 2] - 1).abs().max()) > 1e-3  # exp(c), c ~ N(0, 1)
    grp = AttentionGL([GLBlock((Piece("Wq", "cols"),), (Piece("Wk", "cols"),), 1, 3, algebra=alg)], "mix")
    w = {"Wq": randn(5, 3, seed=15), "Wk": randn(4, 3, seed=16)}
    w2 = grp.action(w, grp.random_element(w, generator=gen(17)))
    close(w2["Wq"] @ w2["Wk"].T, w["Wq"] @ w["Wk"].T, rtol=1e-10, atol=1e-12)


# ============================================================================ rotary invariance by hand
def rotate(x, planes, freqs):
    """Rotary embedding of ``x`` (T, h): at position p the plane ``(j, j')`` turns by ``p * freq``."""
    pos = torch.arange(x.shape[0], dtype=DT)[:, None]
    out = x.clone()
    for (j, k), f in zip(planes, freqs):
        c, s = torch.cos(pos[:, 0] * f), torch.sin(pos[:, 0] * f)
        out[:, j] = c * x[:, j] - s * x[:, k]
        out[:, k] = s * x[:, j] + c * x[:, k]
    return out


def rope_problem(alg, metric="mix", heads=2, n=None, m=None, seed=0):
    h = alg.head_dim
    n, m = n or h + 3, m or h + 2
    grp = AttentionGL([GLBlock((Piece("Wq", "cols"),), (Piece("Wk", "cols"),), heads, h, label="l/qk",
                               algebra=alg)], metric)
    w = {"Wq": randn(n, heads * h, seed=seed), "Wk": randn(m, heads * h, seed=seed + 1)}
    grp.validate(w)
    return grp, w


def rope_logits(w, planes, h, heads=2, seed=20):
    g = gen(seed)
    X = torch.randn(6, w["Wq"].shape[0], generator=g, dtype=DT)
    Y = torch.randn(6, w["Wk"].shape[0], generator=g, dtype=DT)
    freqs = [1.0 / (3.7 ** i) + 0.3 * i for i in range(len(planes))]  # distinct frequencies
    out = []
    for i in range(heads):
        q = rotate(X @ w["Wq"][:, i * h:(i + 1) * h], planes, freqs)
        k = rotate(Y @ w["Wk"][:, i * h:(i + 1) * h], planes, freqs)
        out.append(q @ k.T)
    return torch.stack(out)


@pytest.mark.parametrize("alg", [SubAlgebra.rotary(4), SubAlgebra.rotary(6, 4, "interleaved"),
                                 SubAlgebra.rotary(6, 2)], ids=lambda a: a.name)
def test_rotary_group_preserves_hand_rope_logits_and_its_vertical_vectors_are_null(alg):
    grp, w = rope_problem(alg)
    ref = rope_logits(w, alg.planes, alg.head_dim)
    A = grp.random_element(w, generator=gen(3), max_cond=10.0)
    moved = grp.action(w, A)
    assert float((rope_logits(moved, alg.planes, alg.head_dim) - ref).abs().max() / ref.abs().max()) < 1e-12
    assert float((moved["Wq"] - w["Wq"]).abs().max()) > 1e-2  # the element did move the weights
    # a full GL(h) element is no symmetry of the rotary logits
    full = AttentionGL([GLBlock((Piece("Wq", "cols"),), (Piece("Wk", "cols"),), 2, alg.head_dim)], "mix")
    B = full.random_element(w, generator=gen(4))
    err = float((rope_logits(full.action(w, B), alg.planes, alg.head_dim) - ref).abs().max() / ref.abs().max())
    assert err > 1e-3
    # vertical vectors of random Lie-algebra elements: null directions of the logits
    om = [randn(*z.shape, seed=5) for z in grp.algebra_zeros(w)]
    assert [z.shape for z in grp.algebra_zeros(w)] == [(2, alg.dim)]
    nu = grp.vertical(w, om)
    jv = torch.func.jvp(lambda p: rope_logits(p, alg.planes, alg.head_dim), (w,), (nu,))[1]
    assert float(jv.abs().max()) < 1e-11 * float(ref.abs().max()) * float(T.flatten(nu).norm())
    assert float(T.flatten(nu).norm()) > 1e-1
    # and the vertical vector is (-G Omega, H Omega^T) with Omega from the hand-written generators
    Es = torch.stack(hand_basis(alg.head_dim, alg.planes, alg.free, alg.extra))
    h = alg.head_dim
    for i in range(2):
        Om = torch.einsum("a,aij->ij", om[0][i], Es)
        close(nu["Wq"][:, i * h:(i + 1) * h], -w["Wq"][:, i * h:(i + 1) * h] @ Om, rtol=1e-13, atol=1e-13)
        close(nu["Wk"][:, i * h:(i + 1) * h], w["Wk"][:, i * h:(i + 1) * h] @ Om.T, rtol=1e-13, atol=1e-13)


# ============================================================================ projection vs dense reference
def hand_gl_inner(metric, w, xi, zeta, heads, h):
    """Part 1's metric per head: inv ``tr(P^-1 xG^T zG) + tr(Q^-1 xH^T zH)``, mix
    ``tr(Q xG^T zG) + tr(P xH^T zH)``, with ``P = G^T G``, ``Q = H^T H``."""
    total = 0
    for i in range(heads):
        s = slice(i * h, (i + 1) * h)
        G, H = w["Wq"][:, s], w["Wk"][:, s]
        P, Q = G.T @ G, H.T @ H
        a, b = (torch.linalg.inv(P), torch.linalg.inv(Q)) if metric == "inv" else (Q, P)
        total = total + (a * (xi["Wq"][:, s].T @ zeta["Wq"][:, s])).sum() \
            + (b * (xi["Wk"][:, s].T @ zeta["Wk"][:, s])).sum()
    return total


def dense_projection(metric, w, xi, basis, heads, h):
    D = sum(t.numel() for t in w.values())
    M = torch.autograd.functional.hessian(
        lambda x: 0.5 * hand_gl_inner(metric, w, T.unflatten(x, w), T.unflatten(x, w), heads, h),
        torch.zeros(D, dtype=DT))
    cols = []
    for i in range(heads):
        s = slice(i * h, (i + 1) * h)
        for E in basis:
            nu = {n: torch.zeros_like(t) for n, t in w.items()}
            nu["Wq"][:, s] = -w["Wq"][:, s] @ E
            nu["Wk"][:, s] = w["Wk"][:, s] @ E.T
            cols.append(T.flatten(nu, list(w)))
    V = torch.stack(cols, 1)
    x = T.flatten(xi, list(w))
    p = x - V @ torch.linalg.solve(V.T @ M @ V, V.T @ (M @ x))
    return T.unflatten(p, w), M, V


ALGEBRAS = {
    "rotary-half": SubAlgebra.rotary(4),
    "partial-interleaved": SubAlgebra.rotary(5, 2, "interleaved"),
    "planes-free-extra": SubAlgebra(5, planes=((0, 3),), free=(1, 2), extra=(((4, 4, 1.5),),)),
    "extra-only": SubAlgebra.from_basis(torch.stack([unit(3, 0, 1) - unit(3, 1, 0), unit(3, 2, 2),
                                                     unit(3, 0, 2) + 0.5 * unit(3, 1, 2) - unit(3, 2, 1)])),
    "full": SubAlgebra.full(3),
    "free-only-partial": SubAlgebra(4, free=(0, 2)),
}


@pytest.mark.parametrize("metric", ["inv", "mix"])
@pytest.mark.parametrize("key", list(ALGEBRAS))
def test_subalgebra_projection_is_the_dense_metric_orthogonal_projection(key, metric):
    alg = ALGEBRAS[key]
    h = alg.head_dim
    grp, w = rope_problem(alg, metric, n=h + 2, m=h + 1, seed=30)
    xi = T.randn_like(w, gen(31))
    basis = hand_basis(h, alg.planes, alg.free, alg.extra)
    ref, M, V = dense_projection(metric, w, xi, basis, 2, h)
    p = grp.horizontal_projection(w, xi)
    assert rel(p, ref) < 1e-10
    # idempotent and M-orthogonal to every vertical vector of the sub-algebra
    assert rel(grp.horizontal_projection(w, p), p) < 1e-10
    pv = T.flatten(p, list(w))
    assert float((V.T @ (M @ pv)).abs().max()) < 1e-10 * float(pv.norm()) * float(V.norm())
    # it removes something (the vertical part) unless xi is horizontal
    assert rel(p, xi) > 1e-3
    # the Riemannian gradient: Pi(M^{-1} egrad)
    egrad = T.randn_like(w, gen(32))
    rg = T.unflatten(torch.linalg.solve(M, T.flatten(egrad, list(w))), w)
    ref_rg, _, _ = dense_projection(metric, w, rg, basis, 2, h)
    assert rel(grp.riemannian_gradient(w, egrad), ref_rg) < 1e-9


@pytest.mark.parametrize("key", ["planes-free-extra", "extra-only"])
def test_subalgebra_projection_builds_every_tensor_on_the_weights_device(key):
    """A default device (here ``meta``) set by the caller changes nothing: every index and
    buffer of the factors and of the solve lives on the weights' device."""
    alg = ALGEBRAS[key]
    grp, w = rope_problem(alg, "mix", seed=33)
    xi = T.randn_like(w, gen(34))
    ref = grp.horizontal_projection(w, xi)
    fresh, _ = rope_problem(alg, "mix", seed=33)
    with torch.device("meta"):
        p = fresh.horizontal_projection(w, xi)
    assert all(t.device.type == "cpu" for t in p.values())
    close(p, ref, rtol=1e-13, atol=1e-14)


def test_subalgebra_projection_keeps_the_dtype_of_float32_input():
    """Float32 weights and vectors: computed in float64, returned in float32 (one rounding)."""
    alg = ALGEBRAS["planes-free-extra"]
    grp, w = rope_problem(alg, "inv", seed=30)
    xi = T.randn_like(w, gen(31))
    ref, _, _ = dense_projection("inv", w, xi, hand_basis(5, alg.planes, alg.free, alg.extra), 2, 5)
    grp32, _ = rope_problem(alg, "inv", seed=30)
    p = grp32.horizontal_projection({n: t.float() for n, t in w.items()}, {n: t.float() for n, t in xi.items()})
    assert all(t.dtype == torch.float32 for t in p.values())
    assert rel({n: t.double() for n, t in p.items()}, ref) < 1e-6


def test_subalgebra_projection_with_repeated_entries_equals_the_merged_generator():
    merged = SubAlgebra(3, free=(2,), extra=(((0, 1, 3.0), (1, 0, -1.0)),))
    dup = SubAlgebra(3, free=(2,), extra=(((0, 1, 1.0), (1, 0, -1.0), (0, 1, 2.0)),))
    gm, w = rope_problem(merged, "inv", n=5, m=4, seed=40)
    gd, _ = rope_problem(dup, "inv", n=5, m=4, seed=40)
    xi = T.randn_like(w, gen(41))
    ref, _, _ = dense_projection("inv", w, xi, hand_basis(3, (), (2,), merged.extra), 2, 3)
    assert rel(gd.horizontal_projection(w, xi), ref) < 1e-10
    assert rel(gm.horizontal_projection(w, xi), ref) < 1e-10


# ============================================================================ JointGroup
def joint_problem(metric="mix", seed=0, order="scales-first"):
    """Fused ``Wqk`` (4 x 6): columns 0-3 two scaled heads (h = 2), columns 4-5 the G factor of a
    GL(2) block whose H factor is ``O`` (3 x 2)."""
    scales = HeadScaling([ScaleBlock((Piece("Wqk", "cols"),), 2, 2, label="l/q")], shares_tensors=True)
    gl = AttentionGL([GLBlock((Piece("Wqk", "cols", offset=4),), (Piece("O", "cols"),), 1, 2, label="l/vo")],
                     metric, eps_rel=0.0, shares_tensors=True)
    joint = JointGroup([scales, gl] if order == "scales-first" else [gl, scales])
    g = gen(seed)
    w = {"Wqk": torch.randn(4, 6, generator=g, dtype=DT), "O": torch.randn(3, 2, generator=g, dtype=DT)}
    joint.validate(w)
    return joint, w


def joint_model(w, X):
    """Two QK-normed heads (scale invariant) and a V/O pair ``X G H^T`` (GL invariant)."""
    W = w["Wqk"]
    heads = [X @ W[:, 2 * i:2 * i + 2] / W[:, 2 * i:2 * i + 2].norm() for i in range(2)]
    return torch.cat([*heads, X @ W[:, 4:6] @ w["O"].T], 1)


def joint_vertical_basis(w):
    """Hand-built vertical vectors: ``W_i`` on scale head i; ``(-G E, H E^T)`` for ``E = e_a e_b^T``."""
    cols = []
    for i in range(2):
        nu = {"Wqk": torch.zeros(4, 6, dtype=DT), "O": torch.zeros(3, 2, dtype=DT)}
        nu["Wqk"][:, 2 * i:2 * i + 2] = w["Wqk"][:, 2 * i:2 * i + 2]
        cols.append(T.flatten(nu, ["Wqk", "O"]))
    for a in range(2):
        for b in range(2):
            E = unit(2, a, b)
            nu = {"Wqk": torch.zeros(4, 6, dtype=DT), "O": torch.zeros(3, 2, dtype=DT)}
            nu["Wqk"][:, 4:6] = -w["Wqk"][:, 4:6] @ E
            nu["O"] = w["O"] @ E.T
            cols.append(T.flatten(nu, ["Wqk", "O"]))
    return torch.stack(cols, 1)


def hand_joint_inner(metric, w, xi, zeta):
    """Part 6 §4 on the scaled heads plus part 1's metric on the GL block."""
    W = w["Wqk"]
    tot = sum((xi["Wqk"][:, 2 * i:2 * i + 2] * zeta["Wqk"][:, 2 * i:2 * i + 2]).sum() / W[:, 2 * i:2 * i + 2].pow(2).sum()
              for i in range(2))
    G, H = W[:, 4:6], w["O"]
    P, Q = G.T @ G, H.T @ H
    a, b = (torch.linalg.inv(P), torch.linalg.inv(Q)) if metric == "inv" else (Q, P)
    return tot + (a * (xi["Wqk"][:, 4:6].T @ zeta["Wqk"][:, 4:6])).sum() + (b * (xi["O"].T @ zeta["O"])).sum()


def test_joint_construction_repr_names_metric_and_pickle():
    grp, w = joint_problem("mix")
    assert repr(grp) == "JointGroup(HeadScaling(1 blocks, 2 heads), AttentionGL(metric='mix', 1 blocks, 1 heads))"
    assert grp.names == ("Wqk", "O") and grp.metric == "mix"
    rev, _ = joint_problem("inv", order="gl-first")
    assert rev.names == ("Wqk", "O") and rev.metric == "inv"
    assert repr(rev).startswith("JointGroup(AttentionGL(metric='inv'")
    with pytest.raises(ValueError) as e:
        JointGroup([grp.parts[0]])
    assert str(e.value) == "JointGroup needs at least two parts"
    with pytest.raises(ValueError, match="at least two parts"):
        JointGroup([])
    # a metric-free product has metric None; names keep first-seen order
    pr = JointGroup([PositiveRescaling(["b", "a"]), Euclidean(["c", "a2"])])
    assert pr.metric is None and pr.names == ("b", "a", "c", "a2")
    # pickle keeps the parts and the geometry
    cp = pickle.loads(pickle.dumps(grp))
    assert repr(cp) == repr(grp)
    xi, zeta = T.randn_like(w, gen(1)), T.randn_like(w, gen(2))
    assert float(cp.inner(w, xi, zeta)) == pytest.approx(float(grp.inner(w, xi, zeta)), rel=1e-14)
    assert grp.block_summaries() == [("l", "QK", "ℝ₊ × 2 heads"), ("l", "VO", "GL(2) × 1 heads")]


def test_joint_validate_checks_the_coverage_of_the_shared_tensors():
    scales = HeadScaling([ScaleBlock((Piece("Wqk", "cols"),), 2, 2)], shares_tensors=True)
    w = {"Wqk": randn(4, 6), "O": randn(3, 2, seed=1)}
    gap = JointGroup([scales, AttentionGL([GLBlock((Piece("Wqk", "cols", offset=4),), (Piece("O", "cols"),), 1, 1)],
                                          shares_tensors=True)])  # column 5 is nobody's
    with pytest.raises(ValueError) as e:
        gap.validate(w)
    assert str(e.value) == "JointGroup: parameter 'Wqk' is not covered exactly once by the parts' slices"
    overlap = JointGroup([scales, AttentionGL([GLBlock((Piece("Wqk", "cols", offset=2),), (Piece("O", "cols"),), 1, 2)],
                                              shares_tensors=True)])
    with pytest.raises(ValueError, match="'Wqk' is not covered exactly once"):
        overlap.validate({"Wqk": randn(4, 4), "O": randn(3, 2, seed=1)})
    with pytest.raises(ValueError, match="non-finite"):
        grp, _ = joint_problem()
        grp.validate({"Wqk": torch.full((4, 6), float("nan"), dtype=DT), "O": randn(3, 2)})
    with pytest.raises(KeyError):
        grp.validate({"Wqk": randn(4, 6)})
    grp, w = joint_problem()
    grp.validate(w)  # validated shapes pass again, without asking the parts again
    calls = []
    for p in grp.parts:
        orig = p.validate
        p.validate = lambda x, orig=orig: (calls.append(1), orig(x))[1]
    grp.validate({n: t.clone() for n, t in w.items()})
    assert calls == []
    with pytest.raises(ValueError, match="not covered exactly once"):  # new shapes: checked again
        grp.validate({"Wqk": randn(4, 7), "O": randn(3, 2)})
    assert calls != []


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_joint_action_preserves_the_model_and_vertical_vectors_are_loss_null(metric):
    grp, w = joint_problem(metric)
    X = randn(5, 4, seed=3)
    ref = joint_model(w, X)
    g = grp.random_element(w, generator=gen(4), max_cond=10.0)
    assert isinstance(g, list) and len(g) == 2
    moved = grp.action(w, g)
    assert set(moved) == {"Wqk", "O"}
    close(joint_model(moved, X), ref, rtol=1e-12, atol=1e-12)
    assert float((moved["Wqk"] - w["Wqk"]).abs().max()) > 1e-2
    # the scale part rescales its heads, the GL part moves G A^-1 and H A^T
    s, A = g[0][0], g[1][0]
    for i in range(2):
        close(moved["Wqk"][:, 2 * i:2 * i + 2], s[i] * w["Wqk"][:, 2 * i:2 * i + 2], rtol=1e-14, atol=0)
    close(moved["Wqk"][:, 4:6], w["Wqk"][:, 4:6] @ torch.linalg.inv(A[0]), rtol=1e-12, atol=1e-13)
    close(moved["O"], w["O"] @ A[0].T, rtol=1e-12, atol=1e-13)
    # vertical vectors: loss-null and equal to the hand-built basis combination
    target = randn(*ref.shape, seed=5)

    def loss(p):
        return ((joint_model(p, X) - target) ** 2).sum()
    om = [[randn(2, seed=6)], [randn(1, 2, 2, seed=7)]]
    assert [[z.shape for z in part] for part in grp.algebra_zeros(w)] == [[(2,)], [(1, 2, 2)]]
    nu = grp.vertical(w, om)
    V = joint_vertical_basis(w)
    close(T.flatten(nu, grp.names), V @ torch.cat([om[0][0], om[1][0].reshape(-1)]), rtol=1e-13, atol=1e-13)
    gl = torch.func.grad(loss)(w)
    assert abs(float(T.dot(gl, nu))) < 1e-11 * float(T.flatten(gl).norm() * T.flatten(nu).norm())


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_joint_metric_projection_gradient_and_whitening_vs_dense_references(metric):
    grp, w = joint_problem(metric, seed=1)
    D = 30
    M = torch.autograd.functional.hessian(
        lambda x: 0.5 * hand_joint_inner(metric, w, T.unflatten(x, w), T.unflatten(x, w)), torch.zeros(D, dtype=DT))
    close(grp.metric_matrix(w), M, rtol=1e-10, atol=1e-12)
    xi, zeta = T.randn_like(w, gen(2)), T.randn_like(w, gen(3))
    x, z = T.flatten(xi, grp.names), T.flatten(zeta, grp.names)
    assert float(grp.inner(w, xi, zeta)) == pytest.approx(float(x @ M @ z), rel=1e-12)
    assert float(grp.norm_sq(w, xi)) == pytest.approx(float(x @ M @ x), rel=1e-12)
    assert float(grp.norm(w, xi)) == pytest.approx(math.sqrt(float(x @ M @ x)), rel=1e-12)
    # horizontal projection: M-orthogonal projection off the hand-built vertical space
    V = joint_vertical_basis(w)
    ref = x - V @ torch.linalg.solve(V.T @ M @ V, V.T @ (M @ x))
    p = grp.horizontal_projection(w, xi)
    close(T.flatten(p, grp.names), ref, rtol=1e-10, atol=1e-12)
    close(grp.horizontal_projection(w, p), p, rtol=1e-10, atol=1e-12)
    assert float((V.T @ (M @ ref)).abs().max()) < 1e-10 * float(ref.norm())
    # Riemannian gradients
    rg = torch.linalg.solve(M, z)
    close(T.flatten(grp.egrad_to_rgrad(w, zeta), grp.names), rg, rtol=1e-10, atol=1e-12)
    hr = rg - V @ torch.linalg.solve(V.T @ M @ V, V.T @ (M @ rg))
    close(T.flatten(grp.riemannian_gradient(w, zeta), grp.names), hr, rtol=1e-10, atol=1e-12)
    # whitening: covariance M^{-1}
    Wm = torch.stack([T.flatten(grp.whiten(w, T.unflatten(e, w)), grp.names) for e in torch.eye(D, dtype=DT)], 1)
    close(Wm @ Wm.T, torch.linalg.inv(M), rtol=1e-9, atol=1e-12)
    # metric invariance under the group and the pushforward of each part
    g = grp.random_element(w, generator=gen(4), max_cond=10.0)
    w2 = grp.action(w, g)
    pf = grp.pushforward(w, g, xi)
    s, A = g[0][0], g[1][0]
    for i in range(2):
        close(pf["Wqk"][:, 2 * i:2 * i + 2], s[i] * xi["Wqk"][:, 2 * i:2 * i + 2], rtol=1e-14, atol=0)
    close(pf["Wqk"][:, 4:6], xi["Wqk"][:, 4:6] @ torch.linalg.inv(A[0]), rtol=1e-12, atol=1e-13)
    close(pf["O"], xi["O"] @ A[0].T, rtol=1e-12, atol=1e-13)
    assert float(grp.inner(w2, pf, grp.pushforward(w, g, zeta))) == pytest.approx(float(x @ M @ z), rel=1e-10)
    # christoffel: the generic autodiff term
    assert rel(grp.christoffel(w, xi), SymmetryGroup.christoffel(grp, w, xi)) < 1e-10
    # tangent-valued results take the dtype of the vector (float32 vector at a float64 point)
    x32 = {n: t.float() for n, t in xi.items()}
    for out in (grp.horizontal_projection(w, x32), grp.egrad_to_rgrad(w, x32), grp.riemannian_gradient(w, x32),
                grp.whiten(w, x32)):
        assert all(t.dtype == torch.float32 for t in out.values())
    close({n: t.double() for n, t in grp.horizontal_projection(w, x32).items()}, T.unflatten(ref, w),
          rtol=1e-5, atol=1e-6)


def test_joint_pushforward_and_restrict_to_domain_pass_the_base_point_to_the_parts():
    """Parts whose pushforward / domain restriction read ``w`` (the generic jvp of the action, the
    clamp ``b >= -1/2`` of the mixed diagonal metric)."""
    j = JointGroup([LayerRescaling("W1", "W2"), LayerRescaling("V1", "V2")])
    w = {"W1": randn(3, 2, seed=1), "W2": randn(2, 3, seed=2), "V1": randn(4, seed=3), "V2": randn(2, 2, seed=4)}
    xi, zeta = T.randn_like(w, gen(5)), T.randn_like(w, gen(6))
    a = [torch.tensor(2.5, dtype=DT), torch.tensor(0.4, dtype=DT)]
    pf = j.pushforward(w, a, xi)
    close(pf, {"W1": 2.5 * xi["W1"], "W2": xi["W2"] / 2.5, "V1": 0.4 * xi["V1"], "V2": xi["V2"] / 0.4})
    w2 = j.action(w, a)
    close(w2, {"W1": 2.5 * w["W1"], "W2": w["W2"] / 2.5, "V1": 0.4 * w["V1"], "V2": w["V2"] / 0.4})
    assert float(j.inner(w2, pf, j.pushforward(w, a, zeta))) == pytest.approx(float(j.inner(w, xi, zeta)), rel=1e-12)
    # restrict_to_domain: b = (xi_u / u + xi_v / v) / 2 clamped at -1/2, xi = (u b, v b)
    d = JointGroup([DiagonalRescaling("u", "v", "mix"), DiagonalRescaling("p", "q", "mix")])
    w = {"u": torch.tensor([1.0, -2.0, 0.5], dtype=DT), "v": torch.tensor([2.0, 1.0, -1.0], dtype=DT),
         "p": torch.tensor([3.0, 1.0], dtype=DT), "q": torch.tensor([0.5, 4.0], dtype=DT)}
    b1, b2 = torch.tensor([-2.0, 0.3, -0.5], dtype=DT), torch.tensor([0.1, -7.0], dtype=DT)
    xi = {"u": w["u"] * b1, "v": w["v"] * b1, "p": w["p"] * b2, "q": w["q"] * b2}
    out = d.restrict_to_domain(w, xi)
    c1, c2 = b1.clamp_min(-0.5), b2.clamp_min(-0.5)
    close(out, {"u": w["u"] * c1, "v": w["v"] * c1, "p": w["p"] * c2, "q": w["q"] * c2})


def test_joint_relative_perturbation_is_the_largest_of_the_parts():
    grp, w = joint_problem("mix", seed=2)
    W, Wo = w["Wqk"], w["O"]

    def ref(xi):
        scale = max(float(xi["Wqk"][:, 2 * i:2 * i + 2].norm() / W[:, 2 * i:2 * i + 2].norm()) for i in range(2))
        gl = max(float(xi["Wqk"][:, 4:6].norm() / W[:, 4:6].norm()), float(xi["O"].norm() / Wo.norm()))
        return max(scale, gl)
    for big in ("scale", "gl"):
        xi = T.scale(T.randn_like(w, gen(3)), 1e-3)
        if big == "scale":
            xi["Wqk"][:, 0:2] *= 500.0
        else:
            xi["O"] *= 500.0
        r = grp.relative_perturbation(w, xi)
        assert float(r) == pytest.approx(ref(xi), rel=1e-12)
        assert float(r) > 0.05
    # parts without a natural scale: None; one part with a scale: its value
    e = JointGroup([Euclidean(["a"]), Euclidean(["b"])])
    we = {"a": randn(3), "b": randn(2)}
    assert e.relative_perturbation(we, T.randn_like(we, gen(1))) is None
    mixed = JointGroup([Euclidean(["x"]), grp.parts[0]])
    xi = {"x": randn(2, seed=4), "Wqk": randn(4, 6, seed=5)}
    wm = {"x": randn(2), "Wqk": W}
    expect = max(float(xi["Wqk"][:, 2 * i:2 * i + 2].norm() / W[:, 2 * i:2 * i + 2].norm()) for i in range(2))
    assert float(mixed.relative_perturbation(wm, xi)) == pytest.approx(expect, rel=1e-12)


def test_joint_random_element_defaults_and_options():
    grp, w = joint_problem("mix")
    # default scale 1 and the generator threaded through the parts in order
    g = grp.random_element(w, generator=gen(8))
    gg = gen(8)
    ref = [grp.parts[0].random_element(w, 1.0, gg), grp.parts[1].random_element(w, 1.0, gg)]
    close(g[0][0], ref[0][0], rtol=0, atol=0)
    close(g[1][0], ref[1][0], rtol=0, atol=0)
    torch.manual_seed(99)
    again = grp.random_element(w, generator=gen(8))
    close(again[1][0], g[1][0], rtol=0, atol=0)
    close(again[0][0], g[0][0], rtol=0, atol=0)
    # max_cond reaches the parts: GL elements of condition number exactly max_cond, scales in
    # [c^-1/2, c^1/2]
    for c in (10.0, 1e4):
        e = grp.random_element(w, generator=gen(9), max_cond=c)
        assert float(torch.linalg.cond(e[1][0][0])) == pytest.approx(c, rel=1e-9)
        assert float(e[0][0].max() / e[0][0].min()) <= c
    # scale multiplies every part
    e2 = grp.random_element(w, scale=2.0, generator=gen(9), max_cond=10.0)
    e1 = grp.random_element(w, scale=1.0, generator=gen(9), max_cond=10.0)
    close(e2[0][0], 2.0 * e1[0][0], rtol=1e-15, atol=0)
    close(e2[1][0], 2.0 * e1[1][0], rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------- joint geodesics
def cylinder_geodesic(W, x, t):
    """Part 6 §4 in log-polar coordinates: ``e^{a t} (cos(phi t) W + sin(phi t)/phi perp)``,
    ``a = <x, W>/|W|^2``, ``perp = x - a W``, ``phi = |perp|/|W|``."""
    a = (W * x).sum() / W.pow(2).sum()
    perp = x - a * W
    phi = perp.norm() / W.norm()
    return torch.exp(a * t) * (torch.cos(phi * t) * W + torch.sin(phi * t) / phi * perp)


def gl_only(xi):
    out = {n: t.clone() for n, t in xi.items()}
    out["Wqk"][:, :4] = 0.0
    return out


def test_joint_geodesics_against_closed_forms_and_hand_rk4():
    grp, w = joint_problem("mix", seed=3)
    xi = T.scale(T.randn_like(w, gen(4)), 0.1)
    gam = SymmetryGroup.christoffel(grp, w, xi)
    # order 1 and 2 (default order is 2)
    for t in (1.0, 0.4):
        close(grp.geodesic(w, xi, t, order=1), {n: w[n] + t * xi[n] for n in grp.names}, rtol=1e-15, atol=0)
        ref2 = {n: w[n] + t * xi[n] - 0.5 * t * t * gam[n] for n in grp.names}
        assert rel(grp.geodesic(w, xi, t), ref2) < 1e-12
        assert rel(grp.geodesic_2nd(w, xi, t), ref2) < 1e-12
    # t defaults to 1
    assert rel(grp.geodesic(w, xi), {n: w[n] + xi[n] - 0.5 * gam[n] for n in grp.names}) < 1e-12
    close(grp.geodesic(w, xi, order=1), {n: w[n] + xi[n] for n in grp.names}, rtol=1e-15, atol=0)
    # exact: the cylinder geodesic on each scaled head, the GL part's RK4 (step doubling) on the rest
    gl_ref = grp.parts[1].geodesic_ode(w, gl_only(xi), 0.7, n_steps=32, tol=None)
    ex = grp.geodesic_exact(w, xi, 0.7)
    for i in range(2):
        s = slice(2 * i, 2 * i + 2)
        close(ex["Wqk"][:, s], cylinder_geodesic(w["Wqk"][:, s], xi["Wqk"][:, s], 0.7), rtol=1e-12, atol=1e-13)
    close(ex["Wqk"][:, 4:], gl_ref["Wqk"][:, 4:], rtol=1e-9, atol=1e-11)
    close(ex["O"], gl_ref["O"], rtol=1e-9, atol=1e-11)
    close(grp.geodesic(w, xi, 0.7, order="exact"), ex, rtol=1e-12, atol=1e-14)
    # RK4 options reach the parts: one step, no step doubling, equals one hand RK4 step on the
    # GL slices (the scale part's exact geodesic stays the closed form) and differs from the limit
    xi = T.scale(xi, 3.0)
    gam = lambda p, v: SymmetryGroup.christoffel(grp, p, v)  # noqa: E731
    one = grp.geodesic_exact(w, xi, 0.7, n_steps=1, tol=None)
    step = rk4_step(gam, w, gl_only(xi), 0.7)
    close(one["Wqk"][:, 4:], step["Wqk"][:, 4:], rtol=1e-10, atol=1e-12)
    close(one["O"], step["O"], rtol=1e-10, atol=1e-12)
    for i in range(2):
        s = slice(2 * i, 2 * i + 2)
        close(one["Wqk"][:, s], cylinder_geodesic(w["Wqk"][:, s], xi["Wqk"][:, s], 0.7), rtol=1e-12, atol=1e-13)
    ode16 = grp.geodesic_ode(w, xi, 0.7, n_steps=16, tol=None)
    assert float((one["O"] - ode16["O"]).abs().max()) > 1e-6
    # geodesic_ode: RK4 on every slice (one hand step with the full xi)
    ode1 = grp.geodesic_ode(w, xi, 0.7, n_steps=1, tol=None)
    assert rel(ode1, rk4_step(gam, w, xi, 0.7)) < 1e-10
    close(grp.geodesic(w, xi, 0.7, order="ode", n_steps=1, tol=None), ode1, rtol=1e-12, atol=1e-14)
    assert rel(ode1, ode16) > 1e-3
    # a geodesic leaves w's other entries alone and returns only the group's names
    extra = {**w, "other": randn(3)}
    assert set(grp.geodesic(extra, xi, 0.5, order="exact")) == {"Wqk", "O"}


class WholeRescaling(PositiveRescaling):
    """Positive rescaling of whole tensors with the ``extract``/``insert`` a joint part provides
    (its geodesic_ode is the base class's RK4: cheap steps)."""

    def extract(self, w):
        return [w[n] for n in self.names]

    def insert(self, base, blocks):
        out = {n: base[n] for n in self.names}
        out.update(zip(self.names, blocks))
        return out


def test_joint_geodesic_ode_honours_its_options_and_defaults():
    """RK4 with step doubling reaches the closed form ``w exp(t xi / w)`` (spec part 1 §4.5); the
    documented defaults are ``t = 1``, 64 initial steps and tolerance 1e-10."""
    j = JointGroup([WholeRescaling(["a"]), WholeRescaling(["b"])])
    w = {"a": randn(3) + 3, "b": randn(2, seed=1) - 3}
    j.validate(w)
    xi = T.scale(T.randn_like(w, gen(2)), 2.0)  # large enough that 64 vs 128 steps differ by > 1e-10
    ref = {n: w[n] * torch.exp(xi[n] / w[n]) for n in w}
    dflt = j.geodesic_ode(w, xi)
    assert rel(dflt, ref) < 1e-11
    close(j.geodesic_ode(w, xi, 1.0, 64, 1e-10), dflt, rtol=0, atol=0)
    assert rel(j.geodesic_ode(w, xi, 1.0, 64, None), ref) > 1e-10
    half = {n: w[n] * torch.exp(0.5 * xi[n] / w[n]) for n in w}
    assert rel(j.geodesic_ode(w, xi, 0.5, n_steps=2, tol=1e-9), half) < 1e-9
    assert rel(j.geodesic_ode(w, xi, 0.5, n_steps=2, tol=None), half) > 1e-6


def test_joint_geodesic_vjp_against_finite_differences():
    grp, w = joint_problem("inv", seed=5)
    xi = T.scale(T.randn_like(w, gen(6)), 0.3)
    cot, d = T.randn_like(w, gen(7)), T.randn_like(w, gen(8))

    def second(x):  # w + x - 1/2 Gamma(x, x): quadratic in x, central differences are exact
        gm = SymmetryGroup.christoffel(grp, w, x)
        return {n: w[n] + x[n] - 0.5 * gm[n] for n in grp.names}

    def fd(fn, eps):
        return float(T.dot(cot, T.sub(fn(T.add(xi, d, eps)), fn(T.add(xi, d, -eps))))) / (2 * eps)
    v2 = grp.geodesic_vjp(w, xi, cot)  # default order: 2
    assert float(T.dot(v2, d)) == pytest.approx(fd(second, 1e-3), rel=1e-9)
    close(grp.geodesic_vjp(w, xi, cot, order=1), cot, rtol=0, atol=0)
    # order "ode" with one RK4 step: the options reach the parts
    gam = lambda p, v: SymmetryGroup.christoffel(grp, p, v)  # noqa: E731
    one = grp.geodesic_vjp(w, xi, cot, order="ode", n_steps=1, tol=None)
    ref1 = fd(lambda x: rk4_step(gam, w, x, 1.0), 1e-5)
    assert float(T.dot(one, d)) == pytest.approx(ref1, rel=1e-7)
    conv = grp.geodesic_vjp(w, xi, cot, order="ode", n_steps=16, tol=None)
    assert abs(float(T.dot(conv, d)) - ref1) > 1e-5 * abs(ref1)


def test_joint_hooks_kernel_masked_with_metric_extract_insert():
    grp, w = joint_problem("mix", seed=6)
    assert grp.kernel_dimension(w) == 2 + 4
    assert grp.masked_count(w) == 0
    inv = grp.with_metric("inv", eps_rel=0.5)
    assert isinstance(inv, JointGroup) and inv.metric == "inv" and inv.parts[1].eps_rel == 0.5
    assert inv.parts[0] is grp.parts[0]
    blocks = grp.extract(w)
    assert len(blocks) == 2
    close(blocks[0][0], torch.stack([w["Wqk"][:, 0:2], w["Wqk"][:, 2:4]]), rtol=0, atol=0)
    back = grp.insert({n: torch.zeros_like(t) for n, t in w.items()}, blocks)
    close(back, w, rtol=0, atol=0)
    grp.check_domain(w)
    dead = {**w, "Wqk": w["Wqk"].clone()}
    dead["Wqk"][:, 0:2] = 0.0
    with pytest.raises(ValueError, match="head slice 0 of stack 0 is zero"):
        grp.check_domain(dead)
    assert grp.kernel_dimension(dead) == 1 + 4

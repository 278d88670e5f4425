"""Survivors of the mutation run on ``quotientsharp/groups/gl_math.py``'s lazy block algebra:
``Blocks`` (``write``, ``_merged``, ``@``, ``*``), ``GramCache`` (``get``, ``put``, ``pin``,
``derive``), ``Views``, ``views_gram``, ``_promote``.

Ground truth: a stack of three heads (``h = 2``) held by strided views of four tensors (two heads
in the columns of a weight and its bias, one head in the rows of a transposed weight and its bias),
cut out again by explicit indexing (:func:`dense`) into a ``(3, 5, 2)`` float64 stack; every
combination ``sum_k a_k X_k C_k`` is compared with the same sum of per-head products done by
``einsum`` on those dense stacks, every Gram matrix with ``einsum`` ``X^T Y`` per head. Caching is
checked against the documented contract of :class:`GramCache` (either order, ``pin`` until the next
pin of the stack, the oldest entry evicted beyond ``size``, dead sources never hit, a derived Gram
matrix computed once).
"""
from __future__ import annotations

import gc

import pytest
import torch
from tensor_checks import assert_close_tree, randn

from quotientsharp.groups import gl_math as M

DT = torch.float64
B, H, ROWS = 3, 2, 5
LAYOUT = ("A", "a", "C", "c")
SHAPES = {"A": (4, 4), "a": (4,), "C": (2, 4), "c": (2,)}


def tensors(seed: int = 0, dtype: torch.dtype = DT, zero: bool = False) -> dict:
    """The four tensors of one factor (``A`` columns of heads 0-1, ``C`` rows of head 2)."""
    return {n: (torch.zeros(s, dtype=dtype) if zero else randn(*s, seed=seed + i, dtype=DT).to(dtype))
            for i, (n, s) in enumerate(SHAPES.items())}


def nans(dtype: torch.dtype = DT) -> dict:
    return {n: torch.full(s, float("nan"), dtype=dtype) for n, s in SHAPES.items()}


def views(d: dict, cache: M.GramCache | None = None, layout=LAYOUT) -> M.Views:
    """Views ``(heads, rows, h)`` into ``d`` without a copy (the layout the code under test sees)."""
    parts = [(0, 2, d["A"].view(4, 2, H).permute(1, 0, 2)),
             (0, 2, d["a"].view(1, 2, H).permute(1, 0, 2)),
             (2, 3, d["C"].t().unsqueeze(0)),
             (2, 3, d["c"].view(1, 1, H))]
    return M.Views(parts, B, H, layout, sources=tuple(d.values()) if cache is not None else (), cache=cache)


def dense(d: dict) -> torch.Tensor:
    """The ``(3, 5, 2)`` float64 stack, head by head by indexing the raw tensors."""
    d = {n: t.double() for n, t in d.items()}
    heads = [torch.cat([d["A"][:, 2 * j:2 * j + 2], d["a"][None, 2 * j:2 * j + 2]]) for j in range(2)]
    heads.append(torch.cat([d["C"].T, d["c"][None]]))
    return torch.stack(heads)


def combo(terms) -> torch.Tensor:
    """``sum_k a_k X_k C_k`` per head from ``[(dense X, C or None, a)]``."""
    return sum(a * (X if C is None else torch.einsum("bnh,bhk->bnk", X, C.double())) for X, C, a in terms)


def gram(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bnh,bnk->bhk", X.double(), Y.double())


def coef(seed: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return randn(B, H, H, seed=seed, dtype=DT).to(dtype)


def write(blocks: M.Blocks, dtype: torch.dtype = DT) -> torch.Tensor:
    """Write into NaN-filled tensors and return the dense stack of what was written."""
    out = nans(dtype)
    blocks.write(views(out))
    return dense(out)


def close(a, b, rtol=1e-13, atol=1e-13):
    assert_close_tree(a, b, rtol, atol)


@pytest.fixture
def xyz():
    return tensors(0), tensors(10), tensors(20)


# ============================================================================ Blocks.write
def test_write_identity_terms_of_one_factor_add_their_scalars(xyz):
    x, _, _ = xyz
    X, Xd = M.Blocks.of(views(x)), dense(x)
    for blocks, a in [(X, 1.0), (2 * X, 2.0), (X * -0.5, -0.5), (X + X, 2.0), (X + 2 * X - 0.5 * X, 2.5),
                      (-X - X, -2.0)]:
        close(write(blocks), a * Xd)
    close((X + X).mT @ (X + 2 * X), 6 * gram(Xd, Xd))


def test_write_identity_terms_of_distinct_factors(xyz):
    x, y, z = xyz
    X, Y, Z = (M.Blocks.of(views(t)) for t in xyz)
    Xd, Yd, Zd = (dense(t) for t in xyz)
    close(write(X + 0.5 * Y), Xd + 0.5 * Yd)
    close(write(2 * X - Y + 3 * Z), 2 * Xd - Yd + 3 * Zd)
    close(write(X + Y), Xd + Yd)


def test_write_coefficient_terms_merge_per_factor(xyz):
    X, Y, _ = (M.Blocks.of(views(t)) for t in xyz)
    Xd, Yd, _ = (dense(t) for t in xyz)
    C1, C2, C3 = coef(1), coef(2), coef(3)
    close(write(X @ C1), combo([(Xd, C1, 1)]))
    close(write((X @ C1) @ C2), combo([(Xd, C1 @ C2, 1)]))
    close(write(X @ C1 + X @ C2 + 0.5 * (Y @ C3)), combo([(Xd, C1 + C2, 1), (Yd, C3, 0.5)]))
    # identity base (baddbmm beta), a coefficient factor and an identity term folded into it
    close(write(2 * X + Y @ C1 - 0.5 * Y), combo([(Xd, None, 2), (Yd, C1, 1), (Yd, None, -0.5)]))
    # an identity term of a third factor after the coefficient terms
    close(write(Y @ C1 + X - 3 * (X @ C2)), combo([(Yd, C1, 1), (Xd, None, 1), (Xd, C2, -3)]))
    lhs, rhs = X @ C1 + X @ C2, Y + Y @ C3
    close(lhs.mT @ rhs, (C1 + C2).mT @ gram(Xd, Yd) @ (torch.eye(H, dtype=DT) + C3))


def test_write_folds_identity_term_into_coefficient_before_rounding():
    """``Z + Y C + Y`` with ``C = -I + 1e-4 R`` in float32: ``Y (C + I)`` is formed in float64
    first (documented fold), so the result is accurate relative to its 1e-4 size; adding ``Y``
    after ``Y C`` would cancel to float32 round-off of ``|Y|``."""
    z, y = tensors(0, torch.float32, zero=True), tensors(10, torch.float32)
    Z, Y = M.Blocks.of(views(z)), M.Blocks.of(views(y))
    R = coef(5)
    C = -torch.eye(H, dtype=DT) + 1e-4 * R
    got = write(Z + Y @ C + Y, torch.float32)
    close(got, combo([(dense(y), 1e-4 * R, 1)]), rtol=1e-5, atol=1e-9)


def test_coefficients_of_mixed_dtypes_promote_to_float64(xyz):
    X, Xd = M.Blocks.of(views(xyz[0])), dense(xyz[0])
    C64, C32 = coef(1), coef(2, torch.float32)
    for first, second in [(C32, C64), (C64, C32)]:
        b = (X @ first) @ second
        assert b.terms[0][1].dtype == torch.float64
        close(write(b), combo([(Xd, first.double() @ second.double(), 1)]))


def test_zero_dim_tensor_scalar_multiplies_and_vector_is_rejected(xyz):
    X, Xd = M.Blocks.of(views(xyz[0])), dense(xyz[0])
    close(write(X * torch.tensor(2.0, dtype=DT)), 2 * Xd)
    close(write(X * torch.tensor(-0.25)), -0.25 * Xd)
    with pytest.raises(TypeError):
        X * torch.tensor([2.0])


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_write_half_precision_goes_through_a_float32_buffer(default):
    """bf16 weights: computed in float32 (``compute_dtype``) and copied into the bf16 output, also
    when the default dtype is float64."""
    bf = torch.bfloat16
    x, y = tensors(0, bf), tensors(10, bf)
    X, Y = M.Blocks.of(views(x)), M.Blocks.of(views(y))
    Xd, Yd = dense(x), dense(y)
    C = coef(1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        cases = [(X, [(Xd, None, 1)]), (2 * X, [(Xd, None, 2)]), (X @ C, [(Xd, C, 1)]),
                 (2 * X + Y @ C, [(Xd, None, 2), (Yd, C, 1)]), (X + 0.5 * Y, [(Xd, None, 1), (Yd, None, 0.5)])]
        for blocks, ref in cases:
            got = write(blocks, bf)
            close(got, combo(ref), rtol=2e-2, atol=2e-2)
    finally:
        torch.set_default_dtype(old)


def test_write_float_outputs_allocate_no_buffer(xyz, monkeypatch):
    """float32 / float64 outputs are written in place ("straight into views of the output")."""
    calls = []
    real = torch.empty

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)
    X, Y = M.Blocks.of(views(xyz[0])), M.Blocks.of(views(xyz[1]))
    Xd = dense(xyz[0])
    out = nans()
    o = views(out)
    monkeypatch.setattr(torch, "empty", counting)
    (2 * X + Y @ coef(1)).write(o)
    (X @ coef(2)).write(o)
    monkeypatch.undo()
    assert calls == []
    close(dense(out), combo([(Xd, coef(2), 1)]))


def test_write_float32_factors_into_float64_output_is_float64_exact():
    """The compute dtype is the output's: float32 factors enter exactly (scalar 1/3 not rounded
    to float32 with them)."""
    x, y = tensors(0, torch.float32), tensors(10, torch.float32)
    X, Y = M.Blocks.of(views(x)), M.Blocks.of(views(y))
    Xd, Yd = dense(x), dense(y)
    C = coef(3)
    close(write((1 / 3) * X), Xd / 3, rtol=1e-15, atol=1e-16)
    close(write(X * (1 / 3) + Y * 0.1), Xd / 3 + 0.1 * Yd, rtol=1e-15, atol=1e-16)
    close(write(X * 0.1 + Y @ C), 0.1 * Xd + combo([(Yd, C, 1)]), rtol=1e-14, atol=1e-15)


def test_write_float64_factors_into_float32_output_rounds_factors_first():
    """A float32 output is evaluated in float32: each factor is rounded to float32 before its
    scalar is applied (as the tall products round factor and coefficient), ``3 fl32(Y)``."""
    z, y = tensors(0, zero=True), tensors(10)
    Z, Y = M.Blocks.of(views(z)), M.Blocks.of(views(y))
    expect = 3 * dense({n: t.float() for n, t in y.items()}).float()
    assert not torch.equal(expect, (3 * dense(y)).float())  # the two roundings differ somewhere
    got = write(Z + 3 * Y, torch.float32).float()
    assert torch.equal(got, expect)


# ============================================================================ views_gram / Views
def test_views_gram_matches_dense_and_is_cached_per_pair(xyz):
    c = M.GramCache()
    X, Y = views(xyz[0], c), views(xyz[1], c)
    close(M.views_gram(X, Y), gram(dense(xyz[0]), dense(xyz[1])))
    assert c.get(Y, X) is not None
    close(c.get(Y, X), gram(dense(xyz[1]), dense(xyz[0])))


def test_explicit_dtype_is_computed_not_taken_from_cache():
    x = tensors(0, torch.float32)
    c = M.GramCache()
    X = views(x, c)
    exact = gram(dense(x), dense(x))
    lo = M.views_gram(X, X)  # float32 accumulation, cached
    assert (lo - exact).abs().max() > 1e-10
    close(M.views_gram(X, X, torch.float64), exact, rtol=1e-14, atol=1e-14)


def test_views_without_a_shared_cache_are_never_cached(xyz):
    x, y, z = xyz
    c = M.GramCache()
    X = views(x, c)
    close(M.views_gram(X, views(y)), gram(dense(x), dense(y)))
    close(M.views_gram(X, views(z)), gram(dense(x), dense(z)))  # same key (layout, ()) as y's
    close(M.views_gram(X, views(z, M.GramCache())), gram(dense(x), dense(z)))
    # sourceless views given a cache: no caching (their key names no tensor)
    parts = lambda t: views(t).parts  # noqa: E731
    Y1, Y2 = (M.Views(parts(t), B, H, LAYOUT, sources=(), cache=c) for t in (y, z))
    assert Y1.cache is None
    close(M.views_gram(Y1, Y1), gram(dense(y), dense(y)))
    close(M.views_gram(Y2, Y2), gram(dense(z), dense(z)))


def test_entry_of_dead_sources_never_hits():
    t = randn(4, 4)
    X = M.Views([(0, B, randn(B, ROWS, H, seed=1))], B, H, "L", sources=(t,), cache=M.GramCache())
    g = randn(B, H, H, seed=2)
    X.cache.put(X, X, g)
    assert X.cache.get(X, X) is g
    del t
    gc.collect()
    assert X.cache.get(X, X) is None


# ============================================================================ GramCache
def test_put_evicts_the_oldest_beyond_default_size_8(xyz):
    c = M.GramCache()
    X = views(xyz[0], c)
    ys = [tensors(100 + 10 * i) for i in range(9)]
    Ys = [views(y, c) for y in ys]
    for Y in Ys:
        M.views_gram(X, Y)
    assert c.get(X, Ys[0]) is None
    for y, Y in zip(ys[1:], Ys[1:]):
        close(c.get(X, Y), gram(dense(xyz[0]), dense(y)))


def test_pin_keeps_one_entry_per_stack_until_the_next_pin(xyz):
    c = M.GramCache(size=1)
    x1, x2, z = xyz
    X1, X2, Z = views(x1, c), views(x2, c), views(z, c, layout=("other",))
    g1, g2, gz = (gram(dense(t), dense(t)) for t in xyz)
    c.pin(X1, g1)
    c.pin(Z, gz)
    assert c.get(X1, X1) is g1
    c.pin(X2, g2)
    assert c.get(X1, X1) is None
    assert c.get(X2, X2) is g2 and c.get(Z, Z) is gz
    M.views_gram(X1, X2)  # the LRU entries do not push pinned ones out
    M.views_gram(X2, X1)
    assert c.get(X2, X2) is g2 and c.get(Z, Z) is gz


def _derived_setup(c, seed=0):
    """Base ``X`` (pinned ``X^T X``), input ``V`` (``X^T V`` cached) and an output written from
    ``2 X C + 0.5 V``; returns ``(X, W, combination, dense X^T W)``."""
    x, v = tensors(seed), tensors(seed + 50)
    X, V = views(x, c), views(v, c)
    c.pin(X, M.views_gram(X, X, torch.float64))
    M.views_gram(X, V)
    comb = 2 * (M.Blocks.of(X) @ coef(seed + 7)) + 0.5 * M.Blocks.of(V)
    out = tensors(0, zero=True)
    W = views(out, c)
    comb.write(W)
    W = views(out, c)  # the written tensors' new version
    return X, W, comb, (x, v, out), gram(dense(x), dense(out))


def test_derived_gram_is_computed_once_and_found_in_either_order(monkeypatch):
    c = M.GramCache()
    X, W, comb, keep, expect = _derived_setup(c)
    c.derive(X, W, comb)
    calls = []
    real = M._matmul
    monkeypatch.setattr(M, "_matmul", lambda a, b: calls.append(1) or real(a, b))
    first = c.get(X, W)
    close(first, expect, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1
    assert c.get(X, W) is first
    close(c.get(W, X), expect.mT, rtol=1e-12, atol=1e-12)
    close(M.views_gram(W, X), expect.mT, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1


def test_derive_keeps_the_last_size_over_2_recipes():
    c = M.GramCache(size=8)
    setups = []
    for seed in range(0, 500, 100):  # 5 outputs, each derived while its base is pinned
        setups.append(_derived_setup(c, seed))
        c.derive(*setups[-1][:3])
    X0, W0 = setups[0][:2]
    assert c.get(X0, W0) is None
    for X, W, _, _, expect in setups[1:]:
        close(c.get(X, W), expect, rtol=1e-12, atol=1e-12)

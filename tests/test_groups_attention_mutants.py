"""Behavioural tests of ``AttentionGL`` and its matrix formulas (``groups/gl_math.py``) that close
the gaps a mutation run found (issue 18).

Ground truths, all independent of the code under test and in float64:

* attention written by hand from the raw tensors of five layouts (separate ``nn.Linear``
  projections over two layers, packed ``nn.MultiheadAttention`` checked against
  ``F.multi_head_attention_forward``, GPT-2 ``Conv1D``, grouped-query attention with strided query
  heads, a GPT-NeoX-style interleaved fused QKV), so the action must leave outputs unchanged;
* per-head factors ``G, H`` cut out of the tensors by explicit indexing (``hand``), the formulas
  of spec part 1 §4.1 / §6.2-6.3 written out per head, the dense metric matrix from those formulas
  and the dense least-squares projection ``I - V (V^T M V)^{-1} V^T M`` onto the M-orthogonal
  complement of the hand-built vertical vectors;
* the autodiff default ``SymmetryGroup.christoffel`` and an RK4 integration written here;
* the errors bad layouts must raise.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import assert_close_tree, gen, randn

from quotientsharp import SymmetryGroup
from quotientsharp import tangent as T
from quotientsharp.groups import gl_math as glm
from quotientsharp.groups.attention import AttentionGL, GLBlock, Piece
from quotientsharp.groups.gl_math import SINGULAR_RTOL, SingularHeadError, gl_factors, gl_factors_from_grams
from quotientsharp.groups.residual import SubAlgebra

DT = torch.float64
METRICS = ("inv", "mix")


def close(a, b, rtol=1e-10, atol=1e-12):
    assert_close_tree(a, b, rtol, atol)


def softmax_attn(q, k, v):
    """``softmax(q k^T / sqrt(h)) v`` for ``(T, h)`` tensors."""
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v


# ============================================================================ layouts
def case_linear(seed=0):
    """Two layers of separate ``nn.Linear`` q/k/v/o (weights ``(out, in)``), biases on q, k, v:
    the two QK blocks stack together, as do the two VO blocks."""
    d, nh, h = 4, 2, 2
    w, blocks = {}, []
    for layer in range(2):
        p = f"l{layer}."
        for j, n in enumerate("qkvo"):
            w[p + n] = randn(d, d, seed=seed + 10 * layer + j)
        for j, n in enumerate("qkv"):
            w[p + n + "b"] = randn(d, seed=seed + 10 * layer + 5 + j)
        blocks += [GLBlock(G=(Piece(p + "q", "rows"), Piece(p + "qb", "bias")),
                           H=(Piece(p + "k", "rows"), Piece(p + "kb", "bias")), n_heads=nh, head_dim=h,
                           label=f"l{layer}/qk"),
                   GLBlock(G=(Piece(p + "v", "rows"), Piece(p + "vb", "bias")), H=(Piece(p + "o", "cols"),),
                           n_heads=nh, head_dim=h, label=f"l{layer}/vo")]

    def hand(w):
        out = {}
        for layer in range(2):
            p = f"l{layer}."
            for i in range(nh):
                r = slice(i * h, (i + 1) * h)
                out[f"l{layer}/qk/head {i}"] = (torch.cat([w[p + "q"][r].T, w[p + "qb"][r][None]]),
                                                torch.cat([w[p + "k"][r].T, w[p + "kb"][r][None]]))
                out[f"l{layer}/vo/head {i}"] = (torch.cat([w[p + "v"][r].T, w[p + "vb"][r][None]]),
                                                w[p + "o"][:, r])
        return out

    def attn(w, x):
        for layer in range(2):
            p = f"l{layer}."
            q = (x @ w[p + "q"].T + w[p + "qb"]).reshape(-1, nh, h)
            k = (x @ w[p + "k"].T + w[p + "kb"]).reshape(-1, nh, h)
            v = (x @ w[p + "v"].T + w[p + "vb"]).reshape(-1, nh, h)
            o = torch.cat([softmax_attn(q[:, i], k[:, i], v[:, i]) for i in range(nh)], 1)
            x = x + o @ w[p + "o"].T
        return x

    return SimpleNamespace(name="linear", w=w, blocks=blocks, hand=hand, attn=attn, x=randn(5, d, seed=99),
                           bias_names=[n for n in w if n.endswith("b")])


def case_mha(seed=0):
    """Packed ``nn.MultiheadAttention`` (rows q | k | v of ``in_proj_weight``, packed bias)."""
    d, nh, h = 6, 3, 2
    w = {"in_w": randn(3 * d, d, seed=seed), "in_b": randn(3 * d, seed=seed + 1), "out_w": randn(d, d, seed=seed + 2)}
    bo = randn(d, seed=seed + 3)
    blocks = [GLBlock(G=(Piece("in_w", "rows", 0), Piece("in_b", "bias", 0)),
                      H=(Piece("in_w", "rows", d), Piece("in_b", "bias", d)), n_heads=nh, head_dim=h, label="mha/qk"),
              GLBlock(G=(Piece("in_w", "rows", 2 * d), Piece("in_b", "bias", 2 * d)),
                      H=(Piece("out_w", "cols"),), n_heads=nh, head_dim=h, label="mha/vo")]

    def hand(w):
        out = {}
        for i in range(nh):
            def gb(off):
                r = slice(off + i * h, off + (i + 1) * h)
                return torch.cat([w["in_w"][r].T, w["in_b"][r][None]])
            out[f"mha/qk/head {i}"] = (gb(0), gb(d))
            out[f"mha/vo/head {i}"] = (gb(2 * d), w["out_w"][:, i * h:(i + 1) * h])
        return out

    def attn(w, x):
        y, _ = F.multi_head_attention_forward(
            x[:, None], x[:, None], x[:, None], d, nh, w["in_w"], w["in_b"], None, None, False, 0.0,
            w["out_w"], bo, training=False, need_weights=False)
        return y[:, 0]

    return SimpleNamespace(name="mha", w=w, blocks=blocks, hand=hand, attn=attn, x=randn(4, d, seed=98),
                           bias_names=["in_b"])


def case_conv1d(seed=0):
    """GPT-2 ``Conv1D``: ``c_attn.weight`` ``(d, 3d)`` with columns q | k | v, ``c_proj.weight``
    ``(d, d)`` whose rows ``r_i`` are ``H_O^T``."""
    d, nh, h = 4, 2, 2
    w = {"attn_w": randn(d, 3 * d, seed=seed + 20), "attn_b": randn(3 * d, seed=seed + 21),
         "proj_w": randn(d, d, seed=seed + 22)}
    blocks = [GLBlock(G=(Piece("attn_w", "cols", 0), Piece("attn_b", "bias", 0)),
                      H=(Piece("attn_w", "cols", d), Piece("attn_b", "bias", d)), n_heads=nh, head_dim=h,
                      label="c/qk"),
              GLBlock(G=(Piece("attn_w", "cols", 2 * d), Piece("attn_b", "bias", 2 * d)),
                      H=(Piece("proj_w", "rows"),), n_heads=nh, head_dim=h, label="c/vo")]

    def hand(w):
        out = {}
        for i in range(nh):
            def gb(off):
                r = slice(off + i * h, off + (i + 1) * h)
                return torch.cat([w["attn_w"][:, r], w["attn_b"][r][None]])
            out[f"c/qk/head {i}"] = (gb(0), gb(d))
            out[f"c/vo/head {i}"] = (gb(2 * d), w["proj_w"][i * h:(i + 1) * h].T)
        return out

    def attn(w, x):
        qkv = x @ w["attn_w"] + w["attn_b"]
        q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(-1, nh, h) for j in range(3))
        o = torch.cat([softmax_attn(q[:, i], k[:, i], v[:, i]) for i in range(nh)], 1)
        return o @ w["proj_w"]

    return SimpleNamespace(name="conv1d", w=w, blocks=blocks, hand=hand, attn=attn, x=randn(5, d, seed=97),
                           bias_names=["attn_b"])


def case_gqa(seed=0):
    """Grouped-query attention, ``r = 2`` query heads per KV head (HF order: query heads
    ``g r .. g r + r - 1`` use KV head ``g``): QK ``G`` stacks the r query heads (pieces at
    offsets ``j h``, stride ``r h``), VO ``H`` stacks the r output slices."""
    d, nkv, r, h = 6, 2, 2, 2
    nq = nkv * r
    w = {"q": randn(nq * h, d, seed=seed + 30), "qb": randn(nq * h, seed=seed + 31),
         "k": randn(nkv * h, d, seed=seed + 32), "kb": randn(nkv * h, seed=seed + 33),
         "v": randn(nkv * h, d, seed=seed + 34), "vb": randn(nkv * h, seed=seed + 35),
         "o": randn(d, nq * h, seed=seed + 36)}
    blocks = [GLBlock(G=tuple(Piece("q", "rows", j * h, r * h) for j in range(r))
                      + tuple(Piece("qb", "bias", j * h, r * h) for j in range(r)),
                      H=(Piece("k", "rows"), Piece("kb", "bias")), n_heads=nkv, head_dim=h, label="g/qk"),
              GLBlock(G=(Piece("v", "rows"), Piece("vb", "bias")),
                      H=tuple(Piece("o", "cols", j * h, r * h) for j in range(r)), n_heads=nkv, head_dim=h,
                      label="g/vo")]

    def hand(w):
        out = {}
        for g in range(nkv):
            rg = slice(g * h, (g + 1) * h)
            qs = [slice((g * r + j) * h, (g * r + j + 1) * h) for j in range(r)]
            out[f"g/qk/head {g}"] = (torch.cat([w["q"][s].T for s in qs] + [w["qb"][s][None] for s in qs]),
                                     torch.cat([w["k"][rg].T, w["kb"][rg][None]]))
            out[f"g/vo/head {g}"] = (torch.cat([w["v"][rg].T, w["vb"][rg][None]]),
                                     torch.cat([w["o"][:, s] for s in qs]))
        return out

    def attn(w, x):
        q = (x @ w["q"].T + w["qb"]).reshape(-1, nq, h)
        k = (x @ w["k"].T + w["kb"]).reshape(-1, nkv, h)
        v = (x @ w["v"].T + w["vb"]).reshape(-1, nkv, h)
        o = torch.cat([softmax_attn(q[:, i], k[:, i // r], v[:, i // r]) for i in range(nq)], 1)
        return o @ w["o"].T

    return SimpleNamespace(name="gqa", w=w, blocks=blocks, hand=hand, attn=attn, x=randn(5, d, seed=96),
                           bias_names=["qb", "kb", "vb"])


def case_neox(seed=0):
    """GPT-NeoX-style fused QKV, rows ordered ``(heads, 3, h)`` (q, k, v of a head interleaved:
    pieces at a stride ``3h``), and an input-major fused ``(d, heads * 3 * h)`` second layer
    (strided columns)."""
    d, nh, h = 4, 2, 2
    w = {"qkv": randn(nh * 3 * h, d, seed=seed + 40), "qkv_b": randn(nh * 3 * h, seed=seed + 41),
         "o": randn(d, nh * h, seed=seed + 42),
         "c": randn(d, nh * 3 * h, seed=seed + 43), "c_b": randn(nh * 3 * h, seed=seed + 44),
         "c_o": randn(nh * h, d, seed=seed + 45)}
    s = 3 * h
    blocks = [GLBlock(G=(Piece("qkv", "rows", 0, s), Piece("qkv_b", "bias", 0, s)),
                      H=(Piece("qkv", "rows", h, s), Piece("qkv_b", "bias", h, s)), n_heads=nh, head_dim=h,
                      label="n0/qk"),
              GLBlock(G=(Piece("qkv", "rows", 2 * h, s), Piece("qkv_b", "bias", 2 * h, s)),
                      H=(Piece("o", "cols"),), n_heads=nh, head_dim=h, label="n0/vo"),
              GLBlock(G=(Piece("c", "cols", 0, s), Piece("c_b", "bias", 0, s)),
                      H=(Piece("c", "cols", h, s), Piece("c_b", "bias", h, s)), n_heads=nh, head_dim=h,
                      label="n1/qk"),
              GLBlock(G=(Piece("c", "cols", 2 * h, s), Piece("c_b", "bias", 2 * h, s)),
                      H=(Piece("c_o", "rows"),), n_heads=nh, head_dim=h, label="n1/vo")]

    def hand(w):
        out = {}
        for i in range(nh):
            def row(name, bias, j):
                sl = slice(i * s + j * h, i * s + (j + 1) * h)
                return torch.cat([w[name][sl].T, w[bias][sl][None]])

            def col(name, bias, j):
                sl = slice(i * s + j * h, i * s + (j + 1) * h)
                return torch.cat([w[name][:, sl], w[bias][sl][None]])
            out[f"n0/qk/head {i}"] = (row("qkv", "qkv_b", 0), row("qkv", "qkv_b", 1))
            out[f"n0/vo/head {i}"] = (row("qkv", "qkv_b", 2), w["o"][:, i * h:(i + 1) * h])
            out[f"n1/qk/head {i}"] = (col("c", "c_b", 0), col("c", "c_b", 1))
            out[f"n1/vo/head {i}"] = (col("c", "c_b", 2), w["c_o"][i * h:(i + 1) * h].T)
        return out

    def attn(w, x):
        qkv = (x @ w["qkv"].T + w["qkv_b"]).reshape(-1, nh, 3, h)
        o = torch.cat([softmax_attn(qkv[:, i, 0], qkv[:, i, 1], qkv[:, i, 2]) for i in range(nh)], 1)
        x = x + o @ w["o"].T
        qkv = (x @ w["c"] + w["c_b"]).reshape(-1, nh, 3, h)
        o = torch.cat([softmax_attn(qkv[:, i, 0], qkv[:, i, 1], qkv[:, i, 2]) for i in range(nh)], 1)
        return o @ w["c_o"]

    return SimpleNamespace(name="neox", w=w, blocks=blocks, hand=hand, attn=attn, x=randn(5, d, seed=95),
                           bias_names=["qkv_b", "c_b"])


CASES = (case_linear, case_mha, case_conv1d, case_gqa, case_neox)


# ============================================================================ hand references
def index_map(case, w):
    """``{label: (iG, iH)}``: the flat parameter index of every entry of the hand factors."""
    idx, off = {}, 0
    for n, t in w.items():
        idx[n] = torch.arange(off, off + t.numel(), dtype=DT).reshape(t.shape)
        off += t.numel()
    return {lab: (G.long(), H.long()) for lab, (G, H) in case.hand(idx).items()}, off


def embed(case, w, facs):
    """The parameter dict whose hand factors are ``facs`` (label -> (G, H)): the hand slicing
    covers every entry exactly once, so this is its inverse (differentiable in ``facs``)."""
    imap, D = index_map(case, w)
    ix = torch.cat([torch.cat([imap[lab][0].flatten(), imap[lab][1].flatten()]) for lab in facs])
    vals = torch.cat([torch.cat([facs[lab][0].flatten(), facs[lab][1].flatten()]) for lab in facs])
    return T.unflatten(torch.zeros(D, dtype=DT).index_put((ix,), vals), w)


def grams(G, H, eps_rel=0.0, eps=0.0):
    h = G.shape[-1]
    P, Q = G.T @ G, H.T @ H
    eye = torch.eye(h, dtype=DT)
    return P + (eps_rel * torch.trace(P) / h + eps) * eye, Q + (eps_rel * torch.trace(Q) / h + eps) * eye


def ref_inner(case, metric, w, xi, zeta, eps_rel=0.0, eps=0.0):
    """Spec Eqs. 9 / 10 per head, summed."""
    hw, hx, hz = case.hand(w), case.hand(xi), case.hand(zeta)
    total = 0.0
    for lab, (G, H) in hw.items():
        P, Q = grams(G, H, eps_rel, eps)
        (xG, xH), (zG, zH) = hx[lab], hz[lab]
        if metric == "inv":
            total = total + torch.trace(torch.linalg.solve(P, xG.T @ zG)) + torch.trace(torch.linalg.solve(Q, xH.T @ zH))
        else:
            total = total + torch.trace(Q @ xG.T @ zG) + torch.trace(P @ xH.T @ zH)
    return total


def dense_metric(case, metric, w, eps_rel=0.0, eps=0.0):
    """``M`` with ``g(x, z) = x^T M z``: per head ``kron(I_n, a) (+) kron(I_m, b)`` (row-major
    factors), inv ``(a, b) = (P^{-1}, Q^{-1})``, mix ``(Q, P)``, placed by the hand index map."""
    imap, D = index_map(case, w)
    M = torch.zeros(D, D, dtype=DT)
    for lab, (G, H) in case.hand(w).items():
        P, Q = grams(G, H, eps_rel, eps)
        a, b = (torch.linalg.inv(P), torch.linalg.inv(Q)) if metric == "inv" else (Q, P)
        iG, iH = (i.flatten() for i in imap[lab])
        M[iG[:, None], iG[None, :]] += torch.kron(torch.eye(G.shape[0], dtype=DT), a.contiguous())
        M[iH[:, None], iH[None, :]] += torch.kron(torch.eye(H.shape[0], dtype=DT), b.contiguous())
    return M


def vertical_basis(case, w):
    """Columns: the hand vertical vectors ``nu(E_ij) = (-G E_ij, H E_ij^T)`` of every head."""
    hw = case.hand(w)
    cols = []
    for lab, (G, H) in hw.items():
        h = G.shape[-1]
        for a in range(h):
            for b in range(h):
                E = torch.zeros(h, h, dtype=DT)
                E[a, b] = 1.0
                facs = {m: (torch.zeros_like(X), torch.zeros_like(Y)) for m, (X, Y) in hw.items()}
                facs[lab] = (-G @ E, H @ E.T)
                cols.append(T.flatten(embed(case, w, facs), list(w)))
    return torch.stack(cols, 1)


def ref_projection_matrix(M, V):
    return torch.eye(M.shape[0], dtype=DT) - V @ torch.linalg.solve(V.T @ M @ V, V.T @ M)


def ref_christoffel(case, metric, w, xi, eps_rel=0.0, eps=0.0):
    """Spec §6.2 (inv) / §6.3 (mix) per head."""
    hw, hx = case.hand(w), case.hand(xi)
    out = {}
    for lab, (G, H) in hw.items():
        P, Q = grams(G, H, eps_rel, eps)
        Pi, Qi = torch.linalg.inv(P), torch.linalg.inv(Q)
        xG, xH = hx[lab]
        if metric == "inv":
            out[lab] = (-xG @ Pi @ (xG.T @ G + G.T @ xG) + G @ Pi @ xG.T @ xG,
                        -xH @ Qi @ (xH.T @ H + H.T @ xH) + H @ Qi @ xH.T @ xH)
        else:
            out[lab] = (xG @ (xH.T @ H + H.T @ xH) @ Qi - G @ (xH.T @ xH) @ Qi,
                        xH @ (xG.T @ G + G.T @ xG) @ Pi - H @ (xG.T @ xG) @ Pi)
    return embed(case, w, out)


def ref_projection_formula(case, metric, w, xi, eps_rel=0.0, eps=0.0):
    """Spec §4.1 per head with the relaxed P, Q: ``(xG + G Lam, xH - H Lam^T)``; mix
    ``Lam = 1/2 (xH^T H Q^{-1} - P^{-1} G^T xG)``, inv ``Lam = X^T`` with ``A X + X A = B``,
    ``A = P Q``, ``B = P H^T xH - xG^T G Q`` (solved densely by Kronecker products)."""
    hw, hx = case.hand(w), case.hand(xi)
    out = {}
    for lab, (G, H) in hw.items():
        P, Q = grams(G, H, eps_rel, eps)
        xG, xH = hx[lab]
        h = G.shape[-1]
        if metric == "mix":
            lam = 0.5 * (xH.T @ H @ torch.linalg.inv(Q) - torch.linalg.solve(P, G.T @ xG))
        else:
            A, B = P @ Q, P @ H.T @ xH - xG.T @ G @ Q
            eye = torch.eye(h, dtype=DT)
            K = torch.kron(A.contiguous(), eye) + torch.kron(eye, A.T.contiguous())  # row-major vec: vec(A X) + vec(X A)
            lam = torch.linalg.solve(K, B.reshape(-1)).reshape(h, h).T
        out[lab] = (xG + G @ lam, xH - H @ lam.T)
    return embed(case, w, out)


def rk4(case, metric, w, xi, t=1.0, n=64):
    """Classical RK4 on ``(w, v)' = (v, -Gamma_w(v, v))`` with the hand Christoffel term."""
    def f(p, v):
        return v, T.scale(ref_christoffel(case, metric, p, v), -1.0)
    p, v = dict(w), dict(xi)
    dt = t / n
    for _ in range(n):
        k1 = f(p, v)
        k2 = f(T.add(p, k1[0], dt / 2), T.add(v, k1[1], dt / 2))
        k3 = f(T.add(p, k2[0], dt / 2), T.add(v, k2[1], dt / 2))
        k4 = f(T.add(p, k3[0], dt), T.add(v, k3[1], dt))
        p = {n_: p[n_] + dt / 6 * (k1[0][n_] + 2 * k2[0][n_] + 2 * k3[0][n_] + k4[0][n_]) for n_ in p}
        v = {n_: v[n_] + dt / 6 * (k1[1][n_] + 2 * k2[1][n_] + 2 * k3[1][n_] + k4[1][n_]) for n_ in v}
    return p


def per_label(group, w, elems):
    """``{label: element}`` from the per-stack list ``elems`` of the group."""
    return {lab: e for labs, E in zip(group.labels(w), elems) for lab, e in zip(labs, E)}


def stack_list(group, w, by_label):
    """Inverse of :func:`per_label`."""
    return [torch.stack([by_label[lab] for lab in labs]) for labs in group.labels(w)]


def make(case_fn, metric, seed=0, **kw):
    case = case_fn(seed)
    grp = AttentionGL(case.blocks, metric, **kw)
    case.w = {n: case.w[n] for n in grp.names}  # the group's order (flattening, autodiff defaults)
    return case, grp


# ============================================================================ action / vertical
@pytest.mark.parametrize("case_fn", CASES)
def test_action_keeps_hand_written_attention_and_matches_the_formula(case_fn):
    case, grp = make(case_fn, "mix")
    w = case.w
    y0 = case.attn(w, case.x)
    g = grp.random_element(w, scale=1.0, generator=gen(3), max_cond=5.0)
    w2 = grp.action(w, g)
    close(case.attn(w2, case.x), y0, rtol=1e-9, atol=1e-10)
    A = per_label(grp, w, g)
    hw = case.hand(w)
    close(w2, embed(case, w, {lab: (G @ torch.linalg.inv(A[lab]), H @ A[lab].T) for lab, (G, H) in hw.items()}))
    # negative control (spec §3.2): leaving the biases alone changes the function
    wb = dict(w2, **{n: w[n] for n in case.bias_names})
    assert float((case.attn(wb, case.x) - y0).abs().max()) > 1e-3
    # tangent map: (xi_G A^{-1}, xi_H A^T) by hand
    xi = T.randn_like(w, gen(4))
    hx = case.hand(xi)
    close(grp.pushforward(w, g, xi),
          embed(case, w, {lab: (xG @ torch.linalg.inv(A[lab]), xH @ A[lab].T) for lab, (xG, xH) in hx.items()}))
    # extract/insert round trip is bit-exact
    close(grp.insert(w, grp.extract(w)), w, rtol=0, atol=0)
    # inputs untouched
    close(w, {n: t for n, t in case_fn(0).w.items()}, rtol=0, atol=0)


@pytest.mark.parametrize("case_fn", CASES)
def test_vertical_vectors_are_hand_nu_and_null_directions_of_the_output(case_fn):
    case, grp = make(case_fn, "inv")
    w = case.w
    om = [randn(*z.shape, seed=7 + i) for i, z in enumerate(grp.algebra_zeros(w))]
    assert all(z.shape[-1] == z.shape[-2] == 2 and not z.any() for z in grp.algebra_zeros(w))
    Om = per_label(grp, w, om)
    nu = grp.vertical(w, om)
    close(nu, embed(case, w, {lab: (-G @ Om[lab], H @ Om[lab].T) for lab, (G, H) in case.hand(w).items()}))
    # d/dt f(w + t nu) = 0 at t = 0 (central difference; the output is smooth)
    t = 1e-4
    yp, ym = case.attn(T.add(w, nu, t), case.x), case.attn(T.add(w, nu, -t), case.x)
    y0 = case.attn(w, case.x)
    assert float(((yp - ym) / (2 * t)).abs().max()) < 1e-6
    assert float((yp - y0).abs().max()) > 1e-10  # but nu is not zero: second order moves it


# ============================================================================ metric, projection
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case_fn", CASES)
def test_metric_projection_and_gradient_against_dense_references(case_fn, metric):
    case, grp = make(case_fn, metric)
    w = case.w
    names = list(w)
    xi, zeta, egrad = T.randn_like(w, gen(11)), T.randn_like(w, gen(12)), T.randn_like(w, gen(13))
    M = dense_metric(case, metric, w)
    V = vertical_basis(case, w)
    Pm = ref_projection_matrix(M, V)
    fx, fz, fe = (T.flatten(v, names) for v in (xi, zeta, egrad))
    # metric
    close(grp.inner(w, xi, zeta), fx @ M @ fz)
    close(grp.norm_sq(w, xi), fx @ M @ fx)
    close(sum(v.sum() for v in grp.inner_per_block(w, xi, zeta)), fx @ M @ fz)
    assert grp.inner(w, xi, zeta).dtype == DT and grp.inner(w, xi, zeta).ndim == 0
    # projection = dense M-orthogonal projection, idempotent, kills vertical vectors
    p = grp.horizontal_projection(w, xi)
    close(T.flatten(p, names), Pm @ fx)
    close(grp.horizontal_projection(w, p), p)
    assert float((V.T @ M @ T.flatten(p, names)).abs().max()) < 1e-9 * float(M.abs().max())
    nu = T.unflatten(V[:, 3] + 0.5 * V[:, -1], w)
    assert float(T.flatten(grp.horizontal_projection(w, nu), names).abs().max()) < 1e-9
    # Riemannian gradient: M^{-1} egrad, then projected
    r = grp.egrad_to_rgrad(w, egrad)
    close(T.flatten(r, names), torch.linalg.solve(M, fe))
    rg = grp.riemannian_gradient(w, egrad)
    close(T.flatten(rg, names), Pm @ torch.linalg.solve(M, fe))
    # norm_sq right after riemannian_gradient (the remembered <egrad, d> shortcut)
    close(grp.norm_sq(w, rg), T.flatten(rg, names) @ M @ T.flatten(rg, names))
    # ... and after the gradient is modified in place, no stale value
    egrad[names[0]].mul_(3.0)
    fe3 = T.flatten(egrad, names)
    dref = T.flatten(rg, names)
    close(grp.norm_sq(w, rg), dref @ M @ dref)
    rg3 = grp.riemannian_gradient(w, egrad)
    close(T.flatten(rg3, names), Pm @ torch.linalg.solve(M, fe3))
    rg3[names[-1]].mul_(-2.0)
    d3 = T.flatten(rg3, names)
    close(grp.norm_sq(w, rg3), d3 @ M @ d3)
    # whitening: covariance M^{-1}, i.e. W^T M W = I for the linear map W: zeta -> whiten(zeta),
    # i.e. g(W z1, W z2) = <z1, z2> for all z1, z2
    Z = torch.randn(len(fx), 3, generator=gen(10), dtype=DT)
    Wz = torch.stack([T.flatten(grp.whiten(w, T.unflatten(Z[:, j], w)), names) for j in range(3)], 1)
    close(Wz.T @ M @ Wz, Z.T @ Z)


def test_a_group_reused_on_weights_of_other_shapes_restacks_its_blocks():
    """Layer 1 with a wider input: its blocks no longer stack with layer 0's. The group that saw
    the first shapes must give what a fresh group gives (it kept the old stacks and failed)."""
    case, grp = make(case_linear, "inv")
    w = case.w
    p1 = grp.horizontal_projection(w, T.randn_like(w, gen(1)))
    w2 = dict(w, **{n: randn(4, 6, seed=5) for n in ("l1.q", "l1.k", "l1.v")})
    xi2 = T.randn_like(w2, gen(2))
    fresh = AttentionGL(case.blocks, "inv")
    close(grp.horizontal_projection(w2, xi2), fresh.horizontal_projection(w2, xi2))
    assert len(grp.stacks) == len(fresh.stacks) > 2
    close(grp.horizontal_projection(w, T.randn_like(w, gen(1))), p1)  # and back


@pytest.mark.parametrize("metric", METRICS)
def test_base_point_changed_in_place_is_not_served_from_the_cache(metric):
    case, grp = make(case_linear, metric)
    w = {n: t.clone() for n, t in case.w.items()}
    xi = T.randn_like(w, gen(21))
    grp.horizontal_projection(w, xi)
    grp.christoffel(w, xi)
    w["l0.q"].mul_(1.7)
    w["l1.o"].add_(0.3)
    names = list(w)
    M = dense_metric(case, metric, w)
    Pm = ref_projection_matrix(M, vertical_basis(case, w))
    close(T.flatten(grp.horizontal_projection(w, xi), names), Pm @ T.flatten(xi, names))
    close(grp.christoffel(w, xi), ref_christoffel(case, metric, w, xi))
    close(grp.inner(w, xi, xi), ref_inner(case, metric, w, xi, xi))
    # tangent modified in place between calls
    xi["l0.k"].mul_(-1.5)
    close(grp.christoffel(w, xi), ref_christoffel(case, metric, w, xi))
    close(T.flatten(grp.horizontal_projection(w, xi), names), Pm @ T.flatten(xi, names))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case_fn", [case_linear, case_gqa])
def test_metric_is_invariant_and_projection_equivariant(case_fn, metric):
    case, grp = make(case_fn, metric)
    w = case.w
    g = grp.random_element(w, generator=gen(5))
    xi, zeta = T.randn_like(w, gen(6)), T.randn_like(w, gen(7))
    w2, xi2, zeta2 = grp.action(w, g), grp.pushforward(w, g, xi), grp.pushforward(w, g, zeta)
    close(grp.inner(w2, xi2, zeta2), grp.inner(w, xi, zeta), rtol=1e-9)
    close(grp.horizontal_projection(w2, xi2), grp.pushforward(w, g, grp.horizontal_projection(w, xi)),
          rtol=1e-8, atol=1e-9)
    close(grp.christoffel(w2, xi2), grp.pushforward(w, g, grp.christoffel(w, xi)), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("metric", METRICS)
def test_relaxation_enters_every_gram_matrix(metric):
    case, grp = make(case_mha, metric, eps_rel=0.3, eps=0.2)
    w = case.w
    names = list(w)
    xi, egrad = T.randn_like(w, gen(8)), T.randn_like(w, gen(9))
    kw = dict(eps_rel=0.3, eps=0.2)
    M = dense_metric(case, metric, w, **kw)
    close(grp.inner(w, xi, egrad), ref_inner(case, metric, w, xi, egrad, **kw))
    close(grp.horizontal_projection(w, xi), ref_projection_formula(case, metric, w, xi, **kw))
    close(T.flatten(grp.egrad_to_rgrad(w, egrad), names), torch.linalg.solve(M, T.flatten(egrad, names)))
    close(grp.christoffel(w, xi), ref_christoffel(case, metric, w, xi, **kw))
    # with_metric keeps the relaxation and the sharing flag, and switches the metric
    other = grp.with_metric("inv" if metric == "mix" else "mix")
    assert (other.metric, other.eps_rel, other.eps, other.shares_tensors) == (
        "inv" if metric == "mix" else "mix", 0.3, 0.2, False)
    close(other.inner(w, xi, xi), ref_inner(case, other.metric, w, xi, xi, **kw))
    o2 = grp.with_metric(metric, eps=0.0)
    assert (o2.eps, o2.eps_rel) == (0.0, 0.3)
    # only eps_rel, only eps
    for kw in (dict(eps_rel=0.5), dict(eps=0.4)):
        g2 = AttentionGL(case.blocks, metric, **kw)
        close(g2.inner(w, xi, xi), ref_inner(case, metric, w, xi, xi, **kw))


# ============================================================================ Christoffel / geodesics
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case_fn", CASES)
def test_christoffel_and_second_order_geodesic_against_closed_forms(case_fn, metric):
    case, grp = make(case_fn, metric)
    w = case.w
    xi = T.scale(T.randn_like(w, gen(14)), 0.3)
    gam = grp.christoffel(w, xi)
    close(gam, ref_christoffel(case, metric, w, xi))
    for t in (1.0, 0.4):
        close(grp.geodesic_2nd(w, xi, t), {n: w[n] + t * xi[n] - 0.5 * t * t * gam[n] for n in w})
        close(grp.geodesic(w, xi, t, order=2), {n: w[n] + t * xi[n] - 0.5 * t * t * gam[n] for n in w})


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case_fn", [case_linear, case_neox])
def test_christoffel_equals_the_autodiff_default(case_fn, metric):
    case, grp = make(case_fn, metric)
    w = case.w
    xi = T.randn_like(w, gen(15))
    close(grp.christoffel(w, xi), SymmetryGroup.christoffel(grp, w, xi), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("metric", METRICS)
def test_second_order_geodesic_is_third_order_accurate_against_rk4(metric):
    case, grp = make(case_conv1d, metric)
    w = case.w
    xi = grp.horizontal_projection(w, T.randn_like(w, gen(16)))
    xi = T.scale(xi, 1.0 / float(grp.norm(w, xi)))
    errs = []
    for t in (0.2, 0.1):
        ref = rk4(case, metric, w, xi, t, n=16)
        errs.append(float(T.flatten(T.sub(grp.geodesic_2nd(w, xi, t), ref), list(w)).norm()))
    assert 6.0 < errs[0] / errs[1] < 10.0, errs
    # the library's own integration agrees with the hand RK4
    ref = rk4(case, metric, w, T.scale(xi, 0.5), 1.0, n=32)
    close(grp.geodesic_ode(w, T.scale(xi, 0.5), 1.0), ref, rtol=1e-8, atol=1e-9)
    close(grp.geodesic_exact(w, T.scale(xi, 0.5)), ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("case_fn", [case_linear, case_neox])
def test_geodesic_vjp_against_autograd_of_the_hand_formulas(case_fn, metric):
    case, grp = make(case_fn, metric)
    w = case.w
    xi = T.scale(T.randn_like(w, gen(17)), 0.2)
    cot = T.randn_like(w, gen(18))
    names = list(w)
    x = {n: xi[n].clone().requires_grad_() for n in names}
    gam = ref_christoffel(case, metric, w, x)
    s = sum(((x[n] - 0.5 * gam[n]) * cot[n]).sum() for n in names)
    ref2 = dict(zip(names, torch.autograd.grad(s, [x[n] for n in names])))
    close(grp.geodesic_vjp(w, xi, cot, order=2), ref2)
    close(grp.geodesic_vjp(w, xi, cot, order=1), cot, rtol=0, atol=0)
    # exact: the adjoint of the integration, against autograd through the hand RK4
    x = {n: xi[n].clone().requires_grad_() for n in names}
    end = rk4(case, metric, w, x, 1.0, n=8)
    s = sum((end[n] * cot[n]).sum() for n in names)
    refx = dict(zip(names, torch.autograd.grad(s, [x[n] for n in names])))
    ode = dict(n_steps=8, tol=None)
    close(grp.geodesic_vjp(w, xi, cot, order="exact", **ode), refx)
    # and after the endpoint was computed first (the kept run is reused)
    close(grp.geodesic_ode(w, xi, **ode), {n: t.detach() for n, t in end.items()})
    close(grp.geodesic_vjp(w, xi, cot, order="exact", **ode), refx)
    # xi = 0: the geodesic stays put and the adjoint is the identity
    z = T.zeros_like(w)
    close(grp.geodesic_ode(w, z), w, rtol=0, atol=0)
    close(grp.geodesic_vjp(w, z, cot, order="exact"), cot, rtol=0, atol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_autograd_path_equals_the_fast_path_and_is_differentiable(metric):
    case, grp = make(case_gqa, metric)
    w = case.w
    names = list(w)
    xi, zeta = T.randn_like(w, gen(19)), T.randn_like(w, gen(20))
    wg = {n: w[n].clone().requires_grad_() for n in names}
    xg = {n: xi[n].clone().requires_grad_() for n in names}
    close(grp.inner(wg, xg, zeta), ref_inner(case, metric, w, xi, zeta))
    close(grp.horizontal_projection(wg, xg), grp.horizontal_projection(w, xi))
    close(grp.christoffel(wg, xg), ref_christoffel(case, metric, w, xi))
    close(grp.geodesic_2nd(wg, xg, 0.5), grp.geodesic_2nd(w, xi, 0.5))
    close(grp.egrad_to_rgrad(wg, xg), grp.egrad_to_rgrad(w, xi))
    close(grp.riemannian_gradient(wg, xg), grp.riemannian_gradient(w, xi))
    close(grp.whiten(wg, xg), grp.whiten(w, xi))
    close(grp.vertical(wg, grp.algebra_zeros(w)), T.zeros_like(w), rtol=0, atol=0)
    close(grp.norm_sq(wg, xg), ref_inner(case, metric, w, xi, xi))
    # inside torch.func transforms: d/dxi g(xi, xi) = 2 M xi, d/dw g_w(xi, zeta) as the hand formula
    M = dense_metric(case, metric, w)
    gf = torch.func.grad(lambda x: grp.norm_sq(w, x))(xi)
    close(T.flatten(gf, names), 2 * M @ T.flatten(xi, names))
    gf = torch.func.grad(lambda x: grp.inner(w, x, zeta))(xi)
    close(T.flatten(gf, names), M @ T.flatten(zeta, names))
    gw = torch.func.grad(lambda p: grp.norm_sq(p, xi))(w)
    w2 = {n: w[n].clone().requires_grad_() for n in names}
    rw = torch.autograd.grad(ref_inner(case, metric, w2, xi, xi), [w2[n] for n in names])
    for n, b in zip(names, rw):
        close(gw[n], b)
    # gradient of the metric through the autograd path = gradient of the hand formula
    gx = torch.autograd.grad(grp.inner(wg, xg, zeta), [xg[n] for n in names])
    x2 = {n: xi[n].clone().requires_grad_() for n in names}
    rx = torch.autograd.grad(ref_inner(case, metric, w, x2, zeta), [x2[n] for n in names])
    for a, b in zip(gx, rx):
        close(a, b)


def test_float32_weights_give_float32_results_close_to_float64():
    case, grp = make(case_mha, "inv")
    w = case.w
    xi = T.randn_like(w, gen(22))
    w32, xi32 = ({n: t.float() for n, t in d.items()} for d in (w, xi))
    n32 = grp.norm_sq(w32, xi32)
    assert n32.dtype == torch.float32
    close(n32.double(), ref_inner(case, "inv", w, xi, xi), rtol=1e-4, atol=1e-5)
    d32 = grp.riemannian_gradient(w32, xi32)
    assert d32["in_w"].dtype == torch.float32 and grp.norm_sq(w32, d32).dtype == torch.float32
    d64 = grp.riemannian_gradient(w, xi)
    close(grp.norm_sq(w32, d32).double(), ref_inner(case, "inv", w, d64, d64), rtol=1e-4, atol=1e-5)
    out = grp.horizontal_projection(w32, xi32)
    assert all(t.dtype == torch.float32 for t in out.values())
    close(out, {n: t.float() for n, t in grp.horizontal_projection(w, xi).items()}, rtol=1e-3, atol=1e-4)
    v = grp.inner(w32, xi32, xi32)
    assert v.dtype == torch.float32
    close(v.double(), ref_inner(case, "inv", w, xi, xi), rtol=1e-4, atol=1e-5)
    close({n: t.double() for n, t in grp.christoffel(w32, xi32).items()}, ref_christoffel(case, "inv", w, xi),
          rtol=1e-3, atol=1e-4)


# ============================================================================ sub-algebra stacks
@pytest.mark.parametrize("metric", METRICS)
def test_rotary_subalgebra_block_projects_onto_the_smaller_vertical_space(metric):
    """QK with the rotary commutant (spec part 6 §3): Lie-algebra elements are coefficients, the
    projection removes only span{nu(E_a)}; VO keeps gl(h)."""
    d, nh, h = 4, 1, 4
    alg = SubAlgebra.rotary(h)
    w = {"q": randn(h, d, seed=50), "k": randn(h, d, seed=51), "v": randn(h, d, seed=52), "o": randn(d, h, seed=53)}
    blocks = [GLBlock(G=(Piece("q", "rows"),), H=(Piece("k", "rows"),), n_heads=nh, head_dim=h, label="r/qk",
                      algebra=alg),
              GLBlock(G=(Piece("v", "rows"),), H=(Piece("o", "cols"),), n_heads=nh, head_dim=h, label="r/vo")]
    grp = AttentionGL(blocks, metric)
    case = SimpleNamespace(hand=lambda w: {"r/qk/head 0": (w["q"].T, w["k"].T), "r/vo/head 0": (w["v"].T, w["o"])})
    zs = grp.algebra_zeros(w)
    assert [tuple(z.shape) for z in zs] == [(1, alg.dim), (1, h, h)]
    E = alg.matrix(torch.eye(alg.dim, dtype=DT))
    names = list(w)
    cols = []
    for j in range(alg.dim):
        cols.append(T.flatten(embed(case, w, {"r/qk/head 0": (-w["q"].T @ E[j], w["k"].T @ E[j].T),
                                              "r/vo/head 0": (torch.zeros(d, h, dtype=DT),
                                                              torch.zeros(d, h, dtype=DT))}), names))
    for a in range(h):
        for b in range(h):
            Eab = torch.zeros(h, h, dtype=DT)
            Eab[a, b] = 1
            cols.append(T.flatten(embed(case, w, {"r/qk/head 0": (torch.zeros(d, h, dtype=DT),) * 2,
                                                  "r/vo/head 0": (-w["v"].T @ Eab, w["o"] @ Eab.T)}), names))
    V = torch.stack(cols, 1)
    M = dense_metric(case, metric, w)
    xi = T.randn_like(w, gen(23))
    close(T.flatten(grp.horizontal_projection(w, xi), names), ref_projection_matrix(M, V) @ T.flatten(xi, names))
    # the autograd path (extract / insert) gives the same projection
    wg = {n: t.clone().requires_grad_() for n, t in w.items()}
    close(T.flatten(grp.horizontal_projection(wg, xi), names), ref_projection_matrix(M, V) @ T.flatten(xi, names))
    c = [randn(1, alg.dim, seed=24), randn(1, h, h, seed=25)]
    close(T.flatten(grp.vertical(w, c), names), V @ torch.cat([c[0][0], c[1][0].flatten()]))
    g = grp.random_element(w, generator=gen(26))
    assert [tuple(A.shape) for A in g] == [(1, h, h), (1, h, h)] and g[0].dtype == DT
    w32 = {n: t.float() for n, t in w.items()}
    assert [A.dtype for A in grp.random_element(w32, generator=gen(26))] == [torch.float32] * 2
    close(grp.random_element(w, scale=2.0, generator=gen(26)), [2.0 * x for x in g], rtol=1e-15, atol=0)
    # max_cond = 1: moduli and singular values all 1 (orthogonal elements), on both stacks
    for A in grp.random_element(w, max_cond=1.0, generator=gen(27)):
        close(torch.linalg.svdvals(A), torch.ones(1, h, dtype=DT))
    assert float(torch.linalg.svdvals(g[0]).max() / torch.linalg.svdvals(g[0]).min()) > 1.01
    # the rotary element commutes with every rotary generator (it lies in the commutant group)
    rot = E[1::2] if alg.planes else E
    for R in rot:
        close(g[0][0] @ R, R @ g[0][0])
    assert grp.kernel_dimension(w) == alg.dim + h * h
    summ = grp.block_summaries()
    assert summ[0] == ("r", "QK", f"{alg.describe()} × 1 heads") and summ[1] == ("r", "VO", "GL(4) × 1 heads")


# ============================================================================ misc API
def test_random_element_scale_condition_number_and_determinism():
    case, grp = make(case_linear, "inv")
    w = case.w
    a = grp.random_element(w, scale=2.5, generator=gen(30))
    b = grp.random_element(w, scale=1.0, generator=gen(30))
    assert [tuple(x.shape) for x in a] == [(4, 2, 2), (4, 2, 2)]
    close(a, [2.5 * x for x in b], rtol=1e-15, atol=0)
    c = grp.random_element(w, max_cond=30.0, generator=gen(31))
    for A in c:
        s = torch.linalg.svdvals(A)
        close(s[:, 0], torch.full((4,), 30.0, dtype=DT))
        close(s[:, -1], torch.ones(4, dtype=DT))
    assert a[0].dtype == DT
    torch.manual_seed(0)
    d1 = grp.random_element(w)  # the global generator, on the CPU
    torch.manual_seed(0)
    close(grp.random_element(w), d1, rtol=0, atol=0)
    assert d1[0].shape == (4, 2, 2) and d1[0].device.type == "cpu"
    w32 = {n: t.float() for n, t in w.items()}
    assert grp.random_element(w32, generator=gen(1))[0].dtype == torch.float32
    assert all(z.dtype == torch.float32 for z in grp.algebra_zeros(w32))
    # h = 1: a scalar; max_cond cannot apply, the element is +-1 times scale
    blocks = [GLBlock(G=(Piece("a", "rows"),), H=(Piece("b", "rows"),), n_heads=3, head_dim=1, label="s")]
    g1 = AttentionGL(blocks, "inv")
    w1 = {"a": randn(3, 2, seed=1), "b": randn(3, 2, seed=2)}
    e = g1.random_element(w1, scale=0.5, max_cond=9.0, generator=gen(2))[0]
    close(e.abs(), torch.full((3, 1, 1), 0.5, dtype=DT))


def test_kernel_dimension_counts_the_rank_of_the_hand_vertical_basis():
    case, grp = make(case_linear, "inv")
    w = {n: t.clone() for n, t in case.w.items()}
    assert grp.kernel_dimension(w) == 8 * 4
    # head 0 of l0/qk: G and H of rank 1 (the second column a multiple of the first)
    w["l0.q"][1] = 2.0 * w["l0.q"][0]
    w["l0.qb"][1] = 2.0 * w["l0.qb"][0]
    w["l0.k"][1] = -3.0 * w["l0.k"][0]
    w["l0.kb"][1] = -3.0 * w["l0.kb"][0]
    # head 1 of l1/vo: G of rank 1 only (H full rank): still h^2
    w["l1.v"][3] = w["l1.v"][2]
    w["l1.vb"][3] = w["l1.vb"][2]
    rank = int(torch.linalg.matrix_rank(vertical_basis(case, w)))
    assert rank == 8 * 4 - 1
    assert grp.kernel_dimension(w) == rank


def test_relative_perturbation_is_the_worst_factor_ratio():
    case, grp = make(case_mha, "mix")
    w = {n: t.clone() for n, t in case.w.items()}
    xi = T.scale(T.randn_like(w, gen(40)), 0.05)

    def ref(w):
        ratios = [0.0]
        for lab, (G, H) in case.hand(w).items():
            xG, xH = case.hand(xi)[lab]
            ratios += [float(xG.norm() / G.norm()) if G.norm() > 0 else 0.0, float(xH.norm() / H.norm())]
        return max(ratios)
    r = grp.relative_perturbation(w, xi)
    assert r.dtype == DT and r.ndim == 0
    close(r, torch.tensor(ref(w), dtype=DT))
    assert float(r) < 1.0
    # a dead head (all-zero G) contributes 0, not inf/nan (and not 1)
    w["in_w"][0:2] = 0.0
    w["in_b"][0:2] = 0.0
    close(grp.relative_perturbation(w, xi), torch.tensor(ref(w), dtype=DT))
    assert float(grp.relative_perturbation(w, xi)) < 1.0
    # a small head (norm < 1) dominates: its ratio is large
    w["out_w"][:, 4:6] *= 1e-3
    assert float(case.hand(w)["mha/vo/head 2"][1].norm()) < 0.1
    close(grp.relative_perturbation(w, xi), torch.tensor(ref(w), dtype=DT))
    assert float(grp.relative_perturbation(w, xi)) > 1.0


def test_kernel_dimension_of_a_partial_rotary_subalgebra():
    """``rotary(4, 2)``: one plane (0, 1) (scale, rotation) and gl on coordinates (2, 3), dim 6.
    The kernel of Pi is the rank of nu restricted to the sub-algebra, per head (hand basis)."""
    h = 4
    basis = []
    e = torch.eye(h, dtype=DT)
    basis += [e[:, [0]] @ e[[0]] + e[:, [1]] @ e[[1]], e[:, [1]] @ e[[0]] - e[:, [0]] @ e[[1]]]
    basis += [e[:, [a]] @ e[[b]] for a in (2, 3) for b in (2, 3)]
    blk = GLBlock(G=(Piece("a", "rows"),), H=(Piece("b", "rows"),), n_heads=3, head_dim=h, label="p",
                  algebra=SubAlgebra.rotary(h, 2))
    plain = GLBlock(G=(Piece("c", "rows"),), H=(Piece("d", "rows"),), n_heads=1, head_dim=2, label="gl")
    grp = AttentionGL([plain, blk], "inv")  # a gl(2) stack first: its count is kept
    a, b = randn(3 * h, 6, seed=70), randn(3 * h, 5, seed=71)
    a[h + 2] = 0.0  # head 1: column 2 of G zero (rank 3) ...
    b[h + 3] = 0.0  # ... and column 3 of H zero (rank 3): Omega = e_2 e_3^T is in the kernel
    b[2 * h + 1] = 0.0  # head 2: H rank 3, G full rank: nu injective
    w = {"c": randn(2, 3, seed=72), "d": randn(2, 3, seed=73), "a": a, "b": b}
    total = 4
    for i in range(3):
        G, H = a[i * h:(i + 1) * h].T, b[i * h:(i + 1) * h].T
        V = torch.stack([torch.cat([(G @ E).flatten(), (H @ E.T).flatten()]) for E in basis], 1)
        total += int(torch.linalg.matrix_rank(V))
    assert total == 4 + 6 + 5 + 6
    assert grp.kernel_dimension(w) == total
    # the same heads under full gl(h): h^2 - (h - rk G)(h - rk H)
    full = AttentionGL([plain, GLBlock(G=blk.G, H=blk.H, n_heads=3, head_dim=h)], "inv")
    assert full.kernel_dimension(w) == 4 + 16 + 15 + 16


@pytest.mark.parametrize("metric", METRICS)
def test_singular_heads_raise_naming_the_head(metric):
    case, grp = make(case_linear, metric)
    w = {n: t.clone() for n, t in case.w.items()}
    grp.check_domain(w)
    w["l1.k"][2:4] = 0.0
    w["l1.kb"][2:4] = 0.0
    with pytest.raises(SingularHeadError, match=r"H \(W_K / W_O side\) in l1/qk/head 1: the block is all zero"):
        grp.check_domain(w)
    with pytest.raises(SingularHeadError, match=r"l1/qk/head 1"):
        grp.horizontal_projection(w, T.randn_like(w, gen(1)))
    w = {n: t.clone() for n, t in case.w.items()}
    w["l0.v"][1] = 0.0  # column 1 of G_V head 0 is the bias entry only: rank 2, fine
    grp.check_domain(w)
    w["l0.vb"][1] = 0.0
    with pytest.raises(SingularHeadError, match=r"G \(W_Q / W_V side\) in l0/vo/head 0"):
        grp.check_domain(w)
    # numerically singular (rank 1 but nonzero): condition number in the message, eps_rel suggested
    w = {n: t.clone() for n, t in case.w.items()}
    w["l0.q"][1] = 2.0 * w["l0.q"][0]
    w["l0.qb"][1] = 2.0 * w["l0.qb"][0]
    with pytest.raises(SingularHeadError, match=r"l0/qk/head 0: the block is numerically singular .*eps_rel > 0"):
        grp.check_domain(w)
    # an absolute relaxation makes it computable
    AttentionGL(case.blocks, metric, eps=1e-3).check_domain(w)


def test_constructor_and_layout_errors():
    case = case_linear()
    with pytest.raises(ValueError, match="metric must be one of"):
        AttentionGL(case.blocks, "euclid")
    with pytest.raises(ValueError, match="eps and eps_rel must be >= 0"):
        AttentionGL(case.blocks, "inv", eps=-1e-3)
    with pytest.raises(ValueError, match="eps and eps_rel must be >= 0"):
        AttentionGL(case.blocks, "inv", eps_rel=-1e-3)
    AttentionGL(case.blocks, "inv", eps=0.0, eps_rel=0.0)
    with pytest.raises(ValueError, match="at least one block"):
        AttentionGL([], "inv")
    grp = AttentionGL(case.blocks, "inv")
    assert list(grp.names) == [f"l{i}.{n}" for i in range(2) for n in ("q", "qb", "k", "kb", "v", "vb", "o")]
    assert repr(grp) == "AttentionGL(metric='inv', 4 blocks, 8 heads)"
    assert grp.block_summaries() == [("l0", "QK", "GL(2) × 2 heads"), ("l0", "VO", "GL(2) × 2 heads"),
                                     ("l1", "QK", "GL(2) × 2 heads"), ("l1", "VO", "GL(2) × 2 heads")]
    deep = GLBlock(G=(Piece("a", "rows"),), H=(Piece("b", "rows"),), n_heads=1, head_dim=2, label="x/y/qk",
                   kind="custom")
    nopart = GLBlock(G=(Piece("c", "rows"),), H=(Piece("d", "rows"),), n_heads=3, head_dim=2, label="solo/")
    nolab = GLBlock(G=(Piece("e", "rows"),), H=(Piece("f", "rows"),), n_heads=1, head_dim=1)
    assert AttentionGL([deep, nopart, nolab]).block_summaries() == [
        ("x/y", "QK", "custom"), ("solo", "GL", "GL(2) × 3 heads"), ("", "GL", "GL(1) × 1 heads")]
    w = case.w
    bad = dict(w, **{"l0.q": w["l0.q"][:, :, None]})
    with pytest.raises(ValueError, match=r"l0/qk: parameter 'l0.q' of shape \(4, 4, 1\) does not fit a 'rows' slice"):
        AttentionGL(case.blocks).validate(bad)
    bad = dict(w, **{"l0.qb": w["l0.q"]})
    with pytest.raises(ValueError, match="does not fit a 'bias' slice"):
        AttentionGL(case.blocks).validate(bad)
    bad = dict(w, **{"l1.o": w["l1.o"][:, :3]})
    with pytest.raises(ValueError, match=r"l1/vo: parameter 'l1.o' of shape \(4, 3\) has no room for 2 heads of "
                                         r"size 2 at offset 0 along dim 1"):
        AttentionGL(case.blocks).validate(bad)
    bad = dict(w, **{"l0.q": torch.cat([w["l0.q"], w["l0.q"]])})
    with pytest.raises(ValueError, match="'l0.q' is only partly covered"):
        AttentionGL(case.blocks).validate(bad)
    AttentionGL(case.blocks, shares_tensors=True).validate(bad)
    with pytest.raises(ValueError, match="'l0.q' is claimed by more than one GL block"):
        AttentionGL(case.blocks + [GLBlock(G=(Piece("l0.q", "rows"),), H=(Piece("l0.k", "rows"),), n_heads=1,
                                           head_dim=1, label="dup")]).validate(w)
    few = GLBlock(G=(Piece("a", "rows"),), H=(Piece("b", "rows"),), n_heads=2, head_dim=3, label="few")
    with pytest.raises(ValueError, match="few: factor G has 2 rows < head dim 3"):
        AttentionGL([few]).validate({"a": randn(6, 2), "b": randn(6, 4)})
    with pytest.raises(ValueError, match="few: factor H has 2 rows < head dim 3"):
        AttentionGL([few]).validate({"a": randn(6, 4), "b": randn(6, 2)})
    AttentionGL([few]).validate({"a": randn(6, 3), "b": randn(6, 3)})
    rot = GLBlock(G=(Piece("a", "rows"),), H=(Piece("b", "rows"),), n_heads=1, head_dim=4, label="rot",
                  algebra=SubAlgebra.rotary(2))
    with pytest.raises(ValueError, match="rot: sub-algebra of gl\\(2\\) on blocks of head dim 4"):
        AttentionGL([rot]).validate({"a": randn(4, 5), "b": randn(4, 5)})
    with pytest.raises(KeyError, match="l0.q"):
        AttentionGL(case.blocks).validate({n: t for n, t in w.items() if n != "l0.q"})
    # a strided piece that overruns, and a strided layout without room for the last head
    st = GLBlock(G=(Piece("a", "rows", 0, 4),), H=(Piece("b", "rows"),), n_heads=2, head_dim=2, label="st")
    with pytest.raises(ValueError, match="no room for 2 heads of size 2 at offset 0 along dim 0"):
        AttentionGL([st], shares_tensors=True).validate({"a": randn(5, 3), "b": randn(4, 3)})
    AttentionGL([st], shares_tensors=True).validate({"a": randn(6, 3), "b": randn(4, 3)})


# ============================================================================ caches, partial tensors, ODE
@pytest.mark.parametrize("metric", METRICS)
def test_remembered_gradient_norm_is_used_only_for_its_own_inputs(metric):
    case, grp = make(case_conv1d, metric)
    w = case.w
    names = list(w)
    M = dense_metric(case, metric, w)

    def ref(x):
        f = T.flatten(x, names)
        return f @ M @ f
    egrad, xi = T.randn_like(w, gen(60)), T.randn_like(w, gen(61))
    rg = grp.riemannian_gradient(w, egrad)
    close(grp.norm_sq(w, xi), ref(xi))  # another vector right after
    close(grp.norm_sq(w, rg), ref(rg))
    # the same values in other tensors (another w, another d): computed afresh, same value
    w2 = {n: t.clone() for n, t in w.items()}
    close(grp.norm_sq(w2, rg), ref(rg))
    close(grp.norm_sq(w, {n: t.clone() for n, t in rg.items()}), ref(rg))
    # a base point with other values in the remembered tensors' shapes
    w3 = {n: t * 1.5 for n, t in w.items()}
    case3 = SimpleNamespace(hand=case.hand)
    M3 = dense_metric(case3, metric, w3)
    grp.riemannian_gradient(w, egrad)
    f = T.flatten(rg, names)
    close(grp.norm_sq(w3, rg), f @ M3 @ f)
    # right after the gradient: at another base point, or for the gradient itself, no shortcut
    d = grp.riemannian_gradient(w, egrad)
    f = T.flatten(d, names)
    close(grp.norm_sq(w3, d), f @ M3 @ f)
    d = grp.riemannian_gradient(w, egrad)
    close(grp.norm_sq(w, egrad), ref(egrad))
    # the gradient released: no remembered value
    eg = T.randn_like(w, gen(62))
    rg2 = grp.riemannian_gradient(w, eg)
    del eg
    close(grp.norm_sq(w, rg2), ref(rg2))
    assert grp.norm_sq(w, rg2).dtype == DT


@pytest.mark.parametrize("metric", METRICS)
def test_blocks_covering_part_of_a_tensor_leave_the_rest_alone(metric):
    """Only the QK block of a packed ``in_proj``: with ``shares_tensors`` the value rows are the
    base point's in a point and 0 in a tangent vector; on the block, as the full group."""
    case, full = make(case_mha, metric)
    w = case.w
    d = 6
    qk = AttentionGL(case.blocks[:1], metric, shares_tensors=True)
    assert list(qk.names) == ["in_w", "in_b"]
    xi = T.randn_like(w, gen(63))
    wg = {n: w[n].clone().requires_grad_() for n in qk.names}
    for ww in (w, wg):
        outs = {"proj": (qk.horizontal_projection(ww, xi), full.horizontal_projection(w, xi), 0.0),
                "gam": (qk.christoffel(ww, xi), full.christoffel(w, xi), 0.0),
                "rgrad": (qk.egrad_to_rgrad(ww, xi), full.egrad_to_rgrad(w, xi), 0.0),
                "geo": (qk.geodesic_2nd(ww, xi, 0.7), full.geodesic_2nd(w, xi, 0.7), None)}
        for key, (part, ref, rest) in outs.items():
            assert set(part) == {"in_w", "in_b"}, key
            close(part["in_w"][:2 * d], ref["in_w"][:2 * d])
            close(part["in_b"][:2 * d], ref["in_b"][:2 * d])
            restw = w["in_w"][2 * d:] if rest is None else torch.zeros_like(w["in_w"][2 * d:])
            restb = w["in_b"][2 * d:] if rest is None else torch.zeros_like(w["in_b"][2 * d:])
            close(part["in_w"][2 * d:], restw, rtol=0, atol=0)
            close(part["in_b"][2 * d:], restb, rtol=0, atol=0)
        qk_only = SimpleNamespace(hand=lambda v: {k: f for k, f in case.hand(v).items() if "/qk/" in k})
        close(qk.inner(ww, xi, xi), ref_inner(qk_only, metric, w, xi, xi))
    g = qk.random_element(w, generator=gen(64))
    moved = qk.action(w, g)
    close(moved["in_w"][2 * d:], w["in_w"][2 * d:], rtol=0, atol=0)
    close(qk.vertical(w, g)["in_w"][2 * d:], torch.zeros(d, d, dtype=DT), rtol=0, atol=0)
    # the group validates the same shapes only once, but a new shape again
    qk.validate(w)
    with pytest.raises(ValueError, match="has no room for 3 heads"):
        qk.validate({"in_w": w["in_w"][:4], "in_b": w["in_b"]})


@pytest.mark.parametrize("metric", METRICS)
def test_ode_endpoint_gradients_singular_start_and_kept_runs(metric):
    case, grp = make(case_linear, metric)
    w = case.w
    names = list(w)
    xi = T.scale(T.randn_like(w, gen(65)), 0.2)
    cot = T.randn_like(w, gen(66))
    ode = dict(n_steps=4, tol=None)
    # under autograd: d<cot, end>/d(w, xi) through the hand RK4
    wg = {n: w[n].clone().requires_grad_() for n in names}
    xg = {n: xi[n].clone().requires_grad_() for n in names}
    end = grp.geodesic_ode(wg, xg, **ode)
    got = torch.autograd.grad(sum((end[n] * cot[n]).sum() for n in names), [*wg.values(), *xg.values()])
    wr = {n: w[n].clone().requires_grad_() for n in names}
    xr = {n: xi[n].clone().requires_grad_() for n in names}
    endr = rk4(case, metric, wr, xr, 1.0, n=4)
    ref = torch.autograd.grad(sum((endr[n] * cot[n]).sum() for n in names), [*wr.values(), *xr.values()])
    for a, b in zip(got, ref):
        close(a, b, rtol=1e-9, atol=1e-11)
    close({n: t.detach() for n, t in end.items()}, {n: t.detach() for n, t in endr.items()})
    # a kept run at another t / step count is not served to the vjp at t = 1
    refx = dict(zip(names, ref[len(names):]))
    grp.geodesic_ode(w, xi, t=0.5, **ode)
    close(grp.geodesic_vjp(w, xi, cot, order="exact", **ode), refx, rtol=1e-9, atol=1e-11)
    grp.geodesic_ode(w, xi, n_steps=8, tol=None)
    close(grp.geodesic_vjp(w, xi, cot, order="exact", **ode), refx, rtol=1e-9, atol=1e-11)
    grp.geodesic_ode(w, T.scale(xi, 2.0), **ode)
    close(grp.geodesic_vjp(w, xi, cot, order="exact", **ode), refx, rtol=1e-9, atol=1e-11)
    # t scales the endpoint as gamma_xi(t) = gamma_{t xi}(1)
    close(grp.geodesic_ode(w, xi, t=0.5, **ode), rk4(case, metric, w, T.scale(xi, 0.5), 1.0, n=4))
    # the base point singular: refused, also right after a successful run from a regular one
    ws = {n: t.clone() for n, t in w.items()}
    grp.geodesic_ode(ws, xi, **ode)
    ws["l0.v"][0:2] = 0.0
    ws["l0.vb"][0:2] = 0.0
    with pytest.raises(SingularHeadError, match="l0/vo/head 0"):
        grp.geodesic_ode(ws, xi, **ode)
    with pytest.raises(SingularHeadError, match="l0/vo/head 0"):
        AttentionGL(case.blocks, metric).geodesic_ode(ws, xi, **ode)


def test_singular_messages_suggest_a_relaxation_from_the_other_heads():
    case, grp = make(case_linear, "inv")
    w = {n: t.clone() for n, t in case.w.items()}
    w["l1.k"][2:4] = 0.0
    w["l1.kb"][2:4] = 0.0
    hw = case.hand(w)
    tops = sorted(float(torch.linalg.eigvalsh(hw[lab][1].T @ hw[lab][1])[-1])
                  for lab in ("l0/qk/head 0", "l0/qk/head 1", "l1/qk/head 0"))
    with pytest.raises(SingularHeadError, match=r"eps=0, eps_rel=0|\[eps_rel=0, eps=0\]") as e:
        grp.check_domain(w)
    assert f"e.g. eps={1e-6 * tops[1]:.1e} " in str(e.value)
    assert "is infinite. Pass an absolute relaxation, e.g. eps=" in str(e.value)
    # every head dead: no typical scale, the suggestion is 1e-6
    blk = GLBlock(G=(Piece("a", "rows"),), H=(Piece("b", "rows"),), n_heads=2, head_dim=1, label="z")
    g1 = AttentionGL([blk], "mix", eps_rel=0.5)
    with pytest.raises(SingularHeadError, match=r"G \(W_Q / W_V side\) in z/head 0: the block is all zero .*"
                                                r"\[eps_rel=0.5, eps=0\].*e\.g\. eps=1\.0e-06 "):
        g1.check_domain({"a": torch.zeros(2, 3, dtype=DT), "b": randn(2, 3)})
    # numerically singular: its condition number is printed
    w = {n: t.clone() for n, t in case.w.items()}
    w["l0.q"][1] = 2.0 * w["l0.q"][0]
    w["l0.qb"][1] = 2.0 * w["l0.qb"][0]
    with pytest.raises(SingularHeadError, match=r"numerically singular \(condition number \d\.\d\de\+\d+\) "
                                                r"\[eps_rel=0, eps=0\], so the GL metric's inverse is infinite\. Pass eps_rel > 0 or an "
                                                r"absolute relaxation, e\.g\. eps="):
        grp.check_domain(w)
    # the threshold: lambda_min <= 1e3 eps lambda_max counts as singular (equality included),
    # whatever the scale; small but well-conditioned heads are fine
    g2 = AttentionGL([GLBlock(G=(Piece("a", "rows"),), H=(Piece("b", "rows"),), n_heads=1, head_dim=2)], "inv")
    eye = torch.eye(2, dtype=DT)
    g2.check_domain({"a": torch.diag(torch.tensor([1.0, 1e-6], dtype=DT)), "b": eye})
    g2.check_domain({"a": 1e-3 * eye, "b": 1e-2 * eye})
    x = math.sqrt(SINGULAR_RTOL)
    assert x * x == SINGULAR_RTOL
    with pytest.raises(SingularHeadError, match=r"G \(W_Q / W_V side\) in /head 0: the block is numerically singular"):
        g2.check_domain({"a": torch.diag(torch.tensor([1.0, x], dtype=DT)), "b": eye})
    with pytest.raises(SingularHeadError, match=r"H \(W_K / W_O side\) in /head 0: the block is numerically singular "
                                                r"\(condition number 1\.00e\+14\)"):
        g2.check_domain({"a": eye, "b": torch.diag(torch.tensor([1e3, 1e-4], dtype=DT))})
    with pytest.raises(SingularHeadError, match=r"numerically singular \(condition number 1\.00e\+16\)"):
        g2.check_domain({"a": torch.diag(torch.tensor([1.0, 1e-8], dtype=DT)), "b": eye})
    small = {n: 0.05 * t for n, t in case.w.items()}
    grp.check_domain(small)
    close(grp.inner(small, small, small), ref_inner(case, "inv", small, small, small))


def case_tiny(seed=0):
    """One GL(1) block with two-row factors: a cheap geodesic for long integrations."""
    w = {"a": torch.tensor([[1.0, 0.5]], dtype=DT), "b": torch.tensor([[0.8, -0.6]], dtype=DT)}
    blocks = [GLBlock(G=(Piece("a", "rows"),), H=(Piece("b", "rows"),), n_heads=1, head_dim=1, label="t")]
    return SimpleNamespace(name="tiny", w=w, blocks=blocks, hand=lambda w: {"t/head 0": (w["a"].T, w["b"].T)})


@pytest.mark.parametrize("metric", METRICS)
def test_ode_defaults_are_t1_64_steps_and_step_doubling(metric):
    """Spec §6.5: RK4 with n = 64 equal steps by default, doubled until two runs agree to
    ``tol = 1e-10`` relative to the speed; ``t = 1``; ``geodesic_2nd`` at ``t = 1``."""
    case, grp = make(case_tiny, metric)
    w = case.w
    s = 0.8 if metric == "inv" else 0.4  # 64 steps are ~1e-9 off, 128 steps ~1e-10
    xi = {"a": s * torch.tensor([[0.9, -1.4]], dtype=DT), "b": s * torch.tensor([[-1.1, 0.7]], dtype=DT)}
    r64 = rk4(case, metric, w, xi, 1.0, n=64)
    close(grp.geodesic_ode(w, xi, tol=None), r64, rtol=1e-13, atol=1e-14)
    r128 = rk4(case, metric, w, xi, 1.0, n=128)
    assert float(T.flatten(T.sub(r64, r128), ["a", "b"]).abs().max()) > 1e-9  # 64 steps are not enough
    close(grp.geodesic_ode(w, xi), r128, rtol=0, atol=3e-10)
    close(grp.geodesic_2nd(w, xi), {n: w[n] + xi[n] - 0.5 * g for n, g in ref_christoffel(case, metric, w, xi).items()})
    # the default vjp: the adjoint of that refined run (kept), and the same when computed afresh
    cot = {"a": torch.tensor([[0.3, -0.2]], dtype=DT), "b": torch.tensor([[0.5, 0.1]], dtype=DT)}
    v1 = grp.geodesic_vjp(w, xi, cot, order="exact")
    v2 = grp.geodesic_vjp(w, xi, cot, order="exact")  # twice in a row: the kept run was released
    close(v1, v2, rtol=1e-12, atol=1e-14)
    v64 = grp.geodesic_vjp(w, xi, cot, order="exact", n_steps=64, tol=None)
    assert float(T.flatten(T.sub(v1, v64), ["a", "b"]).abs().max()) > 1e-10


def test_gl_factors_on_their_own():
    """The base-point factors of ``gl_math.gl_factors`` (spec §4.1 batched solver): relaxed Gram
    matrices, inverses and square roots, and for the inverse metric the eigenbasis
    ``U diag(lam) U^{-1} = P Q`` with ``lam_sum = lam_i + lam_j``; a singular block is named by
    its index when no labels are given."""
    G, H = randn(3, 5, 2, seed=80), randn(3, 4, 2, seed=81)
    f = gl_factors(G, H, "inv", eps_rel=0.1, eps_abs=0.2)
    for i in range(3):
        P, Q = grams(G[i], H[i], 0.1, 0.2)
        close(f.P[i], P)
        close(f.Q[i], Q)
        close(f.P_inv[i], torch.linalg.inv(P))
        close(f.Q_inv[i], torch.linalg.inv(Q))
        close(f.P_half[i] @ f.P_half[i], P)
        close(f.Q_half[i] @ f.Q_half[i], Q)
        close(f.P_ihalf[i] @ P @ f.P_ihalf[i], torch.eye(2, dtype=DT))
        close(f.Q_ihalf[i] @ Q @ f.Q_ihalf[i], torch.eye(2, dtype=DT))
        lam = torch.linalg.eigvals(P @ Q).real.sort().values
        close(f.U[i] @ torch.diag(lam) @ f.U_inv[i], P @ Q)
        close(f.U_inv[i] @ f.U[i], torch.eye(2, dtype=DT))
        close(f.lam_sum[i], lam[:, None] + lam[None, :])
        close(f.P_half[i], f.P_half[i].T)
    f0 = gl_factors(G, H, "inv")  # defaults: no relaxation, with the eigenbasis
    close(f0.P, G.mT @ G)
    close(f0.Q, H.mT @ H)
    assert f0.U is not None and f0.lam_sum is not None
    f1 = gl_factors_from_grams(G.mT @ G, H.mT @ H, "inv")
    close(f1.P, G.mT @ G)
    close(f1.Q, H.mT @ H)
    close(f1.U @ torch.diag_embed(f1.lam_sum.diagonal(dim1=-2, dim2=-1) / 2) @ f1.U_inv, f1.P @ f1.Q)
    assert gl_factors(G, H, "inv", for_projection=False).U is None
    assert gl_factors(G, H, "mix").U is None and gl_factors(G, H, "mix").lam_sum is None
    G[1] = 0.0
    with pytest.raises(SingularHeadError, match=r"G \(W_Q / W_V side\) in block 1: the block is all zero"):
        gl_factors(G, H, "mix")
    with pytest.raises(SingularHeadError, match=r"in head B: the block is all zero"):
        gl_factors(G, H, "mix", labels=["head A", "head B", "head C"])


@pytest.mark.parametrize("case_fn", CASES)
def test_points_keep_the_weights_dtype_on_both_paths(case_fn):
    """``geodesic_2nd`` of float32 weights along a float64 tangent vector is a float32 point,
    written back into every layout (autograd path: extract / insert; fast path: views)."""
    case, grp = make(case_fn, "mix")
    w = case.w
    xi = T.scale(T.randn_like(w, gen(90)), 0.3)
    ref = {n: w[n] + 0.5 * xi[n] - 0.125 * g for n, g in ref_christoffel(case, "mix", w, xi).items()}
    w32 = {n: t.float() for n, t in w.items()}
    for ww in (w32, {n: t.clone().requires_grad_() for n, t in w32.items()}):
        out = grp.geodesic_2nd(ww, xi, 0.5)
        assert all(t.dtype == torch.float32 for t in out.values())
        close({n: t.detach().double() for n, t in out.items()}, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_gl_math_on_plain_float32_tensors_computes_in_float64_and_casts_back(metric):
    """gl_math's documented contract for plain tensors: promoted to float64, results cast back to
    the input dtype; the values are those of the float64 call (spec §4.1-§4.2, §6.2-6.3)."""
    G, H = randn(2, 5, 3, seed=91), randn(2, 4, 3, seed=92)
    xG, xH, cG, cH = randn(2, 5, 3, seed=93), randn(2, 4, 3, seed=94), randn(2, 5, 3, seed=95), randn(2, 4, 3, seed=96)
    A = randn(2, 3, 3, seed=97) + 3 * torch.eye(3, dtype=DT)
    f = gl_factors(G, H, metric)
    args64 = (G, H, xG, xH, cG, cH)
    args32 = tuple(t.float() for t in args64)
    calls = {
        "project": lambda G, H, xG, xH, cG, cH: glm.gl_project(metric, f, G, H, xG, xH),
        "christoffel": lambda G, H, xG, xH, cG, cH: glm.gl_christoffel(metric, f, G, H, xG, xH),
        "christoffel_vjp": lambda G, H, xG, xH, cG, cH: glm.gl_christoffel_vjp(metric, f, G, H, xG, xH, cG, cH),
        "rgrad": lambda G, H, xG, xH, cG, cH: glm.gl_rgrad(metric, f, xG, xH),
        "whiten": lambda G, H, xG, xH, cG, cH: glm.gl_whiten(metric, f, xG, xH),
        "vertical": lambda G, H, xG, xH, cG, cH: glm.gl_vertical(G, H, A),
        "action": lambda G, H, xG, xH, cG, cH: glm.gl_action(G, H, A),
    }
    for name, fn in calls.items():
        r64, r32 = fn(*args64), fn(*args32)
        assert [t.dtype for t in r64] == [DT, DT], name
        assert [t.dtype for t in r32] == [torch.float32, torch.float32], name
        for a, b in zip(r32, r64):
            close(a.double(), b, rtol=1e-4, atol=1e-4)
    v = glm.gl_inner(metric, f, *args32[2:])
    assert v.dtype == DT and v.shape == (2,)
    close(v, glm.gl_inner(metric, f, *args64[2:]), rtol=1e-5, atol=1e-5)
    # the spec formulas, per block
    P, Q = f.P, f.Q
    a, b = (torch.linalg.inv(P), torch.linalg.inv(Q)) if metric == "inv" else (Q, P)
    close(glm.gl_inner(metric, f, xG, xH, cG, cH),
          torch.einsum("bij,bji->b", a, xG.mT @ cG) + torch.einsum("bij,bji->b", b, xH.mT @ cH))
    rg = glm.gl_rgrad(metric, f, xG, xH)
    close(glm.gl_inner(metric, f, *rg, cG, cH), (xG * cG).sum((1, 2)) + (xH * cH).sum((1, 2)))
    wG, wH = glm.gl_whiten(metric, f, xG, xH)
    close(glm.gl_inner(metric, f, wG, wH, *glm.gl_whiten(metric, f, cG, cH)),
          (xG * cG).sum((1, 2)) + (xH * cH).sum((1, 2)))
    close(glm.gl_vertical(G, H, A)[0], -G @ A)
    close(glm.gl_vertical(G, H, A)[1], H @ A.mT)
    close(glm.gl_action(G, H, A)[0], G @ torch.linalg.inv(A))
    close(glm.gl_action(G, H, A)[1], H @ A.mT)

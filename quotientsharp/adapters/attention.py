"""GL blocks of attention layers in PyTorch layouts (spec part 1 §3.3).

Each builder returns the two :class:`~quotientsharp.groups.GLBlock` s (QK and VO) of one layer,
addressing parameters by their full names in ``model.named_parameters()``.
"""
from __future__ import annotations

from torch import nn

from ..groups.attention import GLBlock, Piece


class UnsupportedAttentionError(ValueError):
    """An attention layer whose symmetry quotientsharp cannot (yet) quotient exactly."""


def join_name(prefix: str, name: str) -> str:
    """``prefix.name`` (just ``name`` at the root, where the prefix is empty)."""
    return f"{prefix}.{name}" if prefix else name


def linear_attention_blocks(q: str, k: str, v: str, o: str, n_heads: int, head_dim: int,
                            q_bias: str | None = None, k_bias: str | None = None,
                            v_bias: str | None = None, label: str = "") -> tuple[GLBlock, GLBlock]:
    """Blocks of separate ``nn.Linear`` projections (weights ``(out, in)``), by parameter names.

    QK: ``G = [W_q^i; b_q^i]``, ``H = [W_k^i; b_k^i]``; VO: ``G = [W_v^i; b_v^i]``,
    ``H = W_o[:, r_i]``. This is the explicit override for any model with such projections."""
    if (q_bias is None) != (k_bias is None):
        raise UnsupportedAttentionError(
            f"{label or q}: query and key must both have biases or both have none; otherwise the "
            "bias-augmented QK block is not a GL(h) orbit")
    qk = GLBlock(G=(Piece(q, "rows"),) + ((Piece(q_bias, "bias"),) if q_bias else ()),
                 H=(Piece(k, "rows"),) + ((Piece(k_bias, "bias"),) if k_bias else ()),
                 n_heads=n_heads, head_dim=head_dim, label=f"{label}/qk")
    vo = GLBlock(G=(Piece(v, "rows"),) + ((Piece(v_bias, "bias"),) if v_bias else ()),
                 H=(Piece(o, "cols"),), n_heads=n_heads, head_dim=head_dim, label=f"{label}/vo")
    return qk, vo


def linear_modules_blocks(prefix_q: str, prefix_k: str, prefix_v: str, prefix_o: str,
                          mq: nn.Linear, mk: nn.Linear, mv: nn.Linear, n_heads: int, head_dim: int,
                          label: str) -> tuple[GLBlock, GLBlock]:
    """:func:`linear_attention_blocks` for ``nn.Linear`` modules at the given name prefixes."""
    def bias(prefix, m):
        return join_name(prefix, "bias") if m.bias is not None else None

    return linear_attention_blocks(
        join_name(prefix_q, "weight"), join_name(prefix_k, "weight"), join_name(prefix_v, "weight"),
        join_name(prefix_o, "weight"), n_heads, head_dim,
        bias(prefix_q, mq), bias(prefix_k, mk), bias(prefix_v, mv), label)


def mha_blocks(prefix: str, m: nn.MultiheadAttention) -> tuple[GLBlock, GLBlock]:
    """Blocks of ``nn.MultiheadAttention``: packed ``in_proj_weight`` (rows q | k | v) or separate
    ``q/k/v_proj_weight`` (``kdim``/``vdim`` != ``embed_dim``) with a packed ``in_proj_bias``."""
    if m.bias_k is not None or m.bias_v is not None:
        raise UnsupportedAttentionError(
            f"{prefix}: nn.MultiheadAttention with add_bias_kv=True appends learned key/value rows "
            "that break the per-head GL(h) symmetry; not supported")
    d, H = m.embed_dim, m.num_heads
    dh = d // H
    bias = join_name(prefix, "in_proj_bias") if m.in_proj_bias is not None else None
    if m._qkv_same_embed_dim:
        w = join_name(prefix, "in_proj_weight")
        src = [(w, 0), (w, d), (w, 2 * d)]
    else:
        src = [(join_name(prefix, f"{x}_proj_weight"), 0) for x in "qkv"]

    def factor(i):
        name, off = src[i]
        return (Piece(name, "rows", off),) + ((Piece(bias, "bias", i * d),) if bias else ())

    qk = GLBlock(G=factor(0), H=factor(1), n_heads=H, head_dim=dh, label=f"{prefix}/qk")
    vo = GLBlock(G=factor(2), H=(Piece(join_name(prefix, "out_proj.weight"), "cols"),),
                 n_heads=H, head_dim=dh, label=f"{prefix}/vo")
    return qk, vo


def conv1d_blocks(prefix_attn: str, prefix_proj: str, d: int, n_heads: int,
                  has_bias: bool = True) -> tuple[GLBlock, GLBlock]:
    """Blocks of GPT-2 style ``Conv1D`` (input-major) ``c_attn`` (``(d, 3d)``, columns q | k | v)
    and ``c_proj`` (``(d, d)``, ``H_O = c_proj.weight[r_i, :].T``)."""
    dh = d // n_heads
    w, b = join_name(prefix_attn, "weight"), join_name(prefix_attn, "bias")

    def factor(i):
        return (Piece(w, "cols", i * d),) + ((Piece(b, "bias", i * d),) if has_bias else ())

    qk = GLBlock(G=factor(0), H=factor(1), n_heads=n_heads, head_dim=dh, label=f"{prefix_attn}/qk")
    vo = GLBlock(G=factor(2), H=(Piece(join_name(prefix_proj, "weight"), "rows"),),
                 n_heads=n_heads, head_dim=dh, label=f"{prefix_attn}/vo")
    return qk, vo

"""Adapters for modern attention (spec part 6): grouped-query / multi-query heads, rotary
embeddings (full, partial; ``rotate_half`` or interleaved planes), QK-norm and fused QKV layouts.

A layer is recognised from its module structure and configuration: which projections it has
(``q_proj/k_proj/v_proj`` + ``o_proj|dense|out_proj``, fused ``qkv_proj``, ``query_key_value``,
``Wqkv``, ``qkv``, or T5's ``q/k/v/o``), their sizes (the KV group size ``r = n_q / n_kv``),
whether the config or module carries rotary embeddings (``rope_parameters``, ``rotary_ndims``,
``rotary_dim``; ALiBi instead of rotary keeps the full group), the plane layout of the rotary
helper the module's code uses (``rotate_half``: ``j <-> j + r_rot/2``; ``rotate_every_two``:
``2j <-> 2j+1``), and QK-norm children (``q_norm``/``k_norm``, ``q_layernorm``/``k_layernorm``),
per head or over the whole projection (OLMo-2). The result is a :class:`LayerSymmetry`: GL blocks
(with the rotary sub-algebra on QK when there is one) and, with QK-norm, scale blocks.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..groups.attention import GLBlock, Piece
from ..groups.residual import SubAlgebra
from ..groups.scaling import ScaleBlock
from .attention import UnsupportedAttentionError, join_name

NORM_PAIRS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_norm", "key_norm"))
OUTPUT_NAMES = ("o_proj", "dense", "out_proj")


@dataclass(frozen=True)
class Slot:
    """Where one projection's heads sit in the rows of an ``nn.Linear`` weight ``(out, in)``:
    the head of KV group ``g`` starts at row ``offset + g * stride``."""

    offset: int
    stride: int


@dataclass
class LayerSymmetry:
    """What one attention layer contributes: GL blocks (QK and VO, or VO only with QK-norm),
    scale blocks (QK-norm) and a one-line description."""

    name: str
    gl_blocks: list[GLBlock] = field(default_factory=list)
    scale_blocks: list[ScaleBlock] = field(default_factory=list)
    qk: str = ""
    vo: str = ""

    def describe(self) -> str:
        """One line: ``<layer>: QK: <group>; VO: <group>``."""
        return f"{self.name}: QK: {self.qk}; VO: {self.vo}"


def _groups_text(n: int, r: int) -> str:
    return f"{n} KV groups" if r > 1 else f"{n} heads"


def grouped_attention(name: str, q: tuple[str, str | None, Sequence[Slot]], k: tuple[str, str | None, Slot],
                      v: tuple[str, str | None, Slot], o: str, n_kv: int, head_dim: int,
                      rotary: SubAlgebra | None = None, qk_norm: str | None = None,
                      norm_note: str = "") -> LayerSymmetry:
    """Blocks of one attention layer with ``n_kv`` KV groups of ``r = len(q slots)`` query heads.

    Args:
        q: ``(weight, bias, slots)``: query head ``j`` of KV group ``g`` starts at row
            ``slots[j].offset + g * slots[j].stride`` of the weight (and index of the bias).
        k, v: ``(weight, bias, slot)`` of the key / value head of each group.
        o: output projection weight ``(d_out, n_q * h)``; query head ``g*r + j`` owns its columns
            ``(g*r + j) * h + [0, h)``.
        rotary: the QK sub-algebra (rotary commutant) or ``None`` (full ``gl(h)``).
        qk_norm: ``None``, ``"head"`` (one norm per head) or ``"projection"`` (one over all heads):
            QK gets per-head (per-projection) positive scales instead of a GL block.

    QK: ``G = [q heads of the group, stacked]``, ``H = key head`` (spec part 6 §2); VO:
    ``G = value head``, ``H = [output column slices of the group's query heads, stacked]``.
    """
    qw, qb, qslots = q
    kw, kb, kslot = k
    vw, vb, vslot = v
    r, h = len(qslots), head_dim

    def pieces(weight, bias, slot):
        return ((Piece(weight, "rows", slot.offset, slot.stride),)
                + ((Piece(bias, "bias", slot.offset, slot.stride),) if bias else ()))

    out = LayerSymmetry(name)
    vo_h = tuple(Piece(o, "cols", j * h, r * h) for j in range(r))
    out.gl_blocks.append(GLBlock(G=pieces(vw, vb, vslot), H=vo_h, n_heads=n_kv, head_dim=h, label=f"{name}/vo",
                                 kind=f"GL({h}) × {_groups_text(n_kv, r)} (dim {n_kv * h * h})"))
    out.vo = out.gl_blocks[-1].kind
    if qk_norm is None:
        if (qb is None) != (kb is None):
            raise UnsupportedAttentionError(
                f"{name}: query and key must both have biases or both have none; otherwise the "
                "bias-augmented QK block is not a GL(h) orbit")
        # all weight slots, then all bias slots: consecutive slots of one tensor are read as one run
        G = (tuple(Piece(qw, "rows", s.offset, s.stride) for s in qslots)
             + (tuple(Piece(qb, "bias", s.offset, s.stride) for s in qslots) if qb else ()))
        alg = rotary.describe() if rotary is not None else f"GL({h})"
        dim = n_kv * (rotary.dim if rotary is not None else h * h)
        kind = f"{alg} × {_groups_text(n_kv, r)} (" + (f"{r} query heads each; " if r > 1 else "") + f"dim {dim})"
        out.gl_blocks.insert(0, GLBlock(G=G, H=pieces(kw, kb, kslot), n_heads=n_kv, head_dim=h,
                                        label=f"{name}/qk", algebra=rotary, kind=kind))
        out.qk = kind
    elif qk_norm == "head":
        for j, s in enumerate(qslots):
            out.scale_blocks.append(ScaleBlock(pieces(qw, qb, s), n_kv, h, f"{name}/q{j}", "query head scale"))
        out.scale_blocks.append(ScaleBlock(pieces(kw, kb, kslot), n_kv, h, f"{name}/k", "key head scale"))
        out.qk = f"QK-norm: ℝ₊ per head ({n_kv * r} query + {n_kv} key scales; dim {n_kv * (r + 1)}){norm_note}"
    elif qk_norm == "projection":
        if any(s.stride != r * h or s.offset != j * h for j, s in enumerate(qslots)) or kslot.stride != h:
            raise UnsupportedAttentionError(f"{name}: projection-wide QK-norm on a fused/strided layout")
        n_q = n_kv * r
        out.scale_blocks.append(ScaleBlock(pieces(qw, qb, Slot(qslots[0].offset, n_q * h)), 1, n_q * h,
                                           f"{name}/q", "query projection scale"))
        out.scale_blocks.append(ScaleBlock(pieces(kw, kb, Slot(kslot.offset, n_kv * h)), 1, n_kv * h,
                                           f"{name}/k", "key projection scale"))
        out.qk = f"QK-norm over the projection: ℝ₊ for W_q, ℝ₊ for W_k (dim 2){norm_note}"
    else:
        raise ValueError(f"qk_norm must be None, 'head' or 'projection', got {qk_norm!r}")
    out.scale_blocks = [dataclasses.replace(b, kind=out.qk) for b in out.scale_blocks]
    return out


# ----------------------------------------------------------------------------- reading modules
def _cfg(m: nn.Module):
    return getattr(m, "config", None)


def _int_attr(m: nn.Module, *names: str) -> int | None:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    cfg = _cfg(m)
    for n in names:
        v = getattr(cfg, n, None) if cfg is not None else None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _rope_parameters(cfg) -> dict:
    rp = getattr(cfg, "rope_parameters", None) if cfg is not None else None
    if isinstance(rp, dict) and rp and all(isinstance(x, dict) for x in rp.values()):
        rp = next(iter(rp.values()))  # per-layer-type parameters (ModernBERT, Gemma-3): same layout
    return rp if isinstance(rp, dict) else {}


def _has_rotary(m: nn.Module) -> bool:
    cfg = _cfg(m)
    if cfg is not None and getattr(cfg, "alibi", False):
        return False  # ALiBi: an additive bias, full group (Falcon with alibi=True, BLOOM)
    if hasattr(m, "rotary_ndims") or hasattr(m, "rotary_dim") or hasattr(m, "rotary_emb"):
        return True
    if cfg is None:
        return False
    if getattr(cfg, "position_embedding_type", None) == "rotary":
        return True
    return bool(_rope_parameters(cfg)) or getattr(cfg, "rope_theta", None) is not None \
        or getattr(cfg, "rotary_dim", None) is not None


def _rotary_layout(name: str, m: nn.Module) -> str:
    """Plane layout from the rotary helper the module's code defines."""
    mod = sys.modules.get(type(m).__module__)
    half, two = hasattr(mod, "rotate_half"), hasattr(mod, "rotate_every_two")
    if half and not two:
        return "half"
    if two and not half:
        return "interleaved"
    raise UnsupportedAttentionError(
        f"{name}: rotary embeddings whose plane layout cannot be read from {type(m).__module__} "
        "(neither rotate_half nor rotate_every_two); pass blocks= with SubAlgebra.rotary(..., layout=...)")


def _rotary_algebra(name: str, m: nn.Module, h: int) -> SubAlgebra | None:
    if not _has_rotary(m):
        return None
    rot = getattr(m, "rotary_ndims", None)
    if rot is None and hasattr(m, "rotary_dim"):
        rot = m.rotary_dim or h
    if rot is None:
        cfg = _cfg(m)
        rp = _rope_parameters(cfg)
        factor = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
        rot = h if factor is None else int(h * float(factor))
    rot = min(int(rot), h)
    return SubAlgebra.rotary(h, rot, _rotary_layout(name, m))


def _qk_norm(name: str, m: nn.Module, n_q: int, n_kv: int, h: int) -> tuple[str | None, str]:
    """``(None | "head" | "projection", note)`` from the module's query/key norm children."""
    for qn, kn in NORM_PAIRS:
        a, b = getattr(m, qn, None), getattr(m, kn, None)
        if isinstance(a, nn.Module) and isinstance(b, nn.Module) and not isinstance(a, nn.Identity):
            wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
            na = wa.numel() if wa is not None else (list(getattr(a, "normalized_shape", [0]))[-1])
            nb = wb.numel() if wb is not None else (list(getattr(b, "normalized_shape", [0]))[-1])
            note = ""
            if isinstance(a, nn.LayerNorm) or getattr(a, "bias", None) is not None:
                note = " (LayerNorm: its mean-shift symmetry is not quotiented)"
            if na == h and nb == h:
                return "head", note
            if na == n_q * h and nb == n_kv * h:
                return "projection", note
            raise UnsupportedAttentionError(f"{name}: QK-norm of sizes ({na}, {nb}) matches neither the head "
                                            f"dim {h} nor the projections ({n_q * h}, {n_kv * h})")
    return None, ""


def _linear(m: nn.Module, attr: str) -> nn.Linear | None:
    x = getattr(m, attr, None)
    return x if isinstance(x, nn.Linear) else None


def _bias(prefix: str, lin: nn.Linear) -> str | None:
    return join_name(prefix, "bias") if lin.bias is not None else None


def _refuse_mla(name: str, m: nn.Module) -> None:
    if any(hasattr(m, a) for a in ("kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj")):
        raise UnsupportedAttentionError(
            f"{name}: multi-head latent attention (shared low-rank KV compression with decoupled rotary "
            "keys) has no per-head GL(h) orbit that quotientsharp can quotient; pass blocks= explicitly")


def _n_heads(name: str, m: nn.Module) -> int:
    n = _int_attr(m, "num_heads", "num_attention_heads", "n_heads", "n_head")
    if n is None:
        raise UnsupportedAttentionError(f"{name}: cannot tell the number of heads")
    return n


def _contiguous(n_kv: int, r: int, h: int, base: int = 0) -> list[Slot]:
    return [Slot(base + j * h, r * h) for j in range(r)]


def _assemble(name: str, m: nn.Module, n_q: int, n_kv: int, h: int, qw, qb, qslots, kw, kb, kslot,
              vw, vb, vslot, o: str) -> LayerSymmetry:
    if n_q % n_kv:
        raise UnsupportedAttentionError(f"{name}: {n_q} query heads do not split into {n_kv} KV groups")
    rotary = _rotary_algebra(name, m, h)
    qk_norm, note = _qk_norm(name, m, n_q, n_kv, h)
    return grouped_attention(name, (qw, qb, qslots), (kw, kb, kslot), (vw, vb, vslot), o, n_kv, h,
                             None if qk_norm else rotary, qk_norm, note)


# ----------------------------------------------------------------------------- recognisers
def split_projections(name: str, m: nn.Module) -> LayerSymmetry | None:
    """``q_proj/k_proj/v_proj`` + ``o_proj|dense|out_proj`` (Llama, Mistral, Qwen2/3, OLMo-2,
    Gemma 1-3, Phi, GPT-J, CLIP's ``out_proj``, ...). Returns ``None`` for a classic ``o_proj``
    layer without GQA, rotary or QK-norm (the part 1 adapter handles it)."""
    q, k, v = _linear(m, "q_proj"), _linear(m, "k_proj"), _linear(m, "v_proj")
    out_attr = next((a for a in OUTPUT_NAMES if _linear(m, a) is not None), None)
    if q is None or k is None or v is None or out_attr is None:
        return None
    n_q = _n_heads(name, m)
    h = _int_attr(m, "head_dim") or q.out_features // n_q
    if q.out_features != n_q * h or k.out_features % h or k.out_features != v.out_features:
        raise UnsupportedAttentionError(f"{name}: projection sizes q {q.out_features}, k {k.out_features}, "
                                        f"v {v.out_features} do not fit {n_q} heads of dim {h}")
    n_kv = k.out_features // h
    modern = n_kv != n_q or _has_rotary(m) or _qk_norm(name, m, n_q, n_kv, h)[0] is not None
    if not modern and out_attr == "o_proj":
        return None  # a classic layer the part 1 adapter reads (HF ViT-style q/k/v/o_proj)
    r = n_q // n_kv
    p = lambda a: join_name(name, a)  # noqa: E731
    return _assemble(name, m, n_q, n_kv, h, p("q_proj.weight"), _bias(p("q_proj"), q), _contiguous(n_kv, r, h),
                     p("k_proj.weight"), _bias(p("k_proj"), k), Slot(0, h),
                     p("v_proj.weight"), _bias(p("v_proj"), v), Slot(0, h), p(f"{out_attr}.weight"))


def fused_projections(name: str, m: nn.Module) -> LayerSymmetry | None:
    """Fused QKV: Phi-3 ``qkv_proj`` (q | k | v with GQA sizes), GPT-NeoX / BLOOM
    ``query_key_value`` (per head ``[q k v]``), Falcon ``query_key_value`` (multi-query: q heads,
    k, v; new architecture: per KV group ``[r q heads, k, v]``), ModernBERT ``Wqkv`` and timm
    ``qkv`` (``(3, heads, h)``)."""
    p = lambda a: join_name(name, a)  # noqa: E731
    if _linear(m, "qkv_proj") is not None and _linear(m, "o_proj") is not None:      # Phi-3
        lin = m.qkv_proj
        n_q = _n_heads(name, m)
        h = _int_attr(m, "head_dim") or lin.in_features // n_q
        n_kv = _int_attr(m, "num_key_value_heads") or n_q
        if lin.out_features != (n_q + 2 * n_kv) * h:
            raise UnsupportedAttentionError(f"{name}: qkv_proj has {lin.out_features} rows, not "
                                            f"({n_q} + 2*{n_kv}) * {h}")
        w, b = p("qkv_proj.weight"), _bias(p("qkv_proj"), lin)
        r = n_q // n_kv
        return _assemble(name, m, n_q, n_kv, h, w, b, _contiguous(n_kv, r, h), w, b, Slot(n_q * h, h),
                         w, b, Slot((n_q + n_kv) * h, h), p("o_proj.weight"))
    if _linear(m, "query_key_value") is not None and _linear(m, "dense") is not None:
        lin = m.query_key_value
        n_q = _n_heads(name, m)
        h = _int_attr(m, "head_dim", "head_size") or lin.in_features // n_q
        w, b = p("query_key_value.weight"), _bias(p("query_key_value"), lin)
        if getattr(m, "new_decoder_architecture", False):                              # Falcon 40B+
            n_kv = _int_attr(m, "num_kv_heads") or n_q
            r = n_q // n_kv
            st = (r + 2) * h
            return _assemble(name, m, n_q, n_kv, h, w, b, [Slot(j * h, st) for j in range(r)], w, b,
                             Slot(r * h, st), w, b, Slot((r + 1) * h, st), p("dense.weight"))
        if getattr(m, "multi_query", False):                                          # Falcon MQA
            return _assemble(name, m, n_q, 1, h, w, b, _contiguous(1, n_q, h), w, b, Slot(n_q * h, h),
                             w, b, Slot((n_q + 1) * h, h), p("dense.weight"))
        if lin.out_features != 3 * n_q * h:
            raise UnsupportedAttentionError(f"{name}: query_key_value of {lin.out_features} rows is not "
                                            f"3 x {n_q} heads x {h}")
        return _assemble(name, m, n_q, n_q, h, w, b, [Slot(0, 3 * h)], w, b, Slot(h, 3 * h),   # NeoX, BLOOM
                         w, b, Slot(2 * h, 3 * h), p("dense.weight"))
    for qkv, out in (("Wqkv", "Wo"), ("qkv", "proj")):                                  # ModernBERT, timm
        lin, o = _linear(m, qkv), _linear(m, out)
        if lin is None or o is None:
            continue
        n_q = _n_heads(name, m)
        h = _int_attr(m, "head_dim") or lin.out_features // (3 * n_q)
        if lin.out_features != 3 * n_q * h:
            raise UnsupportedAttentionError(f"{name}: {qkv} of {lin.out_features} rows is not 3 x {n_q} x {h}")
        if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedAttentionError(f"{name}: a norm between the attention output and {out} "
                                            "(timm scale_norm) breaks the VO symmetry")
        if getattr(m, "gate", None) is not None:
            raise UnsupportedAttentionError(f"{name}: a gated attention output breaks the VO symmetry")
        d = n_q * h
        w, b = p(f"{qkv}.weight"), _bias(p(qkv), lin)
        return _assemble(name, m, n_q, n_q, h, w, b, [Slot(0, h)], w, b, Slot(d, h), w, b, Slot(2 * d, h),
                         p(f"{out}.weight"))
    return None


def t5_attention(name: str, m: nn.Module) -> LayerSymmetry | None:
    """T5 ``q/k/v/o`` (no biases); the relative position bias is additive: full GL(h)."""
    if not all(_linear(m, a) is not None for a in "qkvo") or not hasattr(m, "key_value_proj_dim"):
        return None
    n, h = _n_heads(name, m), m.key_value_proj_dim
    p = lambda a: join_name(name, a)  # noqa: E731
    out = grouped_attention(name, (p("q.weight"), _bias(p("q"), m.q), [Slot(0, h)]),
                            (p("k.weight"), _bias(p("k"), m.k), Slot(0, h)),
                            (p("v.weight"), _bias(p("v"), m.v), Slot(0, h)), p("o.weight"), n, h)
    if getattr(m, "has_relative_attention_bias", False):
        out.qk = out.qk[:-1] + ", relative position bias: additive)"
        out.gl_blocks[0] = dataclasses.replace(out.gl_blocks[0], kind=out.qk)
    return out


RECOGNISERS = (split_projections, fused_projections, t5_attention)


def match(name: str, m: nn.Module) -> LayerSymmetry | None:
    """The :class:`LayerSymmetry` of module ``m`` at path ``name``, ``None`` if it is not a
    modern attention layer this module knows (raises :class:`UnsupportedAttentionError` with the
    reason for a layer it recognises but cannot quotient)."""
    _refuse_mla(name, m)
    for rec in RECOGNISERS:
        out = rec(name, m)
        if out is not None:
            return out
    return None

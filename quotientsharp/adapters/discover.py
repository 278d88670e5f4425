"""Find the symmetric blocks of a model by module type and build its :class:`Quotient`.

Recognised: quotientsharp's :class:`~quotientsharp.models.attention.MultiHeadSelfAttention`,
``nn.MultiheadAttention`` (hence ``nn.TransformerEncoderLayer``/``DecoderLayer``), HuggingFace
BERT-style (``self.query/key/value`` + ``output.dense``), ``q_proj/k_proj/v_proj/o_proj`` style
(HF ViT) and GPT-2 ``Conv1D`` attention, and the modern layers of
:mod:`quotientsharp.adapters.modern` (grouped/multi-query heads, rotary embeddings, QK-norm, fused
QKV: Llama, Mistral, Qwen2/3, OLMo-2, Gemma, Phi, Phi-3, GPT-NeoX, GPT-J, Falcon, ModernBERT, T5,
timm ``VisionTransformer``), each with its residual group (spec part 6). Layers whose symmetry
quotientsharp cannot quotient (``add_bias_kv``, BERT ``relative_key`` scores, multi-head latent
attention) are refused with :class:`UnsupportedAttentionError` saying why.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

from torch import nn

from ..groups.attention import AttentionGL, GLBlock
from ..groups.base import SymmetryGroup
from ..groups.joint import JointGroup
from ..groups.scaling import HeadScaling, ScaleBlock
from ..models.attention import MultiHeadSelfAttention
from ..quotient import Quotient
from . import modern
from .attention import UnsupportedAttentionError, conv1d_blocks, join_name, linear_modules_blocks, mha_blocks
from .modern import LayerSymmetry


def _config(m: nn.Module):
    return getattr(m, "config", None)


def _refuse_if_broken(name: str, m: nn.Module) -> None:
    cfg = _config(m)
    if any(hasattr(m, a) for a in ("q_norm", "k_norm", "query_norm", "key_norm")):
        raise UnsupportedAttentionError(
            f"{name}: QK-normalisation normalises each query/key, so only orthogonal head maps "
            "survive; the GL(h) quotient does not apply")
    if cfg is not None and (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None)
                            or getattr(cfg, "rotary_dim", None)):
        raise UnsupportedAttentionError(
            f"{name}: rotary position embeddings rotate queries and keys, so only rotation-commuting "
            "A survive on QK; the GL(h) quotient does not apply")
    pos = getattr(cfg, "position_embedding_type", "absolute") if cfg is not None else "absolute"
    if pos not in (None, "absolute"):
        raise UnsupportedAttentionError(
            f"{name}: position_embedding_type={pos!r} adds query-position scores that break the "
            "QK symmetry")


def _heads(m: nn.Module) -> int:
    for attr in ("num_attention_heads", "num_heads", "n_heads"):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    cfg = _config(m)
    if cfg is not None and isinstance(getattr(cfg, "num_attention_heads", None), int):
        return cfg.num_attention_heads
    raise UnsupportedAttentionError(f"{type(m).__name__}: cannot tell the number of heads")


def _classic(name: str, found: tuple[GLBlock, GLBlock]) -> LayerSymmetry:
    qk, vo = found
    def text(b):
        return f"GL({b.head_dim}) × {b.n_heads} heads (dim {b.n_heads * b.head_dim ** 2})"
    found = tuple(dataclasses.replace(b, kind=text(b)) for b in found)
    return LayerSymmetry(name, list(found), [], text(found[0]), text(found[1]))


def attention_layers(model: nn.Module) -> list[LayerSymmetry]:
    """The symmetry of every attention layer of ``model``, in module order: classic layers (part 1)
    and modern ones (GQA/MQA, rotary, QK-norm, fused QKV: :mod:`quotientsharp.adapters.modern`).
    Raises :class:`UnsupportedAttentionError` (with the reason) on layers it recognises but cannot
    quotient; warns, naming the module path, about attention-like modules it does not recognise
    (their parameters then get the rest metric)."""
    layers: list[LayerSymmetry] = []
    claimed: set[str] = set()
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        found = None
        layer = None
        if isinstance(m, MultiHeadSelfAttention):
            found = linear_modules_blocks(join_name(name, "q"), join_name(name, "k"), join_name(name, "v"), join_name(name, "o"),
                                          m.q, m.k, m.v, m.n_heads, m.head_dim, name)
        elif isinstance(m, nn.MultiheadAttention):
            found = mha_blocks(name, m)
        elif (layer := modern.match(name, m)) is not None:
            pass
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")):
            _refuse_if_broken(name, m)
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            out = modules.get(join_name(parent, "output.dense"))
            if not isinstance(out, nn.Linear):
                raise UnsupportedAttentionError(f"{name}: found query/key/value but no output projection "
                                                f"at {join_name(parent, 'output.dense')!r}")
            H = _heads(m)
            found = linear_modules_blocks(join_name(name, "query"), join_name(name, "key"), join_name(name, "value"),
                                          join_name(parent, "output.dense"), m.query, m.key, m.value,
                                          H, m.query.out_features // H, name)
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            # classic layers only: modern.match took those with GQA, rotary or QK-norm
            _refuse_if_broken(name, m)
            H = _heads(m)
            found = linear_modules_blocks(join_name(name, "q_proj"), join_name(name, "k_proj"), join_name(name, "v_proj"),
                                          join_name(name, "o_proj"), m.q_proj, m.k_proj, m.v_proj,
                                          H, m.q_proj.out_features // H, name)
        elif hasattr(m, "c_attn") and hasattr(m, "c_proj") and hasattr(getattr(m, "c_attn"), "weight"):
            if getattr(m, "is_cross_attention", False):
                raise UnsupportedAttentionError(f"{name}: GPT-2 cross-attention (q_attn) is not supported")
            _refuse_if_broken(name, m)
            d = m.c_attn.weight.shape[0]
            found = conv1d_blocks(join_name(name, "c_attn"), join_name(name, "c_proj"), d, _heads(m),
                                  m.c_attn.bias is not None)
        if found is not None:
            layer = _classic(name, found)
        if layer is not None:
            layers.append(layer)
            claimed.add(name)
    for name, m in modules.items():
        if _looks_like_attention(m) and not any(  # "" is the root, an ancestor of every module
                name == c or name.startswith(c + ".") or not name or c.startswith(name + ".") for c in claimed):
            if any(True for _ in m.parameters()):  # own parameters or projections as child modules
                warnings.warn(f"{name} ({type(m).__name__}) looks like attention but is not recognised; "
                              "its parameters get the rest metric. Pass its blocks explicitly "
                              "(quotientsharp.adapters.linear_attention_blocks) to quotient it.", stacklevel=3)
    return layers


def _looks_like_attention(m: nn.Module) -> bool:
    """An attention-named class, or a module with a fused ``qkv``/``query_key_value`` projection."""
    return "attention" in type(m).__name__.lower() or any(
        isinstance(getattr(m, a, None), nn.Module) for a in ("qkv", "qkv_proj", "query_key_value", "Wqkv"))


def attention_blocks(model: nn.Module) -> list[GLBlock]:
    """All GL blocks of the attention layers of ``model`` (see :func:`attention_layers`; the scale
    blocks of QK-norm layers are not GL blocks and are not listed here)."""
    return [b for layer in attention_layers(model) for b in layer.gl_blocks]


def find_symmetries(model: nn.Module, metric: str = "mix", rest: str = "adaptive", eps_rel: float = 0.0,
                    eps: float = 0.0, blocks: Sequence[GLBlock] | None = None,
                    extra_groups: Sequence[SymmetryGroup] = (), order: int | str = 2,
                    rest_order: int | str = 1) -> Quotient:
    """The :class:`Quotient` of ``model``: one :class:`AttentionGL` over every attention block
    found (or the explicit ``blocks``), ``extra_groups`` (e.g. :class:`DiagonalRescaling`), and the
    ``rest`` metric on every other trainable parameter. ``eps_rel``/``eps``: the Gram relaxation
    of :class:`AttentionGL` (default 0: exactly invariant; a dead head raises ``SingularHeadError``)."""
    scale_blocks: list[ScaleBlock] = []
    if blocks is None:
        layers = attention_layers(model)
        blocks = [b for layer in layers for b in layer.gl_blocks]
        scale_blocks = [b for layer in layers for b in layer.scale_blocks]
    else:
        blocks = list(blocks)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for b in blocks:
        for pc in b.G + b.H:
            if pc.name not in trainable:
                raise ValueError(f"{b.label}: parameter {pc.name!r} is not a trainable parameter of the model")
    for b in scale_blocks:
        for pc in b.pieces:
            if pc.name not in trainable:
                raise ValueError(f"{b.label}: parameter {pc.name!r} is not a trainable parameter of the model")
    groups: list[SymmetryGroup] = []
    gl_names = {pc.name for b in blocks for pc in b.G + b.H}
    if scale_blocks and gl_names & {pc.name for b in scale_blocks for pc in b.pieces}:
        # fused QKV with QK-norm: scales on the q/k rows, GL on the v rows of one tensor
        groups.append(JointGroup([AttentionGL(blocks, metric=metric, eps_rel=eps_rel, eps=eps, shares_tensors=True),
                                  HeadScaling(scale_blocks, shares_tensors=True)]))
    else:
        if blocks:
            groups.append(AttentionGL(blocks, metric=metric, eps_rel=eps_rel, eps=eps))
        if scale_blocks:
            groups.append(HeadScaling(scale_blocks))
    groups.extend(extra_groups)
    q = Quotient.from_model(model, groups, rest=rest, order=order, rest_order=rest_order)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for g in q.groups:
        g.validate(params)
    return q

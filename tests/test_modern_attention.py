"""Modern attention (spec part 6): residual groups of GQA/MQA, rotary, partial rotary and QK-norm,
their adapters, and the invariance of geodesic sharpness under them (float64, eps = 0).

The part 1 property suite runs on every layout through ``geometry_cases.modern_cases``; this
file adds what is specific to the residual groups."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as tr
from geometry_cases import _HF, DT, exact_layernorm_qk, exact_rmsnorm, modern_models

from quotientsharp import tangent as T
from quotientsharp.adapters import UnsupportedAttentionError, find_symmetries
from quotientsharp.functional import forward
from quotientsharp.groups.attention import AttentionGL
from quotientsharp.groups.residual import SubAlgebra
from quotientsharp.groups.scaling import HeadScaling
from quotientsharp.measures import adaptive_sharpness, geodesic_sharpness

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=40,
            attn_implementation="sdpa")


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _fn(model, x):
    params = _params(model)
    return lambda p: forward(model, {**params, **p}, x)


def _quiet_find(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_symmetries(model, **kw)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    m = exact_rmsnorm(_HF(tr.LlamaModel(tr.LlamaConfig(num_key_value_heads=2, **TINY)))).to(DT).eval()
    return m, torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- groups
def test_llama_quotient_is_rotary_per_kv_group_and_gl_on_vo(llama):
    m, _ = llama
    q = _quiet_find(m)
    lines = q.summary().splitlines()
    assert lines[0] == ("m.layers.0.self_attn: QK: rotary ℂ*^4 [half] × 2 KV groups (2 query heads each; dim 16); "
                        "VO: GL(8) × 2 KV groups (dim 128)")
    assert len([ln for ln in lines if "self_attn" in ln]) == 2
    G = q.groups[0]
    w = {n: p for n, p in _params(m).items() if n in G.names}
    # group dimension per layer: QK 2 groups x h = 8 (rotary), VO 2 groups x h^2 = 64
    assert G.kernel_dimension(w) == 2 * (2 * 8 + 2 * 64)


def _full_gl(G: AttentionGL) -> AttentionGL:
    return AttentionGL([dataclasses.replace(b, algebra=None) for b in G.blocks], G.metric)


def test_full_gl_on_qk_breaks_rotary_and_gqa_models(llama):
    m, ids = llama
    fn = _fn(m, ids)
    G = _quiet_find(m).groups[0]
    w = {n: p for n, p in _params(m).items() if n in G.names}
    ok, why = G.check_function_invariance(fn, w, G.random_element(w, generator=torch.Generator().manual_seed(1),
                                                                  max_cond=1e3), rtol=1e-10)
    assert ok, why
    full = _full_gl(G)  # a full GL(h) per KV group on QK: rotary breaks it
    g = full.random_element(w, generator=torch.Generator().manual_seed(1), max_cond=10.0)
    assert _rel(fn({**w, **full.action(w, g)}), fn(w)) > 1e-3
    # GQA: the query heads of a KV group must share its element; giving the second query head of
    # every group another rotary element (keys transformed by the first) breaks the function
    from quotientsharp.groups.attention import extract_pieces, insert_pieces
    g = G.random_element(w, generator=torch.Generator().manual_seed(1), max_cond=10.0)
    other = G.random_element(w, generator=torch.Generator().manual_seed(2), max_cond=10.0)
    moved = G.action(w, g)
    for s, stack in enumerate(G.stacks):
        for i in stack:
            b = G.blocks[i]
            if b.algebra is None:
                continue
            slot1 = (b.G[1],)  # query head 1 of every KV group
            X = extract_pieces(w, slot1, b.n_heads, b.head_dim)
            insert_pieces(moved, slot1, X @ torch.linalg.inv(other[s][:b.n_heads]), b.n_heads, b.head_dim)
    assert _rel(fn({**w, **moved}), fn(w)) > 1e-3


def _gptj_two_planes():
    """GPT-J, head dim 8, rotary_dim 4: interleaved planes (0,1), (2,3); ``half`` would pair (0,2), (1,3)."""
    torch.manual_seed(0)
    m = _HF(tr.GPTJModel(tr.GPTJConfig(n_embd=16, n_layer=1, n_head=2, rotary_dim=4, vocab_size=20, n_positions=16,
                                       attn_implementation="sdpa")))
    return m, torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_id,wrong", [("llama-gqa", "interleaved"), ("gptj-interleaved", "half")])
def test_wrong_plane_pairing_breaks_invariance(model_id, wrong):
    m, x = modern_models(0)[model_id] if model_id == "llama-gqa" else _gptj_two_planes()
    m = m.to(DT).eval()
    fn = _fn(m, x)
    G = _quiet_find(m).groups[0]
    w = {n: p for n, p in _params(m).items() if n in G.names}
    right = [b.algebra for b in G.blocks if b.algebra is not None][0]
    swapped = SubAlgebra.rotary(right.head_dim, 2 * len(right.planes), wrong)
    bad = AttentionGL([dataclasses.replace(b, algebra=swapped) if b.algebra else b for b in G.blocks], G.metric)
    for grp, broken in ((G, False), (bad, True)):
        g = grp.random_element(w, generator=torch.Generator().manual_seed(3), max_cond=10.0)
        err = _rel(fn({**w, **grp.action(w, g)}), fn(w))
        assert (err > 1e-6) if broken else (err < 1e-10), (model_id, broken, err)


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_generic_subalgebra_projection_equals_closed_form_for_full_gl(llama, metric):
    m, _ = llama
    G = _full_gl(_quiet_find(m, metric=metric).groups[0])
    w = {n: p for n, p in _params(m).items() if n in G.names}
    xi = T.randn_like(w, torch.Generator().manual_seed(4))
    closed = G.horizontal_projection(w, xi)
    for alg in (SubAlgebra.full(8),  # gl(S) with S = all coordinates: generalised Sylvester
                SubAlgebra.from_basis(torch.eye(64, dtype=DT).reshape(64, 8, 8))):  # the k x k solve, k = h^2
        generic = AttentionGL([dataclasses.replace(b, algebra=alg) for b in G.blocks], metric)
        d = T.sub(generic.horizontal_projection(w, xi), closed)
        assert float(torch.sqrt(T.dot(d, d) / T.dot(closed, closed))) < 1e-10, alg.describe()


def test_rotary_projection_is_metric_orthogonal_to_the_rotary_vertical_space_only(llama):
    m, _ = llama
    G = _quiet_find(m, metric="inv").groups[0]
    w = {n: p for n, p in _params(m).items() if n in G.names}
    p = G.horizontal_projection(w, T.randn_like(w, torch.Generator().manual_seed(5)))
    assert float(G.is_horizontal(w, p)) < 1e-10
    assert float(_full_gl(G).is_horizontal(w, p)) > 1e-3  # not horizontal for the (wrong) full group


# ----------------------------------------------------------------------------- QK-norm
def _qwen3(eps):
    """Tiny Qwen3; q/k projections scaled x30 so that ``rms(q)^2`` is O(1), not O(1e-4) as at
    init, and the ``eps / rms^2`` error of the scale symmetry is meaningful."""
    torch.manual_seed(1)
    cfg = tr.Qwen3Config(num_key_value_heads=2, head_dim=8, rms_norm_eps=eps, **TINY)
    m = _HF(tr.Qwen3Model(cfg)).to(DT).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(30.0)
    return m


def test_qwen3_quotient_scales_qk_and_gl_on_vo():
    m = _qwen3(1e-6)
    q = _quiet_find(m)
    assert [type(g) for g in q.groups] == [AttentionGL, HeadScaling]
    assert q.summary().splitlines()[0] == ("m.layers.0.self_attn: QK: QK-norm: ℝ₊ per head (4 query + 2 key scales; "
                                           "dim 6); VO: GL(8) × 2 KV groups (dim 128)")


def test_full_gl_on_qk_breaks_a_qk_norm_model_while_head_scales_keep_it():
    m = exact_rmsnorm(_qwen3(1e-30))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    fn = _fn(m, ids)
    S = _quiet_find(m).groups[1]
    w = {n: p for n, p in _params(m).items() if n in S.names}
    g = S.random_element(w, generator=torch.Generator().manual_seed(2), max_cond=1e3)
    assert _rel(fn(S.action(w, g)), fn(w)) < 1e-10
    # the GQA GL(h) per KV group on (query heads, key head) -- the group without QK-norm
    from quotientsharp.groups.attention import GLBlock
    blocks = []
    for layer in ("m.layers.0.self_attn", "m.layers.1.self_attn"):
        qs = [b for b in S.blocks if b.label.startswith(layer + "/q")]
        k = [b for b in S.blocks if b.label == layer + "/k"][0]
        blocks.append(GLBlock(G=tuple(pc for b in qs for pc in b.pieces), H=k.pieces, n_heads=2, head_dim=8))
    full = AttentionGL(blocks, "inv")
    A = full.random_element(w, generator=torch.Generator().manual_seed(3), max_cond=10.0)
    assert _rel(fn({**w, **full.action(w, A)}), fn(w)) > 1e-3


def test_qk_norm_invariance_with_hf_float32_rmsnorm_within_its_tolerance():
    """HF computes RMSNorm in float32 with eps > 0: the scales are a symmetry up to
    ``eps / rms^2`` and float32 rounding (spec §4, §7); a rotary element on QK breaks it."""
    eps = 1e-6
    m = _qwen3(eps)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    fn = _fn(m, ids)
    q = _quiet_find(m)
    S = q.groups[1]
    w = {n: p for n, p in _params(m).items() if n in S.names}
    rms2 = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: rms2.append(inp[0].pow(2).mean(-1).min()))
             for n, mod in m.named_modules() if n.endswith(("q_norm", "k_norm"))]
    fn(w)
    for h in hooks:
        h.remove()
    g = S.random_element(w, generator=torch.Generator().manual_seed(6), max_cond=10.0)
    scale_lo = float(torch.cat(g).min())
    tol = 64 * 2.0 ** -24 + 10 * eps / (float(min(rms2)) * scale_lo ** 2)
    assert tol < 1e-3
    err = _rel(fn({**w, **S.action(w, g)}), fn(w))
    assert err <= tol, (err, tol)
    assert err > 0  # float32 inside HF: not exact
    # a rotary (complex-scalar) element on the query heads is not a symmetry under QK-norm
    from quotientsharp.groups.attention import extract_pieces, insert_pieces
    b = [b for b in S.blocks if b.label.endswith("/q0")][0]
    A = SubAlgebra.rotary(8).random_element(b.n_heads, torch.Generator().manual_seed(7), 10.0)
    moved = dict(w)
    insert_pieces(moved, b.pieces, extract_pieces(w, b.pieces, b.n_heads, 8) @ A, b.n_heads, 8)
    assert _rel(fn(moved), fn(w)) > 10 * tol


def test_head_scaling_geodesic_is_a_great_circle():
    m = exact_rmsnorm(_qwen3(1e-30))
    S = _quiet_find(m).groups[1]
    w = {n: p for n, p in _params(m).items() if n in S.names}
    xi = S.horizontal_projection(w, T.randn_like(w, torch.Generator().manual_seed(8)))
    xi = T.scale(xi, 0.5 / S.norm(w, xi))
    end = S.geodesic(w, xi, order="exact")
    for W0, W1 in zip(S.extract(w), S.extract(end)):
        assert torch.allclose(W1.norm(dim=(1, 2)), W0.norm(dim=(1, 2)), rtol=1e-12)  # constant norm
    ode = S.geodesic(w, xi, order="ode", n_steps=256, tol=None)
    d = T.sub(end, ode)
    assert float(torch.sqrt(T.dot(d, d) / T.dot(end, end))) < 1e-10


# ----------------------------------------------------------------------------- adapters
def _summary(model):
    return _quiet_find(model).summary()


def test_adapters_read_layouts_from_structure_and_config():
    torch.manual_seed(0)
    s = _summary(tr.Olmo2Model(tr.Olmo2Config(num_key_value_heads=2, **TINY)))
    assert "QK: QK-norm over the projection: ℝ₊ for W_q, ℝ₊ for W_k (dim 2)" in s
    assert "VO: GL(8) × 2 KV groups (dim 128)" in s
    s = _summary(tr.Gemma2Model(tr.Gemma2Config(num_key_value_heads=2, head_dim=8,
                                                **dict(TINY, attn_implementation="eager"))))
    assert "QK: rotary ℂ*^4 [half] × 2 KV groups" in s  # soft-capping keeps the group
    s = _summary(tr.PhiModel(tr.PhiConfig(partial_rotary_factor=0.5, **TINY)))
    assert "QK: rotary ℂ*^2 ⊕ GL(4) [half] × 4 heads (dim 80)" in s  # 4 x (2*2 + 4^2)
    s = _summary(tr.GPTJModel(tr.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=40)))
    assert "QK: rotary ℂ*^2 ⊕ GL(4) [interleaved] × 4 heads" in s
    s = _summary(tr.FalconModel(tr.FalconConfig(multi_query=True, new_decoder_architecture=False, **TINY)))
    assert "QK: rotary ℂ*^4 [half] × 1 KV groups (4 query heads each; dim 8)" in s
    s = _summary(tr.FalconModel(tr.FalconConfig(alibi=True, multi_query=False, new_decoder_architecture=False,
                                                **TINY)))
    assert "QK: GL(8) × 4 heads (dim 256)" in s  # ALiBi is additive: full group
    s = _summary(tr.ModernBertModel(tr.ModernBertConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                        cls_token_id=1, sep_token_id=2, **TINY)))
    assert "QK: rotary ℂ*^4 [half] × 4 heads" in s
    s = _summary(tr.T5Model(tr.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=1, d_ff=64, vocab_size=40)))
    assert s.count("QK: GL(8) × 4 heads (dim 256, relative position bias: additive)") == 2  # enc. and dec. self-attn
    assert "EncDecAttention: QK: GL(8) × 4 heads (dim 256)" in s
    s = _summary(tr.CLIPTextModel(tr.CLIPTextConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, vocab_size=40, max_position_embeddings=10)))
    assert s.splitlines()[0] == "encoder.layers.0.self_attn: QK: GL(8) × 2 heads (dim 128); VO: GL(8) × 2 heads (dim 128)"


def _more_models():
    eager = dict(TINY, attn_implementation="eager")
    return {
        "mistral": lambda: tr.MistralModel(tr.MistralConfig(num_key_value_heads=2, **TINY)),
        "olmo2": lambda: tr.Olmo2Model(tr.Olmo2Config(num_key_value_heads=2, rms_norm_eps=1e-30, **TINY)),
        "gemma2": lambda: tr.Gemma2Model(tr.Gemma2Config(num_key_value_heads=2, head_dim=8, **eager)),
        "gemma3": lambda: tr.Gemma3TextModel(tr.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-30,
                                                                 **eager)),
        "phi": lambda: tr.PhiModel(tr.PhiConfig(partial_rotary_factor=0.5, **TINY)),
        "falcon-gqa": lambda: tr.FalconModel(tr.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **TINY)),
        "modernbert": lambda: tr.ModernBertModel(tr.ModernBertConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                                     cls_token_id=1, sep_token_id=2, **TINY)),
    }


@pytest.mark.parametrize("name", list(_more_models()))
def test_more_architectures_keep_their_output_under_the_residual_group(name):
    """Function invariance at cond(A) = 1e3 on more layouts, with HF's own norms (float32 inside:
    the tolerance is float32's, 1e-5); a full GL(h) on QK (where QK has a sub-algebra) breaks it."""
    torch.manual_seed(0)
    m = _HF(_more_models()[name]()).to(DT).eval()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    fn = _fn(m, ids)
    q = _quiet_find(m)
    w = _params(m)
    moved = q.action(w, q.random_element(w, generator=torch.Generator().manual_seed(1), max_cond=1e3))
    assert _rel(fn(moved), fn(w)) < 1e-5
    G = q.groups[0]
    if any(b.algebra is not None for b in G.blocks):
        full = _full_gl(G)
        wg = {n: w[n] for n in G.names}
        g = full.random_element(wg, generator=torch.Generator().manual_seed(1), max_cond=100.0)
        assert _rel(fn({**w, **full.action(wg, g)}), fn(w)) > 1e-4  # 10x the tolerance above


def test_mla_and_bert_relative_key_stay_refused():
    with pytest.raises(UnsupportedAttentionError, match="multi-head latent attention"):
        find_symmetries(tr.DeepseekV3Model(tr.DeepseekV3Config(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, moe_intermediate_size=16,
            vocab_size=40, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
            n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1)))
    with pytest.raises(UnsupportedAttentionError, match="relative_key"):
        find_symmetries(tr.BertModel(tr.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=16, vocab_size=20,
                                                   position_embedding_type="relative_key")))


def test_timm_vit_fused_qkv_with_layerscale_and_qk_norm():
    from timm.models.vision_transformer import VisionTransformer
    kw = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2, init_values=0.1)
    s = _summary(VisionTransformer(**kw))
    assert s.splitlines()[0] == "blocks.0.attn: QK: GL(8) × 2 heads (dim 128); VO: GL(8) × 2 heads (dim 128)"
    q = _quiet_find(VisionTransformer(qk_norm=True, **kw))
    assert [type(g).__name__ for g in q.groups] == ["JointGroup"]  # scales and GL share the fused qkv weight
    assert q.summary().splitlines()[0].startswith("blocks.0.attn: QK: QK-norm: ℝ₊ per head (2 query + 2 key scales; dim 4)")
    assert q.summary().splitlines()[0].endswith("; VO: GL(8) × 2 heads (dim 128)")
    from timm.models.vision_transformer import Attention
    with pytest.raises(UnsupportedAttentionError, match="scale_norm"):  # a norm between V and O
        find_symmetries(torch.nn.Sequential(Attention(16, 2, scale_norm=True, norm_layer=torch.nn.LayerNorm)))


def test_unrecognised_attention_with_child_projections_warns_naming_the_path():
    class OddAttention(torch.nn.Module):  # projections as child modules, names nobody knows
        def __init__(self):
            super().__init__()
            self.to_qkv = torch.nn.Linear(8, 24)
            self.to_out = torch.nn.Linear(8, 8)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.ModuleDict({"attn": OddAttention()})

    with pytest.warns(UserWarning, match=r"block\.attn \(OddAttention\) looks like attention"):
        find_symmetries(Net())


# ----------------------------------------------------------------------------- sharpness
def _lm_setup(kind):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    if kind == "timm":
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2,
                                  num_heads=2, qkv_bias=True, qk_norm=True, init_values=0.5)
        model = exact_layernorm_qk(model).to(DT).eval()
        x = torch.randn(8, 1, 8, 8, generator=g, dtype=DT)
        return model, [(x, torch.randint(0, 3, (8,), generator=g))], F.cross_entropy
    cfg = dict(TINY, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32)
    if kind == "llama":
        model = tr.LlamaForCausalLM(tr.LlamaConfig(**cfg))
    else:
        model = tr.Qwen3ForCausalLM(tr.Qwen3Config(head_dim=4, rms_norm_eps=1e-30, **cfg))
    model = exact_rmsnorm(model).to(DT).eval()
    ids = torch.randint(0, 40, (4, 6), generator=g)

    def loss(logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return model, [(ids, torch.roll(ids, -1, 1))], loss


@pytest.mark.parametrize("kind", ["llama", "qwen3", "timm"])
def test_geodesic_sharpness_invariant_under_residual_group_adaptive_moves(kind):
    model, batches, loss = _lm_setup(kind)
    q = _quiet_find(model)
    w = _params(model)
    moved_w = q.action(w, q.random_element(w, generator=torch.Generator().manual_seed(9), max_cond=30.0))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.copy_(moved_w[n])
    if kind != "timm":
        exact_rmsnorm(moved)
    x = batches[0][0]
    assert _rel(forward(moved, _params(moved), x), forward(model, w, x)) < 1e-10
    kw = dict(rho=0.05, progress=False)
    s0 = geodesic_sharpness(model, batches, loss, quotient=q, **kw).value
    s1 = geodesic_sharpness(moved, batches, loss, quotient=_quiet_find(moved), **kw).value
    assert s0 > 0
    assert abs(s1 - s0) <= 1e-9 * s0, (s0, s1)
    a0 = adaptive_sharpness(model, batches, loss, **kw).value
    a1 = adaptive_sharpness(moved, batches, loss, **kw).value
    assert abs(a1 - a0) >= 0.1 * a0, (a0, a1)


@pytest.mark.parametrize("order", [1, 2])
def test_joint_group_geodesic_vjp_matches_autograd(order):
    """The product group over a fused qkv (timm QK-norm): each part moves only its own slices."""
    m, x = modern_models(0)["timm-vit-qknorm"]
    G = _quiet_find(m.to(DT)).groups[0]
    w = {n: p for n, p in _params(m).items() if n in G.names}
    gen = torch.Generator().manual_seed(10)
    xi = T.scale(G.horizontal_projection(w, T.randn_like(w, gen)), 0.05)
    c = T.randn_like(w, gen)
    leaf = {n: t.clone().requires_grad_(True) for n, t in xi.items()}
    end = G.geodesic(w, leaf, order=order)
    ref = torch.autograd.grad(sum((end[n] * c[n]).sum() for n in G.names), [leaf[n] for n in G.names])
    got = G.geodesic_vjp(w, xi, c, order=order)
    for n, r in zip(G.names, ref):
        assert torch.allclose(got[n], r, rtol=1e-10, atol=1e-12), n
    if order == 1:  # the first-order step is w + xi on every slice, once
        d = T.sub(G.geodesic(w, xi, order=1), T.add(w, xi))
        assert float(torch.sqrt(T.dot(d, d))) < 1e-14


def test_partial_rotary_schur_complement_is_independent_of_chunking():
    """The k1 x k1 Schur complement of partial rotary is assembled a few basis elements at a
    time (memory cap); one element per chunk gives the same factor as all at once."""
    from quotientsharp.groups import gl_math as M
    from quotientsharp.groups.residual import subalgebra_factors
    g = torch.Generator().manual_seed(0)
    G, H = torch.randn(3, 9, 8, generator=g, dtype=DT), torch.randn(3, 11, 8, generator=g, dtype=DT)
    alg = SubAlgebra.rotary(8, 4)
    for metric in ("inv", "mix"):
        f = M.gl_factors(G, H, metric, 0.0, 0.0)
        one = subalgebra_factors(metric, f, G, H, alg, chunk_bytes=1)
        allin = subalgebra_factors(metric, f, G, H, alg)
        assert torch.allclose(one.chol, allin.chol, rtol=1e-13, atol=0)

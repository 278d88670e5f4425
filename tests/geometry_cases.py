"""Test cases for the generic geometry property suite: every built-in group, every adapter and a
user-defined group, each with its parameters, a model function and a loss (float64)."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quotientsharp import DiagonalRescaling, Euclidean, PositiveRescaling, SymmetryGroup
from quotientsharp.adapters import find_symmetries
from quotientsharp.functional import forward
from quotientsharp.models.attention import MultiHeadSelfAttention

DT = torch.float64


class LogPair(SymmetryGroup):
    """``(u, v) -> (a u, v / a)`` with the log metric ``sum xi_u^2/u^2 + xi_v^2/v^2``: only the four
    required methods, so every other method is the generic default. Geodesics in closed form:
    ``x(t) = x e^{xi t / x}`` per coordinate (``x'' = x'^2 / x``, so ``Gamma(v, v) = -v^2 / x``)."""

    def __init__(self):
        super().__init__(("u", "v"))

    def action(self, w, g):
        return {"u": w["u"] * g, "v": w["v"] / g}

    def vertical(self, w, omega):
        return {"u": omega * w["u"], "v": -omega * w["v"]}

    def algebra_zeros(self, w):
        return torch.zeros_like(w["u"])

    def inner(self, w, xi, zeta):
        return (xi["u"] * zeta["u"] / w["u"] ** 2).sum() + (xi["v"] * zeta["v"] / w["v"] ** 2).sum()


class LogPairClosedGamma(LogPair):
    """:class:`LogPair` with its closed-form ``Gamma(v, v) = -v^2 / x`` (the generic autodiff one is
    checked against it in ``test_generic_geodesic_ode_rhs...``; this one keeps RK4 runs cheap)."""

    def christoffel(self, w, xi):
        return {n: -xi[n] ** 2 / w[n] for n in self.names}


def log_pair_point(seed: int = 0):
    """A point of :class:`LogPair` (``u`` in [0.5, 1.5), ``v`` in (-1.5, -0.5]) and a tangent of size ~0.3."""
    g = torch.Generator().manual_seed(seed)
    w = {"u": 0.5 + torch.rand(3, generator=g, dtype=DT), "v": -(0.5 + torch.rand(3, generator=g, dtype=DT))}
    xi = {"u": 0.3 * torch.randn(3, generator=g, dtype=DT), "v": 0.3 * torch.randn(3, generator=g, dtype=DT)}
    return w, xi


def log_geodesic(w, xi, t=1.0):
    """``w e^{xi t / w}`` per coordinate: the geodesic of :class:`LogPair`."""
    return {n: w[n] * torch.exp(xi[n] * t / w[n]) for n in w}


class LayerRescaling(SymmetryGroup):
    """A user-defined group, written as a user would: ``(W1, W2) -> (a W1, W2 / a)``, ``a > 0``,
    the whole-layer rescaling of a bias-free ReLU net ``W2 relu(W1 x)``, with the invariant metric
    ``<eta, zeta> = <eta1, zeta1>/|W1|^2 + <eta2, zeta2>/|W2|^2``. Only the four required methods and
    ``random_element``; projection, gradient, Christoffel term and geodesics come from the base."""

    def __init__(self, first: str, second: str):
        super().__init__((first, second))
        self.first, self.second = first, second

    def action(self, w, a):
        return {self.first: a * w[self.first], self.second: w[self.second] / a}

    def random_element(self, w, scale=1.0, generator=None):
        return torch.exp(scale * torch.randn((), generator=generator, dtype=DT))

    def algebra_zeros(self, w):
        return torch.zeros(1, dtype=w[self.first].dtype)

    def vertical(self, w, omega):
        return {self.first: omega[0] * w[self.first], self.second: -omega[0] * w[self.second]}

    def inner(self, w, xi, zeta):
        a, b = self.first, self.second
        return (xi[a] * zeta[a]).sum() / w[a].pow(2).sum() + (xi[b] * zeta[b]).sum() / w[b].pow(2).sum()


@dataclass
class Case:
    id: str
    group: SymmetryGroup
    params: dict                     # the full parameter dict of the model
    model_fn: Callable | None        # params -> outputs (None: no network)
    loss_fn: Callable | None         # params -> scalar loss
    oracle: bool = True              # small enough for the dense generic defaults
    exact_geodesic: bool = False     # geodesic_exact is a closed form to compare with RK4
    tags: set = field(default_factory=set)

    @property
    def w(self):
        return {n: self.params[n] for n in self.group.names}


def _model_problem(model, x, metric):
    """``(quotient, params, model_fn, loss_fn)`` of ``model`` in float64 at input ``x``: the found
    quotient (eps = 0) and a squared-error loss against a random target."""
    model = model.to(DT).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = find_symmetries(model, metric=metric, eps_rel=0.0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        target = torch.randn_like(forward(model, params, x))

    def model_fn(p):
        return forward(model, {**params, **p}, x)

    def loss_fn(p):
        return ((model_fn(p) - target) ** 2).mean()

    return q, params, model_fn, loss_fn


def _model_case(cid, model, x, metric, oracle=True, tags=()):
    q, params, model_fn, loss_fn = _model_problem(model, x, metric)
    return Case(cid, q.groups[0], params, model_fn, loss_fn, oracle=oracle, tags=set(tags) | {"attention"})


class PooledAttention(nn.Module):
    """One :class:`MultiHeadSelfAttention` layer of ``width`` and ``heads``, mean-pooled over tokens."""

    def __init__(self, width: int = 8, heads: int = 2):
        super().__init__()
        self.att = MultiHeadSelfAttention(width, heads)

    def forward(self, x):
        return self.att(x).mean(1)


class _MHA(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(batch_first=True, **kw)

    def forward(self, x):
        kd = self.mha.kdim
        vd = self.mha.vdim
        return self.mha(x, x[..., :kd], x[..., :vd], need_weights=False)[0]


class _HF(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x).last_hidden_state


def _randomize_biases(model, gen):
    """Random biases on the scale of the model's weights (zero biases would hide bias bugs)."""
    scale = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                       if n.endswith("weight") and p.ndim == 2]).std()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def attention_cases(metric: str, seed: int = 0) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    cases = [
        _model_case(f"qs-d8h2-{metric}", _randomize_biases(MultiHeadSelfAttention(8, 2), g), x(3, 5, 8), metric,
                    tags={"bias"}),
        _model_case(f"qs-h1-{metric}", _randomize_biases(MultiHeadSelfAttention(3, 3), g), x(3, 4, 3), metric,
                    tags={"h1"}),
        _model_case(f"qs-nobias-d6h3-{metric}", MultiHeadSelfAttention(6, 3, bias=False), x(3, 5, 6), metric),
        _model_case(f"mha-packed-{metric}", _randomize_biases(_MHA(embed_dim=8, num_heads=2), g), x(3, 5, 8), metric),
        _model_case(f"mha-kvdim-{metric}", _randomize_biases(_MHA(embed_dim=6, num_heads=2, kdim=5, vdim=4), g),
                    x(3, 5, 6), metric),
        _model_case(f"encoder-layer-{metric}",
                    nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), x(3, 5, 8), metric),
    ]
    try:
        from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, ViTConfig, ViTModel
    except ImportError:
        return cases
    tiny = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    bert = BertModel(BertConfig(vocab_size=20, max_position_embeddings=8, **tiny))
    vit = ViTModel(ViTConfig(image_size=4, patch_size=2, num_channels=1, **tiny))
    gpt2 = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=8,
                                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))
    ids = torch.randint(0, 20, (2, 6), generator=g)
    cases += [
        _model_case(f"hf-bert-{metric}", _HF(_randomize_biases(bert, g)), ids, metric, oracle=False),
        _model_case(f"hf-vit-{metric}", _HF(_randomize_biases(vit, g)), x(2, 1, 4, 4), metric, oracle=False),
        _model_case(f"hf-gpt2-{metric}", _HF(_randomize_biases(gpt2, g)), ids, metric, oracle=False),
    ]
    return cases


def diagonal_case(metric: str, seed: int = 0, d: int = 6, n: int = 10) -> Case:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    def away_from_zero():  # magnitudes in [1, 2]: the full-rank manifold, geodesics stay inside
        return torch.sign(torch.randn(d, generator=g, dtype=DT)) * (1 + torch.rand(d, generator=g, dtype=DT))

    params = {"u": away_from_zero(), "v": away_from_zero()}

    def model_fn(p):
        return X @ (p["u"] * p["v"])

    return Case(f"diag-{metric}", DiagonalRescaling("u", "v", metric), params, model_fn,
                lambda p: ((model_fn(p) - y) ** 2).sum(), exact_geodesic=True)


def _relu_net(seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 4, generator=g, dtype=DT)
    y = torch.randn(12, 2, generator=g, dtype=DT)
    params = {"W1": torch.randn(5, 4, generator=g, dtype=DT), "W2": torch.randn(2, 5, generator=g, dtype=DT)}

    def model_fn(p):
        return torch.relu(X @ p["W1"].T) @ p["W2"].T

    return params, model_fn, lambda p: ((model_fn(p) - y) ** 2).mean()


def user_case(seed: int = 0) -> Case:
    params, model_fn, loss_fn = _relu_net(seed)
    return Case("user-layer-rescaling", LayerRescaling("W1", "W2"), params, model_fn, loss_fn)


def elementwise_cases(seed: int = 0) -> list[Case]:
    params, model_fn, loss_fn = _relu_net(seed)
    return [
        Case("positive-rescaling", PositiveRescaling(["W1", "W2"]), params, model_fn, loss_fn,
             exact_geodesic=True),
        Case("euclidean", Euclidean(["W1", "W2"]), params, model_fn, loss_fn, exact_geodesic=True),
    ]


def all_cases(seed: int = 0) -> list[Case]:
    return (attention_cases("inv", seed) + attention_cases("mix", seed)
            + [diagonal_case("inv", seed), diagonal_case("mix", seed), user_case(seed)]
            + elementwise_cases(seed) + modern_cases("inv", seed) + modern_cases("mix", seed))


# ----------------------------------------------------------------------------- modern attention
def exact_rmsnorm(model: nn.Module) -> nn.Module:
    """Replace the forward of HF ``*RMSNorm`` (and ``T5LayerNorm``) modules of the form ``weight * x / rms(x)`` by the
    same formula in the input dtype: HF computes it in float32 and casts back, which rounds the
    residual stream (and the QK-norm outputs) to float32 and hides float64 invariance."""
    import types

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for m in model.modules():
        cls = type(m).__name__
        if (cls.endswith("RMSNorm") or cls == "T5LayerNorm") and hasattr(m, "variance_epsilon") and "Gemma" not in cls:
            m.forward = types.MethodType(forward, m)
    return model


class _Timm(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.forward_features(x)


def _model_cases(cid, model, x, metric, oracle=False, tags=()):
    """One case per group that ``find_symmetries`` builds (GL blocks, and scale blocks with QK-norm)."""
    q, params, model_fn, loss_fn = _model_problem(model, x, metric)
    out = []
    for g in q.groups:
        kind = {"AttentionGL": "attention", "HeadScaling": "scaling", "JointGroup": "joint"}[type(g).__name__]
        extra = {"attention"} if kind == "joint" else set()  # GL parts: conditioned elements, extract/insert
        out.append(Case(f"{cid}-{kind}-{metric}", g, params, model_fn, loss_fn, oracle=oracle,
                        exact_geodesic=g.has_closed_form_geodesic, tags=set(tags) | {kind, "modern"} | extra))
    return out


def modern_models(seed: int = 0, d: int = 8, heads: int = 2, layers: int = 1):
    """Tiny modern models built from config (float64), ``{id: (model, input)}``: GQA + rotary
    (Llama), q/k/v biases (Qwen2), QK-norm (Qwen3, timm), partial rotary with a fused per-head
    QKV (GPT-NeoX), interleaved partial rotary (GPT-J), fused GQA QKV (Phi-3), MQA (Falcon),
    relative bias (T5), fused QKV + LayerScale (timm ViT), fused QKV + QK-norm (timm ViT: a
    ``JointGroup`` of head scales on the q/k rows and GL on the v rows)."""
    import transformers as tr
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ids = torch.randint(0, 20, (2, 6), generator=g)
    tiny = dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * d,
                vocab_size=20, attn_implementation="sdpa")
    hd = d // heads
    models = {
        "llama-gqa": tr.LlamaModel(tr.LlamaConfig(num_key_value_heads=1, **tiny)),
        "qwen2-bias": _randomize_biases(tr.Qwen2Model(tr.Qwen2Config(num_key_value_heads=1, **tiny)), g),
        "qwen3-qknorm": tr.Qwen3Model(tr.Qwen3Config(num_key_value_heads=1, head_dim=hd, rms_norm_eps=1e-30, **tiny)),
        "neox-partial": tr.GPTNeoXModel(tr.GPTNeoXConfig(rotary_pct=0.5, **tiny)),
        "gptj-interleaved": tr.GPTJModel(tr.GPTJConfig(n_embd=d, n_layer=layers, n_head=heads, rotary_dim=hd // 2,
                                                        vocab_size=20, n_positions=16, attn_implementation="sdpa")),
        "phi3-fused-gqa": tr.Phi3Model(tr.Phi3Config(num_key_value_heads=1, pad_token_id=0, **tiny)),
        "falcon-mqa": tr.FalconModel(tr.FalconConfig(multi_query=True, new_decoder_architecture=False, **tiny)),
        # T5 scales no logits by 1/sqrt(h): a smaller init keeps the vertical-direction test's
        # largest step (t = 1e-2) in the quadratic regime of the loss
        "t5-relbias": tr.T5EncoderModel(tr.T5Config(d_model=d, d_kv=hd, num_heads=heads, num_layers=layers,
                                                     d_ff=2 * d, vocab_size=20, initializer_factor=0.3)),
    }
    out = {k: (exact_rmsnorm(_HF(m)), ids) for k, m in models.items()}
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=4, patch_size=2, in_chans=1, num_classes=0, embed_dim=d, depth=layers,
                            num_heads=heads, mlp_ratio=2.0, qkv_bias=True, init_values=0.5)
    out["timm-vit-layerscale"] = (_Timm(_randomize_biases(vit, g)), torch.randn(2, 1, 4, 4, generator=g, dtype=DT))
    vit = VisionTransformer(img_size=4, patch_size=2, in_chans=1, num_classes=0, embed_dim=d, depth=layers,
                            num_heads=heads, mlp_ratio=2.0, qkv_bias=True, qk_norm=True)
    out["timm-vit-qknorm"] = (_Timm(exact_layernorm_qk(_randomize_biases(vit, g))),
                              torch.randn(2, 1, 4, 4, generator=g, dtype=DT))
    return out


def exact_layernorm_qk(model: nn.Module) -> nn.Module:
    """``eps = 0`` in the QK LayerNorms: the per-head scales are then an exact symmetry (with
    ``eps > 0`` only up to ``eps / var``)."""
    for n, m in model.named_modules():
        if n.endswith(("q_norm", "k_norm")) and isinstance(m, nn.LayerNorm):
            m.eps = 0.0
    return model


def modern_cases(metric: str, seed: int = 0) -> list[Case]:
    return [c for cid, (m, x) in modern_models(seed).items()
            for c in _model_cases(cid, m, x, metric, oracle=cid in ("llama-gqa", "gptj-interleaved"))]

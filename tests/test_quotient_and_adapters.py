"""The composite quotient, the model adapters (recognition and refusal), the geoopt manifold and
the errors on bad input."""
from __future__ import annotations

import warnings

import geoopt
import pytest
import torch
from torch import nn

from quotientsharp import AttentionGL, DiagonalRescaling, Euclidean, GLBlock, Piece, PositiveRescaling, Quotient
from quotientsharp import tangent as T
from quotientsharp.adapters import UnsupportedAttentionError, attention_blocks, find_symmetries, linear_attention_blocks
from quotientsharp.functional import forward
from quotientsharp.manifold import QuotientManifold
from quotientsharp.models.attention import MultiHeadSelfAttention

DT = torch.float64


class TwoLayerAttention(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.a1, self.a2 = MultiHeadSelfAttention(d, heads), MultiHeadSelfAttention(d, heads)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.a2(self.a1(x)).mean(1))


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoLayerAttention().to(DT)


# ----------------------------------------------------------------------------- Quotient
def test_quotient_covers_every_parameter_once(model):
    q = find_symmetries(model, metric="inv")
    gl = q.groups[0]
    assert isinstance(gl, AttentionGL) and len(gl.blocks) == 4
    assert set(gl.names) | set(q.rest.names) == set(q.names) == {n for n, _ in model.named_parameters()}
    assert not set(gl.names) & set(q.rest.names)
    assert {"a1.o.bias", "a2.o.bias", "head.weight", "head.bias"} == set(q.rest.names)
    assert isinstance(q.rest, PositiveRescaling)
    assert isinstance(find_symmetries(model, rest="euclidean").rest, Euclidean)
    # the four blocks of equal shape stack into two batches: QK and VO over both layers
    assert [len(s) for s in gl.stacks] == [2, 2]


def test_quotient_operations_act_block_by_block(model):
    q = find_symmetries(model, metric="mix", eps_rel=0.0)
    w = params_of(model)
    xi = T.randn_like(w, torch.Generator().manual_seed(0))
    gl, rest = q.groups[0], q.rest
    split = lambda d, g: {n: d[n] for n in g.names}  # noqa: E731
    assert torch.allclose(q.inner(w, xi, xi), gl.inner(w, split(xi, gl), split(xi, gl)) + rest.inner(w, split(xi, rest), split(xi, rest)))
    p = q.horizontal_projection(w, xi)
    assert float(q.is_horizontal(w, p)) < 1e-10
    end = q.geodesic(w, p)  # order 2 on the blocks, 1 on the rest
    for n in rest.names:
        assert torch.equal(end[n], w[n] + p[n])
    assert not torch.allclose(end["a1.q.weight"], w["a1.q.weight"] + p["a1.q.weight"])
    # the action moves only function-preserving groups and leaves the outputs unchanged
    g = q.random_element(w, generator=torch.Generator().manual_seed(1))
    assert g[-1] is None
    x = torch.randn(4, 5, 8, dtype=DT)
    assert torch.allclose(forward(model, q.action(w, g), x), forward(model, w, x), atol=1e-10)


def test_quotient_rejects_overlapping_or_unknown_groups(model):
    names = [n for n, _ in model.named_parameters()]
    g1 = PositiveRescaling(["head.weight"])
    with pytest.raises(ValueError, match="claimed by both"):
        Quotient([g1, PositiveRescaling(["head.weight", "head.bias"])], names)
    with pytest.raises(ValueError, match="not among"):
        Quotient([PositiveRescaling(["nope"])], names)
    with pytest.raises(ValueError, match="rest must be"):
        Quotient([], names, rest="riemann")


def test_quotient_refuses_a_repeated_parameter_name(model):
    """A name given twice would be counted twice in every norm of the rest (a silent wrong
    number), so it is refused by name."""
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"parameter names repeated: \['head.bias'\]"):
        Quotient([], [*names, "head.bias"])
    assert Quotient([], names).names == tuple(names)


# ----------------------------------------------------------------------------- adapters
def test_transformer_encoder_and_decoder_layers_are_found():
    enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    dec = nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)
    assert len(attention_blocks(enc)) == 2
    assert len(attention_blocks(dec)) == 4  # self- and cross-attention


def test_explicit_override_by_parameter_names():
    """A hand-written attention with non-standard names, quotiented through explicit blocks."""

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk = nn.Linear(6, 6), nn.Linear(6, 6)
            self.wv, self.wo = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            b, n, _ = x.shape
            sh = lambda t: t.view(b, n, 3, 2).transpose(1, 2)  # noqa: E731
            a = (sh(self.wq(x)) @ sh(self.wk(x)).transpose(-1, -2)).softmax(-1)
            return self.wo((a @ sh(self.wv(x))).transpose(1, 2).reshape(b, n, 6))

    torch.manual_seed(0)
    m = Custom().to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attention_blocks(m) == []  # nothing recognisable, and nothing to warn about
    blocks = linear_attention_blocks("wq.weight", "wk.weight", "wv.weight", "wo.weight", n_heads=3, head_dim=2,
                                     q_bias="wq.bias", k_bias="wk.bias", v_bias="wv.bias", label="custom")
    q = find_symmetries(m, blocks=blocks, eps_rel=0.0)
    w = params_of(m)
    x = torch.randn(2, 4, 6, dtype=DT)
    g = q.random_element(w, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(forward(m, q.action(w, g), x), forward(m, w, x), atol=1e-10)


def test_unsupported_attention_is_refused_with_a_reason():
    with pytest.raises(UnsupportedAttentionError, match="add_bias_kv"):
        attention_blocks(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=16)
    # grouped-query + rotary layers are supported since spec part 6 (tests/test_modern_attention.py):
    # their QK blocks carry the rotary sub-algebra, never the full GL(h)
    blocks = attention_blocks(transformers.LlamaModel(cfg))
    assert [b.algebra is not None for b in blocks] == [True, False]
    bert = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=8, position_embedding_type="relative_key")
    model = transformers.BertModel(bert)  # builds on the pinned transformers (5.x); a failure here is a failure
    assert model.config.position_embedding_type == "relative_key"
    with pytest.raises(UnsupportedAttentionError, match="position_embedding_type='relative_key'"):
        attention_blocks(model)


def test_unrecognised_attention_module_warns():
    class SomeAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.warns(UserWarning, match="not recognised"):
        attention_blocks(nn.Sequential(SomeAttention()))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_problem(model):
    w = params_of(model)
    gl = find_symmetries(model, metric="inv", eps_rel=0.0).groups[0]
    xi = T.randn_like({n: w[n] for n in gl.names})
    # a tangent dict with missing / extra names, wrong shape, dtype
    q = find_symmetries(model)
    with pytest.raises(ValueError, match="missing"):
        q.check_tangent(w, {n: w[n] for n in list(w)[1:]})
    with pytest.raises(ValueError, match="does not act on"):
        q.check_tangent(w, {**w, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        q.check_tangent(w, {**w, "a1.q.weight": torch.zeros(3, dtype=DT)})
    with pytest.raises(ValueError, match="dtype"):
        q.check_tangent(w, {**w, "a1.q.weight": w["a1.q.weight"].float()})
    # mixed dtypes in the point
    with pytest.raises(ValueError, match="mix devices or dtypes"):
        q.validate({**w, "a1.q.weight": w["a1.q.weight"].float()})
    # non-finite weights name the parameter
    bad = dict(w)
    bad["a2.k.weight"] = w["a2.k.weight"].clone()
    bad["a2.k.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="a2.k.weight"):
        gl.horizontal_projection(bad, xi)
    # a singular Gram matrix with eps = 0 names the block; eps > 0 repairs it
    sing = dict(w)
    sing["a1.k.weight"] = torch.zeros_like(w["a1.k.weight"])
    sing["a1.k.bias"] = torch.zeros_like(w["a1.k.bias"])
    with pytest.raises(ValueError, match="singular Gram matrix.*a1"):
        gl.with_metric("inv", eps_rel=0.0).horizontal_projection(sing, xi)
    out = gl.with_metric("inv", eps=1e-3).horizontal_projection(sing, xi)
    assert all(torch.isfinite(t).all() for t in out.values())
    # a parameter the symmetry does not fit
    wrong = GLBlock(G=(Piece("a1.q.weight", "rows"),), H=(Piece("a1.k.weight", "rows"),), n_heads=3, head_dim=4)
    with pytest.raises(ValueError, match="no room for 3 heads"):
        AttentionGL([wrong]).validate(w)
    partial = GLBlock(G=(Piece("a1.q.weight", "rows"),), H=(Piece("a1.k.weight", "rows"),), n_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="only partly covered"):
        AttentionGL([partial]).validate(w)
    with pytest.raises(ValueError, match="equal shape"):
        DiagonalRescaling("a1.q.bias", "head.bias").validate(w)
    with pytest.raises(ValueError, match="metric must be"):
        AttentionGL([wrong], metric="euclid")


def test_geodesic_integration_errors():
    from quotientsharp.geodesic import integrate_geodesic
    gl = AttentionGL([GLBlock((Piece("G", "cols"),), (Piece("H", "cols"),), 1, 2)], "inv", eps_rel=0.0)
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=DT)
    w = {"G": G, "H": G.clone()}
    xi = {"G": torch.randn(3, 2, dtype=DT), "H": torch.randn(3, 2, dtype=DT)}
    with pytest.raises(RuntimeError, match="did not converge"):
        integrate_geodesic(gl.christoffel, w, xi, n_steps=1, tol=1e-15, max_steps=4)
    # a Gram matrix that turned singular on the way (eps = 0) is an error naming the block
    with pytest.raises(ValueError, match="singular Gram matrix"):
        gl.check_domain({"G": torch.zeros(3, 2, dtype=DT), "H": G})
    # the diagonal mixed geodesic reaches beta = 0 at b = -1/2: the edge of its domain
    g = DiagonalRescaling("u", "v", metric="mix")
    wd = {"u": torch.ones(3, dtype=DT), "v": torch.ones(3, dtype=DT)}
    assert g.geodesic_exact(wd, {"u": -0.5 * wd["u"], "v": -0.5 * wd["v"]})["u"].abs().max() == 0
    clamped = g.restrict_to_domain(wd, {"u": -wd["u"], "v": -wd["v"]})
    assert torch.allclose(g.to_b(wd, clamped), torch.full((3,), -0.5, dtype=DT))


# ----------------------------------------------------------------------------- geoopt
def test_geoopt_riemannian_sgd_decreases_the_loss(model):
    q = find_symmetries(model, metric="mix", eps_rel=0.0)
    w = params_of(model)
    man = QuotientManifold(q, w)
    x = geoopt.ManifoldParameter(man.flatten(w).clone(), manifold=man)
    opt = geoopt.optim.RiemannianSGD([x], lr=0.3, momentum=0.5)
    inputs, targets = torch.randn(32, 5, 8, dtype=DT), torch.randint(0, 3, (32,))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(forward(model, man.unflatten(x), inputs), targets)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    # geoopt's projection is the horizontal one, and retr is the 2nd-order geodesic
    u = torch.randn_like(x)
    assert float(q.is_horizontal(w, man.unflatten(man.proju(man.flatten(w), u)))) < 1e-10
    assert torch.allclose(man.retr(man.flatten(w), u), man.flatten(q.geodesic(w, man.unflatten(u))))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_operations_keep_device_and_dtype(device, dtype):
    torch.manual_seed(0)
    m = TwoLayerAttention().to(device=device, dtype=dtype)
    q = find_symmetries(m, metric="inv")
    w = {n: p.detach() for n, p in m.named_parameters()}
    xi = T.randn_like(w)
    for out in (q.horizontal_projection(w, xi), q.egrad_to_rgrad(w, xi), q.christoffel(w, xi), q.geodesic(w, xi),
                q.whiten(w, xi)):
        for n, t in out.items():
            assert t.device == w[n].device and t.dtype == dtype, n
    assert q.inner(w, xi, xi).device == w["head.bias"].device


def test_root_module_named_like_attention_is_not_warned_about_when_its_layers_are_found():
    import warnings as _w

    from test_sharpness_common import TinyAttentionClassifier

    from quotientsharp import find_symmetries
    with _w.catch_warnings():
        _w.simplefilter("error")
        q = find_symmetries(TinyAttentionClassifier(n_layers=2))
    assert len(q.groups) == 1 and sum(b.n_heads for b in q.groups[0].blocks) == 8

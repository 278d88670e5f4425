"""Shapes, padding invariance, determinism and structure of the models."""
import pytest
import torch

from quotientsharp.models import (
    MLP,
    DiagonalNet,
    MultiHeadSelfAttention,
    TextTransformer,
    TinyViT,
    TransformerBlock,
)


@pytest.mark.parametrize(
    "kwargs, shape",
    [({}, (3, 1, 8, 8)), (dict(image_size=28, patch_size=7, n_classes=5), (2, 1, 28, 28)),
     (dict(in_channels=3, depth=1), (2, 3, 8, 8))],
)
def test_vit_shapes(kwargs, shape):
    model = TinyViT(**kwargs)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], kwargs.get("n_classes", 10))
    assert model.pos_embed.shape[1] == model.n_patches + 1


def test_vit_structure_for_symmetry_adapter():
    model = TinyViT(depth=3)
    assert len(model.blocks) == 3
    for block in model.blocks:
        assert isinstance(block, TransformerBlock)
        assert isinstance(block.attn, MultiHeadSelfAttention)
        assert (block.attn.n_heads, block.attn.head_dim) == (4, 16)


def test_vit_patchify_is_row_major_channel_major():
    model = TinyViT(image_size=4, patch_size=2, in_channels=2)
    images = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = model.patchify(images)
    assert patches.shape == (1, 4, 8)
    torch.testing.assert_close(patches[0, 1], images[0, :, 0:2, 2:4].reshape(-1))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 1, 8, 8))


def test_text_shapes_and_max_len():
    model = TextTransformer(vocab_size=50, n_classes=3, max_len=12)
    assert model(torch.randint(2, 50, (4, 12))).shape == (4, 3)
    assert model(torch.randint(2, 50, (4, 5))).shape == (4, 3)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randint(2, 50, (1, 13)))


def test_text_padding_does_not_change_prediction():
    torch.manual_seed(0)
    model = TextTransformer(vocab_size=50, n_classes=3, max_len=16).eval()
    tokens = torch.randint(2, 50, (4, 9))
    padded = torch.cat([tokens, torch.zeros(4, 7, dtype=torch.long)], dim=1)
    reference = model(tokens)
    torch.testing.assert_close(model(padded), reference, rtol=0, atol=1e-6)
    # Rows of different lengths in one batch: each matches its unpadded prediction.
    ragged = padded.clone()
    ragged[1, 4:] = 0
    torch.testing.assert_close(model(ragged)[1], model(tokens[1:2, :4])[0], rtol=0, atol=1e-6)
    # The pad embedding never reaches the CLS token.
    with torch.no_grad():
        model.token_embed.weight[0].normal_()
    torch.testing.assert_close(model(padded), reference, rtol=0, atol=1e-6)


def test_models_deterministic_given_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        vit = TinyViT()
        text = TextTransformer(vocab_size=30, n_classes=2)
        x_img = torch.randn(2, 1, 8, 8)
        x_txt = torch.randint(0, 30, (2, 7))
        outs.append((vit(x_img), text(x_txt)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_vit_supports_double_backward():
    model = TinyViT(depth=1).double()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vec = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vec)), params)
    assert all(torch.isfinite(h).all() for h in hvp)


def test_diagonal_net():
    net = DiagonalNet(6, init_scale=0.5)
    torch.testing.assert_close(net.u, torch.full((6,), 0.5 * 2**0.5, dtype=torch.float64))
    assert torch.equal(net.v, torch.zeros(6, dtype=torch.float64))
    with torch.no_grad():
        net.u.normal_()
        net.v.normal_()
    x = torch.randn(5, 6, dtype=torch.float64)
    out = net(x)
    assert out.shape == (5,)
    torch.testing.assert_close(out, x @ (net.u * net.v), rtol=0, atol=0)
    torch.testing.assert_close(net.beta, net.u * net.v)


def test_mlp():
    model = MLP([5, 8, 7, 3])
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert model(torch.randn(4, 5)).shape == (4, 3)
    normed = MLP([5, 8, 3], activation="gelu", bias=False, layernorm=True)
    assert [type(m).__name__ for m in normed] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert normed[0].bias is None
    with pytest.raises(ValueError, match="activation"):
        MLP([2, 2], activation="swish")

"""HessianOperator / GGNOperator against dense ground truth (spec §8)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_curvature_models import (
    classification_data,
    dense_hessian,
    flat_loss,
    mlp_with_layernorm,
    single_thread,  # noqa: F401 (autouse fixture)
    transformer,
)
from torch import nn

from quotientsharp.curvature import GGNOperator, HessianOperator, select_parameters

CASES = {
    "mlp_layernorm": (mlp_with_layernorm, (6,)),
    "sdpa_transformer": (transformer, (5, 4)),  # HVPs enter the SDPA math backend themselves
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    build, shape = CASES[request.param]
    model = build()
    X, y = classification_data(24, shape)
    return model, X, y, dense_hessian(model, X, y)


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_hvp_matches_dense(case, mode):
    model, X, y, H = case
    op = HessianOperator(model, [(X, y)], F.cross_entropy, mode=mode)
    V = torch.randn(op.n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert (op.matvec(V[:, 0]) - H @ V[:, 0]).abs().max() < 1e-10
    assert (op.matmat(V) - H @ V).abs().max() < 1e-10


def test_hvp_modes_agree_and_dense_is_symmetric(case):
    model, X, y, H = case
    dense = {mode: HessianOperator(model, [(X, y)], F.cross_entropy, mode=mode).to_dense()
             for mode in ("reverse_over_reverse", "forward_over_reverse")}
    assert (dense["reverse_over_reverse"] - dense["forward_over_reverse"]).abs().max() < 1e-12
    assert (dense["reverse_over_reverse"] - dense["reverse_over_reverse"].T).abs().max() < 1e-10
    assert (H - H.T).abs().max() < 1e-10


def test_hvp_matches_finite_difference_of_gradient(case):
    model, X, y, _ = case
    op = HessianOperator(model, [(X, y)], F.cross_entropy)
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v /= v.norm()
    h = 1e-6
    fd = (op.loss_and_gradient(h * v)[1] - op.loss_and_gradient(-h * v)[1]) / (2 * h)
    hv = op.matvec(v)
    assert (hv - fd).norm() / hv.norm() < 1e-6
    fd_op = HessianOperator(model, [(X, y)], F.cross_entropy, mode="finite_difference")
    assert (fd_op.matvec(3 * v) - 3 * hv).norm() / (3 * hv.norm()) < 1e-6


def test_layernorm_regression_symmetric_and_matches_fd_jacobian():
    """§2: double-backward through affine LayerNorm is right (jacrev-based Hessians are not)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    X, y = classification_data(10, (3,), n_classes=2)
    H = HessianOperator(model, [(X, y)], F.cross_entropy).to_dense()
    assert (H - H.T).abs().max() < 1e-10
    theta, loss = flat_loss(model, X, y)

    def gradient(t):
        t = t.clone().requires_grad_()
        return torch.autograd.grad(loss(t), t)[0]

    h = 1e-6
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    J = torch.stack([(gradient(theta + h * e) - gradient(theta - h * e)) / (2 * h) for e in eye], 1)
    assert (H - J).abs().max() < 1e-6


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_loader_weights_batches_by_size(mode):
    model = mlp_with_layernorm()
    X, y = classification_data(71, (6,))
    split = [(X[:7], y[:7]), (X[7:], y[7:])]
    whole = HessianOperator(model, [(X, y)], F.cross_entropy, mode=mode)
    batched = HessianOperator(model, split, F.cross_entropy, mode=mode)
    v = torch.randn(whole.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert (batched.matvec(v) - whole.matvec(v)).abs().max() < 1e-12
    assert batched.batch_weights == [7 / 71, 64 / 71]
    equal_weights = sum(HessianOperator(model, [b], F.cross_entropy, mode=mode).matvec(v) for b in split) / 2
    assert (equal_weights - whole.matvec(v)).abs().max() > 1e-6  # the bias the weighting avoids


def test_parameter_block_is_the_diagonal_block_and_converters_roundtrip():
    model = mlp_with_layernorm()
    X, y = classification_data(16, (6,))
    H = dense_hessian(model, X, y)
    op = HessianOperator(model, [(X, y)], F.cross_entropy, params="3.*")  # glob: last layer
    assert op.param_names == ["3.weight", "3.bias"]
    offset = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("3."))
    assert (op.to_dense() - H[offset:, offset:]).abs().max() < 1e-10
    v = torch.randn(op.n, dtype=torch.float64)
    parts = op.unflatten(v)
    assert parts["3.weight"].shape == (3, 12) and torch.equal(op.flatten(parts), v)
    scipy_op = op.to_scipy()
    assert scipy_op.dtype == np.float64
    assert np.abs(scipy_op @ v.numpy() - (H[offset:, offset:] @ v).numpy()).max() < 1e-10


def test_select_parameters_forms():
    model = mlp_with_layernorm()
    assert select_parameters(model, "0.weight") == ["0.weight"]
    assert select_parameters(model, "weight$") == ["0.weight", "1.weight", "3.weight"]
    assert select_parameters(model, ["3.bias", "0.bias"]) == ["0.bias", "3.bias"]
    assert len(select_parameters(model)) == 6
    with pytest.raises(ValueError, match="no parameter name matches"):
        select_parameters(model, "encoder.*")


def test_ggn_matches_explicit_jt_h_j_and_is_psd():
    model = mlp_with_layernorm()
    X, y = classification_data(12, (6,))
    G = GGNOperator(model, [(X[:5], y[:5]), (X[5:], y[5:])], F.cross_entropy).to_dense()
    theta, _ = flat_loss(model, X, y)
    _, outputs = flat_loss(model, X, y, loss_fn=lambda out, _: out)
    J = torch.autograd.functional.jacobian(outputs, theta).reshape(-1, theta.numel())
    logits = outputs(theta).detach()
    H_out = torch.autograd.functional.hessian(lambda f: F.cross_entropy(f.view_as(logits), y), logits.reshape(-1))
    assert (G - J.T @ H_out @ J).abs().max() < 1e-10
    assert torch.linalg.eigvalsh(G).min() > -1e-12


def test_bad_inputs_raise_clear_errors():
    model = mlp_with_layernorm()
    X, y = classification_data(8, (6,))
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, [], F.cross_entropy)
    with pytest.raises(ValueError, match="unknown HVP mode"):
        HessianOperator(model, [(X, y)], F.cross_entropy, mode="jacrev")
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        HessianOperator(model, [(X, y)], F.cross_entropy, params="0.weight")
    model[0].weight.requires_grad_(True)
    X_bad = X.clone()
    X_bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite loss"):
        HessianOperator(model, [(X_bad, y)], F.cross_entropy)


def test_batchnorm_without_running_stats_refused_unless_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)).double()
    X, y = classification_data(16, (6,))
    with pytest.raises(ValueError, match="BatchNorm.*train_mode=True"):
        HessianOperator(model, [(X, y)], F.cross_entropy)
    assert HessianOperator(model, [(X, y)], F.cross_entropy, train_mode=True).n == 35 + 10 + 18


def test_train_mode_batchnorm_leaves_running_stats_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double().eval()
    X, y = classification_data(16, (6,))
    before = model[1].running_mean.clone()
    op = HessianOperator(model, [(X, y)], F.cross_entropy, train_mode=True)
    op.matvec(torch.ones(op.n, dtype=torch.float64))
    assert torch.equal(model[1].running_mean, before) and int(model[1].num_batches_tracked) == 0
    assert not model.training
    eval_op = HessianOperator(model, [(X, y)], F.cross_entropy)
    assert abs(eval_op.loss - op.loss) > 1e-6  # running vs batch statistics really differ


def test_nondeterministic_model_is_detected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    X, y = classification_data(16, (6,))
    with pytest.raises(ValueError, match="dropout"):
        HessianOperator(model, [(X, y)], F.cross_entropy, train_mode=True)
    HessianOperator(model, [(X, y)], F.cross_entropy)  # eval mode: dropout off, deterministic

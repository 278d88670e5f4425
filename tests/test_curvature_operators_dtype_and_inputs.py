"""ModelOperator's compute dtype, its documented defaults and its bad-input messages (survivors
of the mutation run on quotientsharp/curvature/operators.py).

References are built outside the code under test: an operator in the compute dtype must give
bit for bit what the same operator gives on a model (and data) already stored in that dtype, a
float64 model's dense Hessian from ``torch.autograd.functional.hessian`` of a loss typed in by
hand, single-batch operators summed by hand for the batch weights, and call counters on the
per-batch product for the column chunks.
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from tensor_checks import gen
from torch import nn

from quotientsharp.curvature import GGNOperator, HessianOperator, ModelOperator
from quotientsharp.curvature.operators import as_operator, select_parameters
from quotientsharp.validation import conform_inputs


class KeywordRegressor(nn.Module):
    """``x ↦ head(tanh(norm(body(x))))`` called as ``model(x=...)`` (a dict batch), with a
    BatchNorm whose floating running statistics are buffers."""

    def __init__(self):
        super().__init__()
        self.body, self.norm, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.body(x))))


def regressor(dtype: torch.dtype) -> KeywordRegressor:
    torch.manual_seed(0)
    model = KeywordRegressor()
    with torch.no_grad():  # non-trivial running statistics, so a buffer left uncast would matter
        model.norm.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))
        model.norm.running_var.copy_(torch.tensor([1.5, 0.7, 1.2, 0.9]))
    return model.to(dtype).eval()


def regression_batches(dtype: torch.dtype, form: str = "tuple") -> list:
    """Two batches (sizes 3 and 5) with floating inputs and floating targets."""
    g = gen(4)
    out = []
    for n in (3, 5):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randn(n, 2, generator=g, dtype=torch.float64).to(dtype)
        out.append({"x": x, "labels": y} if form == "dict" else ({"x": x}, y))
    return out


def dense(op) -> torch.Tensor:
    return op.matmat(torch.eye(op.n, dtype=torch.float64))


@pytest.mark.parametrize("form", ["tuple", "dict"])
@pytest.mark.parametrize("Operator", [HessianOperator, GGNOperator])
def test_dtype_option_computes_as_a_model_stored_in_that_dtype(Operator, form):
    """``dtype=float32`` on a float64 model and float64 data (inputs, floating targets and
    BatchNorm buffers) is the float32 model on float32 data, bit for bit: every floating tensor
    of the batch, targets included, and every floating buffer is cast."""
    as_float32 = Operator(regressor(torch.float64), regression_batches(torch.float64, form), F.mse_loss,
                          dtype=torch.float32)
    stored = Operator(regressor(torch.float32), regression_batches(torch.float32, form), F.mse_loss)
    assert as_float32.compute_dtype == torch.float32
    assert torch.equal(dense(as_float32), dense(stored))
    assert torch.equal(as_float32.gradient, stored.gradient) and as_float32.loss == stored.loss
    # the cast model differs from the float64 one in its rounding only
    exact = Operator(regressor(torch.float64), regression_batches(torch.float64, form), F.mse_loss)
    torch.testing.assert_close(dense(as_float32), dense(exact), rtol=1e-4, atol=1e-5)
    assert not torch.equal(dense(as_float32), dense(exact))


def test_float64_operator_of_a_float32_model_is_the_float64_models_hessian():
    """``dtype=float64`` on a float32 model (float32 data and buffers) reaches the float64
    Hessian of the same weights: a dense ``autograd.functional.hessian`` of the loss written by
    hand, with the BatchNorm's running statistics in float64."""
    model32 = regressor(torch.float32)
    batches = regression_batches(torch.float32)
    op = HessianOperator(model32, batches, F.mse_loss, dtype=torch.float64)
    m = copy.deepcopy(model32).double()
    sizes = [b[1].shape[0] for b in batches]

    def loss(flat):
        w1, b1, gamma, beta, w2, b2 = flat.split([12, 4, 4, 4, 8, 2])
        total = 0.0
        for (inputs, y), n in zip(batches, sizes):
            h = inputs["x"].double() @ w1.view(4, 3).T + b1
            h = (h - m.norm.running_mean) / torch.sqrt(m.norm.running_var + m.norm.eps) * gamma + beta
            out = torch.tanh(h) @ w2.view(2, 4).T + b2
            total = total + n / sum(sizes) * ((out - y.double()) ** 2).mean()
        return total

    theta = torch.cat([p.detach().double().reshape(-1) for p in m.parameters()])
    torch.testing.assert_close(dense(op), torch.autograd.functional.hessian(loss, theta), rtol=1e-10, atol=1e-12)


def test_inputs_are_cast_to_the_models_dtype_without_a_dtype_option():
    """With no ``dtype``, float64 inputs to a float32 model are cast to float32 (float32 targets)."""
    def with_inputs(dtype):  # float32 targets either way
        return [({"x": i["x"].to(dtype)}, y.float()) for i, y in regression_batches(torch.float64)]
    to_float32, stored = with_inputs(torch.float64), with_inputs(torch.float32)
    a = HessianOperator(regressor(torch.float32), to_float32, F.mse_loss)
    b = HessianOperator(regressor(torch.float32), stored, F.mse_loss)
    assert a.batches[0][0]["x"].dtype == torch.float32
    assert torch.equal(dense(a), dense(b))


def test_flat_vectors_are_float64_and_blocks_are_in_the_compute_dtype():
    op = HessianOperator(regressor(torch.float64), regression_batches(torch.float64), F.mse_loss,
                         dtype=torch.float32)
    v = torch.randn(op.n, generator=gen(1), dtype=torch.float64)
    blocks = op.unflatten(v)
    assert {t.dtype for t in blocks.values()} == {torch.float32}
    flat = op.flatten(blocks)
    assert flat.dtype == torch.float64 and torch.equal(flat, v.float().double())
    assert op.gradient.dtype == torch.float64 and (op @ v).dtype == torch.float64


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse", "finite_difference"])
def test_columns_enter_the_product_in_the_compute_dtype(mode):
    """Float64 columns go into a float32 product as float32: ``V`` and ``V`` rounded to float32
    give one result, in every HVP mode (the finite difference steps the float32 weights by them)."""
    def squared_error(out, y):  # F.mse_loss, written out: torch cannot go forward over its reverse
        return ((out - y) ** 2).mean()

    op = HessianOperator(regressor(torch.float64), regression_batches(torch.float64), squared_error,
                         dtype=torch.float32, mode=mode)
    V = torch.randn(op.n, 3, generator=gen(3), dtype=torch.float64)
    assert not torch.equal(V, V.float().double())
    assert torch.equal(op.matmat(V), op.matmat(V.float().double()))


def test_batch_products_are_weighted_and_summed_in_float64():
    """``A V = Σ_b (n_b/N) A_b V`` with each float32 ``A_b V`` widened to float64 before it is
    weighted: equal, to float64 rounding, to the single-batch operators summed by hand in
    float64 (a sum weighted in float32 would be off by float32 rounding, ~1e-8)."""
    model, batches = regressor(torch.float32), regression_batches(torch.float32)
    V = torch.randn(34, 5, generator=gen(2), dtype=torch.float64)
    op = HessianOperator(model, batches, F.mse_loss)
    by_hand = sum(n / 8 * HessianOperator(model, [b], F.mse_loss).matmat(V) for b, n in zip(batches, (3, 5)))
    torch.testing.assert_close(op.matmat(V), by_hand, rtol=1e-15, atol=1e-15)


def test_columns_go_through_the_product_in_chunks_of_32_by_default():
    seen: list[int] = []

    class Identity(ModelOperator):
        def batch_product(self, batch):
            def apply(V):
                seen.append(next(iter(V.values())).shape[0])
                return V
            return apply

    torch.manual_seed(0)
    op = Identity(nn.Linear(40, 1).double(), [(torch.randn(2, 40, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64))],
                  F.mse_loss)
    V = torch.randn(41, 70, dtype=torch.float64)
    assert torch.equal(op.matmat(V), V)
    assert seen == [32, 32, 6]


@pytest.mark.parametrize("Operator", [HessianOperator, GGNOperator, ModelOperator])
def test_swapped_arguments_name_the_operator(Operator):
    model, batches = regressor(torch.float64), regression_batches(torch.float64)
    with pytest.raises(TypeError, match=rf"^{Operator.__name__}\(model, loader, loss_fn, \.\.\.\): loader and loss_fn are swapped"):
        Operator(model, F.mse_loss, batches)


def test_params_glob_selects_in_model_order():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    assert select_parameters(model, "*.weight") == ["0.weight", "2.weight"]  # not a valid regex
    assert select_parameters(model, "?.bias") == ["0.bias", "2.bias"]
    assert select_parameters(model, "bias$") == ["0.bias", "2.bias"]  # the regular-expression fallback


@pytest.mark.parametrize("attrs", [{"shape": (3, 3)}, {"matvec": lambda v: v}])
def test_as_operator_needs_both_shape_and_matvec(attrs):
    half = type("Half", (), {k: (staticmethod(v) if callable(v) else v) for k, v in attrs.items()})()
    with pytest.raises(TypeError, match=r"cannot use Half as a linear operator \(needs shape and matvec\)"):
        as_operator(half)


def test_ggn_of_a_squared_error_is_the_gauss_newton_matrix():
    """``G = Σ_b (n_b/N) J_bᵀ (2/(n_b k)) J_b`` for ``F.mse_loss`` (mean over the ``n_b × k``
    outputs), with ``J_b`` the dense output Jacobian from ``torch.autograd.functional``.
    (torch 2.13 fails forward-over-reverse through ``F.mse_loss``.)"""
    model, batches = regressor(torch.float64), regression_batches(torch.float64)
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def outputs(flat, inputs):
        params = dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        return torch.func.functional_call(model, params, (), inputs).reshape(-1)

    expected = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for inputs, y in batches:
        J = torch.autograd.functional.jacobian(lambda f: outputs(f, inputs), theta)
        expected += y.shape[0] / 8 * (2 / y.numel()) * J.T @ J
    torch.testing.assert_close(dense(GGNOperator(model, batches, F.mse_loss)), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_fn", [F.mse_loss, F.huber_loss])
def test_forward_over_reverse_names_the_losses_torch_cannot_differentiate(loss_fn):
    model, batches = regressor(torch.float64), regression_batches(torch.float64)
    op = HessianOperator(model, batches, loss_fn, mode="forward_over_reverse")
    with pytest.raises(RuntimeError, match=r"(?s)^HessianOperator\(mode='forward_over_reverse'\): torch's forward-mode "
                                           r"AD cannot differentiate .*use mode='reverse_over_reverse'"):
        op @ torch.ones(op.n, dtype=torch.float64)
    reference = HessianOperator(model, batches, loss_fn)
    assert reference.matvec(torch.ones(op.n, dtype=torch.float64)).abs().sum() > 0


def test_a_namedtuple_batch_is_measured_like_a_pair():
    """A loader may yield ``namedtuple(inputs, targets)`` batches; they are moved, cast and
    measured like plain pairs (a namedtuple is rebuilt from its fields, not from one iterable)."""
    Batch = collections.namedtuple("Batch", "inputs targets")
    model = regressor(torch.float64)
    pairs = [({"x": i["x"]}, y) for i, y in regression_batches(torch.float32)]
    named = [Batch(i, y) for i, y in pairs]
    op = HessianOperator(model, named, F.mse_loss, dtype=torch.float64)
    assert type(op.batches[0]) is Batch and op.batches[0].inputs["x"].dtype == torch.float64
    assert op.batches[0].targets.dtype == torch.float64
    assert torch.equal(dense(op), dense(HessianOperator(model, pairs, F.mse_loss, dtype=torch.float64)))
    inner = Batch(torch.ones(2, dtype=torch.float32), torch.arange(2))
    assert conform_inputs((inner,), torch.float64)[0].inputs.dtype == torch.float64  # cast inside, too

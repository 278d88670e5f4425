"""The curvature-operator template (issue 16 item 3): a subclass of ModelOperator writes only the
per-batch product and gets the batch loop, the n_b/N weighting, chunking and the checks; SLQ takes
its probes and dimension from the operator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_curvature_models import (
    classification_data,
    dense_hessian,
    mlp_with_layernorm,
    single_thread,  # noqa: F401 (autouse fixture)
)
from torch.func import grad, jvp, vmap

from quotientsharp.curvature import HessianOperator, MatrixOperator, ModelOperator, slq


class DiagonalScaledHessian(ModelOperator):
    """``D H D`` with a fixed positive diagonal ``D`` (a preconditioned Hessian): only the
    per-batch product ``D H_b D V`` is written here."""

    def __init__(self, model, loader, loss_fn, scale, **kwargs):
        self.scale = scale  # flat (n,) float64
        super().__init__(model, loader, loss_fn, **kwargs)

    def batch_product(self, batch):
        gradient_fn = grad(lambda target: self.batch_loss(target, batch))
        d = self.layout.unflatten(self.scale, self.compute_dtype)

        def product(v):
            scaled = {n: d[n] * t for n, t in v.items()}
            hv = jvp(gradient_fn, (self.target,), (scaled,))[1]
            return {n: d[n] * t for n, t in hv.items()}

        return vmap(product)


@pytest.fixture(scope="module")
def problem():
    model = mlp_with_layernorm()
    X, y = classification_data(10, (6,))
    n = sum(p.numel() for p in model.parameters())
    scale = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # unequal batches (3 and 7 examples): the n_b/N weights matter
    return model, X, y, [(X[:3], y[:3]), (X[3:], y[3:])], scale


def test_subclass_with_only_the_batch_product_matches_the_dense_reference(problem):
    model, X, y, loader, scale = problem
    op = DiagonalScaledHessian(model, loader, F.cross_entropy, scale, chunk_size=2)
    reference = scale[:, None] * dense_hessian(model, X, y) * scale[None, :]  # D H D, H of the full-data mean loss
    V = torch.randn(op.n, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (op.matmat(V) - reference @ V).abs().max() < 1e-10  # 5 columns in chunks of 2
    assert (op.matvec(V[:, 0]) - reference @ V[:, 0]).abs().max() < 1e-10
    assert (op.to_dense() - reference).abs().max() < 1e-10
    # the weighting is what makes it right: the plain mean of the two batch products is not
    per_batch = [scale[:, None] * dense_hessian(model, xb, yb) * scale[None, :] for xb, yb in loader]
    unweighted = (per_batch[0] + per_batch[1]) / 2
    assert (unweighted - reference).abs().max() > 1e-3
    assert op.batch_weights == [0.3, 0.7]
    # it is a LinearOperator like the others: same probes and dimension as the Hessian operator
    assert op.effective_dimension == op.n
    assert torch.equal(op.sample_probes(3, seed=4), HessianOperator(model, loader, F.cross_entropy).sample_probes(3, seed=4))


def test_the_template_owns_the_loss_gradient_and_determinism_check(problem):
    model, X, y, loader, scale = problem
    op = DiagonalScaledHessian(model, loader, F.cross_entropy, scale)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    full = F.cross_entropy(torch.func.functional_call(model, op.layout.unflatten(theta), (X,)), y)
    (g,) = torch.autograd.grad(full, theta)
    assert op.loss == pytest.approx(full.item(), rel=1e-13)
    assert (op.gradient - g).abs().max() < 1e-13

    calls = iter(range(100))

    class Noisy(DiagonalScaledHessian):  # a different loss on every pass: the template refuses it
        def batch_loss(self, target, batch):
            return super().batch_loss(target, batch) * (1 + 1e-3 * next(calls))

    with pytest.raises(ValueError, match="two passes over the data gave different loss"):
        Noisy(model, loader, F.cross_entropy, scale)


def test_the_bare_template_has_no_product_and_says_so(problem):
    model, _, _, loader, _ = problem
    op = ModelOperator(model, loader, F.cross_entropy)
    with pytest.raises(NotImplementedError, match="implement batch_product"):
        op.matvec(torch.zeros(op.n, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"expected shape \({op.n}, k\)"):
        HessianOperator(model, loader, F.cross_entropy).matmat(torch.zeros(op.n + 1, 2, dtype=torch.float64))


class SubspaceOperator(MatrixOperator):
    """diag(λ) on the first ``k`` coordinates, zero elsewhere; its spectrum of interest lives on
    those ``k`` coordinates, so its probes do too."""

    def __init__(self, eigenvalues, n):
        self.k = len(eigenvalues)
        super().__init__(torch.diag(torch.cat([eigenvalues, torch.zeros(n - self.k, dtype=torch.float64)])))

    @property
    def effective_dimension(self):
        return self.k

    def sample_probes(self, count, seed=0, distribution=None, generator=None):
        z = torch.zeros(self.shape[0], count, dtype=torch.float64)
        z[: self.k] = super().sample_probes(count, seed, distribution, generator)[: self.k]
        return z

    def describe(self):
        return {"subspace": self.k}


def test_slq_takes_probes_and_dimension_from_the_operator():
    eigenvalues = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    op = SubspaceOperator(eigenvalues, 8)
    result = slq(op, m=10, n_probes=4, seed=0, progress=False)
    assert result.n == 3 and result.config["m"] == 3 and result.config["subspace"] == 3
    # Rademacher on the 3 coordinates, full Lanczos there: every probe gives Σ f(λ) exactly
    assert result.spectral_sum(lambda t: t**0.5).samples == pytest.approx([6.0] * 4, rel=1e-12)
    assert result.spectral_sum(torch.ones_like).value == pytest.approx(3.0, rel=1e-12)  # not 8
    # the plain operator on the same matrix sums over all 8 eigenvalues (5 of them 0)
    plain = slq(MatrixOperator(op.matrix), m=8, n_probes=4, seed=0, progress=False)
    assert plain.n == 8 and plain.spectral_sum(torch.ones_like).value == pytest.approx(8.0, rel=1e-12)

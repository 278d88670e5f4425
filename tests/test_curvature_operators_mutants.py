"""Survivors of the mutation run on quotientsharp/curvature/operators.py, layerwise.py, results.py,
slq.py and probes.py: the SciPy adapter, the LinearOperator defaults, FunctionOperator's inner
products and forwarding, MatrixOperator / as_operator / select_parameters, the HVP modes and the
ModelOperator template (batch weights, chunks, cached products), per-layer Rényi sharpness and the
held-out (layer, α) selection, the result records' ``to_dict``, and the SLQ / probe plumbing.

Every reference is computed outside the code under test: small explicit float64 matrices, a dense
Hessian (and GGN) from ``torch.autograd.functional`` of a loss typed in by hand, SciPy's own
``LinearOperator`` contract, call counters on the callables handed to the operators, result
dicts written out field by field, Kendall τ-a and its bootstrap CI recomputed with a Python pair
loop from the same NumPy draws, Rényi entropies from exact eigenvalues, and Gauss–Lanczos
quadrature rules taken from the exact eigendecomposition of the matrix (with ``m = n`` the rule of
``z`` has the eigenvalues as nodes and ``(qᵢᵀz)²/‖z‖²`` as weights).
"""
from __future__ import annotations

import importlib
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensor_checks import DT, gen, randn
from torch import nn

from quotientsharp.curvature import (
    FunctionOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    ModelOperator,
    slq,
)
from quotientsharp.curvature.layerwise import (
    LayerwiseRenyi,
    layer_targets,
    layerwise_renyi,
    parse_value_name,
    select_layer_alpha,
    split_halves,
    value_name,
)
from quotientsharp.curvature.operators import as_operator, select_parameters
from quotientsharp.curvature.probes import sample_probes
from quotientsharp.curvature.renyi import RenyiResult
from quotientsharp.curvature.results import Estimate, mean_and_stderr
from quotientsharp.curvature.slq import SLQResult


def sym(n: int, seed: int = 0) -> torch.Tensor:
    A = randn(n, n, seed=seed)
    return A + A.T


def spd(n: int, seed: int = 0) -> torch.Tensor:
    A = randn(n, n, seed=seed)
    return A @ A.T + n * torch.eye(n, dtype=DT)


def re_tuple(shape) -> str:
    """A pattern matching the end of a message that quotes ``tuple(shape)``."""
    return re.escape(str(tuple(shape))) + "$"


class Counting:
    """``matvec``/``matmat`` of a dense matrix that count their calls."""

    def __init__(self, A: torch.Tensor):
        self.A, self.matvecs, self.matmats = A, 0, 0

    def matvec(self, v):
        self.matvecs += 1
        return self.A @ v

    def matmat(self, V):
        self.matmats += 1
        return self.A @ V


# --------------------------------------------------------------------------- LinearOperator.to_scipy
def test_to_scipy_products_match_the_dense_matrix():
    A = sym(5, seed=1)
    s = MatrixOperator(A).to_scipy()
    An = A.numpy()
    assert s.shape == (5, 5) and s.dtype == np.float64
    x = np.array([1.0, -2.0, 0.5, 3.0, -1.0])
    X = np.arange(15.0).reshape(5, 3) - 7
    np.testing.assert_allclose(s.matvec(x), An @ x, rtol=1e-14, atol=1e-12)
    np.testing.assert_allclose(s.matmat(X), An @ X, rtol=1e-14, atol=1e-12)
    np.testing.assert_allclose(s @ X, An @ X, rtol=1e-14, atol=1e-12)
    # the operator is symmetric: the adjoint products are A x as well
    np.testing.assert_allclose(s.rmatvec(x), An.T @ x, rtol=1e-14, atol=1e-12)
    np.testing.assert_allclose(s.rmatvec(x[:, None]), (An.T @ x)[:, None], rtol=1e-14, atol=1e-12)
    np.testing.assert_allclose(s.H @ x, An.T @ x, rtol=1e-14, atol=1e-12)
    np.testing.assert_allclose(s.T.matvec(x), An.T @ x, rtol=1e-14, atol=1e-12)


def test_to_scipy_casts_any_numpy_input_to_float64():
    A = sym(4, seed=2)
    s = MatrixOperator(A).to_scipy()
    x = np.array([1, -2, 3, 4])
    for xin in (x.astype(np.float32), x.astype(np.int64)):
        out = s.matvec(xin)
        assert out.dtype == np.float64
        np.testing.assert_allclose(out, A.numpy() @ x, rtol=1e-14, atol=1e-12)
        np.testing.assert_allclose(s.rmatvec(xin), A.numpy() @ x, rtol=1e-14, atol=1e-12)
    X = np.stack([x, 2 * x], 1).astype(np.float32)
    np.testing.assert_allclose(s.matmat(X), A.numpy() @ X.astype(np.float64), rtol=1e-14, atol=1e-12)


def test_to_scipy_is_lazy_and_forwards_blocks_to_matmat():
    """Building the adapter applies nothing (a model operator's product is a pass over the data),
    and a block product is one ``matmat`` call, not one matvec per column."""
    A = sym(6, seed=3)
    calls = Counting(A)
    s = FunctionOperator(6, calls.matvec, calls.matmat).to_scipy()
    assert (calls.matvecs, calls.matmats) == (0, 0)
    assert s.dtype == np.float64
    X = randn(6, 4, seed=4).numpy()
    np.testing.assert_allclose(s.matmat(X), A.numpy() @ X, rtol=1e-14, atol=1e-12)
    assert (calls.matvecs, calls.matmats) == (0, 1)
    np.testing.assert_allclose(s @ X, A.numpy() @ X, rtol=1e-14, atol=1e-12)
    assert (calls.matvecs, calls.matmats) == (0, 2)


def test_to_scipy_hands_the_operator_vectors_on_its_device():
    seen = []

    def matvec(v):
        seen.append((v.device.type, v.dtype, tuple(v.shape)))
        return torch.zeros(3, dtype=DT)

    def matmat(V):
        seen.append((V.device.type, V.dtype, tuple(V.shape)))
        return torch.zeros(3, V.shape[1], dtype=DT)

    s = FunctionOperator(3, matvec, matmat, device="meta").to_scipy()
    s.matvec(np.ones(3, dtype=np.float32))
    s.rmatvec(np.ones(3))
    s.matmat(np.ones((3, 2)))
    assert seen == [("meta", DT, (3,)), ("meta", DT, (3,)), ("meta", DT, (3, 2))]


# --------------------------------------------------------------------------- FunctionOperator
def test_function_operator_inner_from_metric_matmat():
    A, M = sym(4, seed=5), spd(4, seed=6)
    op = FunctionOperator(4, lambda v: A @ v, metric_matmat=lambda V: M @ V)
    u, v, U = randn(4, seed=7), randn(4, seed=8), randn(4, 3, seed=9)
    torch.testing.assert_close(op.inner(u, v), u @ M @ v, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(op.inner(U, v), U.T @ M @ v, rtol=1e-13, atol=1e-13)
    assert op.inner(U, v).shape == (3,)
    assert op.has_metric_matmat
    torch.testing.assert_close(op.metric_matmat(U), M @ U, rtol=0, atol=0)


def test_function_operator_defaults_to_the_euclidean_inner_product():
    A = sym(4, seed=10)
    op = FunctionOperator(4, lambda v: A @ v)
    u, v, U = randn(4, seed=11), randn(4, seed=12), randn(4, 2, seed=13)
    torch.testing.assert_close(op.inner(u, v), (u * v).sum(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(op.inner(U, v), (U * v[:, None]).sum(0), rtol=1e-13, atol=1e-13)
    assert op.has_metric_matmat
    assert torch.equal(op.metric_matmat(U), U)


def test_function_operator_with_inner_only_has_no_metric_matmat():
    A, M = sym(3, seed=14), spd(3, seed=15)
    op = FunctionOperator(3, lambda v: A @ v, inner=lambda u, v: (u.mT if u.ndim == 2 else u) @ (M @ v))
    u, v = randn(3, seed=16), randn(3, seed=17)
    torch.testing.assert_close(op.inner(u, v), u @ M @ v, rtol=1e-13, atol=1e-13)
    assert not op.has_metric_matmat
    with pytest.raises(NotImplementedError, match=r"^FunctionOperator with inner= but no metric_matmat=$"):
        op.metric_matmat(torch.eye(3, dtype=DT))


def test_function_operator_matmat_uses_the_given_block_product():
    A = sym(5, seed=18)
    calls = Counting(A)
    op = FunctionOperator(5, calls.matvec, calls.matmat)
    V = randn(5, 3, seed=19)
    torch.testing.assert_close(op.matmat(V), A @ V, rtol=1e-13, atol=1e-13)
    assert (calls.matvecs, calls.matmats) == (0, 1)
    only_matvec = Counting(A)
    torch.testing.assert_close(FunctionOperator(5, only_matvec.matvec).matmat(V), A @ V, rtol=1e-13, atol=1e-13)
    assert (only_matvec.matvecs, only_matvec.matmats) == (3, 0)


# --------------------------------------------------------------------------- finite-difference HVP
class TinyNet(nn.Module):
    """x ↦ W2 tanh(W1 x + b1) + b2, plus a parameter the forward never uses (zero Hessian rows)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(3, 4)
        self.lin2 = nn.Linear(4, 2)
        self.unused = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


def tiny_data():
    g = gen(21)
    return torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g)


def tiny_theta(model):
    """The flat parameters in model order (a module's own parameters before its children's)."""
    return torch.cat([model.unused.detach(), model.lin1.weight.detach().reshape(-1), model.lin1.bias.detach(),
                      model.lin2.weight.detach().reshape(-1), model.lin2.bias.detach()])


def tiny_logits(X):
    """θ ↦ logits of TinyNet, typed in (θ[:2] is the unused parameter)."""
    def logits(t):
        W1, b1 = t[2:14].reshape(4, 3), t[14:18]
        W2, b2 = t[18:26].reshape(2, 4), t[26:28]
        return torch.tanh(X @ W1.T + b1) @ W2.T + b2
    return logits


def tiny_mean_ce(X, y):
    def loss(t):
        logits = tiny_logits(X)(t)
        return (torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]).mean() + 0 * t[:2].sum()
    return loss


def tiny_dense_hessian(model, X, y):
    """Hessian of the mean cross-entropy over (unused, W1, b1, W2, b2)."""
    return torch.autograd.functional.hessian(tiny_mean_ce(X, y), tiny_theta(model))


# reverse_over_reverse raised "appears to not have been used in the graph" for every product
# while a trainable parameter went unused (its first autograd.grad did not materialize zeros)
@pytest.mark.parametrize("mode,tol", [("finite_difference", 1e-7), ("forward_over_reverse", 1e-12),
                                      ("reverse_over_reverse", 1e-12)])
def test_hvp_modes_against_dense_hessian_with_zero_unit_and_unused_columns(mode, tol):
    model = TinyNet().double()
    X, y = tiny_data()
    H = tiny_dense_hessian(model, X, y)
    n = H.shape[0]
    assert n == 28 and H[:2].abs().max() == 0
    op = HessianOperator(model, [(X, y)], F.cross_entropy, mode=mode)
    assert op.param_names == ["unused", "lin1.weight", "lin1.bias", "lin2.weight", "lin2.bias"]
    assert op.fd_step == 1e-5 and op.mode == mode
    e0, e_unused = torch.zeros(n, dtype=DT), torch.zeros(n, dtype=DT)
    e0[2], e_unused[1] = 1.0, 1.0
    # a zero column first (no step along it), unit columns, a general one
    V = torch.stack([torch.zeros(n, dtype=DT), e0, randn(n, seed=22), e_unused, torch.zeros(n, dtype=DT)], 1)
    out = op.matmat(V)
    assert out.shape == (n, 5)
    assert torch.equal(out[:, 0], torch.zeros(n, dtype=DT)) and torch.equal(out[:, 4], torch.zeros(n, dtype=DT))
    torch.testing.assert_close(out, H @ V, rtol=0, atol=tol)
    assert (H @ e0).abs().max() > 1e-2  # the unit column has a visible product
    torch.testing.assert_close(op.to_dense(), H, rtol=0, atol=tol)


# --------------------------------------------------------------------------- layerwise selection
def test_hessian_operator_refuses_a_target_the_loss_never_reads():
    model = TinyNet().double()
    X, y = tiny_data()
    with pytest.raises(ValueError, match=r"does not depend on the target parameters \['unused'\]"):
        HessianOperator(model, [(X, y)], F.cross_entropy, params=["unused"])


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse", "finite_difference"])
def test_hessian_operator_of_a_loss_linear_in_the_target_is_zero(mode):
    """loss = Σ (X W^T + b): its gradient is constant, so no gradient entry keeps a graph and the
    Hessian is exactly zero in every mode."""
    model = nn.Linear(3, 2).double()
    X, y = tiny_data()
    op = HessianOperator(model, [(X, y)], lambda out, target: out.sum(), mode=mode)
    assert op.n == 8 and torch.equal(op.to_dense(), torch.zeros(8, 8, dtype=DT))


def test_parse_value_name_splits_at_the_first_separator_only():
    assert parse_value_name("layer_renyi_0.5@blocks@0.weight") == ("0.5", "blocks@0.weight")
    assert parse_value_name(value_name("shannon", "a@b@c")) == ("shannon", "a@b@c")


def test_split_halves_default_seed_is_zero():
    ids = [f"m{i}" for i in range(10)]
    order = np.random.default_rng(0).permutation(10)
    chosen = {ids[k] for k in order[:5]}
    expected = ([i for i in ids if i in chosen], [i for i in ids if i not in chosen])
    assert split_halves(ids) == expected
    assert split_halves(ids, seed=1) != expected  # the default is visible


def hand_tau(x, y):
    m = len(x)
    s = [np.sign(x[a] - x[b]) * np.sign(y[a] - y[b]) for a in range(m) for b in range(a + 1, m)]
    return sum(s) / len(s)


def hand_bootstrap_ci(x, y, n_boot, seed):
    """Percentile CI of τ-a over resamples of models, pairs of the same original model left out."""
    m = len(x)
    idx = np.random.default_rng(seed).integers(0, m, size=(n_boot, m))
    taus = []
    for row in idx:
        num = count = 0
        for a in range(m):
            for b in range(a + 1, m):
                i, j = row[a], row[b]
                if i != j:
                    num += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
                    count += 1
        taus.append(num / count if count else 0.0)
    lo, hi = np.quantile(taus, [0.025, 0.975])
    return [float(lo), float(hi)]


def _population(n=12, seed=3):
    rng = np.random.default_rng(seed)
    ids = [f"m{i}" for i in range(n)]
    gap = {i: float(g) for i, g in zip(ids, rng.normal(size=n))}
    a, b = value_name(0.5, "l1"), value_name(1.5, "l2")
    values = {i: {a: gap[i] + 0.8 * float(rng.normal()), b: float(rng.normal())} for i in ids}
    return ids, gap, values


def test_select_layer_alpha_defaults_and_reported_fields():
    ids, gap, values = _population(n=30, seed=0)  # 15 evaluation models: n_boot = 2000 vs 2001 shows
    out = select_layer_alpha(values, gap)
    assert out["seed"] == 0 and out["sign"] == 1
    order = np.random.default_rng(0).permutation(len(ids))
    chosen = set(order[: len(ids) // 2].tolist())
    assert out["selection"] == [i for k, i in enumerate(ids) if k in chosen]
    assert out["evaluation"] == [i for k, i in enumerate(ids) if k not in chosen]
    best = out["choice"]["name"]
    ev_x, ev_y = [values[i][best] for i in out["evaluation"]], [gap[i] for i in out["evaluation"]]
    assert out["tau_evaluation"] == pytest.approx(hand_tau(ev_x, ev_y), abs=1e-12)
    assert out["ci95_evaluation"] == pytest.approx(hand_bootstrap_ci(ev_x, ev_y, 2000, 0), abs=1e-12)


def test_select_layer_alpha_passes_seed_and_n_boot_to_the_bootstrap():
    ids, gap, values = _population(n=14, seed=5)
    out = select_layer_alpha(values, gap, seed=3, sign=None, n_boot=300)
    assert out["seed"] == 3 and out["sign"] is None
    best = out["choice"]["name"]
    ev_x, ev_y = [values[i][best] for i in out["evaluation"]], [gap[i] for i in out["evaluation"]]
    assert out["ci95_evaluation"] == pytest.approx(hand_bootstrap_ci(ev_x, ev_y, 300, 3), abs=1e-12)
    assert select_layer_alpha(values, gap, seed=3, sign=-1, n_boot=300)["sign"] == -1


def test_select_layer_alpha_silences_only_its_own_tie_warnings():
    """Tied values make kendall_tau warn (τ-a ≠ τ-b); the selection computes τ-a on purpose and
    neither fails nor lets the warning out."""
    ids, gap, values = _population(n=8, seed=7)
    tied = value_name(2.0, "l3")
    for k, i in enumerate(ids):
        values[i][tied] = float(k // 4)  # two blocks of ties
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = select_layer_alpha(values, gap, n_boot=50)
    sel = out["selection"]
    assert out["candidates"][tied] == pytest.approx(hand_tau([values[i][tied] for i in sel], [gap[i] for i in sel]))


# --------------------------------------------------------------------------- result records
def renyi_record(estimate, alpha):
    return RenyiResult(estimate, alpha, "abs", 2.0, 3.0, 0.125, torch.tensor([[1.0, 2.0]], dtype=DT), {"m": 3})


def renyi_dict(estimate, alpha):
    return {"estimate": estimate, "alpha": alpha, "normalizer": "abs", "s_alpha": 2.0, "s_1": 3.0, "stderr": 0.125,
            "samples": [[1.0, 2.0]], "config": {"m": 3}, "sharpness": -estimate}


def test_layerwise_renyi_to_dict():
    rec = LayerwiseRenyi({"l1": 4, "l2": 2}, {"l1": {0.5: renyi_record(1.5, 0.5), "shannon": renyi_record(2.0, "shannon")},
                                              "l2": {1.5: renyi_record(-0.5, 1.5)}},
                         {"m": 3, "normalizer": "abs", "bad": math.inf})
    expected = {"n": {"l1": 4, "l2": 2},
                "renyi": {"l1": {"0.5": renyi_dict(1.5, 0.5), "shannon": renyi_dict(2.0, "shannon")},
                          "l2": {"1.5": renyi_dict(-0.5, 1.5)}},
                "config": {"m": 3, "normalizer": "abs", "bad": None}}
    assert rec.to_dict() == expected
    assert json.loads(json.dumps(rec.to_dict())) == expected


def test_estimate_to_dict():
    est = Estimate(1.25, 0.5, torch.tensor([1.0, 1.5], dtype=DT), {"m": 4, "x": math.nan, "seed": 2})
    expected = {"value": 1.25, "stderr": 0.5, "samples": [1.0, 1.5], "config": {"m": 4, "x": None, "seed": 2}}
    assert est.to_dict() == expected and json.loads(json.dumps(est.to_dict())) == expected
    assert Estimate(-2.0).to_dict() == {"value": -2.0, "stderr": None, "samples": None, "config": {}}


def test_slq_result_to_dict():
    res = SLQResult(torch.tensor([[1.0, 3.0]], dtype=DT), torch.tensor([[0.25, 0.75]], dtype=DT),
                    torch.tensor([4.0], dtype=DT), 2, {"method": "slq", "m": 2})
    expected = {"nodes": [[1.0, 3.0]], "weights": [[0.25, 0.75]], "probe_norms_sq": [4.0], "n": 2,
                "config": {"method": "slq", "m": 2}}
    assert res.to_dict() == expected and json.loads(json.dumps(res.to_dict())) == expected


def test_mean_and_stderr_by_hand():
    mean, stderr = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=DT))
    assert mean == 3.0 and stderr == pytest.approx(math.sqrt(14 / 3) / 2, rel=1e-14)
    mean, stderr = mean_and_stderr(torch.tensor([1.0, 4.0], dtype=DT))
    assert mean == 2.5 and stderr == pytest.approx(math.sqrt(4.5) / math.sqrt(2), rel=1e-14)
    assert mean_and_stderr(torch.tensor([7.0], dtype=DT)) == (7.0, None)


# --------------------------------------------------------------------------- probes
def test_sample_probes_rademacher_default():
    Z = sample_probes(50, 40, generator=gen(1))
    assert Z.shape == (50, 40) and Z.dtype == DT
    assert set(Z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(Z.mean())) < 0.05  # 2000 fair signs
    torch.manual_seed(123)
    again = sample_probes(50, 40, "rademacher", gen(1))
    assert torch.equal(Z, again)  # drawn from the generator, not the global RNG
    assert not torch.equal(Z, sample_probes(50, 40, generator=gen(2)))


def test_sample_probes_gaussian():
    Z = sample_probes(400, 25, "gaussian", gen(3))
    assert Z.shape == (400, 25) and Z.dtype == DT
    assert abs(float(Z.mean())) < 0.05 and abs(float(Z.var()) - 1) < 0.05
    assert len(Z.unique()) == Z.numel()
    torch.manual_seed(7)
    assert torch.equal(Z, sample_probes(400, 25, "gaussian", gen(3)))
    with pytest.raises(ValueError, match=r"^distribution must be one of \('rademacher', 'gaussian'\), got 'normal'$"):
        sample_probes(3, 2, "normal", gen(0))


# --------------------------------------------------------------------------- SLQ
def eig_matrix(n: int = 6, seed: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A = Q diag(λ) Qᵀ`` with distinct eigenvalues of both signs."""
    Q = torch.linalg.qr(randn(n, n, seed=seed)).Q
    lam = torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.5, 4.0], dtype=DT)[:n]
    return Q @ torch.diag(lam) @ Q.T, lam, Q


def exact_rules(lam, Q, Z):
    """With ``m = n`` the Gauss rule of probe ``z`` is exact: nodes λ (ascending), weights
    ``(qᵢᵀz)²/‖z‖²``, and ``‖z‖²``."""
    norms_sq = (Z**2).sum(0)
    return lam.expand(Z.shape[1], -1), ((Q.T @ Z) ** 2 / norms_sq).T, norms_sq


@pytest.mark.parametrize("lockstep,probe_block", [(True, None), (True, 2), (False, None)])
def test_slq_full_lanczos_rules_are_the_exact_gauss_rules(lockstep, probe_block):
    A, lam, Q = eig_matrix()
    Z = randn(6, 5, seed=31) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=DT)
    res = slq(MatrixOperator(A), m=6, probes=Z, progress=False, lockstep=lockstep, probe_block=probe_block)
    nodes, weights, norms_sq = exact_rules(lam, Q, Z)
    assert res.nodes.shape == (5, 6) and res.weights.shape == (5, 6) and res.probe_norms_sq.shape == (5,)
    torch.testing.assert_close(res.nodes, nodes, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.weights, weights, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.probe_norms_sq, norms_sq, rtol=1e-13, atol=0)
    assert res.n == 6
    assert res.config == {"method": "slq", "m": 6, "n_probes": 5, "distribution": "given", "seed": 0, "n": 6}
    # the per-probe samples of Tr A are zᵀAz
    torch.testing.assert_close(res.trace().samples, torch.einsum("ip,ij,jp->p", Z, A, Z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lockstep", [True, False])
def test_slq_restarts_after_breakdown_come_from_the_seeded_generator(lockstep):
    """A probe in a 2-dimensional invariant subspace breaks down after 2 steps; the rest of the
    m = 4 steps start from a random vector, which comes from the generator seeded by ``seed`` —
    not from the global RNG — so the nodes after the restart are reproducible."""
    Q = torch.linalg.qr(randn(6, 6, seed=34)).Q
    A = Q @ torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0, 5.0], dtype=DT)) @ Q.T
    z = (Q[:, 0] + 2 * Q[:, 2])[:, None]

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        return slq(MatrixOperator(A), m=4, probes=z, seed=seed, progress=False, lockstep=lockstep)

    first, again, other = run(3, 1), run(3, 2), run(4, 1)
    torch.testing.assert_close(first.nodes[0][first.weights[0] > 1e-12],
                               torch.tensor([1.0, 2.0], dtype=DT), rtol=0, atol=1e-10)  # the Gauss rule of z
    assert torch.equal(first.nodes, again.nodes)
    assert (first.nodes - other.nodes).abs().max() > 1e-6  # the restart vector did change with the seed


def test_slq_caps_m_at_the_dimension_and_records_the_draws():
    A, lam, Q = eig_matrix()
    Z = torch.randn(6, 3, generator=gen(5), dtype=DT)  # the Gaussian draws of a generator seeded 5
    res = slq(MatrixOperator(A), m=50, n_probes=3, distribution="gaussian", seed=5, progress=False)
    assert res.config == {"method": "slq", "m": 6, "n_probes": 3, "distribution": "gaussian", "seed": 5, "n": 6}
    assert res.nodes.shape == (3, 6)
    nodes, weights, norms_sq = exact_rules(lam, Q, Z)
    torch.testing.assert_close(res.probe_norms_sq, norms_sq, rtol=1e-13, atol=0)
    torch.testing.assert_close(res.weights, weights, rtol=0, atol=1e-10)


def test_slq_defaults():
    """m = 15, 100 Rademacher probes (‖z‖² = n) from seed 0, probes in lockstep (block products)."""
    A = sym(20, seed=32)
    calls = Counting(A)
    res = slq(FunctionOperator(20, calls.matvec, calls.matmat), progress=False)
    assert res.config == {"method": "slq", "m": 15, "n_probes": 100, "distribution": "rademacher", "seed": 0, "n": 20}
    assert res.nodes.shape == (100, 15)
    assert torch.equal(res.probe_norms_sq, torch.full((100,), 20.0, dtype=DT))
    Z = torch.randint(0, 2, (20, 100), generator=gen(0)).to(DT) * 2 - 1
    torch.testing.assert_close(res.trace().samples, torch.einsum("ip,ij,jp->p", Z, A, Z), rtol=1e-10, atol=1e-10)
    assert calls.matvecs == 0 and calls.matmats >= 1


def test_slq_probe_block_from_the_memory_cap(monkeypatch):
    slq_module = importlib.import_module("quotientsharp.curvature.slq")  # the attribute is the function

    A = sym(6, seed=33)

    def widths(**kwargs):
        seen = []
        op = FunctionOperator(6, lambda v: A @ v, lambda V: seen.append(V.shape[1]) or A @ V)
        slq(op, m=3, n_probes=5, progress=False, **kwargs)
        return sorted(set(seen))

    assert widths() == [5]
    monkeypatch.setattr(slq_module, "PROBE_BLOCK_BYTES", 8 * 3 * 6 * 2)  # room for 2 probes' bases
    assert widths() == [1, 2]
    monkeypatch.setattr(slq_module, "PROBE_BLOCK_BYTES", 8 * 3 * 6 * 2 - 1)
    assert widths() == [1]
    monkeypatch.setattr(slq_module, "PROBE_BLOCK_BYTES", 1)  # not even one: still one at a time
    assert widths() == [1]
    assert widths(probe_block=3) == [2, 3]


def test_slq_argument_errors():
    op = MatrixOperator(eig_matrix()[0])
    with pytest.raises(ValueError, match=r"^slq: m must be an integer >= 1, got 0$"):
        slq(op, m=0, progress=False)
    with pytest.raises(ValueError, match=r"^slq: n_probes must be an integer >= 1, got 0$"):
        slq(op, n_probes=0, progress=False)
    with pytest.raises(ValueError, match=r"^slq: probe_block must be an integer >= 1, got 0$"):
        slq(op, probe_block=0, progress=False)
    shape_error = r"^slq: probes must have shape \(6, P\) with P ≥ 1, got "
    for bad in (torch.ones(6, dtype=DT), torch.ones(5, 2, dtype=DT), torch.ones(6, 0, dtype=DT),
                torch.ones(6, 2, 1, dtype=DT)):
        with pytest.raises(ValueError, match=shape_error + re_tuple(bad.shape)):
            slq(op, probes=bad, progress=False)
    # the smallest valid values
    res = slq(op, m=1, n_probes=1, probe_block=1, progress=False)
    assert res.nodes.shape == (1, 1)
    assert slq(op, m=2, probes=torch.ones(6, 1, dtype=DT), n_probes=0, progress=False).config["n_probes"] == 1


def test_slq_progress_bars(capsys):
    op = MatrixOperator(eig_matrix()[0])
    slq(op, m=3, n_probes=3, progress=False, lockstep=False)
    slq(op, m=3, n_probes=3, progress=False, probe_block=1)
    assert capsys.readouterr().err == ""
    slq(op, m=3, n_probes=3, progress=True, lockstep=False)
    err = capsys.readouterr().err
    assert "SLQ:" in err and "SLQ: 100%" not in err and "\n" not in err  # transient bar
    slq(op, m=3, n_probes=3, progress=True, probe_block=1)
    err = capsys.readouterr().err
    assert "SLQ:" in err and "SLQ: 100%" not in err
    slq(op, m=3, n_probes=3, progress=True)  # a single block: no bar over blocks
    err = capsys.readouterr().err
    assert "Lanczos (lockstep)" in err and "SLQ" not in err


# --------------------------------------------------------------------------- SLQResult functionals
def hand_result() -> SLQResult:
    return SLQResult(torch.tensor([[0.5, 2.0], [1.0, 4.0]], dtype=DT), torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=DT),
                     torch.tensor([2.0, 4.0], dtype=DT), 2, {"method": "slq", "m": 2})


def test_slq_result_spectral_sums_by_hand():
    res = hand_result()
    tr = res.trace()
    assert tr.samples.tolist() == [2 * (0.125 + 1.5), 4 * (0.5 + 2.0)]
    assert tr.value == pytest.approx(6.625) and tr.stderr == pytest.approx(abs(3.25 - 10.0) / 2, rel=1e-13)
    assert tr.config == {"method": "slq", "m": 2, "function": "identity"}
    sq = res.abs_power_trace(2.0)
    assert sq.samples.tolist() == pytest.approx([2 * (0.25 * 0.25 + 0.75 * 4), 4 * (0.5 + 0.5 * 16)])
    assert sq.config["function"] == "abs_power_2.0"
    ld = res.log_det()
    assert ld.samples.tolist() == pytest.approx([math.log(2), 4 * math.log(2)], rel=1e-13)
    assert ld.config == {"method": "slq", "m": 2, "function": "log"}
    clamped = res.log_det(clamp_min=1.0)
    assert clamped.samples.tolist() == pytest.approx([2 * 0.75 * math.log(2), 4 * 0.5 * math.log(4)], rel=1e-13)
    assert clamped.config == {"method": "slq", "m": 2, "function": "log_clamp_1.0", "clamp_min": 1.0}
    assert res.config == {"method": "slq", "m": 2}  # the record's own config is not touched


def test_slq_result_log_det_refuses_non_positive_nodes():
    zero = SLQResult(torch.tensor([[0.0, 2.0]], dtype=DT), torch.tensor([[0.5, 0.5]], dtype=DT),
                     torch.tensor([1.0], dtype=DT), 2, {})
    with pytest.raises(ValueError, match=r"^log det is undefined: smallest quadrature node is 0 ≤ 0; pass clamp_min"):
        zero.log_det()
    assert zero.log_det(clamp_min=0.5).value == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(2))


def hand_density(nodes, weights, grid, s2):
    phi = torch.zeros_like(grid)
    for p in range(nodes.shape[0]):
        for k in range(nodes.shape[1]):
            phi += weights[p, k] * torch.exp(-((grid - nodes[p, k]) ** 2) / (2 * s2)) / math.sqrt(2 * math.pi * s2)
    return phi / nodes.shape[0]


def test_slq_result_density_by_hand():
    res = SLQResult(torch.tensor([[0.0, 1.0], [0.25, 0.5]], dtype=DT), torch.tensor([[0.5, 0.5], [0.8, 0.2]], dtype=DT),
                    torch.tensor([1.0, 1.0], dtype=DT), 2, {"m": 2})
    d = res.density(n_grid=9, padding=0.5, variance=0.04)
    grid = torch.tensor([-0.5 + 0.25 * i for i in range(9)], dtype=DT)
    torch.testing.assert_close(d.grid, grid, rtol=0, atol=1e-15)
    phi = hand_density(res.nodes, res.weights, grid, 0.04)
    mass = float(((phi[1:] + phi[:-1]) / 2 * 0.25).sum())
    assert d.variance == 0.04 and d.mass_before_normalisation == pytest.approx(mass, rel=1e-13)
    torch.testing.assert_close(d.density, phi / mass, rtol=1e-13, atol=1e-15)
    assert d.config == {"m": 2, "n_grid": 9, "padding": 0.5}
    # defaults: 10 000 points, padding 0.01, s² = 1e-5 · max(1, range)
    d = res.density()
    assert d.grid.shape == (10_000,) and d.grid.dtype == DT
    assert float(d.grid[0]) == pytest.approx(-0.01) and float(d.grid[-1]) == pytest.approx(1.01)
    assert d.variance == pytest.approx(1e-5 * 1.02) and d.config == {"m": 2, "n_grid": 10_000, "padding": 0.01}
    narrow = SLQResult(torch.tensor([[0.0, 0.1]], dtype=DT), torch.tensor([[0.5, 0.5]], dtype=DT),
                       torch.tensor([1.0], dtype=DT), 2, {})
    assert narrow.density(n_grid=50).variance == 1e-5


# --------------------------------------------------------------------------- LinearOperator defaults
class OnlyMatvec(LinearOperator):
    """The minimal subclass: a dense matrix behind ``matvec``; records what ``matvec`` receives."""

    def __init__(self, A, device="cpu"):
        self.A, self.shape, self.device, self.seen = A, tuple(A.shape), torch.device(device), []

    def matvec(self, v):
        self.seen.append((v.device.type, v.dtype))
        return self.A.to(v.device) @ v if v.device.type != "meta" else torch.zeros(self.shape[0], dtype=DT, device="meta")


class MetricByInner(OnlyMatvec):
    def inner(self, u, v):
        return 2 * super().inner(u, v)


def test_linear_operator_defaults_are_euclidean_and_columnwise():
    A = sym(5, seed=40)
    op = OnlyMatvec(A)
    u, v, U = randn(5, seed=41), randn(5, seed=42), randn(5, 3, seed=43)
    torch.testing.assert_close(op.inner(u, v), (u * v).sum(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(op.inner(U, v), (U * v[:, None]).sum(0), rtol=1e-13, atol=1e-13)
    assert op.has_metric_matmat and torch.equal(op.metric_matmat(U), U)
    torch.testing.assert_close(op.matmat(U), A @ U, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(op @ U, A @ U, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(op @ v, A @ v, rtol=1e-13, atol=1e-13)
    assert len(op.seen) == 3 + 3 + 1
    assert op.effective_dimension == 5 and op.describe() == {}
    custom = MetricByInner(A)
    assert not custom.has_metric_matmat
    with pytest.raises(NotImplementedError, match=r"^MetricByInner overrides inner\(\) but not metric_matmat\(\)$"):
        custom.metric_matmat(U)


def test_linear_operator_to_dense_in_column_blocks():
    n = 300
    A = sym(n, seed=44)
    widths = []
    op = FunctionOperator(n, lambda v: A @ v, lambda V: widths.append((V.shape[1], V.dtype)) or A @ V)
    torch.testing.assert_close(op.to_dense(), A, rtol=0, atol=0)
    assert widths == [(256, DT), (44, DT)]
    widths.clear()
    small = sym(5, seed=45)
    op = FunctionOperator(5, lambda v: small @ v, lambda V: widths.append((V.shape[1], V.dtype)) or small @ V)
    torch.testing.assert_close(op.to_dense(chunk_size=2), small, rtol=0, atol=0)
    assert widths == [(2, DT), (2, DT), (1, DT)]
    meta = OnlyMatvec(torch.eye(3, dtype=DT), device="meta")
    assert meta.to_dense().device.type == "meta" and meta.seen == [("meta", DT)] * 3


def test_linear_operator_sample_probes():
    op = OnlyMatvec(sym(7, seed=46))
    Z = op.sample_probes(4)
    assert Z.shape == (7, 4) and Z.dtype == DT and set(Z.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(Z, torch.randint(0, 2, (7, 4), generator=gen(0)).to(DT) * 2 - 1)  # seed 0
    assert torch.equal(op.sample_probes(4, seed=3), torch.randint(0, 2, (7, 4), generator=gen(3)).to(DT) * 2 - 1)
    g = gen(9)
    assert torch.equal(op.sample_probes(4, seed=3, distribution="gaussian", generator=g),
                       torch.randn(7, 4, generator=gen(9), dtype=DT))  # the given generator wins over seed
    op.probe_distribution = "gaussian"
    assert torch.equal(op.sample_probes(2, seed=1), torch.randn(7, 2, generator=gen(1), dtype=DT))
    assert torch.equal(op.sample_probes(2, seed=1, distribution="rademacher"),
                       torch.randint(0, 2, (7, 2), generator=gen(1)).to(DT) * 2 - 1)


# --------------------------------------------------------------------------- MatrixOperator / as_operator
def test_matrix_operator_construction():
    A32 = sym(4, seed=47).to(torch.float32)
    op = MatrixOperator(A32)
    assert op.matrix.dtype == DT and op.shape == (4, 4) and isinstance(op.shape, tuple)
    assert op.device == torch.device("cpu")
    torch.testing.assert_close(op.to_dense(), A32.to(DT), rtol=0, atol=0)
    dense = op.to_dense()
    dense[0, 0] = 100.0
    assert op.matrix[0, 0] != 100.0  # a copy
    for bad in (torch.ones(3, 4), torch.ones(3), torch.ones(2, 2, 2)):
        with pytest.raises(ValueError, match=r"^expected a square matrix, got shape " + re_tuple(bad.shape)):
            MatrixOperator(bad)


class DuckOperator:
    """Anything with ``shape`` and ``matvec`` (and optionally the rest)."""

    def __init__(self, A, M, full=True):
        self.shape, self.A, self.M, self.calls = tuple(A.shape), A, M, []
        if full:
            self.matmat = lambda V: self.calls.append("matmat") or A @ V
            self.inner = lambda u, v: self.calls.append("inner") or (u.mT if u.ndim == 2 else u) @ (M @ v)
            self.metric_matmat = lambda V: self.calls.append("metric_matmat") or M @ V
            self.device = "meta"

    def matvec(self, v):
        self.calls.append("matvec")
        return self.A @ v


def test_as_operator_forms():
    A, M = sym(4, seed=48), spd(4, seed=49)
    op = as_operator(A)
    assert isinstance(op, MatrixOperator) and torch.equal(op.matrix, A)
    assert as_operator(op) is op
    duck = DuckOperator(A, M)
    wrapped = as_operator(duck)
    assert isinstance(wrapped, FunctionOperator) and wrapped.shape == (4, 4) and wrapped.device == torch.device("meta")
    u, v, V = randn(4, seed=50), randn(4, seed=51), randn(4, 2, seed=52)
    torch.testing.assert_close(wrapped.matvec(v), A @ v, rtol=0, atol=0)
    torch.testing.assert_close(wrapped.matmat(V), A @ V, rtol=0, atol=0)
    torch.testing.assert_close(wrapped.inner(u, v), u @ M @ v, rtol=0, atol=0)
    torch.testing.assert_close(wrapped.metric_matmat(V), M @ V, rtol=0, atol=0)
    assert duck.calls == ["matvec", "matmat", "inner", "metric_matmat"]
    bare = DuckOperator(A, M, full=False)
    plain = as_operator(bare)
    assert plain.device == torch.device("cpu") and plain.has_metric_matmat
    torch.testing.assert_close(plain.matmat(V), A @ V, rtol=0, atol=0)
    torch.testing.assert_close(plain.inner(u, v), u @ v, rtol=0, atol=0)
    assert bare.calls == ["matvec", "matvec"]
    with pytest.raises(TypeError, match=r"^cannot use list as a linear operator \(needs shape and matvec\)$"):
        as_operator([[1.0]])


# --------------------------------------------------------------------------- select_parameters / HessianOperator
def test_select_parameters_errors_and_frozen_targets():
    model = TinyNet()
    model.lin2.bias.requires_grad_(False)
    assert select_parameters(model) == ["unused", "lin1.weight", "lin1.bias", "lin2.weight"]
    assert select_parameters(model, "lin1.*") == ["lin1.weight", "lin1.bias"]  # glob
    assert select_parameters(model, r"n1\.b") == ["lin1.bias"]  # regular expression, searched
    assert select_parameters(model, ("lin2.weight", "unused")) == ["unused", "lin2.weight"]
    with pytest.raises(ValueError, match=r"^model has no parameter\(s\) \['lin3.weight'\]; available: \['unused'"):
        select_parameters(model, ["lin1.weight", "lin3.weight"])
    with pytest.raises(ValueError, match=r"^target parameter\(s\) \['lin2.bias'\] do not require grad"):
        select_parameters(model, "lin2.*")
    with pytest.raises(ValueError, match=r"^no parameter name matches 'conv'; available: \['unused'"):
        select_parameters(model, "conv")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^no parameter of the model requires grad: nothing to differentiate$"):
        select_parameters(model)


def test_hessian_operator_constructor_settings():
    X, y = tiny_data()
    model = TinyNet().double()
    op = HessianOperator(model, [(X, y)], F.cross_entropy)
    assert op.mode == "reverse_over_reverse" and op.chunk_size == 32 and op.train_mode is False
    assert op.param_names == ["unused", "lin1.weight", "lin1.bias", "lin2.weight", "lin2.bias"]
    assert op.compute_dtype == DT and op.fd_step == 1e-5
    op = HessianOperator(model, [(X, y)], F.cross_entropy, params="lin2.*", mode="forward_over_reverse",
                         train_mode=True, chunk_size=5, fd_step=0.25, dtype=torch.float32)
    assert op.mode == "forward_over_reverse" and op.chunk_size == 5 and op.train_mode is True
    assert op.param_names == ["lin2.weight", "lin2.bias"] and op.fd_step == 0.25
    assert op.compute_dtype == torch.float32 and op.target["lin2.weight"].dtype == torch.float32
    assert HessianOperator(model, [(X, y)], F.cross_entropy, dtype=torch.float32).fd_step == 1e-2
    assert HessianOperator(TinyNet(), [(X.float(), y)], F.cross_entropy).fd_step == 1e-2
    with pytest.raises(ValueError, match=r"^unknown HVP mode 'exact'; choose one of \('reverse_over_reverse', "):
        HessianOperator(model, [(X, y)], F.cross_entropy, mode="exact")


def test_hessian_operator_checks_determinism_by_default():
    X, y = tiny_data()
    noise = torch.Generator().manual_seed(0)

    def noisy(out, target):
        return F.cross_entropy(out, target) + 1e-3 * torch.rand((), generator=noise, dtype=DT)

    with pytest.raises(ValueError, match=r"^two passes over the data gave different loss/gradient"):
        HessianOperator(TinyNet().double(), [(X, y)], noisy)
    HessianOperator(TinyNet().double(), [(X, y)], noisy, check_deterministic=False)


# --------------------------------------------------------------------------- layerwise_renyi
def hand_renyi(lam: torch.Tensor, alpha, normalizer: str) -> tuple[float, float, float]:
    """(H_α, S_α, S₁) of eigenvalues ``lam`` under the "abs"/"clamp" masses, typed in."""
    mass = lam.abs() if normalizer == "abs" else lam.clamp(min=0)
    s1 = float(mass.sum())
    if alpha == "shannon":
        sa = float(sum(float(t) * math.log(float(t)) for t in mass if t > 0))
        return math.log(s1) - sa / s1, sa, s1
    sa = float((mass**alpha).sum())
    return (math.log(sa) - alpha * math.log(s1)) / (1 - alpha), sa, s1


def tiny_dense_ggn(model, X):
    """``(1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` with J from torch.autograd.functional.jacobian."""
    theta, logits = tiny_theta(model), tiny_logits(X)
    J = torch.autograd.functional.jacobian(logits, theta)  # (N, C, n)
    p = torch.softmax(logits(theta), 1)
    Hf = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nci,ncd,ndj->ij", J, Hf, J) / X.shape[0]


def identity_probes(n: int) -> torch.Tensor:
    """√n·I: with m = n every SLQ rule is exact and the mean over the n probes is Tr f(H)."""
    return math.sqrt(n) * torch.eye(n, dtype=DT)


def test_layerwise_renyi_exact_blocks_against_dense_hessian():
    model = TinyNet().double()
    X, y = tiny_data()
    H = tiny_dense_hessian(model, X, y)
    blocks = {"first": slice(2, 14), "second": slice(18, 28)}
    loader = ((X[i : i + 4], y[i : i + 4]) for i in (0, 4))  # a one-shot iterator: kept for every layer
    result = layerwise_renyi(model, loader, F.cross_entropy, alphas=(2.0, "shannon"),
                             targets={"first": "lin1.weight", "second": ("lin2.weight", "lin2.bias")},
                             m=50, seed=4, normalizer="clamp", probes=identity_probes)
    assert result.n == {"first": 12, "second": 10}
    assert result.config == {"m": 50, "n_probes": "given", "seed": 4, "normalizer": "clamp", "alphas": [2.0, "shannon"],
                             "targets": {"first": "lin1.weight", "second": ["lin2.weight", "lin2.bias"]}}  # tuple → list
    for layer, sl in blocks.items():
        lam = torch.linalg.eigvalsh(H[sl, sl])
        assert set(result.renyi[layer]) == {2.0, "shannon"}  # α < 1 would amplify the rounding of λ ≈ 0
        for alpha, r in result.renyi[layer].items():
            h, sa, s1 = hand_renyi(lam, alpha, "clamp")
            assert r.alpha == alpha and r.normalizer == "clamp"
            assert r.estimate == pytest.approx(h, rel=1e-8) and r.s_1 == pytest.approx(s1, rel=1e-8)
            assert r.s_alpha == pytest.approx(sa, rel=1e-8, abs=1e-12)
            assert r.config["m"] == sl.stop - sl.start and r.config["n_probes"] == sl.stop - sl.start
            assert r.config["seed"] == 4 and r.config["distribution"] == "given"


def test_layerwise_renyi_passes_operator_kwargs_and_progress(capsys):
    model = TinyNet().double()
    X, y = tiny_data()
    G = tiny_dense_ggn(model, X)[2:14, 2:14]
    result = layerwise_renyi(model, [(X, y)], F.cross_entropy, alphas=1.5, targets={"first": "lin1.weight"},
                             m=12, probes=identity_probes, curvature="ggn", progress=True)
    assert "Lanczos (lockstep)" in capsys.readouterr().err  # progress reaches the SLQ run
    h, sa, s1 = hand_renyi(torch.linalg.eigvalsh(G), 1.5, "abs")
    assert result.renyi["first"][1.5].estimate == pytest.approx(h, rel=1e-8)
    assert result.config["alphas"] == [1.5] and result.config["normalizer"] == "abs"


def test_layerwise_renyi_defaults(capsys):
    model = TinyNet().double()
    X, y = tiny_data()
    result = layerwise_renyi(model, [(X, y)], F.cross_entropy)
    assert capsys.readouterr().err == ""  # no progress bars by default
    assert result.n == {"lin1.weight": 12, "lin2.weight": 8}
    assert result.config == {"m": 15, "n_probes": 100, "seed": 0, "normalizer": "abs", "alphas": [0.5, 1.5],
                             "targets": {"lin1.weight": ["lin1.weight"], "lin2.weight": ["lin2.weight"]}}
    for layer, n in result.n.items():
        assert set(result.renyi[layer]) == {0.5, 1.5}
        r = result.renyi[layer][0.5]
        assert r.config["n_probes"] == 100 and r.config["seed"] == 0 and r.config["m"] == n
        assert r.config["distribution"] == "rademacher" and r.samples.shape == (100, 2)
    assert set(result.values()) == {value_name(a, layer) for a in (0.5, 1.5) for layer in result.n}


def test_layerwise_renyi_argument_errors():
    model = TinyNet().double()
    X, y = tiny_data()
    with pytest.raises(ValueError, match=r"^layerwise_renyi: m must be an integer >= 1, got 0$"):
        layerwise_renyi(model, [(X, y)], F.cross_entropy, m=0)
    with pytest.raises(ValueError, match=r"^layerwise_renyi: n_probes must be an integer >= 1, got 0$"):
        layerwise_renyi(model, [(X, y)], F.cross_entropy, n_probes=0)
    with pytest.raises(ValueError, match=r"^layerwise_renyi: alphas is empty$"):
        layerwise_renyi(model, [(X, y)], F.cross_entropy, alphas=[])
    with pytest.raises(ValueError, match=r"^layerwise_renyi: targets is empty$"):
        layerwise_renyi(model, [(X, y)], F.cross_entropy, targets={})
    with pytest.raises(TypeError, match=r"^layerwise_renyi"):
        layerwise_renyi(model, F.cross_entropy, [(X, y)])
    # the smallest valid counts
    one = layerwise_renyi(model, [(X, y)], F.cross_entropy, m=1, n_probes=1, targets={"w": "lin2.weight"})
    assert one.config["m"] == 1 and one.renyi["w"][0.5].config["m"] == 1
    # m < block size and m ≠ n_probes: each reaches SLQ in its own place
    few = layerwise_renyi(model, [(X, y)], F.cross_entropy, m=3, n_probes=2, targets={"w": "lin2.weight"})
    assert few.renyi["w"][0.5].config["m"] == 3 and few.renyi["w"][0.5].config["n_probes"] == 2


def test_layer_targets_rule():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    model.register_parameter("matrix", nn.Parameter(torch.ones(2, 2)))  # ndim 2 but not a "weight"
    assert layer_targets(model) == {"0.weight": ["0.weight"]}
    with pytest.raises(ValueError, match=r"^the model has no trainable weight tensor with ndim > 1; pass targets="):
        layer_targets(nn.Sequential(nn.LayerNorm(3)))


# --------------------------------------------------------------------------- the ModelOperator template
def tiny_loss(model, X, y, delta=None):
    """(L(θ + δ), ∇L(θ + δ)) of the hand-typed loss."""
    theta = (tiny_theta(model) + (0 if delta is None else delta)).requires_grad_(True)
    loss = tiny_mean_ce(X, y)(theta)
    return float(loss.detach()), torch.autograd.grad(loss, theta)[0]


class CountingHessian(HessianOperator):
    def __init__(self, *args, **kwargs):
        self.products = 0
        super().__init__(*args, **kwargs)

    def batch_product(self, batch):
        self.products += 1
        return super().batch_product(batch)


def test_model_operator_batches_weights_chunks_loss_and_gradient():
    model = TinyNet().double()
    X, y = tiny_data()
    H = tiny_dense_hessian(model, X, y)
    op = CountingHessian(model, [(X[:3], y[:3]), (X[3:], y[3:])], F.cross_entropy, chunk_size=2,
                         mode="forward_over_reverse")
    assert op.batch_weights == [3 / 8, 5 / 8] and op.num_data == 8 and op.n == 28 and op.shape == (28, 28)
    loss, gradient = tiny_loss(model, X, y)
    assert op.loss == pytest.approx(loss, rel=1e-13)
    torch.testing.assert_close(op.gradient, gradient, rtol=0, atol=1e-14)
    delta = 0.1 * randn(28, seed=60)
    moved_loss, moved_gradient = op.loss_and_gradient(delta)
    hand_loss, hand_gradient = tiny_loss(model, X, y, delta)
    assert moved_loss == pytest.approx(hand_loss, rel=1e-13) and abs(moved_loss - loss) > 1e-3
    torch.testing.assert_close(moved_gradient, hand_gradient, rtol=0, atol=1e-14)
    V = randn(28, 5, seed=61)
    op.products = 0
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=0, atol=1e-12)
    assert op.products == 2  # one per batch, shared by the three chunks
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=0, atol=1e-12)
    for bad in (V[:27], V[:, 0]):
        with pytest.raises(ValueError, match=r"^CountingHessian.matmat: expected shape \(28, k\), got " + re_tuple(bad.shape)):
            op.matmat(bad)
    parts = op.unflatten(V[:, 0])
    assert list(parts) == op.param_names and parts["lin1.weight"].shape == (4, 3)
    assert torch.equal(op.flatten(parts), V[:, 0]) and torch.equal(op.flatten(list(parts.values())), V[:, 0])


def test_model_operator_reuses_batch_products_inside_the_block():
    model = TinyNet().double()
    X, y = tiny_data()
    H = tiny_dense_hessian(model, X, y)
    batches = [(X[:2], y[:2]), (X[2:5], y[2:5]), (X[5:], y[5:])]
    op = CountingHessian(model, batches, F.cross_entropy, mode="forward_over_reverse")
    v = randn(28, seed=62)
    op.products = 0
    with op.reuse_batch_products():
        for _ in range(3):
            torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-12)
        with op.reuse_batch_products(max_batches=1):  # nested: the outer cache
            op.matvec(v)
    assert op.products == 3
    op.matvec(v)
    assert op.products == 6  # the cache ends with the block
    op.products = 0
    with op.reuse_batch_products(max_batches=1):
        for _ in range(3):
            torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-12)
    assert op.products == 1 + 2 * 3


def test_model_operator_errors():
    model = TinyNet().double()
    X, y = tiny_data()
    bare = ModelOperator(model, [(X, y)], F.cross_entropy)
    with pytest.raises(NotImplementedError, match=r"^ModelOperator has no curvature product: subclass ModelOperator"):
        bare.matvec(torch.zeros(28, dtype=DT))
    calls = []

    def nan_on_second(out, target):
        calls.append(len(target))
        loss = F.cross_entropy(out, target)
        return loss * math.nan if len(calls) == 2 else loss

    with pytest.raises(ValueError, match=r"^non-finite loss \(nan\) on batch 1: check the inputs"):
        ModelOperator(model, [(X[:4], y[:4]), (X[4:], y[4:])], nan_on_second)

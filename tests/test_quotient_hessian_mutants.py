"""Survivors of the mutation run on quotientsharp/curvature/quotient_hessian.py: the horizontal
probes, Hutchinson, SLQ and Lanczos/power methods of :class:`QuotientHessianOperator` and the
model-level wrappers (trace, SLQ, top eigenvalues, spectral density, Rényi sharpness).

Ground truth is dense linear algebra on the 80-parameter attention model of
``test_independent_references`` (float64): ``A = Π M⁻¹(H − C)Π``, ``M`` and the vertical vectors
``V`` built there by autodiff of the loss, the metric and the group *action*, not by the operator.
The probes are rebuilt here as ``Π W ζ`` rescaled to ``‖z‖²_M = n_h``, with ``ζ`` drawn from a
generator seeded like the library's, ``Π = I − V(VᵀMV)⁻¹VᵀM`` and ``W`` the matrix of
``Quotient.whiten`` (checked to satisfy ``WWᵀ = M⁻¹``). Spectral quantities come from
``eigh(L⁻¹ M A L⁻ᵀ)`` (``M = LLᵀ``): per probe ``⟨z, f(A) z⟩_M = Σ_i f(λ_i) (uᵢᵀLᵀz)²``. Gauss
quadrature with ``m`` Lanczos steps is exact for polynomials of degree ≤ 2m − 1, and for every
``f`` once ``m = n_h``, so SLQ samples are compared exactly where that holds. Krylov Ritz values
are recomputed from the dense matrix. Arguments that only change how a run is shown (``progress``,
``lockstep``) are observed through the progress bars written to stderr.
"""
from __future__ import annotations

import functools
import math
import re
import warnings

import pytest
import torch
from test_independent_references import dense_quotient_hessian, mse, quotient_hessian_case, small_attention_problem

from quotientsharp.curvature import (
    QuotientHessianOperator,
    RenyiResult,
    quotient_hessian_slq,
    quotient_hessian_spectral_density,
    quotient_hessian_top_eigenvalues,
    quotient_hessian_trace,
    quotient_renyi_sharpness,
)

DT = torch.float64
NAMES = ["att.q.weight", "att.q.bias", "att.k.weight", "att.k.bias",
         "att.v.weight", "att.v.bias", "att.o.weight", "att.o.bias"]
LOCKSTEP_BAR = "Lanczos (lockstep)"


# --- dense references ----------------------------------------------------------------------------
@functools.lru_cache
def reference(metric: str) -> dict:
    """Dense ``A``, ``M``, ``Π``, ``W`` and the horizontal eigen-decomposition for ``metric``."""
    op, A, parts = quotient_hessian_case(metric)
    M, V = parts["M"], parts["V"]
    n = A.shape[0]
    eye = torch.eye(n, dtype=DT)
    Pi = eye - V @ torch.linalg.solve(V.T @ M @ V, V.T @ M)
    W = torch.stack([op.to_flat(op.quotient.whiten(op.point, op.to_dict(eye[:, i]))) for i in range(n)], 1)
    Minv = torch.linalg.inv(M)
    assert (W @ W.T - Minv).abs().max() <= 1e-12 * Minv.abs().max()  # covariance M⁻¹
    L = torch.linalg.cholesky(M)
    B = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, M @ A, upper=False).T, upper=False)
    values, vectors = torch.linalg.eigh((B + B.T) / 2)
    horizontal = values.abs().argsort()[V.shape[1]:].sort().values  # drop the dim V zeros
    assert values.abs().sort().values[V.shape[1] - 1] <= 1e-10 * values.abs().max()
    return {"op": op, "A": A, "M": M, "Pi": Pi, "W": W, "L": L, "n": n, "n_h": n - V.shape[1],
            "kernel_dim": V.shape[1], "eig": values[horizontal], "U": vectors[:, horizontal]}


def probes(metric: str, count: int, seed: int) -> torch.Tensor:
    """``(n, count)`` horizontal probes ``Π W ζ`` scaled to ``‖z‖²_M = n_h``."""
    r = reference(metric)
    zeta = torch.randn(r["n"], count, generator=torch.Generator().manual_seed(seed), dtype=DT)
    Z = r["Pi"] @ r["W"] @ zeta
    return Z * (r["n_h"] / (Z * (r["M"] @ Z)).sum(0)).sqrt()


def quadratic_forms(metric: str, Z: torch.Tensor, f) -> torch.Tensor:
    """``(⟨z_p, f(A) z_p⟩_M)_p`` over the horizontal eigenvalues."""
    r = reference(metric)
    c = r["U"].T @ (r["L"].T @ Z)  # (n_h, P) coordinates of Lᵀz on the horizontal eigenvectors
    return (f(r["eig"])[:, None] * c**2).sum(0)


def power_forms(metric: str, Z: torch.Tensor, k: int) -> torch.Tensor:
    """``(z_pᵀ M A^k z_p)_p`` by dense matrix powers."""
    r = reference(metric)
    return ((r["M"] @ Z) * (torch.linalg.matrix_power(r["A"], k) @ Z)).sum(0)


def ritz_values(metric: str, z: torch.Tensor, m: int) -> torch.Tensor:
    """Ritz values of ``A`` on the Krylov space ``span(z, Az, …, A^{m−1}z)`` in the M inner product."""
    r = reference(metric)
    K = [z / z.norm()]
    for _ in range(m - 1):
        K.append(r["A"] @ K[-1])
        K[-1] = K[-1] / K[-1].norm()
    K = torch.linalg.qr(torch.stack(K, 1)).Q  # same span, well conditioned
    G = K.T @ r["M"] @ K
    S = K.T @ r["M"] @ r["A"] @ K
    C = torch.linalg.cholesky(G)
    T = torch.linalg.solve_triangular(C, torch.linalg.solve_triangular(C, S, upper=False).T, upper=False)
    return torch.linalg.eigvalsh((T + T.T) / 2)


def problem():
    return small_attention_problem()


def config_of(metric: str, **extra) -> dict:
    r = reference(metric)
    return {"operator": "quotient_hessian", "quotient": repr(r["op"].quotient), "n": r["n_h"], "n_total": r["n"],
            "kernel_dim": r["kernel_dim"], "probes": "horizontal_whitened_spherical", "params": NAMES, **extra}


def assert_close(actual, expected, rel=1e-9):
    actual, expected = torch.as_tensor(actual, dtype=DT), torch.as_tensor(expected, dtype=DT)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= rel * expected.abs().max()


def swapped_message(owner: str) -> str:
    return "^" + re.escape(f"{owner}(model, loader, loss_fn, ...): loader and loss_fn are swapped")


def count_message(owner: str, name: str, value) -> str:
    return "^" + re.escape(f"{owner}: {name} must be an integer >= 1, got {value!r}") + "$"


# --- QuotientHessianOperator.sample_probes / _config -----------------------------------------------
def test_reference_is_the_library_geometry():
    r = reference("mix")
    assert r["op"].param_names == NAMES and r["n"] == 80 and r["n_h"] == 64 and r["kernel_dim"] == 16
    assert "AttentionGL(metric='mix'" in repr(r["op"].quotient)
    assert "AttentionGL(metric='inv'" in repr(reference("inv")["op"].quotient)
    assert (r["op"].to_dense() - r["A"]).abs().max() <= 1e-10 * r["A"].abs().max()


def test_sample_probes_are_the_whitened_projected_gaussians():
    op = reference("mix")["op"]
    r = reference("mix")
    Z = op.sample_probes(4, seed=3)
    assert Z.dtype == DT and Z.shape == (80, 4)
    assert_close(Z, probes("mix", 4, 3), rel=1e-12)
    assert (r["Pi"] @ Z - Z).abs().max() <= 1e-12 * Z.abs().max()  # horizontal
    assert_close((Z * (r["M"] @ Z)).sum(0), torch.full((4,), 64.0), rel=1e-12)  # ‖z‖²_M = n_h per column
    assert_close(op.sample_probes(3), probes("mix", 3, 0), rel=1e-12)  # default seed 0
    assert_close(op.sample_probes(1, 2), probes("mix", 1, 2), rel=1e-12)
    given = op.sample_probes(3, seed=0, generator=torch.Generator().manual_seed(5))  # the generator wins
    assert_close(given, probes("mix", 3, 5), rel=1e-12)
    named = op.sample_probes(2, 1, distribution="horizontal_whitened_spherical")
    assert_close(named, probes("mix", 2, 1), rel=1e-12)
    message = ("QuotientHessianOperator samples its own probes (horizontal_whitened_spherical); "
               "distribution='rademacher' cannot be used")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        op.sample_probes(2, distribution="rademacher")


def test_describe_is_the_full_config():
    op = reference("mix")["op"]
    assert op.describe() == config_of("mix")
    assert op.effective_dimension == 64 and op.probe_distribution == "horizontal_whitened_spherical"


# --- QuotientHessianOperator.hutchinson ------------------------------------------------------------
def test_hutchinson_samples_estimate_and_config():
    op = reference("mix")["op"]
    result = op.hutchinson(5, 3)
    expected = quadratic_forms("mix", probes("mix", 5, 3), lambda t: t)
    assert_close(result.samples, expected)
    assert result.value == pytest.approx(float(expected.mean()), rel=1e-9)
    assert result.stderr == pytest.approx(float(expected.std() / math.sqrt(5)), rel=1e-8)
    assert result.config == config_of("mix", method="hutchinson", n_probes=5, seed=3)

    default = op.hutchinson()
    expected = quadratic_forms("mix", probes("mix", 100, 0), lambda t: t)
    assert_close(default.samples, expected)
    assert default.config == config_of("mix", method="hutchinson", n_probes=100, seed=0)
    assert abs(default.value - float(reference("mix")["eig"].sum())) <= 4 * default.stderr


# --- QuotientHessianOperator.slq -------------------------------------------------------------------
def test_operator_slq_defaults(capsys):
    op = reference("mix")["op"]
    capsys.readouterr()
    result = op.slq()
    assert LOCKSTEP_BAR in capsys.readouterr().err  # progress=True by default
    assert result.n == 64 and result.nodes.shape == (100, 15)
    assert {k: result.config[k] for k in ("m", "n_probes", "seed", "n")} == {"m": 15, "n_probes": 100, "seed": 0, "n": 64}
    Z = probes("mix", 100, 0)
    assert_close(result.trace().samples, quadratic_forms("mix", Z, lambda t: t))
    assert_close(result.probe_norms_sq, torch.full((100,), 64.0), rel=1e-12)


def test_operator_slq_passes_its_arguments(capsys):
    op = reference("mix")["op"]
    capsys.readouterr()
    result = op.slq(m=4, n_probes=6, seed=2, progress=False)
    assert capsys.readouterr().err == ""
    assert result.nodes.shape == (6, 4) and result.config["m"] == 4 and result.config["seed"] == 2
    Z = probes("mix", 6, 2)
    # 4 Lanczos steps integrate degree ≤ 7 exactly
    assert_close(result.spectral_sum(lambda t: t**5).samples, power_forms("mix", Z, 5), rel=1e-8)
    assert_close(result.trace().samples, quadratic_forms("mix", Z, lambda t: t))

    sequential = op.slq(3, 2, 1, True, lockstep=False)  # slq_kwargs reach slq(): one bar over the probes
    err = capsys.readouterr().err
    assert "SLQ" in err and LOCKSTEP_BAR not in err
    assert_close(sequential.spectral_sum(lambda t: t**3).samples, power_forms("mix", probes("mix", 2, 1), 3),
                 rel=1e-8)


# --- QuotientHessianOperator.top_eigenvalues -------------------------------------------------------
def test_operator_top_eigenvalues_defaults(capsys):
    r = reference("mix")
    capsys.readouterr()
    top = r["op"].top_eigenvalues()
    assert "Lanczos" in capsys.readouterr().err
    assert top.eigenvalues.shape == (1,)
    assert float(top.eigenvalues[0]) == pytest.approx(float(r["eig"][-1]), rel=1e-7)
    assert top.config == {"method": "lanczos", "k": 1, "which": "LA", "m": 40, "steps": top.config["steps"],
                          "tol": 1e-4, "seed": 0, **config_of("mix")}
    assert top.config["steps"] <= 40
    # the default number of steps is max(2k + 20, 40), capped at n_h
    many = r["op"].top_eigenvalues(k=12, tol=1e-300, progress=False)
    assert many.config["m"] == 44 and many.config["steps"] == 44 and many.config["k"] == 12
    assert_close(many.eigenvalues[:3], r["eig"].flip(0)[:3], rel=1e-8)


def test_operator_top_eigenvalues_krylov_from_the_horizontal_probe(capsys):
    r = reference("mix")
    z = probes("mix", 1, 4)[:, 0]  # the start: the seed's first horizontal probe
    ritz = ritz_values("mix", z, 3)
    capsys.readouterr()
    top = r["op"].top_eigenvalues(k=2, which="LA", m=3, tol=1e-12, seed=4, progress=False)
    assert capsys.readouterr().err == ""
    assert_close(top.eigenvalues, ritz.flip(0)[:2], rel=1e-9)
    assert {k: top.config[k] for k in ("k", "which", "m", "steps", "tol", "seed")} == \
        {"k": 2, "which": "LA", "m": 3, "steps": 3, "tol": 1e-12, "seed": 4}
    bottom = r["op"].top_eigenvalues(1, "SA", "lanczos", 3, 1e-12, 4, False)
    assert_close(bottom.eigenvalues, ritz[:1], rel=1e-9)
    assert bottom.config["which"] == "SA"
    # m is capped at n_h: 64 steps from a horizontal start span the whole horizontal space
    full = r["op"].top_eigenvalues(k=2, m=100, tol=1e-13, progress=False)
    assert full.config["m"] == 64
    assert_close(full.eigenvalues, r["eig"].flip(0)[:2], rel=1e-9)
    assert_close(r["Pi"] @ full.eigenvectors, full.eigenvectors, rel=1e-9)


def test_operator_top_eigenvalues_power(capsys):
    r = reference("mix")
    largest_magnitude = float(r["eig"][r["eig"].abs().argmax()])
    capsys.readouterr()
    power = r["op"].top_eigenvalues(method="power")
    assert "power iteration" in capsys.readouterr().err
    assert power.config == {"method": "power_iteration", "k": 1, "tol": 1e-3, "max_iter": 100, "seed": 0,
                            **config_of("mix")}
    one = r["op"].top_eigenvalues(k=1, method="power", tol=1e-12, seed=1, progress=False)
    assert capsys.readouterr().err == ""
    assert one.eigenvalues.shape == (1,)
    assert {k: one.config[k] for k in ("k", "tol", "seed")} == {"k": 1, "tol": 1e-12, "seed": 1}
    assert float(one.eigenvalues[0]) == pytest.approx(largest_magnitude, rel=1e-8)
    with pytest.raises(ValueError, match="^" + re.escape("method must be 'lanczos' or 'power', got 'arnoldi'") + "$"):
        r["op"].top_eigenvalues(method="arnoldi")


# --- quotient_hessian_top_eigenvalues --------------------------------------------------------------
def test_top_eigenvalues_wrapper_defaults(capsys):
    model, loader = problem()
    capsys.readouterr()
    top = quotient_hessian_top_eigenvalues(model, loader, mse)
    assert "Lanczos" in capsys.readouterr().err
    assert top.eigenvalues.shape == (1,)
    assert float(top.eigenvalues[0]) == pytest.approx(float(reference("mix")["eig"][-1]), rel=1e-7)
    assert {k: top.config[k] for k in ("k", "which", "m", "tol", "seed")} == \
        {"k": 1, "which": "LA", "m": 40, "tol": 1e-4, "seed": 0}


def test_top_eigenvalues_wrapper_passes_its_arguments(capsys):
    model, loader = problem()
    ritz = ritz_values("inv", probes("inv", 1, 6)[:, 0], 4)
    capsys.readouterr()
    top = quotient_hessian_top_eigenvalues(model, loader, mse, k=2, which="SA", m=4, tol=1e-12, seed=6,
                                           progress=False, metric="inv", eps_rel=0.0)
    assert capsys.readouterr().err == ""
    assert_close(top.eigenvalues, ritz[:2], rel=1e-9)
    assert {k: top.config[k] for k in ("k", "which", "m", "steps", "tol", "seed")} == \
        {"k": 2, "which": "SA", "m": 4, "steps": 4, "tol": 1e-12, "seed": 6}
    assert top.config["quotient"] == repr(reference("inv")["op"].quotient)
    power = quotient_hessian_top_eigenvalues(model, loader, mse, k=1, method="power", tol=1e-12, progress=False)
    assert power.config["method"] == "power_iteration" and power.config["tol"] == 1e-12


def test_top_eigenvalues_wrapper_bad_arguments():
    model, loader = problem()
    owner = "quotient_hessian_top_eigenvalues"
    with pytest.raises(ValueError, match=count_message(owner, "k", 0)):
        quotient_hessian_top_eigenvalues(model, loader, mse, k=0)
    with pytest.raises(TypeError, match=swapped_message(owner)):
        quotient_hessian_top_eigenvalues(model, mse, loader)


# --- quotient_hessian_trace ------------------------------------------------------------------------
def test_trace_wrapper_defaults_to_hutchinson_with_100_probes():
    model, loader = problem()
    result = quotient_hessian_trace(model, loader, mse)
    assert result.config == config_of("mix", method="hutchinson", n_probes=100, seed=0)
    assert_close(result.samples, quadratic_forms("mix", probes("mix", 100, 0), lambda t: t))


def test_trace_wrapper_hutchinson_passes_its_arguments():
    model, loader = problem()
    result = quotient_hessian_trace(model, loader, mse, method="hutchinson", n_probes=7, seed=3, metric="inv")
    assert result.config == config_of("inv", method="hutchinson", n_probes=7, seed=3)
    assert_close(result.samples, quadratic_forms("inv", probes("inv", 7, 3), lambda t: t))
    one = quotient_hessian_trace(model, loader, mse, n_probes=1, seed=2)
    assert_close(one.samples, quadratic_forms("mix", probes("mix", 1, 2), lambda t: t))


def test_trace_wrapper_slq(capsys):
    model, loader = problem()
    capsys.readouterr()
    result = quotient_hessian_trace(model, loader, mse, method="slq", n_probes=3, seed=2)
    assert LOCKSTEP_BAR in capsys.readouterr().err  # progress=True by default
    assert {k: result.config[k] for k in ("method", "m", "n_probes", "seed", "function")} == \
        {"method": "slq", "m": 15, "n_probes": 3, "seed": 2, "function": "identity"}
    assert_close(result.samples, quadratic_forms("mix", probes("mix", 3, 2), lambda t: t))  # exact for f = id
    quiet = quotient_hessian_trace(model, loader, mse, method="slq", n_probes=1, m=1, seed=5, progress=False,
                                   metric="inv")
    assert capsys.readouterr().err == ""
    assert quiet.config["m"] == 1 and quiet.config["n_probes"] == 1
    assert_close(quiet.samples, quadratic_forms("inv", probes("inv", 1, 5), lambda t: t))


@pytest.mark.parametrize("wrapper", [quotient_hessian_trace, quotient_hessian_slq], ids=lambda f: f.__name__)
def test_trace_and_slq_wrappers_bad_arguments(wrapper):
    model, loader = problem()
    owner = wrapper.__name__
    with pytest.raises(ValueError, match=count_message(owner, "n_probes", 0)):
        wrapper(model, loader, mse, n_probes=0)
    with pytest.raises(ValueError, match=count_message(owner, "m", 0)):
        wrapper(model, loader, mse, m=0)
    with pytest.raises(TypeError, match=swapped_message(owner)):
        wrapper(model, mse, loader)
    if wrapper is quotient_hessian_trace:
        message = "^" + re.escape(f"{owner}: method must be one of 'hutchinson', 'slq'; got 'hutch++'") + "$"
        with pytest.raises(ValueError, match=message):
            wrapper(model, loader, mse, method="hutch++")


# --- quotient_hessian_slq --------------------------------------------------------------------------
def test_slq_wrapper_defaults(capsys):
    model, loader = problem()
    capsys.readouterr()
    result = quotient_hessian_slq(model, loader, mse)
    assert LOCKSTEP_BAR in capsys.readouterr().err  # progress and lockstep on by default
    assert result.nodes.shape == (100, 15) and result.n == 64
    assert {k: result.config[k] for k in ("m", "n_probes", "seed")} == {"m": 15, "n_probes": 100, "seed": 0}
    assert_close(result.trace().samples, quadratic_forms("mix", probes("mix", 100, 0), lambda t: t))


def test_slq_wrapper_passes_its_arguments(capsys):
    model, loader = problem()
    capsys.readouterr()
    result = quotient_hessian_slq(model, loader, mse, m=3, n_probes=4, seed=5, progress=False, metric="inv")
    assert capsys.readouterr().err == ""
    assert result.nodes.shape == (4, 3) and result.config["seed"] == 5
    assert result.config["quotient"] == repr(reference("inv")["op"].quotient)
    Z = probes("inv", 4, 5)
    assert_close(result.spectral_sum(lambda t: t**4).samples, power_forms("inv", Z, 4), rel=1e-8)

    sequential = quotient_hessian_slq(model, loader, mse, m=2, n_probes=2, seed=1, progress=True, lockstep=False)
    err = capsys.readouterr().err
    assert "SLQ" in err and LOCKSTEP_BAR not in err
    assert_close(sequential.spectral_sum(lambda t: t**3).samples, power_forms("mix", probes("mix", 2, 1), 3),
                 rel=1e-8)
    smallest = quotient_hessian_slq(model, loader, mse, m=1, n_probes=1, seed=2, progress=False)
    assert smallest.nodes.shape == (1, 1)
    assert_close(smallest.trace().samples, quadratic_forms("mix", probes("mix", 1, 2), lambda t: t))


# --- quotient_hessian_spectral_density -------------------------------------------------------------
def reference_density(metric: str, Z: torch.Tensor, n_grid: int, padding: float = 0.01) -> tuple:
    """φ on its grid from the exact rules: nodes λ_i, weights (uᵢᵀLᵀz)² / ‖z‖²_M."""
    r = reference(metric)
    c = r["U"].T @ (r["L"].T @ Z)
    weights = c**2 / (c**2).sum(0)
    lam = r["eig"]
    lo, hi = float(lam.min()) - padding, float(lam.max()) + padding
    grid = torch.linspace(lo, hi, n_grid, dtype=DT)
    s2 = 1e-5 * max(1.0, hi - lo)
    kernel = torch.exp(-((grid[:, None] - lam[None, :]) ** 2) / (2 * s2)) / math.sqrt(2 * math.pi * s2)
    phi = (kernel @ weights).mean(1)
    return grid, phi / float(torch.trapezoid(phi, grid))


def test_spectral_density_defaults_are_exact_rules():
    model, loader = problem()
    density = quotient_hessian_spectral_density(model, loader, mse, progress=False)  # m = 100 → n_h, 3 probes
    assert density.config["n_grid"] == 10_000 and density.config["m"] == 64 and density.config["n_probes"] == 3
    grid, phi = reference_density("mix", probes("mix", 3, 0), 10_000)
    assert_close(density.grid, grid, rel=1e-9)
    assert (density.density - phi).abs().max() <= 1e-5 * phi.max()
    small = quotient_hessian_spectral_density(model, loader, mse, m=2, n_probes=1, n_grid=500, seed=3,
                                              progress=False, metric="inv")
    assert small.grid.shape == (500,) and small.density.shape == (500,)
    assert {k: small.config[k] for k in ("n_grid", "m", "n_probes", "seed")} == \
        {"n_grid": 500, "m": 2, "n_probes": 1, "seed": 3}
    assert small.config["quotient"] == repr(reference("inv")["op"].quotient)


# --- quotient_renyi_sharpness ----------------------------------------------------------------------
def test_renyi_defaults():
    model, loader = problem()
    result = quotient_renyi_sharpness(model, loader, mse, progress=False)
    assert isinstance(result, RenyiResult) and result.alpha == 0.5 and result.normalizer == "abs"
    assert result.samples.shape == (100, 2)
    assert {k: result.config[k] for k in ("m", "n_probes", "seed")} == {"m": 15, "n_probes": 100, "seed": 0}
    lam = reference("mix")["eig"]
    exact = (math.log(float((lam.abs() ** 0.5).sum())) - 0.5 * math.log(float(lam.abs().sum()))) / 0.5
    assert result.estimate == pytest.approx(exact, abs=0.15)  # m = 15 is biased here (indefinite spectrum)


def signed_renyi(s2: torch.Tensor, s1: torch.Tensor, alpha: float) -> float:
    return (math.log(float(s2.mean())) - alpha * math.log(float(s1.mean()))) / (1 - alpha)


def test_renyi_passes_its_arguments_exactly():
    """α = 2 and 4 with the signed normalizer: every sum is a polynomial, integrated exactly."""
    model, loader = problem()
    Z = probes("inv", 6, 6)
    a1, a2, a4 = (power_forms("inv", Z, k) for k in (1, 2, 4))
    with pytest.warns(UserWarning, match="normalizer='signed'"):
        single = quotient_renyi_sharpness(model, loader, mse, alpha=2.0, normalizer="signed", m=3, n_probes=6,
                                          seed=6, progress=False, metric="inv")
    assert single.alpha == 2.0 and single.normalizer == "signed"
    assert {k: single.config[k] for k in ("m", "n_probes", "seed")} == {"m": 3, "n_probes": 6, "seed": 6}
    assert_close(single.samples, torch.stack([a2, a1], 1), rel=1e-8)
    assert single.estimate == pytest.approx(signed_renyi(a2, a1, 2.0), rel=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        several = quotient_renyi_sharpness(model, loader, mse, alpha=[2.0, 4.0], normalizer="signed", m=3,
                                           n_probes=6, seed=6, progress=False, metric="inv")
    assert set(several) == {2.0, 4.0} and all(v.normalizer == "signed" for v in several.values())
    assert_close(several[4.0].samples, torch.stack([a4, a1], 1), rel=1e-8)
    assert several[4.0].estimate == pytest.approx(signed_renyi(a4, a1, 4.0), rel=1e-8)
    assert several[2.0].estimate == pytest.approx(signed_renyi(a2, a1, 2.0), rel=1e-8)


# --- QuotientHessianOperator.map_columns -----------------------------------------------------------
def test_map_columns_vmaps_the_geometry_and_remembers_failures():
    r = reference("mix")
    op = QuotientHessianOperator(*problem(), mse, metric="mix", eps_rel=0.0)  # a fresh vmap_failures
    V = torch.randn(80, 3, generator=torch.Generator().manual_seed(8), dtype=DT)
    assert_close(op.map_columns(op._project, V), r["Pi"] @ V, rel=1e-12)
    W = V.float()  # float32 columns are cast to float64 before the geometry sees them
    assert_close(op.metric_matmat(W), r["M"] @ W.double(), rel=1e-12)
    assert_close(op.map_columns(op._project, W), r["Pi"] @ W.double(), rel=1e-12)
    assert_close(op.map_columns(op._riemannian_gradient, W), r["Pi"] @ torch.linalg.solve(r["M"], W.double()),
                 rel=1e-10)
    assert_close(op.matmat(W), r["A"] @ W.double(), rel=1e-9)
    assert_close(op.matmat(V), r["A"] @ V, rel=1e-9)
    assert op.vmap_failures == {}  # every map of the attention geometry vmaps
    empty = op.map_columns(op._project, torch.zeros(80, 0, dtype=torch.float32))
    assert empty.shape == (80, 0) and empty.dtype == DT
    message = "QuotientHessianOperator: expected columns of shape (80, k), got (81, 2)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        op.map_columns(op._project, torch.zeros(81, 2, dtype=DT))
    with pytest.raises(ValueError, match="^" + re.escape(message.replace("(81, 2)", "(80,)")) + "$"):
        op.map_columns(op._project, torch.zeros(80, dtype=DT))

    def sign_of_sum(xi):  # data-dependent control flow: does not vmap
        return {n: t * (1.0 if float(t.sum()) > 0 else -1.0) for n, t in xi.items()}

    sizes = [t.numel() for t in r["op"].point.values()]
    by_hand = torch.stack([torch.cat([p * (1.0 if float(p.sum()) > 0 else -1.0) for p in V[:, j].split(sizes)])
                           for j in range(3)], 1)
    assert torch.equal(op.map_columns(sign_of_sum, V[:, :1]), by_hand[:, :1])
    assert op.vmap_failures == {}  # one column: a direct call, vmap not tried
    assert torch.equal(op.map_columns(sign_of_sum, V[:, :2]), by_hand[:, :2])
    assert list(op.vmap_failures) == ["sign_of_sum"]
    assert op.vmap_failures["sign_of_sum"].startswith("RuntimeError: ")
    assert torch.equal(op.map_columns(sign_of_sum, V), by_hand)
    assert_close(op.map_columns(op._project, V), r["Pi"] @ V, rel=1e-12)
    assert list(op.vmap_failures) == ["sign_of_sum"]


def test_flat_and_dict_conversions_are_float64_for_a_float32_model():
    model, loader = problem()
    model = model.float()
    op = QuotientHessianOperator(model, [(x.float(), y.float()) for x, y in loader], mse)
    v = torch.randn(80, generator=torch.Generator().manual_seed(9), dtype=DT)
    assert [t.dtype for t in op.point.values()] == [DT] * 8  # the geometry runs in float64
    d = op.to_dict(v)
    assert [t.dtype for t in d.values()] == [DT] * 8 and list(d) == NAMES
    assert torch.equal(torch.cat([t.reshape(-1) for t in d.values()]), v)  # no round trip through float32
    single = {n: t.float() for n, t in d.items()}
    flat = op.to_flat(single)
    assert flat.dtype == DT and torch.equal(flat, v.float().double())


def test_flat_metric_has_no_christoffel_term():
    """No symmetry and a Euclidean rest: ``Γ = 0`` and ``A`` is the plain Hessian, here by autograd."""
    from quotientsharp.models import MLP

    torch.manual_seed(0)
    model = MLP([3, 4, 2], activation="tanh").to(DT)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT)
    op = QuotientHessianOperator(model, [(x, y)], mse, rest="euclidean")
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w):
        params = dict(zip(names, (part.reshape(s) for part, s in zip(w.split([s.numel() for s in shapes]), shapes))))
        return mse(torch.func.functional_call(model, params, (x,)), y)

    H = torch.autograd.functional.hessian(loss, w0)
    v = torch.randn(op.n, generator=g, dtype=DT)
    assert torch.equal(op.christoffel_matvec(v), torch.zeros(op.n, dtype=DT))
    assert_close(op.matvec(v), H @ v, rel=1e-12)


# --- QuotientHessianOperator.__init__ --------------------------------------------------------------
def test_constructor_settings_and_messages():
    from torch import nn

    from quotientsharp.adapters import find_symmetries

    model, loader = problem()
    r = reference("mix")
    v = torch.randn(80, 2, generator=torch.Generator().manual_seed(10), dtype=DT)
    default = QuotientHessianOperator(model, loader, mse)  # metric "mix", eps_rel 0
    assert_close(default.metric_matmat(v), r["M"] @ v, rel=1e-12)
    given = QuotientHessianOperator(model, loader, mse, quotient=r["op"].quotient)
    assert_close(given.metric_matmat(v), r["M"] @ v, rel=1e-12)
    forward = QuotientHessianOperator(model, loader, mse, mode="forward_over_reverse", chunk_size=7)
    assert forward.hessian.mode == "forward_over_reverse" and forward.hessian.chunk_size == 7  # passed on
    assert_close(forward.matmat(v), r["A"] @ v, rel=1e-9)
    regularised = QuotientHessianOperator(model, loader, mse, eps_rel=0.5)
    assert (regularised.metric_matmat(v) - r["M"] @ v).abs().max() > 1e-3 * (r["M"] @ v).abs().max()
    owner = "QuotientHessianOperator"
    with pytest.raises(TypeError, match=swapped_message(owner)):
        QuotientHessianOperator(model, mse, loader)
    with pytest.raises(ValueError, match="^" + re.escape(f"{owner}: metric must be one of 'inv', 'mix'; got 'euclid'")):
        QuotientHessianOperator(model, loader, mse, metric="euclid")
    with pytest.raises(ValueError, match="^" + re.escape("metric/rest/eps_rel configure the default quotient; with "
                                                         "quotient= given")):
        QuotientHessianOperator(model, loader, mse, quotient=r["op"].quotient, metric="inv")
    message = ("the quotient must cover exactly the trainable parameters; not trainable: ['bias', 'weight'], "
               f"not covered: {sorted(NAMES)}")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        QuotientHessianOperator(model, loader, mse, quotient=find_symmetries(nn.Linear(2, 2).to(DT)))


def test_christoffel_with_a_euclidean_rest_against_the_dense_construction():
    """With ``rest="euclidean"`` the output bias never enters ``Γ``: its block of ``C v`` is 0."""
    model, loader = problem()
    op = QuotientHessianOperator(model, loader, mse, rest="euclidean")
    _, parts = dense_quotient_hessian(model, loader[0], op.quotient)
    v = torch.randn(80, generator=torch.Generator().manual_seed(11), dtype=DT)
    expected = parts["C"] @ v
    assert_close(op.christoffel_matvec(v), expected, rel=1e-10)
    assert expected[-4:].abs().max() == 0 and expected.abs().max() > 0  # att.o.bias: flat


# --- QuotientHessianOperator.__init__: horizontal spaces of dimension 0 and 1 ------------------------
def test_horizontal_dimension_zero_is_refused_and_one_is_the_scalar_quotient_hessian():
    """Adaptive rest metric ``g(w) = 1/w²`` on a linear model: coordinates with ``w = 0`` are masked
    (vertical), so all-zero weights leave no horizontal direction and one non-zero weight leaves one.
    On it, ``A = M⁻¹(H − C) = w²(∂²L + Γ ∂L)`` with ``Γ = ½ g⁻¹ g' = −1/w``: ``w² ∂²L + w ∂L``."""
    from quotientsharp.quotient import Quotient

    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(8, 3, generator=gen, dtype=DT), torch.randn(8, 1, generator=gen, dtype=DT)
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    quotient = Quotient([], ["weight", "bias"], rest="adaptive")
    with pytest.raises(ValueError, match="horizontal space is trivial"):
        QuotientHessianOperator(model, [(X, Y)], mse, quotient=quotient)
    w = 0.7
    with torch.no_grad():
        model.weight[0, 1] = w
    op = QuotientHessianOperator(model, [(X, Y)], mse, quotient=quotient)
    assert (op.n, op.kernel_dim, op.n_horizontal) == (4, 3, 1)
    x = X[:, 1]
    residual = w * x - Y[:, 0]
    d2, d1 = 2 * (x * x).mean(), 2 * (residual * x).mean()  # ∂²L, ∂L of mean((w x − y)²)
    expected = torch.zeros(4, 4, dtype=DT)
    expected[1, 1] = w * w * d2 + w * d1
    assert_close(op.to_dense(), expected, rel=1e-12)

"""Behavioural tests of quotientsharp/geodesic.py aimed at surviving mutants (issue 18).

Ground truth is independent of the integrator: the closed-form geodesic of the adaptive metric
``1/w^2`` (``Gamma = -xi^2/w``, ``gamma(t) = w exp(t xi/w)``, spec part 1 §6.4), the step-doubling
contract of spec §6.5 (passes of ``n, 2n, 4n, ...`` steps; accept the first ``2n`` pass whose
endpoint is within ``tol ||xi|| |t|`` of the ``n``-step one; give up past ``max_steps``), read off
the ``on_step`` callback, and the GL Christoffel forms of spec §6.2/§6.3 written out by hand.

Each integration test runs ``integrate_geodesic`` three ways: inside ``torch.func.jvp`` (the plain
traced RK4 of ``_plain_integration``), as an autograd node (the kept trajectory and its discrete
adjoint) and without a graph; derivatives are checked against the closed form too.
"""
from __future__ import annotations

import pytest
import torch

from quotientsharp.geodesic import (
    autograd_linearization,
    geodesic_trajectory,
    gl_block_christoffel,
    integrate_geodesic,
)

DT = torch.float64


def _adaptive_christoffel(w, v):
    """``Gamma_w(v, v) = -v^2 / w`` per coordinate: the metric ``1/w^2`` (spec §6.4)."""
    return {n: -v[n] ** 2 / w[n] for n in w}


def _exact(w: torch.Tensor, xi: torch.Tensor, t: float) -> torch.Tensor:
    """The closed-form geodesic ``w exp(t xi / w)`` of the adaptive metric."""
    return w * torch.exp(t * xi / w)


class _TooManySteps(Exception):
    """Raised by the recording callback once more steps ran than the contract allows."""


class _Recorder:
    """``on_step`` callback: records every step state (as plain float64 tensors) and its dtype."""

    def __init__(self, limit: int = 10_000):
        self.states, self.dtypes, self.limit = [], [], limit

    def __call__(self, w):
        if len(self.states) >= self.limit:
            raise _TooManySteps(f"more than {self.limit} RK4 steps")
        self.dtypes.append(w["a"].dtype)
        self.states.append(torch.tensor(w["a"].tolist(), dtype=DT))

    def passes(self, n0: int) -> list[list[torch.Tensor]]:
        """The recorded states split into passes of ``n0, 2 n0, 4 n0, ...`` steps (asserted)."""
        out, start, length = [], 0, n0
        while start < len(self.states):
            out.append(self.states[start:start + length])
            start, length = start + length, 2 * length
        assert start == len(self.states), f"{len(self.states)} steps are not passes of {n0}, {2 * n0}, ..."
        return out


PATHS = ["jvp", "autograd", "no_grad"]


def _integrate(path, w, xi, direction, christoffel=_adaptive_christoffel, **kw):
    """``integrate_geodesic(christoffel, {"a": w}, {"a": xi}, **kw)["a"]`` and its derivative
    along ``direction`` w.r.t. ``xi``, by one of three paths: inside ``torch.func.jvp`` (the
    plain traced RK4), as an autograd node (``xi`` requires grad: the discrete adjoint; the
    Jacobian of an elementwise geodesic is diagonal, so the VJP with ``direction`` is the JVP),
    or without a graph (derivative ``None``)."""
    def f(x):
        return integrate_geodesic(christoffel, {"a": w}, {"a": x}, **kw)["a"]
    if path == "jvp":
        return torch.func.jvp(f, (xi,), (direction,))
    if path == "autograd":
        x = xi.clone().requires_grad_(True)
        out = f(x)
        (g,) = torch.autograd.grad(out, x, direction)
        return out.detach(), g
    with torch.no_grad():
        return f(xi), None


# ------------------------------------------------------------------ step doubling (spec §6.5)
@pytest.mark.parametrize("xi_scale,t,tol", [
    (0.3, 1.0, 1e-10),    # the default tolerance, t = 1
    (0.02, 4.0, 1e-10),   # |t| != 1: the tolerance scales with ||xi|| |t|, not ||xi|| / |t|
    (0.002, 2.5, 1e-9),   # ||xi|| |t| << 1: no absolute floor added to the scale
    (0.08, 0.5, 1e-11),   # t < 1
    (0.1, -1.5, 1e-10),   # backward in time: |t|
])
@pytest.mark.parametrize("path", PATHS)
def test_step_doubling_follows_the_spec_contract(path, xi_scale, t, tol):
    n0 = 4
    w = torch.tensor([1.0, 2.0, 0.5], dtype=DT)
    xi = xi_scale * torch.tensor([1.0, -1.5, 0.4], dtype=DT)
    direction = torch.tensor([0.3, 1.0, -0.7], dtype=DT)
    rec = _Recorder()
    out, tangent = _integrate(path, w, xi, direction, t=t, n_steps=n0, tol=tol, on_step=rec)
    passes = rec.passes(n0)
    assert len(passes) >= 2  # at least one doubling is always compared
    # every pass is an RK4 trajectory over [0, t] with equal steps (closed form at each step)
    for states in passes:
        for j, s in enumerate(states, start=1):
            assert torch.allclose(s, _exact(w, xi, t * j / len(states)), rtol=1e-5, atol=0)
    # acceptance: the last pair agrees within tol ||xi|| |t|, no earlier pair does
    scale = float(xi.norm()) * abs(t)
    diffs = [float((b[-1] - a[-1]).norm()) for a, b in zip(passes, passes[1:])]
    assert diffs[-1] <= tol * scale
    assert all(d > tol * scale for d in diffs[:-1])
    # the result is the accepted (finer) endpoint, in the input dtype, and is the geodesic
    assert out.dtype == DT and torch.equal(out, passes[-1][-1])
    assert torch.allclose(out, _exact(w, xi, t), rtol=100 * tol, atol=0)
    # d/dxi [w exp(t xi / w)] = t exp(t xi / w)
    if tangent is not None:
        assert tangent.dtype == DT
        assert torch.allclose(tangent, t * torch.exp(t * xi / w) * direction, rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_fixed_steps_run_exactly_n_steps(path):
    w = torch.tensor([1.0, 2.0], dtype=DT)
    xi = torch.tensor([0.3, -0.5], dtype=DT)
    rec = _Recorder()
    out, tangent = _integrate(path, w, xi, torch.ones(2, dtype=DT), t=1.0, n_steps=6, tol=None, on_step=rec)
    assert len(rec.states) == 6
    assert torch.equal(out, rec.states[-1])
    assert torch.allclose(out, _exact(w, xi, 1.0), rtol=1e-5, atol=0)
    if tangent is not None:  # the derivative of the 6-step RK4 map, near the exact one
        assert torch.allclose(tangent, torch.exp(xi / w), rtol=1e-4, atol=0)


@pytest.mark.parametrize("tol", [0.0, 1e-10])
@pytest.mark.parametrize("path", PATHS)
def test_zero_velocity_converges_at_the_first_doubling(path, tol):
    """xi = 0: every pass ends exactly at w (difference 0), so the first doubling is accepted even
    with ``tol = 0`` and with ``max_steps`` equal to that doubling's step count."""
    w = torch.tensor([1.5, -2.0], dtype=DT)
    xi = torch.zeros(2, dtype=DT)
    direction = torch.tensor([1.0, 2.0], dtype=DT)
    rec = _Recorder(limit=12)
    out, tangent = _integrate(path, w, xi, direction, t=1.0, n_steps=4, tol=tol, max_steps=8, on_step=rec)
    assert [len(p) for p in rec.passes(4)] == [4, 8]
    assert torch.equal(out, w)
    if tangent is not None:  # d/dxi [w exp(xi / w)] at xi = 0 is the identity
        assert torch.allclose(tangent, direction, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_raises_once_doubling_would_exceed_max_steps(path):
    # at ||xi|| = 0.54 the 4/8/16-step endpoints differ by > 1e-10 ||xi|| (RK4, error ~ h^4)
    w = torch.tensor([1.0, 2.0], dtype=DT)
    xi = torch.tensor([0.3, -0.45], dtype=DT)
    rec = _Recorder(limit=4 + 8 + 16)
    with pytest.raises(RuntimeError, match=r"did not converge to tol=1e-10 within 16 steps"):
        _integrate(path, w, xi, torch.ones(2, dtype=DT), n_steps=4, tol=1e-10, max_steps=16, on_step=rec)
    assert [len(p) for p in rec.passes(4)] == [4, 8, 16]


@pytest.mark.parametrize("path", PATHS)
def test_float32_is_integrated_in_float64_and_returned_in_float32(path):
    """Spec §6.5: work in float64. The Christoffel term and the callback see float64 states; the
    endpoint (and its derivative) come back in the input dtype, and the default tolerance (1e-10,
    far below float32 rounding) is met."""
    w = torch.tensor([1.0, 2.0], dtype=torch.float32)
    xi = torch.tensor([0.3, -0.5], dtype=torch.float32)
    rec, seen = _Recorder(limit=4096), set()

    def christoffel(w_, v_):
        seen.update((w_["a"].dtype, v_["a"].dtype))
        return _adaptive_christoffel(w_, v_)

    direction = torch.ones(2, dtype=torch.float32)
    out, tangent = _integrate(path, w, xi, direction, christoffel, n_steps=8, on_step=rec)
    assert seen == {DT}
    assert rec.dtypes and set(rec.dtypes) == {DT}
    assert out.dtype == torch.float32
    want = _exact(w.double(), xi.double(), 1.0)
    assert torch.allclose(out.double(), want, rtol=2 ** -23, atol=0)
    assert torch.equal(out, rec.passes(8)[-1][-1].float())
    if tangent is not None:
        assert tangent.dtype == torch.float32
        assert torch.allclose(tangent.double(), torch.exp(xi.double() / w.double()), rtol=1e-6, atol=0)


def test_defaults_are_t1_64_steps_and_tol_1e_10():
    """Spec §6.5 defaults: t = 1, n = 64, tol = 1e-10 (at this radius 64 steps are not enough)."""
    w = torch.tensor([1.0, 2.0, 0.5], dtype=DT)
    xi = torch.tensor([1.0, -1.5, 0.4], dtype=DT)
    for call in (integrate_geodesic, geodesic_trajectory):
        rec = _Recorder(limit=4096)
        got = call(_adaptive_christoffel, {"a": w}, {"a": xi}, on_step=rec)
        end = got["a"] if isinstance(got, dict) else got.end["a"]
        passes = rec.passes(64)
        assert len(passes) >= 3  # 64 -> 128 was not accepted
        diffs = [float((b[-1] - a[-1]).norm()) for a, b in zip(passes, passes[1:])]
        assert diffs[-1] <= 1e-10 * float(xi.norm()) and all(d > 1e-10 * float(xi.norm()) for d in diffs[:-1])
        assert torch.allclose(end, _exact(w, xi, 1.0), rtol=1e-9, atol=0)


@pytest.mark.parametrize("velocity", [True, False])
@pytest.mark.parametrize("budget", [None, 0])
def test_trajectory_velocity_memory_budget_and_vjp(velocity, budget):
    """``geodesic_trajectory``: the end velocity is ``xi exp(t xi / w)`` (or ``None`` when not
    asked for); a zero memory budget keeps no stage pullbacks; the VJP is the closed form's."""
    w = torch.tensor([1.0, 2.0], dtype=DT)
    xi = torch.tensor([0.3, -0.5], dtype=DT)
    kw = {} if velocity else {"velocity": False}
    traj = geodesic_trajectory(_adaptive_christoffel, {"a": w}, {"a": xi}, n_steps=8, memory_budget=budget, **kw)
    assert torch.allclose(traj.end["a"], _exact(w, xi, 1.0), rtol=1e-9, atol=0)
    if velocity:
        assert torch.allclose(traj.end_velocity["a"], xi * torch.exp(xi / w), rtol=1e-9, atol=0)
    else:
        assert traj.end_velocity is None
    assert (traj.stages is None) == (budget == 0)
    cot = torch.tensor([0.7, -1.3], dtype=DT)
    dw, dxi = traj.vjp({"a": cot})
    # d/dw [w exp(xi/w)] = exp(xi/w) (1 - xi/w), d/dxi = exp(xi/w) (diagonal Jacobians)
    assert torch.allclose(dw["a"], cot * torch.exp(xi / w) * (1 - xi / w), rtol=1e-8, atol=0)
    assert torch.allclose(dxi["a"], cot * torch.exp(xi / w), rtol=1e-8, atol=0)


@pytest.mark.parametrize("tol", [None, 1e-10])
def test_user_linearize_records_the_accepted_integration(tol):
    """A given ``linearize`` is what the kept trajectory records; the first ``n_steps`` pass of step
    doubling, never the accepted one, records nothing; the gradient is the closed form's."""
    w = torch.tensor([1.0, 2.0], dtype=DT)
    xi = torch.tensor([0.3, -0.5], dtype=DT)
    rec, at = _Recorder(), []
    base = autograd_linearization(_adaptive_christoffel)

    def linearize(w_, v_):
        at.append(len(rec.states))
        return base(w_, v_)

    x = xi.clone().requires_grad_(True)
    out = integrate_geodesic(_adaptive_christoffel, {"a": w}, {"a": x}, n_steps=4, tol=tol, on_step=rec,
                             linearize=linearize)["a"]
    (g,) = torch.autograd.grad(out, x, torch.ones(2, dtype=DT))
    passes = rec.passes(4)
    last = len(rec.states) - len(passes[-1])  # steps before the accepted pass
    assert sum(a >= last for a in at) >= 3 * len(passes[-1])  # its stages were linearized
    if tol is not None:  # the first 4-step pass is never accepted: it runs on christoffel alone
        assert len(passes) >= 2 and min(at) >= 4
    assert torch.allclose(g, torch.exp(xi / w), rtol=1e-4 if tol is None else 1e-8, atol=0)


# ------------------------------------------------------------------ GL block Christoffel (spec §6.2, §6.3)
def _gl_gamma_by_hand(metric, G, H, xG, xH):
    """Eq. 11 (inv) / Eq. 12 (mix) with ``P = G^T G``, ``Q = H^T H`` (no relaxation)."""
    P, Q = G.mT @ G, H.mT @ H
    Pi, Qi = torch.linalg.inv(P), torch.linalg.inv(Q)
    SG, SH = xG.mT @ G + G.mT @ xG, xH.mT @ H + H.mT @ xH
    KG, KH = xG.mT @ xG, xH.mT @ xH
    if metric == "inv":
        return -xG @ Pi @ SG + G @ Pi @ KG, -xH @ Qi @ SH + H @ Qi @ KH
    return xG @ SH @ Qi - G @ KH @ Qi, xH @ SG @ Pi - H @ KG @ Pi


def _gl_blocks(seed: int):
    g = torch.Generator().manual_seed(seed)
    G, H = torch.randn(2, 5, 3, generator=g, dtype=DT), torch.randn(2, 4, 3, generator=g, dtype=DT)
    xG, xH = torch.randn(G.shape, generator=g, dtype=DT), torch.randn(H.shape, generator=g, dtype=DT)
    return G, H, xG, xH, g


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_gl_block_christoffel_defaults_are_unrelaxed_and_record_nothing(metric):
    G, H, xG, xH, _ = _gl_blocks(3)
    gG, gH, pullback = gl_block_christoffel(metric, G, H, xG, xH)
    assert pullback is None
    wG, wH = _gl_gamma_by_hand(metric, G, H, xG, xH)
    assert torch.allclose(gG, wG, rtol=1e-12, atol=1e-12) and torch.allclose(gH, wH, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ["inv", "mix"])
def test_gl_block_pullback_of_a_cotangent_taller_on_the_h_side(metric):
    """A cotangent with more rows than the state (state rows zero there), taller on the H side
    than on the G side: the gradient of ``<c, Gamma>`` at the zero-padded state, by autograd of
    the hand-written forms."""
    G, H, xG, xH, g = _gl_blocks(4)
    cG, cH = torch.randn(2, 5, 3, generator=g, dtype=DT), torch.randn(2, 7, 3, generator=g, dtype=DT)
    _, _, pullback = gl_block_christoffel(metric, G, H, xG, xH, record=True)
    pad = lambda X: torch.nn.functional.pad(X, (0, 0, 0, 7 - X.shape[1]))  # noqa: E731
    leaves = [G.clone().requires_grad_(True), pad(H).requires_grad_(True),
              xG.clone().requires_grad_(True), pad(xH).requires_grad_(True)]
    oG, oH = _gl_gamma_by_hand(metric, *leaves)
    want = torch.autograd.grad((oG * cG).sum() + (oH * cH).sum(), leaves)
    got = pullback(cG, cH)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))


def test_under_vmap_fixed_steps_work_and_step_doubling_says_to_pass_tol_none():
    """vmap over base points: ``tol=None`` integrates each sample (closed form ``w exp(t xi / w)``);
    the step doubling needs Python floats, so it raises naming the way out."""
    def chr_adaptive(w, v):
        return {n: -v[n] ** 2 / w[n] for n in w}

    x = 1.0 + torch.rand(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def end(tol):
        return torch.func.vmap(lambda p: integrate_geodesic(chr_adaptive, {"a": p}, {"a": 0.1 * p},
                                                            n_steps=64, tol=tol)["a"])(x)
    torch.testing.assert_close(end(None), x * torch.exp(torch.tensor(0.1, dtype=torch.float64)), rtol=1e-10, atol=0)
    with pytest.raises(RuntimeError, match="pass tol=None"):
        end(1e-10)

"""SAM/ASAM's documented defaults, the closure step's accumulation and warm-up arithmetic, the
entry-gradient warning, ``all_reduce_mean`` and RiemannianSGD's own construction (issue 18: tests
written against the surviving mutants of ``optim/sam.py``, ``optim/utils.py`` and
``optim/geodesic_sam.py``). float64 throughout; references are closed forms of quadratic losses
or the spec's formulas (training.md §1-§3, §9)."""
import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quotientsharp.adapters.resolve import default_quotient
from quotientsharp.models.vit import TinyViT
from quotientsharp.optim import ASAM, SAM, RiemannianSGD
from quotientsharp.optim.utils import all_reduce_mean


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


class Named(nn.Module):
    """A ``weight`` (2, 3) and a ``bias`` (3,), entries away from 0; ``loss(a, c) = ½Σa⊙θ² − c·θ``."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(2, 3, generator=g) + 2.0)
        self.bias = nn.Parameter(torch.randn(3, generator=g) - 2.0)

    def loss(self, a, c):
        return sum(0.5 * (ai * p**2).sum() - (ci * p).sum() for p, ai, ci in zip(self.parameters(), a, c))


def coefficients(k, seed=5):
    """k micro-batches of a quadratic: per micro-batch (a, c) with a > 0, shaped like Named's params."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 3), (3,)]
    return [([torch.rand(s, generator=g) + 0.5 for s in shapes], [torch.randn(s, generator=g) for s in shapes])
            for _ in range(k)]


def quadratic_grad(theta, a, c):
    """∇(½Σa⊙θ² − c·θ) = a⊙θ − c, per tensor."""
    return [ai * t - ci for t, ai, ci in zip(theta, a, c)]


def quadratic_loss(theta, a, c):
    return sum(float((0.5 * ai * t**2 - ci * t).sum()) for t, ai, ci in zip(theta, a, c))


def sam_reference_step(theta, micro, rho, lr):
    """One SAM step with accumulate_mode="micro": per micro-batch ε_i = ρ g_i/‖g_i‖ and
    g̃_i = ∇L_i(θ + ε_i); θ ← θ − lr·mean_i g̃_i (training.md §1, the accumulation row of §5)."""
    tilde = []
    for a, c in micro:
        g = quadratic_grad(theta, a, c)
        norm = flat(g).norm()
        tilde.append(quadratic_grad([t + rho * gi / norm for t, gi in zip(theta, g)], a, c))
    return [t - lr * sum(gt[j] for gt in tilde) / len(micro) for j, t in enumerate(theta)]


# ----- documented defaults (training.md §2) ------------------------------------------------------

def test_sam_default_rho_is_0_05():
    """ε = ρ·g/‖g‖ with the default ρ = 0.05: ‖ε‖ = 0.05, parallel to g."""
    model = Named()
    grads = [torch.randn_like(p) for p in model.parameters()]
    eps = SAM(model.parameters(), torch.optim.SGD, lr=0.1).perturbation(grads, list(model.parameters()))
    torch.testing.assert_close(flat(eps), 0.05 * flat(grads) / flat(grads).norm(), rtol=1e-12, atol=0.0)


def test_asam_defaults_rho_0_5_eta_0_01_on_weight_tensors_only():
    """Official ASAM: T = |θ| + 0.01 on tensors named "weight", T = 1 elsewhere;
    ε = 0.5·T²g/‖Tg‖ (so ‖T⁻¹ε‖ = 0.5)."""
    model = Named()
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    opt = ASAM(model.named_parameters(), torch.optim.SGD, lr=0.1)
    t = [model.weight.detach().abs() + 0.01, torch.ones(3)]
    tg = [ti * gi for ti, gi in zip(t, grads)]
    expected = [0.5 * ti * tgi / flat(tg).norm() for ti, tgi in zip(t, tg)]
    eps = opt.perturbation(grads, params)
    torch.testing.assert_close(flat(eps), flat(expected), rtol=1e-12, atol=0.0)
    assert float(flat([e.detach() / ti for e, ti in zip(eps, t)]).norm()) == pytest.approx(0.5, rel=1e-12)


def test_asam_adaptive_filter_is_called_with_the_parameter_tensor():
    """A filter that looks at the tensor (not its name): adapt only the 1-D tensor (the bias)."""
    model = Named()
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    opt = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.3, eta=0.1, lr=0.1,
               adaptive_filter=lambda name, p: p.dim() == 1)
    t = [torch.ones(2, 3), model.bias.detach().abs() + 0.1]
    tg = [ti * gi for ti, gi in zip(t, grads)]
    expected = [0.3 * ti * tgi / flat(tg).norm() for ti, tgi in zip(t, tg)]
    torch.testing.assert_close(flat(opt.perturbation(grads, params)), flat(expected), rtol=1e-12, atol=0.0)


# ----- the closure step: accumulation, warm-up, returned loss ------------------------------------

def closure_for(model, micro, losses=None):
    """closure(i): micro-batch i's loss, backward, returned (and recorded in ``losses``)."""
    def closure(i):
        loss = model.loss(*micro[i])
        loss.backward()
        if losses is not None:
            losses.append(float(loss.detach()))
        return loss
    return closure


def test_micro_accumulation_over_consecutive_steps_matches_the_reference():
    """accumulate=2 "micro": each step takes one ε per micro-batch and a base step with the mean g̃;
    the base optimizer steps once per step, the next step starts a fresh sum, and step() returns
    the mean of the micro-batches' first-pass losses."""
    model = Named()
    micro = coefficients(2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, accumulate=2)
    base_steps = []
    opt.base_optimizer.register_step_post_hook(lambda *args: base_steps.append(1))
    theta = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        expected_loss = sum(quadratic_loss(theta, a, c) for a, c in micro) / 2
        theta = sam_reference_step(theta, micro, rho=0.2, lr=0.3)
        loss = opt.step(closure_for(model, micro))
        assert float(loss) == pytest.approx(expected_loss, rel=1e-12)
        assert len(base_steps) == step + 1
        torch.testing.assert_close(flat(list(model.parameters())).detach(), flat(theta), rtol=1e-12, atol=1e-14)


def test_two_step_api_accumulation_steps_the_base_optimizer_once_per_k_micro_batches():
    """The two-step API with accumulate=3: only the third second_step() calls the base optimizer."""
    model = Named()
    micro = coefficients(3)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, accumulate=3)
    base_steps = []
    opt.base_optimizer.register_step_post_hook(lambda *args: base_steps.append(1))
    theta = [p.detach().clone() for p in model.parameters()]
    for i in range(3):
        model.loss(*micro[i]).backward()
        opt.first_step()
        model.loss(*micro[i]).backward()
        opt.second_step()
        assert len(base_steps) == (1 if i == 2 else 0)
    torch.testing.assert_close(flat(list(model.parameters())).detach(),
                               flat(sam_reference_step(theta, micro, rho=0.2, lr=0.3)), rtol=1e-12, atol=1e-14)


def test_single_step_returns_the_closures_own_loss_object():
    """accumulate=1: step() returns what the closure returned (the graph-carrying loss), not a copy."""
    model = Named()
    micro = coefficients(1)
    returned = []

    def closure():
        loss = model.loss(*micro[0])
        loss.backward()
        returned.append(loss)
        return loss

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3)
    out = opt.step(closure)
    assert out is returned[0] and out.requires_grad


def test_warmup_with_accumulation_is_sgd_on_the_mean_gradient():
    """During warm-up (epoch 0 ≤ warmup_epochs = 0) a step with accumulate=2 calls closure(0) and
    closure(1) once each and takes θ ← θ − lr·mean_i ∇L_i(θ); it returns the mean loss."""
    model = Named()
    micro = coefficients(2)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, accumulate=2, warmup_epochs=0)
    assert not opt.perturbing
    theta = [p.detach().clone() for p in model.parameters()]
    grads = [quadratic_grad(theta, a, c) for a, c in micro]
    expected = [t - 0.3 * (g0 + g1) / 2 for t, g0, g1 in zip(theta, *grads)]
    seen = []
    loss = opt.step(closure_for(model, micro, seen))
    assert len(seen) == 2 and float(loss) == pytest.approx(sum(seen) / 2, rel=1e-12)
    assert seen == pytest.approx([quadratic_loss(theta, a, c) for a, c in micro], rel=1e-12)
    torch.testing.assert_close(flat(list(model.parameters())).detach(), flat(expected), rtol=1e-12, atol=1e-14)


def test_set_epoch_records_the_epoch():
    opt = SAM(Named().parameters(), torch.optim.SGD, lr=0.1, warmup_epochs=2)
    for epoch in (1, 3, 0):
        opt.set_epoch(epoch)
        assert opt.epoch == epoch


def test_entry_gradient_warning_is_given_once_and_names_the_callers_line():
    """Spec training.md §1: gradients present at step() entry are discarded with a one-time warning,
    attributed to the line that called step() (under mutmut, whose trampolines add frames, the
    same stacklevel lands in mutmut's trampoline or the ./mutants copy of the package instead)."""
    model = Named()
    micro = coefficients(1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.loss(*micro[0]).backward()  # left over: discarded by step()
            opt.step(lambda: model.loss(*micro[0]).backward()); line = __import__("inspect").currentframe().f_lineno  # noqa: E702
    ours = [w for w in caught if "discarded" in str(w.message)]
    assert len(ours) == 1
    where = (ours[0].filename, ours[0].lineno)
    assert where == (__file__, line) or {"mutmut", "mutants"} & set(Path(where[0]).parts), where


# ----- all_reduce_mean on two simulated ranks ----------------------------------------------------

def test_all_reduce_mean_averages_over_ranks_and_keeps_shapes(monkeypatch):
    """torch.distributed.all_reduce sums in place over ranks; with a second rank holding ``other``
    the result is (mine + other)/2 per tensor, shaped like the inputs, which stay untouched."""
    g = torch.Generator().manual_seed(0)
    mine = [torch.randn(2, 3, generator=g), torch.randn(4, generator=g), torch.randn(1, 1, 2, generator=g)]
    other = [torch.randn_like(t) for t in mine]
    before = [t.clone() for t in mine]
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(flat(other)))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    out = all_reduce_mean(mine)
    assert [o.shape for o in out] == [t.shape for t in mine]
    for o, a, b in zip(out, before, other, strict=True):
        torch.testing.assert_close(o, (a + b) / 2, rtol=1e-15, atol=0.0)
    assert all(torch.equal(t, b) for t, b in zip(mine, before))


# ----- RiemannianSGD built on its own (geometry from model=) --------------------------------------

def mlp(seed=0):
    """No continuous symmetry (tanh): the quotient is the rest metric alone."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def vit(seed=0):
    torch.manual_seed(seed)
    model = TinyViT(image_size=4, patch_size=2, in_channels=1, n_classes=3, d_model=8, depth=1,
                    n_heads=2, mlp_dim=8)
    with torch.no_grad():  # no exact zeros (the adaptive metric masks them)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def batch(shape, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def one_step(model, opt, x, y):
    """θ before, gradient at θ, θ after one step."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return theta, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_riemannian_sgd_errors_name_the_optimizer():
    model = mlp()
    cases = [
        (dict(params=[{"params": list(model.parameters()), "lr": -1.0}], lr=0.1), ValueError, r"^RiemannianSGD: lr "),
        (dict(params=model.parameters(), lr=0.1, metric="bogus"), ValueError, r"^RiemannianSGD: metric must be one of"),
        (dict(params=model.parameters(), lr=0.1, quotient="junk"), TypeError, r"^RiemannianSGD: quotient must be a Quotient"),
        (dict(params=model.parameters(), lr=0.1, rest="euclidean", rest_metric="adaptive"), TypeError,
         r"^RiemannianSGD: rest_metric is the old name"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            RiemannianSGD(model=model, **kwargs)


@pytest.mark.parametrize("spelling", ["rest", "rest_metric"])
def test_riemannian_sgd_rest_metric_selects_the_rest_step(spelling):
    """No symmetry group: "euclidean" is θ − lr·∇L (plain SGD); the default "adaptive" is
    θ − lr·∇L⊙θ² (docstring, geometry.md's elementwise metric); ``rest_metric`` is the old name."""
    x, y = batch((5,))
    model = mlp()
    theta, grads, after = one_step(model, RiemannianSGD(model.parameters(), lr=0.2, model=model,
                                                        **{spelling: "euclidean"}), x, y)
    for n in theta:
        torch.testing.assert_close(after[n], theta[n] - 0.2 * grads[n], rtol=1e-14, atol=1e-15)
    model = mlp()
    theta, grads, after = one_step(model, RiemannianSGD(model.parameters(), lr=0.2, model=model), x, y)
    for n in theta:
        torch.testing.assert_close(after[n], theta[n] - 0.2 * grads[n] * theta[n] ** 2, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("metric, eps_rel", [("inv", 0.0), ("mix", 0.3)])
def test_riemannian_sgd_retraction_step_is_minus_lr_times_the_riemannian_gradient(metric, eps_rel):
    """geodesic="retraction": θ ← θ − lr·ξ, ξ = Π_θ(g_θ⁻¹∇L) of the quotient ``default_quotient(model,
    metric, rest, eps_rel)`` (the documented default geometry); the second-order step differs by
    ½lr²Γ_θ(ξ, ξ) ≠ 0 on the attention heads' GL groups."""
    x, y = batch((1, 4, 4))
    model = vit()
    quotient = default_quotient(copy.deepcopy(model), metric, "adaptive", eps_rel)
    assert len(quotient.groups) == 1
    opt = RiemannianSGD(model.parameters(), lr=0.5, model=model, metric=metric, eps_rel=eps_rel,
                        geodesic="retraction")
    theta, grads, after = one_step(model, opt, x, y)
    xi = quotient.riemannian_gradient(theta, grads)
    for n in theta:
        torch.testing.assert_close(after[n], theta[n] - 0.5 * xi[n], rtol=1e-10, atol=1e-12)
    second = vit()
    _, _, after_second = one_step(second, RiemannianSGD(second.parameters(), lr=0.5, model=second, metric=metric,
                                                        eps_rel=eps_rel), x, y)
    assert float(flat([after_second[n] - after[n] for n in theta]).abs().max()) > 1e-6
    # the other metric / relaxation gives another step
    other = vit()
    other_kw = {"metric": "mix" if metric == "inv" else "inv", "eps_rel": 0.3 - eps_rel}
    _, _, after_other = one_step(other, RiemannianSGD(other.parameters(), lr=0.5, model=other,
                                                      geodesic="retraction", **other_kw), x, y)
    assert float(flat([after_other[n] - after[n] for n in theta]).abs().max()) > 1e-6


def test_riemannian_sgd_with_default_arguments_is_equivariant():
    """The defaults (metric "mix", rest "adaptive", eps_rel = 0) give the exactly invariant geometry:
    training g·w gives the same predictions as training w (geometry.md §6.7)."""
    model = vit()
    quotient = default_quotient(copy.deepcopy(model), "mix", "adaptive", 0.0)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    element = quotient.random_element(w, generator=torch.Generator().manual_seed(3), max_cond=30.0)
    other = copy.deepcopy(model)
    other.load_state_dict(quotient.action(w, element))
    batches = [batch((1, 4, 4), seed=s) for s in range(3)]
    x_test, _ = batch((1, 4, 4), n=32, seed=99)
    outs = []
    for m in (model, other):
        opt = RiemannianSGD(m.parameters(), lr=0.05, model=m)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        with torch.no_grad():
            outs.append(m(x_test))
    with torch.no_grad():
        assert float((outs[0] - vit()(x_test)).abs().max()) > 1e-4  # training moved the function
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-8)
    assert math.isfinite(float(outs[0].sum()))

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


# ----- SharpnessAwareOptimizer: counters, epoch, gradients after a step, the accumulation guard -------

def test_stats_count_every_perturbed_and_skipped_step():
    """``stats`` starts at zero and counts each perturbed step and each skip (zero or non-finite g)."""
    model = Named()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.0)
    assert opt.stats == {"perturbed": 0, "skipped_zero_grad": 0, "skipped_nonfinite_grad": 0}
    assert opt.epoch == 0
    kinds = ["zero", "nan", "zero", "normal", "nan", "normal", "normal"]
    for kind in kinds:
        for p in model.parameters():
            p.grad = {"zero": torch.zeros_like(p), "nan": torch.full_like(p, math.nan),
                      "normal": torch.ones_like(p)}[kind]
        opt.first_step()
        opt.restore()
    assert opt.stats == {"perturbed": 3, "skipped_zero_grad": 2, "skipped_nonfinite_grad": 2}


def test_gradients_are_none_after_a_closure_step():
    """step() leaves ``.grad`` unset (set_to_none), like ``zero_grad()`` of torch.optim."""
    model = Named()
    micro = coefficients(1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3)
    opt.step(lambda: model.loss(*micro[0]).backward())
    assert all(p.grad is None for p in model.parameters())
    model.loss(*micro[0]).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_accumulation_error_is_raised_once_per_offence():
    """Two backward passes before first_step() raise; the offence is then consumed: a caller that
    catches it and goes on is not stopped again (the next first_step proceeds from the summed g)."""
    model = Named()
    micro = coefficients(1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3)
    model.loss(*micro[0]).backward()
    model.loss(*micro[0]).backward()
    with pytest.raises(RuntimeError, match="accumulate=k"):
        opt.first_step(zero_grad=False)
    theta = [p.detach().clone() for p in model.parameters()]
    g = [2 * gi for gi in quadratic_grad(theta, *micro[0])]  # two backward passes: twice the gradient
    opt.first_step()
    torch.testing.assert_close(flat(list(model.parameters())).detach(),
                               flat([t + 0.2 * gi / flat(g).norm() for t, gi in zip(theta, g)]), rtol=1e-12, atol=1e-14)


# ----- distributed: the perturbation scope and its warning (ranks simulated in one process) -------

def fake_two_ranks(monkeypatch, other):
    """A process group of two ranks in which the other rank's flattened tensors are ``other``:
    torch.distributed.all_reduce sums in place, get_world_size is 2."""
    import quotientsharp.optim.sam as sam_module
    monkeypatch.setattr(sam_module, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(flat(other)))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)


def test_global_perturbation_uses_the_rank_averaged_gradient(monkeypatch):
    """perturbation="global": ε = ρ·ḡ/‖ḡ‖ with ḡ the gradient averaged over ranks; "local" uses this
    rank's g (and warns that without the DDP wrapper it cannot run the first pass under no_sync)."""
    micro = coefficients(1)
    other = [torch.randn_like(t) for t in Named().parameters()]
    fake_two_ranks(monkeypatch, other)
    for scope in ("global", "local"):
        model = Named()
        theta = [p.detach().clone() for p in model.parameters()]
        g = quadratic_grad(theta, *micro[0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, model=model, perturbation=scope)
        assert [("not honoured" in str(w.message)) for w in caught] == ([True] if scope == "local" else [])
        model.loss(*micro[0]).backward()
        opt.first_step()
        d = [(gi + oi) / 2 for gi, oi in zip(g, other)] if scope == "global" else g
        torch.testing.assert_close(flat(list(model.parameters())).detach(),
                                   flat([t + 0.2 * di / flat(d).norm() for t, di in zip(theta, d)]),
                                   rtol=1e-12, atol=1e-14)


def test_no_distributed_warning_outside_a_distributed_run():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scope in ("local", "global"):
            model = Named()
            SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model, perturbation=scope)


@pytest.mark.parametrize("initialized, world, expected", [(False, 2, False), (True, 1, False), (True, 2, True),
                                                          (True, 3, True)])
def test_is_distributed_means_an_initialised_group_of_several_ranks(monkeypatch, initialized, world, expected):
    from quotientsharp.optim.utils import is_distributed
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    assert is_distributed() is expected


# ----- hyperparameter validation details (optim/utils.py) ----------------------------------------

def test_single_param_group_errors_carry_no_group_number():
    model = Named()
    with pytest.raises(ValueError, match=r"^SAM: lr must be a finite number >= 0, got -1\.0$"):
        SAM([{"params": list(model.parameters()), "lr": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"^RiemannianSGD: lr must be a finite number >= 0, got -1\.0$"):
        RiemannianSGD([{"params": list(model.parameters()), "lr": -1.0}], lr=0.1, model=model)


def test_tuples_other_than_betas_and_flags_are_not_range_checked():
    """Rprop's etas = (0.5, 1.2) and step_sizes are not betas (no [0, 1) check); a boolean (a flag,
    or False for 0) is passed to the base optimizer unchecked."""
    model = Named()
    opt = SAM(model.parameters(), torch.optim.Rprop, lr=0.01, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0))
    assert opt.param_groups[0]["etas"] == (0.5, 1.2)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, weight_decay=False, nesterov=False)
    assert opt.param_groups[0]["weight_decay"] is False


def test_other_real_hyperparameters_must_not_be_nan():
    """ASGD's lambd and t0 are in no range table: any finite value passes (also from the base
    optimizer's own defaults), NaN is refused, naming the optimizer."""
    model = Named()
    assert SAM(model.parameters(), torch.optim.ASGD, lr=0.1).param_groups[0]["lambd"] == 1e-4
    with pytest.raises(ValueError, match=r"^SAM: lambd must not be NaN$"):
        SAM(model.parameters(), torch.optim.ASGD, lr=0.1, lambd=math.nan)


def test_a_bad_default_of_the_base_optimizer_is_caught_after_it_fills_the_groups():
    class NanDefaultLR(torch.optim.SGD):
        def __init__(self, params, lr=math.nan):
            super().__init__(params, lr=lr)

    with pytest.raises(ValueError, match=r"^SAM: lr must be a finite number >= 0, got nan$"):
        SAM(Named().parameters(), NanDefaultLR)


# ----- GeodesicSAM: defaults, geometry arguments, BatchNorm, debug threshold, tiny gradients -------

def geodesic_reference(model, quotient, rho):
    """v = ρ·ξ/(‖ξ‖_θ + 1e-12), ξ = Π_θ(g_θ⁻¹g) of ``quotient`` (training.md §9), for the gradient in .grad."""
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    xi = quotient.riemannian_gradient(w, {n: p.grad.clone() for n, p in model.named_parameters()})
    scale = rho / (float(quotient.norm(w, xi)) + 1e-12)
    return w, {n: scale * t for n, t in xi.items()}


def test_geodesic_sam_defaults():
    """ρ = 0.5, the mix metric with the adaptive rest and eps_rel = 0; the debug check is off (a
    quotient reporting vertical leakage does not stop the step)."""
    from quotientsharp.optim import GeodesicSAM
    x, y = batch((1, 4, 4))
    model = vit()
    quotient = default_quotient(copy.deepcopy(model), "mix", "adaptive", 0.0)
    F.cross_entropy(model(x), y).backward()
    w, v = geodesic_reference(model, quotient, 0.5)
    opt = GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    eps = opt.perturbation([p.grad for p in params], params)
    for n, e in zip(names, eps):
        torch.testing.assert_close(e, v[n], rtol=1e-10, atol=1e-13)
    assert float(quotient.norm(w, dict(zip(names, eps)))) == pytest.approx(0.5, rel=1e-10)
    opt.quotient.is_horizontal = lambda *args: torch.tensor(1.0)  # would fail a debug check
    opt.first_step()
    assert opt.stats["perturbed"] == 1


@pytest.mark.parametrize("metric, rest, eps_rel, geodesic", [("inv", "adaptive", 0.0, "retraction"),
                                                             ("mix", "euclidean", 0.3, "retraction"),
                                                             ("inv", "euclidean", 0.0, "exact")])
def test_geodesic_sam_uses_the_requested_geometry(metric, rest, eps_rel, geodesic):
    """The perturbation is ρ·ξ/‖ξ‖ of ``default_quotient(model, metric, rest, eps_rel)`` and
    first_step() moves to γ_v(1) at the requested order: θ + v for the retraction."""
    from quotientsharp.optim import GeodesicSAM
    x, y = batch((1, 4, 4))
    model = vit()
    quotient = default_quotient(copy.deepcopy(model), metric, rest, eps_rel)
    F.cross_entropy(model(x), y).backward()
    w, v = geodesic_reference(model, quotient, 0.3)
    opt = GeodesicSAM(model.parameters(), torch.optim.SGD, rho=0.3, model=model, metric=metric, rest=rest,
                      eps_rel=eps_rel, geodesic=geodesic, lr=0.1)
    opt.first_step()
    end = ({n: w[n] + v[n] for n in w} if geodesic == "retraction"
           else quotient.geodesic(w, v, order=geodesic, rest_order=1))
    second = quotient.geodesic(w, v, order=2, rest_order=1)
    assert max(float((end[n] - second[n]).abs().max()) for n in w) > 1e-6  # the order matters here
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), end[n], rtol=1e-9, atol=1e-12)


def test_geodesic_sam_rest_metric_conflict_names_it():
    from quotientsharp.optim import GeodesicSAM
    model = mlp()
    with pytest.raises(TypeError, match=r"^GeodesicSAM: rest_metric is the old name"):
        GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, rest="euclidean", rest_metric="adaptive",
                    lr=0.1)


def test_geodesic_sam_second_pass_leaves_batchnorm_buffers_alone():
    """model= reaches the shared step: only the first pass updates BatchNorm's running statistics."""
    from quotientsharp.optim import GeodesicSAM
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    reference = copy.deepcopy(model)
    x, y = batch((4,))
    opt = GeodesicSAM(model.parameters(), torch.optim.SGD, rho=0.1, model=model, lr=0.1)
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    reference(x)  # one training-mode forward at θ: what the first pass does to the buffers
    bn, ref_bn = model[1], reference[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=0)


def test_geodesic_sam_debug_threshold_is_1e_minus_6():
    """debug=True refuses a ξ whose vertical leakage exceeds 1e-6 and accepts 1e-6 itself (docstring)."""
    from quotientsharp.optim import GeodesicSAM
    x, y = batch((1, 4, 4))
    model = vit()
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    opt = GeodesicSAM(params, torch.optim.SGD, rho=0.1, model=model, debug=True, lr=0.1)
    opt.quotient.is_horizontal = lambda *args: torch.tensor(1e-6)
    opt.perturbation(grads, params)
    opt.quotient.is_horizontal = lambda *args: torch.tensor(1.5e-6)
    with pytest.raises(AssertionError, match="not horizontal"):
        opt.perturbation(grads, params)


def test_geodesic_sam_tiny_gradient_keeps_the_1e_minus_12_guard():
    """‖v‖_θ = ρ·‖ξ‖_θ/(‖ξ‖_θ + 1e-12): at ‖ξ‖ ~ 1e-13 the guard dominates (and v keeps ξ's direction)."""
    from quotientsharp.optim import GeodesicSAM
    x, y = batch((5,))
    model = mlp()
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    opt = GeodesicSAM(params, torch.optim.SGD, rho=0.4, model=model, rest="euclidean", lr=0.1)
    grads = [p.grad * (1e-13 / float(flat([p.grad for p in params]).norm())) for p in params]
    eps = opt.perturbation(grads, params)
    torch.testing.assert_close(flat(eps), 0.4 * flat(grads) / (1e-13 + 1e-12), rtol=1e-9, atol=0.0)


def test_quotient_parameters_default_order_is_second_order_and_the_rest_moves_linearly():
    from quotientsharp.optim.geodesic_sam import QuotientParameters
    model = vit()
    quotient = default_quotient(model, "mix", "adaptive", 0.0)
    view = QuotientParameters(model, quotient)
    w = view.point()
    g = torch.Generator().manual_seed(4)
    v = {n: 0.05 * torch.randn(t.shape, generator=g) for n, t in w.items()}
    end, second = view.endpoint(w, v), quotient.geodesic(w, v, order=2, rest_order=1)
    for n in w:
        torch.testing.assert_close(end[n], second[n], rtol=1e-12, atol=1e-14)
    # the rest (adaptive metric, order 1) moves to θ + v exactly (training.md §9 step 3)
    rest = [n for n in w if not any(n in grp.names for grp in quotient.groups)]
    assert "head.weight" in rest
    for n in rest:
        torch.testing.assert_close(end[n], w[n] + v[n], rtol=0, atol=1e-15)
    # ... even for a quotient whose own rest order is 2 (GeodesicSAM: "the rest always moves to θ + v")
    view2 = QuotientParameters(model, quotient.replace(rest_order=2))
    end2, curved = view2.endpoint(w, v), quotient.geodesic(w, v, order=2, rest_order=2)
    assert float((curved["head.weight"] - end2["head.weight"]).abs().max()) > 1e-8
    for n in rest:
        torch.testing.assert_close(end2[n], w[n] + v[n], rtol=0, atol=1e-15)


def test_distributed_warning_names_the_line_that_built_the_optimizer(monkeypatch):
    """SAM/ASAM/RSAM/GeodesicSAM call the shared __init__ directly: the warning that perturbation
    "local" is not honoured points at the caller's line (under mutmut: its trampoline or ./mutants)."""
    import quotientsharp.optim.sam as sam_module
    monkeypatch.setattr(sam_module, "is_distributed", lambda: True)
    model = Named()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model); line = __import__("inspect").currentframe().f_lineno  # noqa: E702
    ours = [w for w in caught if "not honoured" in str(w.message)]
    assert len(ours) == 1
    where = (ours[0].filename, ours[0].lineno)
    assert where == (__file__, line) or {"mutmut", "mutants"} & set(Path(where[0]).parts), where


# ----- shared helpers of optim/utils.py: reductions, validation ------------------------------------

def test_global_norm_and_sum_reduce_in_the_widest_dtype_at_least_float32():
    """float16 gradients are reduced in float32 (their norm, of 300 entries, would lose digits in
    float16), and a float32/float64 mix in float64 (a float64 entry of 1e-9 survives beside 1.0)."""
    from quotientsharp.optim.utils import global_norm, global_sum
    half = [torch.full((300,), 0.1, dtype=torch.float16), torch.full((5,), -3.0, dtype=torch.float16)]
    ref = torch.cat([t.double() for t in half])
    n, s = global_norm(half), global_sum(half)
    assert n.dtype == s.dtype == torch.float32
    assert float(n) == pytest.approx(float(ref.norm()), rel=1e-6)
    assert float(s) == pytest.approx(float(ref.abs().sum()), rel=1e-6)
    mixed = [torch.ones(1, dtype=torch.float32), torch.full((1,), 1e-9, dtype=torch.float64)]
    assert global_sum(mixed).dtype == torch.float64
    assert float(global_sum(mixed)) == 1.0 + 1e-9
    assert float(global_norm(mixed)) == math.sqrt(1.0 + 1e-18)


@pytest.mark.parametrize("bad", [dict, nn.Linear])
def test_base_optimizer_must_be_an_optimizer_class(bad):
    """A class that is not a torch.optim.Optimizer is refused by name, before it is called."""
    model = mlp()
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer subclass"):
        SAM(model.parameters(), bad, lr=0.1)


def test_an_added_param_group_is_checked_under_its_own_number():
    """The third group (index 2) is the one checked, and its error names it."""
    a, b, c = (nn.Parameter(torch.randn(2)) for _ in range(3))
    opt = SAM([{"params": [a]}, {"params": [b]}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"lr \(param group 2\)"):
        opt.add_param_group({"params": [c], "lr": -1.0})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 2


def test_quotient_parameters_name_what_does_not_match():
    """A quotient of another model, or an optimizer parameter the model does not have, is a
    ValueError that says so (not a KeyError from deeper in)."""
    from quotientsharp.optim.geodesic_sam import QuotientParameters
    model = vit()
    quotient = default_quotient(model, "mix", "adaptive", 0.0)
    with pytest.raises(ValueError, match="quotient's parameters .* are not parameters of model="):
        QuotientParameters(mlp(), quotient)
    view = QuotientParameters(model, quotient)
    stranger = nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"shapes \[\(3, 2\)\] are not parameters of model="):
        view.check([*model.parameters(), stranger])

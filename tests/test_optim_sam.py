"""SAM, ASAM, RSAM: closed-form perturbations, the two-pass step, restore, state dicts."""
import io
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from quotientsharp.optim import ASAM, RSAM, SAM


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class Quadratic(nn.Module):
    """L(θ) = ½ Σ a⊙θ² − c·θ over a "weight" (2, 3) and a "bias" (3,): ∇L = a⊙θ − c."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(2, 3, generator=g))
        self.bias = nn.Parameter(torch.randn(3, generator=g))
        self.register_buffer("a_w", torch.rand(2, 3, generator=g) + 0.5)
        self.register_buffer("a_b", torch.rand(3, generator=g) + 0.5)
        self.register_buffer("c_w", torch.randn(2, 3, generator=g))
        self.register_buffer("c_b", torch.randn(3, generator=g))

    def forward(self):
        return (0.5 * (self.a_w * self.weight**2).sum() - (self.c_w * self.weight).sum()
                + 0.5 * (self.a_b * self.bias**2).sum() - (self.c_b * self.bias).sum())

    def grads(self):
        return [self.a_w * self.weight.detach() - self.c_w, self.a_b * self.bias.detach() - self.c_b]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_sam_perturbation_closed_form():
    model = Quadratic()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    g = model.grads()
    eps = opt.perturbation(g, list(model.parameters()))
    expected = 0.3 * flat(g) / flat(g).norm()
    torch.testing.assert_close(flat(eps), expected, rtol=1e-12, atol=1e-14)


def test_asam_perturbation_closed_form_and_ellipsoid():
    model = Quadratic()
    opt = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1)
    g = model.grads()
    eps = opt.perturbation(g, list(model.parameters()))
    t = flat([model.weight.detach().abs() + 0.01, torch.ones(3)])  # official rule: only "weight"
    tg = t * flat(g)
    torch.testing.assert_close(flat(eps), 0.5 * t * tg / tg.norm(), rtol=1e-12, atol=1e-14)
    assert (flat(eps) / t).norm().item() == pytest.approx(0.5, rel=1e-12)


def test_asam_filter_none_adapts_every_tensor_and_needs_no_names():
    model = Quadratic()
    opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, eta=0.0, adaptive_filter=None, lr=0.1)
    g = model.grads()
    t = flat([p.detach().abs() for p in model.parameters()])
    eps = opt.perturbation(g, list(model.parameters()))
    torch.testing.assert_close(flat(eps), 0.5 * t * t * flat(g) / (t * flat(g)).norm(), rtol=1e-12, atol=1e-14)


def test_asam_without_names_raises():
    with pytest.raises(ValueError, match="named_parameters"):
        ASAM(Quadratic().parameters(), torch.optim.SGD, lr=0.1)


def test_asam_with_identity_scaling_equals_sam_exactly():
    model = Quadratic()
    asam = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.2, adaptive_filter=lambda n, p: False, lr=0.1)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    params, g = list(model.parameters()), model.grads()
    for a, b in zip(asam.perturbation(g, params), sam.perturbation(g, params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("alpha", [0.5, 1.2, 2.0])
def test_rsam_perturbation_closed_form(alpha):
    model = Quadratic()
    opt = RSAM(model.parameters(), torch.optim.SGD, rho=0.7, alpha=alpha, lr=0.1)
    g = flat(model.grads())
    s1 = (g**2).sum() + 1e-16
    sa = (g.abs() ** (2 * alpha)).sum() + 1e-16
    c = math.copysign(1.0, 1 - alpha) * 0.7 * sa / s1 ** (alpha + 1)
    eps = flat(opt.perturbation(model.grads(), list(model.parameters())))
    torch.testing.assert_close(eps, -c * g, rtol=1e-12, atol=1e-15)
    # equivalent reading: signed radius rho_t = rho * sum p^alpha / |g|
    p = g**2 / (g**2).sum()
    rho_t = 0.7 * (p**alpha).sum() / g.norm()
    assert eps.norm().item() == pytest.approx(rho_t.item(), rel=1e-10)
    assert torch.dot(eps, g).sign().item() == (1.0 if alpha > 1 else -1.0)


def test_rsam_scaling_gradient_by_three_scales_eps_by_a_third():
    model = Quadratic()
    opt = RSAM(model.parameters(), torch.optim.SGD, rho=0.7, alpha=1.2, lr=0.1)
    params, g = list(model.parameters()), model.grads()
    e1 = flat(opt.perturbation(g, params))
    e3 = flat(opt.perturbation([3 * t for t in g], params))
    torch.testing.assert_close(e3, e1 / 3, rtol=1e-12, atol=0)


def test_rsam_tends_to_sam_as_alpha_goes_to_one_from_above():
    model = Quadratic()
    params, g = list(model.parameters()), model.grads()
    rho_sam = 0.05
    rsam = RSAM(params, torch.optim.SGD, rho=rho_sam * flat(g).norm().item(), alpha=1 + 1e-9, lr=0.1)
    sam = SAM(params, torch.optim.SGD, rho=rho_sam, lr=0.1)
    diff = flat(rsam.perturbation(g, params)) - flat(sam.perturbation(g, params))
    assert diff.abs().max().item() < 1e-8
    below = RSAM(params, torch.optim.SGD, rho=rho_sam * flat(g).norm().item(), alpha=1 - 1e-9, lr=0.1)
    mirror = flat(below.perturbation(g, params)) + flat(sam.perturbation(g, params))
    assert mirror.abs().max().item() < 1e-8


def test_rsam_rejects_alpha_one():
    with pytest.raises(ValueError, match="alpha = 1"):
        RSAM(Quadratic().parameters(), torch.optim.SGD, alpha=1.0, lr=0.1)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_at(model, params, x, y):
    return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_uses_the_perturbed_gradient(momentum):
    model, (x, y) = mlp(), batch()
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    g = torch.autograd.grad(loss_at(model, theta, x, y), list(theta.values()))
    theta = {n: t.detach() for n, t in theta.items()}
    scale = 0.1 / flat(g).norm()
    perturbed = {n: theta[n] + scale * gi for n, gi in zip(names, g)}
    g_tilde = torch.autograd.grad(loss_at(model, {n: t.requires_grad_() for n, t in perturbed.items()}, x, y),
                                  list(perturbed.values()))
    expected = {n: theta[n] - 0.5 * gt for n, gt in zip(names, g_tilde)}  # first SGD step: buf = g̃

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, momentum=momentum)

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first_loss = opt.step(closure)
    assert first_loss.item() == pytest.approx(loss_at(model, theta, x, y).item())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-14)
    assert opt.stats["perturbed"] == 1
    assert all(p.grad is None for p in model.parameters())


def test_two_step_api_matches_closure_step():
    (x, y) = batch()
    results = []
    for api in ("closure", "two_step"):
        model = mlp()
        opt = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.5, lr=0.3, momentum=0.9)
        for _ in range(3):
            if api == "closure":
                opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())
            else:
                with opt.first_pass():
                    nn.functional.cross_entropy(model(x), y).backward()
                opt.first_step()
                with opt.second_pass():
                    nn.functional.cross_entropy(model(x), y).backward()
                opt.second_step()
        results.append(flat(list(model.parameters())).detach())
    assert torch.equal(*results)


def test_restore_is_an_exact_copy_even_in_bfloat16():
    torch.manual_seed(0)
    model = nn.Linear(64, 64).to(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    model(torch.randn(8, 64, dtype=torch.bfloat16)).square().mean().backward()
    opt.first_step()
    moved = [p.detach().clone() for p in model.parameters()]
    eps = [m - b for m, b in zip(moved, before)]
    assert any((e != 0).any() for e in eps)
    assert not all(torch.equal(m - e, b) for m, e, b in zip(moved, eps, before)), "subtraction would be exact"
    opt.restore()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    opt.restore()  # no-op once restored
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_state_dict_round_trip_includes_base_state():
    (x, y) = batch()
    model = mlp()
    opt = RSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=1.5, warmup_epochs=-1, lr=0.1, momentum=0.9)
    closure = lambda: nn.functional.cross_entropy(model(x), y).backward()  # noqa: E731
    opt.step(closure)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)  # a real round trip: no aliasing of momentum buffers
    saved.seek(0)
    state = torch.load(saved)
    assert state["base_optimizer"]["state"], "momentum buffers must be saved"

    clone = mlp()
    clone.load_state_dict(model.state_dict())
    opt2 = RSAM(clone.parameters(), torch.optim.SGD, rho=0.5, alpha=1.5, warmup_epochs=-1, lr=0.7, momentum=0.9)
    opt2.load_state_dict(state)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    opt.step(closure)
    opt2.step(lambda: nn.functional.cross_entropy(clone(x), y).backward())
    assert torch.equal(flat(list(model.parameters())), flat(list(clone.parameters())))


def test_lr_scheduler_on_wrapper_drives_base_optimizer():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_missing_closure_names_two_step_alternative():
    opt = SAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="first_step"):
        opt.step()


def test_closure_without_backward_raises():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))


def test_closure_runs_with_grad_enabled_and_entry_gradients_are_discarded():
    model, (x, y) = mlp(), batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)
    reference = mlp()
    ref_opt = SAM(reference.parameters(), torch.optim.SGD, rho=0.1, lr=0.5)
    ref_opt.step(lambda: nn.functional.cross_entropy(reference(x), y).backward())

    nn.functional.cross_entropy(model(x), y).backward()  # old pattern: manual first backward
    with torch.no_grad(), pytest.warns(UserWarning, match="discarded"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())
    assert torch.equal(flat(list(model.parameters())), flat(list(reference.parameters())))


@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_zero_or_nonfinite_gradient_skips_perturbation(bad):
    model = mlp()
    opt = RSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=1.5, warmup_epochs=-1, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if bad == "zero" else torch.full_like(p, math.nan)
    opt.first_step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    key = "skipped_zero_grad" if bad == "zero" else "skipped_nonfinite_grad"
    assert opt.stats[key] == 1 and opt.stats["perturbed"] == 0


def test_rsam_warmup_takes_plain_steps_then_perturbs():
    model, (x, y) = mlp(), batch()
    plain = mlp()
    opt = RSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=1.5, warmup_epochs=1, lr=0.3)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.3)
    calls = []

    def closure():
        calls.append(1)
        nn.functional.cross_entropy(model(x), y).backward()

    for epoch in range(3):
        opt.set_epoch(epoch)
        calls.clear()
        opt.step(closure)
        sgd.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        sgd.step()
        same = torch.equal(flat(list(model.parameters())), flat(list(plain.parameters())))
        assert (len(calls), same) == ((1, True) if epoch <= 1 else (2, False))


def test_warmup_predicate_latches_on_metrics():
    opt = RSAM(mlp().parameters(), torch.optim.SGD, lr=0.1,
               warmup_predicate=lambda epoch, metrics: metrics is None or metrics["top1"] <= 0.3)
    assert not opt.perturbing
    opt.set_epoch(1, {"top1": 0.2})
    assert not opt.perturbing
    opt.set_epoch(2, {"top1": 0.35})
    assert opt.perturbing
    opt.set_epoch(3, {"top1": 0.1})
    assert opt.perturbing

"""Spec §6 pitfalls: BatchNorm running stats, bf16 autocast, fp16 GradScaler, accumulation."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from quotientsharp.optim import RSAM, SAM, bn_frozen


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def bn_net(momentum=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=momentum), nn.ReLU(), nn.Linear(6, 3))


def data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def bn_buffers(model):
    return [b.clone() for b in model[1].buffers()]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_second_pass_leaves_batchnorm_buffers_bit_identical(momentum):
    x, y = data()
    for with_model in (True, False):
        model = bn_net(momentum)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model if with_model else None)
        snapshots = []

        def closure():
            nn.functional.cross_entropy(model(x), y).backward()
            snapshots.append(bn_buffers(model))

        opt.step(closure)
        after_step = bn_buffers(model)
        identical = all(torch.equal(a, b) for a, b in zip(snapshots[0], after_step))
        assert identical == with_model  # without model= the perturbed pass updates them again
    assert snapshots[0][2].item() == 1  # first pass counted once (num_batches_tracked)


def test_bn_frozen_still_uses_batch_statistics():
    model, (x, _) = bn_net(), data()
    before = bn_buffers(model)
    with bn_frozen(model):
        out_frozen = model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_buffers(model)))
    torch.testing.assert_close(out_frozen, model(x))  # train mode: batch statistics either way


def test_bf16_autocast_on_cpu_matches_manual_two_pass():
    x, y = data()
    model = bn_net()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, model=model)

    def loss_of(params):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(functional_call(model, params, (x,)).float(), y)

    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    buffers_before = bn_buffers(model)
    g = torch.autograd.grad(loss_of(theta), list(theta.values()))
    assert all(gi.dtype == torch.float32 for gi in g)
    scale = 0.1 / flat(g).norm()
    perturbed = {n: (t.detach() + scale * gi).requires_grad_() for (n, t), gi in zip(theta.items(), g)}
    with bn_frozen(model):
        g_tilde = torch.autograd.grad(loss_of(perturbed), list(perturbed.values()))
    expected = [t.detach() - 0.5 * gt for t, gt in zip(theta.values(), g_tilde)]
    for buf, b in zip(model[1].buffers(), buffers_before):
        buf.copy_(b)  # undo the reference's first pass

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss

    opt.step(closure)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-6)


def _fp16_autocast():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return torch.autocast("cpu", dtype=torch.float16)
    except RuntimeError:
        return torch.autocast("cpu", enabled=False)


def test_grad_scaler_path_forms_eps_from_unscaled_gradient():
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    # RSAM's eps is not scale-invariant: a scaled gradient would give a 1/scale-sized eps
    opt = RSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=1.5, warmup_epochs=-1, lr=0.1)
    ref_opt = RSAM(reference.parameters(), torch.optim.SGD, rho=0.5, alpha=1.5, warmup_epochs=-1, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def loss_fn(net):
        with _fp16_autocast():
            return nn.functional.cross_entropy(net(x).float(), y)

    scaler.scale(loss_fn(model)).backward()
    opt.first_step(grad_scale=scaler.get_scale())
    nn.functional.cross_entropy(reference(x), y).backward()
    ref_opt.first_step()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-2, atol=1e-3)
    scaler.scale(loss_fn(model)).backward()
    opt.restore()
    scaler.step(opt.base_optimizer)
    scaler.update()
    opt.zero_grad()
    nn.functional.cross_entropy(reference(x), y).backward()
    ref_opt.second_step()
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-2, atol=1e-3)


def test_grad_scaler_overflow_skips_eps_and_step_and_leaves_theta_untouched():
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    before = flat(list(model.parameters())).detach().clone()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def scaled_backward_with_overflow():
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        model[0].weight.grad[0, 0] = math.inf

    scaled_backward_with_overflow()
    opt.first_step(grad_scale=scaler.get_scale())
    assert opt.stats["skipped_nonfinite_grad"] == 1
    scaled_backward_with_overflow()
    opt.restore()
    scaler.step(opt.base_optimizer)
    scaler.update()
    assert torch.equal(flat(list(model.parameters())).detach(), before)
    assert scaler.get_scale() < 2.0**10


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def grad_at(model, params, x, y):
    params = {n: t.detach().clone().requires_grad_() for n, t in params.items()}
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def sam_point(theta, g, rho):
    norm = flat(list(g.values())).norm()
    return {n: theta[n] + rho * g[n] / norm for n in theta}


@pytest.mark.parametrize("mode", ["micro", "global"])
@pytest.mark.parametrize("api", ["closure", "two_step"])
def test_gradient_accumulation_modes(mode, api):
    x, y = data(n=12)
    x = x.double()
    micro = [(x[i::3], y[i::3]) for i in range(3)]
    model = mlp()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = [grad_at(model, theta, *mb) for mb in micro]
    if mode == "micro":  # one eps per micro-batch
        tilde = [grad_at(model, sam_point(theta, g, 0.2), *mb) for g, mb in zip(grads, micro)]
    else:  # eps from the averaged first gradient
        mean_g = {n: sum(g[n] for g in grads) / 3 for n in theta}
        tilde = [grad_at(model, sam_point(theta, mean_g, 0.2), *mb) for mb in micro]
    expected = {n: theta[n] - 0.3 * sum(t[n] for t in tilde) / 3 for n in theta}

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3, accumulate=3, accumulate_mode=mode)
    loss_of = lambda i: nn.functional.cross_entropy(model(micro[i][0]), micro[i][1])  # noqa: E731
    if api == "closure":
        opt.step(lambda i: loss_of(i).backward())
    elif mode == "micro":
        for i in range(3):
            loss_of(i).backward()
            opt.first_step()
            loss_of(i).backward()
            opt.second_step()
    else:
        for i in range(3):
            loss_of(i).backward()
        opt.first_step()
        for i in range(3):
            loss_of(i).backward()
        opt.second_step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-14)


def test_two_step_api_raises_on_unstepped_accumulated_gradients():
    x, y = data()
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss = lambda: nn.functional.cross_entropy(model(x.double()), y)  # noqa: E731
    loss().backward()
    loss().backward()
    with pytest.raises(RuntimeError, match="accumulate=k"):
        opt.first_step()
    model.zero_grad()  # zeroing outside the optimizer is fine
    loss().backward()
    opt.first_step(zero_grad=False)
    loss().backward()  # adds g̃ to the un-cleared g
    with pytest.raises(RuntimeError, match="accumulate=k"):
        opt.second_step()

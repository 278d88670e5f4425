"""GeodesicSAM and RiemannianSGD (training.md §9): closed forms, horizontality, invariance, Taylor
slope, state dicts. float64 and eps_rel = 0 wherever an exact identity is asserted."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quotientsharp import Quotient
from quotientsharp.models.vit import TinyViT
from quotientsharp.optim import ASAM, SAM, GeodesicSAM, RiemannianSGD


@pytest.fixture(autouse=True)
def float64_default():
    """float64 default dtype for the test (restored to float32 after it)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def mlp(seed=0):
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


def batch(shape, n=16, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def loss_at(model, x, y):
    return F.cross_entropy(model(x), y)


def first_gradient(model, x, y):
    model.zero_grad()
    loss_at(model, x, y).backward()
    params = list(model.parameters())
    return params, [p.grad.clone() for p in params]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def point(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----- (a) reductions to SAM and ASAM ------------------------------------------------------------

def test_no_groups_euclidean_retraction_equals_sam():
    model = mlp()
    x, y = batch((5,))
    params, grads = first_gradient(model, x, y)
    geo = GeodesicSAM(params, torch.optim.SGD, rho=0.3, model=model, rest="euclidean",
                      geodesic="retraction", eps_rel=0.0, lr=0.1)
    assert geo.quotient.groups == []
    sam = SAM(params, torch.optim.SGD, rho=0.3, lr=0.1)
    eps_geo, eps_sam = geo.perturbation(grads, params), sam.perturbation(grads, params)
    torch.testing.assert_close(flat(eps_geo), flat(eps_sam), rtol=0, atol=1e-12)
    theta = flat(params).detach().clone()
    geo.first_step()  # the retraction moves to θ + ε exactly
    torch.testing.assert_close(flat(params).detach(), theta + flat(eps_sam), rtol=0, atol=1e-12)
    geo.restore()
    assert torch.equal(flat(params).detach(), theta)


def test_no_groups_adaptive_equals_asam_on_all_tensors():
    model = mlp()
    x, y = batch((5,))
    params, grads = first_gradient(model, x, y)
    geo = GeodesicSAM(params, torch.optim.SGD, rho=0.5, model=model, rest="adaptive",
                      geodesic="retraction", eps_rel=0.0, lr=0.1)
    asam = ASAM(params, torch.optim.SGD, rho=0.5, eta=0.0, adaptive_filter=None, lr=0.1)
    torch.testing.assert_close(flat(geo.perturbation(grads, params)), flat(asam.perturbation(grads, params)),
                               rtol=1e-12, atol=1e-14)


def test_quotient_must_cover_the_optimizer_parameters():
    model = mlp()
    half = Quotient([], ["0.weight", "0.bias"], rest="euclidean")
    with pytest.raises(ValueError, match="only in the optimizer"):
        GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, quotient=half, lr=0.1)
    with pytest.raises(ValueError, match="geodesic must be one of"):
        GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, geodesic="third", lr=0.1)


# ----- (b) horizontality; (d) Taylor slope -------------------------------------------------------

@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_perturbation_is_horizontal_with_metric_radius(metric):
    model = vit()
    x, y = batch((1, 4, 4))
    params, grads = first_gradient(model, x, y)
    opt = GeodesicSAM(params, torch.optim.SGD, rho=0.1, model=model, metric=metric, eps_rel=0.0,
                      debug=True, lr=0.1)
    assert len(opt.quotient.groups) == 1
    eps = opt.perturbation(grads, params)
    w, v = point(model), opt.view.tangent(params, eps)
    assert float(opt.quotient.is_horizontal(w, v)) < 1e-10
    assert float(opt.quotient.norm(w, v)) == pytest.approx(0.1, rel=1e-10)
    # g^T v = ρ‖grad L‖_θ: the metric-ball maximiser of the first-order increase
    xi = opt.quotient.riemannian_gradient(w, opt.view.tangent(params, grads))
    assert float(flat(grads) @ flat(eps)) == pytest.approx(0.1 * float(opt.quotient.norm(w, xi)), rel=1e-10)
    opt.first_step()  # debug mode checks horizontality inside the step too
    opt.restore()


def test_taylor_slope_of_the_perturbed_loss():
    """L(γ_{tv}(1)) − L(θ) − t·gᵀv = O(t²): log-log slope ≈ 2."""
    model = vit()
    x, y = batch((1, 4, 4))
    params, grads = first_gradient(model, x, y)
    opt = GeodesicSAM(params, torch.optim.SGD, rho=1.0, model=model, eps_rel=0.0, lr=0.1)
    eps = opt.perturbation(grads, params)
    w, v = point(model), opt.view.tangent(params, eps)
    with torch.no_grad():
        base, slope = float(loss_at(model, x, y)), float(flat(grads) @ flat(eps))
    ts = [4e-3, 2e-3, 1e-3, 5e-4]
    residuals = []
    for t in ts:
        end = opt.view.endpoint(w, {n: t * d for n, d in v.items()})
        with torch.no_grad():
            value = float(F.cross_entropy(torch.func.functional_call(model, end, (x,)), y))
        residuals.append(abs(value - base - t * slope))
    orders = [math.log(residuals[i] / residuals[i + 1], 2) for i in range(len(ts) - 1)]
    assert all(1.8 < o < 2.2 for o in orders), orders


# ----- (c) invariance ----------------------------------------------------------------------------

def transformed_copy(model, quotient, seed=3):
    """g·w for a random g (GL(h) per head, condition number ≤ 30): same function."""
    w = point(model)
    element = quotient.random_element(w, generator=torch.Generator().manual_seed(seed), max_cond=30.0)
    other = copy.deepcopy(model)
    other.load_state_dict(quotient.action(w, element))
    return other


def perturbed_loss(opt_cls, model, x, y, **kw):
    opt = opt_cls(model.parameters(), torch.optim.SGD, model=model, lr=0.1, **kw)
    loss_at(model, x, y).backward()
    opt.first_step()
    with torch.no_grad():
        value = float(loss_at(model, x, y))
    opt.restore()
    return value


def test_ascent_step_is_invariant_and_sams_is_not():
    model = vit()
    x, y = batch((1, 4, 4))
    quotient = GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, eps_rel=0.0, lr=0.1).quotient
    other = transformed_copy(model, quotient)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=1e-12)
    for geodesic in ("second_order", "exact", "retraction"):
        a = perturbed_loss(GeodesicSAM, model, x, y, rho=0.2, eps_rel=0.0, geodesic=geodesic)
        b = perturbed_loss(GeodesicSAM, other, x, y, rho=0.2, eps_rel=0.0, geodesic=geodesic)
        assert abs(a - b) < 1e-8 * max(1.0, abs(a)), (geodesic, a, b)
    a, b = perturbed_loss(SAM, model, x, y, rho=0.2), perturbed_loss(SAM, other, x, y, rho=0.2)
    assert abs(a - b) > 1e-3


def train(model, opt, batches):
    for x, y in batches:
        opt.step(lambda: loss_at(model, x, y).backward())


def test_training_from_transformed_weights_gives_the_same_predictions():
    """GeodesicSAM + RiemannianSGD is equivariant step by step, so after several steps the two
    runs predict identically; plain SAM + SGD does not, and neither does GeodesicSAM + SGD (the
    Euclidean base step is the only non-invariant part)."""
    model = vit()
    quotient = GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, eps_rel=0.0, lr=0.1).quotient
    other = transformed_copy(model, quotient)
    batches = [batch((1, 4, 4), seed=s) for s in range(5)]
    x_test, _ = batch((1, 4, 4), n=32, seed=99)

    def run(make):
        outputs = []
        for start in (model, other):
            m = copy.deepcopy(start)
            train(m, make(m), batches)
            with torch.no_grad():
                outputs.append(m(x_test))
        return outputs

    def geo(base, **kw):
        return lambda m: GeodesicSAM(m.parameters(), base, rho=0.1, model=m, eps_rel=0.0, **kw)

    a, b = run(geo(RiemannianSGD, lr=0.05))
    with torch.no_grad():
        assert (a - model(x_test)).abs().max() > 1e-3  # training moved the function
    torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    a, b = run(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.05))
    assert (a - b).abs().max() > 1e-3
    a, b = run(geo(torch.optim.SGD, lr=0.05))
    assert (a - b).abs().max() > 1e-3


def test_riemannian_sgd_alone_is_invariant():
    model = vit()
    quotient = GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, eps_rel=0.0, lr=0.1).quotient
    other = transformed_copy(model, quotient)
    batches = [batch((1, 4, 4), seed=s) for s in range(3)]
    x_test, _ = batch((1, 4, 4), n=32, seed=99)
    outs = []
    for m in (model, other):
        opt = RiemannianSGD(m.parameters(), lr=0.05, model=m, eps_rel=0.0)
        for x, y in batches:
            opt.zero_grad()
            loss_at(m, x, y).backward()
            opt.step()
        with torch.no_grad():
            outs.append(m(x_test))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-8)


# ----- (e) state dict ----------------------------------------------------------------------------

@pytest.mark.parametrize("base, kw", [(torch.optim.SGD, {"momentum": 0.9}), (RiemannianSGD, {})])
def test_state_dict_round_trip(base, kw):
    model = vit()
    batches = [batch((1, 4, 4), seed=s) for s in range(3)]
    opt = GeodesicSAM(model.parameters(), base, rho=0.1, model=model, lr=0.05, **kw)
    train(model, opt, batches[:2])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    clone = vit(seed=7)
    clone.load_state_dict(saved["model"])
    clone_opt = GeodesicSAM(clone.parameters(), base, rho=0.1, model=clone, lr=0.05, **kw)
    clone_opt.load_state_dict(saved["opt"])
    train(model, opt, batches[2:])
    train(clone, clone_opt, batches[2:])
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)

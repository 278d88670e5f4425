"""Issue 15 items 2 and 9: every optimizer hyperparameter is validated when the optimizer is built
(the error names the optimizer, the parameter and its value); SAM(adaptive=True) points to ASAM;
the README's SAM snippet runs as written."""
import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from test_optim_geodesic_sam import float64_default, mlp  # noqa: F401  (autouse fixture, shared model)

from quotientsharp.models.vit import TinyViT
from quotientsharp.optim import ASAM, MESA, RSAM, SAF, SAM, GeodesicSAM, RiemannianSGD

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def vit(seed=0):
    torch.manual_seed(seed)
    return TinyViT(image_size=4, patch_size=2, in_channels=1, n_classes=3, d_model=8, depth=1,
                   n_heads=2, mlp_dim=8)


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def build(name, model, **kw):
    """Each optimizer with valid defaults, overridden by ``kw``."""
    params = model.named_parameters() if name == "ASAM" else model.parameters()
    base = {"lr": 0.1}
    if name == "SAM":
        return SAM(params, torch.optim.SGD, **{**base, **kw})
    if name == "ASAM":
        return ASAM(params, torch.optim.SGD, **{**base, **kw})
    if name == "RSAM":
        return RSAM(params, torch.optim.SGD, **{**base, **kw})
    if name == "GeodesicSAM":
        return GeodesicSAM(params, torch.optim.SGD, **{"model": model, **base, **kw})
    if name == "SAF":
        return SAF(params, torch.optim.SGD, **{"num_samples": 8, "num_classes": 3, **base, **kw})
    if name == "MESA":
        return MESA(params, torch.optim.SGD, **{"model": model, **base, **kw})
    raise AssertionError(name)


TWO_PASS = ["SAM", "ASAM", "RSAM", "GeodesicSAM"]
ALL = TWO_PASS + ["SAF", "MESA"]


def model_for(name):
    return vit() if name == "GeodesicSAM" else mlp()


# ----- item 2: rho -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TWO_PASS)
@pytest.mark.parametrize("rho", [float("nan"), float("inf"), -float("inf"), 0.0, -0.1])
def test_rho_must_be_finite_and_positive(name, rho):
    with pytest.raises(ValueError, match=rf"{name}: rho must be a finite number > 0, got {re.escape(repr(rho))}"):
        build(name, model_for(name), rho=rho)


@pytest.mark.parametrize("name", TWO_PASS)
def test_rho_of_the_wrong_type_is_a_type_error(name):
    with pytest.raises(TypeError, match=rf"{name}: rho must be a finite number > 0, got '0.05' \(str\)"):
        build(name, model_for(name), rho="0.05")


def test_sam_nan_rho_was_the_reported_failure_and_a_valid_rho_still_steps():
    """The observed bug: rho=nan was accepted and one step made every weight NaN."""
    model = mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=float("nan"), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


# ----- item 2: every other hyperparameter -------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("key, value, message", [
    ("lr", float("nan"), "lr must be a finite number >= 0, got nan"),
    ("lr", float("inf"), "lr must be a finite number >= 0, got inf"),
    ("lr", -0.1, "lr must be a finite number >= 0, got -0.1"),
    ("momentum", float("nan"), "momentum must be a finite number >= 0 and <= 1, got nan"),
    ("momentum", 1.5, "momentum must be a finite number >= 0 and <= 1, got 1.5"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0, got inf"),
    ("dampening", -0.5, "dampening must be a finite number >= 0 and <= 1, got -0.5"),
])
def test_base_optimizer_hyperparameters(name, key, value, message):
    with pytest.raises(ValueError, match=rf"{name}: {re.escape(message)}"):
        build(name, model_for(name), **{key: value})


def test_adam_betas_eps_and_per_group_values():
    model = mlp()
    with pytest.raises(ValueError, match=r"SAM: betas\[1\] must be a finite number >= 0 and < 1, got 1.0"):
        SAM(model.parameters(), torch.optim.Adam, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="SAM: eps must be a finite number >= 0, got nan"):
        SAM(model.parameters(), torch.optim.Adam, eps=float("nan"))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": float("nan")}]
    with pytest.raises(ValueError, match=r"SAM: lr \(param group 1\) must be a finite number >= 0, got nan"):
        SAM(groups, torch.optim.SGD, lr=0.1)
    opt = SAM(model[0].parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"SAM: lr \(param group 1\) must be a finite number >= 0, got inf"):
        opt.add_param_group({"params": model[2].parameters(), "lr": float("inf")})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.2})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]


def test_unknown_base_keyword_names_the_wrapper_and_base():
    with pytest.raises(TypeError, match=r"SAM: the base optimizer SGD refused the arguments \['lr', 'nesterow'\]"):
        SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, nesterow=True)


@pytest.mark.parametrize("name", TWO_PASS)
@pytest.mark.parametrize("key, value, exc, message", [
    ("accumulate", 0, ValueError, "accumulate must be an integer >= 1, got 0"),
    ("accumulate", 2.0, TypeError, "accumulate must be an integer >= 1, got 2.0 (float)"),
    ("warmup_epochs", -2, ValueError, "warmup_epochs must be an integer >= -1, got -2"),
    ("perturbation", "both", ValueError, "perturbation must be one of 'local', 'global'; got 'both'"),
    ("accumulate_mode", "macro", ValueError, "accumulate_mode must be one of 'micro', 'global'; got 'macro'"),
    ("warmup_predicate", 3, TypeError, "warmup_predicate must be callable"),
])
def test_sharpness_aware_options(name, key, value, exc, message):
    with pytest.raises(exc, match=rf"{name}: {re.escape(message)}"):
        build(name, model_for(name), **{key: value})


@pytest.mark.parametrize("eta, exc", [(-0.01, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                      (None, TypeError)])
def test_asam_eta(eta, exc):
    with pytest.raises(exc, match=rf"ASAM: eta must be a finite number >= 0, got {re.escape(repr(eta))}"):
        build("ASAM", mlp(), eta=eta)


def test_asam_eta_zero_is_allowed_and_filter_must_be_callable():
    assert build("ASAM", mlp(), eta=0.0).eta == 0.0
    with pytest.raises(TypeError, match="ASAM: adaptive_filter must be callable"):
        build("ASAM", mlp(), adaptive_filter="weight")


@pytest.mark.parametrize("alpha, message", [(float("nan"), "alpha must be a finite number > 0, got nan"),
                                            (0.0, "alpha must be a finite number > 0, got 0.0"),
                                            (float("inf"), "alpha must be a finite number > 0, got inf"),
                                            (1.0, "alpha = 1 is undefined")])
def test_rsam_alpha(alpha, message):
    with pytest.raises(ValueError, match=rf"RSAM: {re.escape(message)}"):
        build("RSAM", mlp(), alpha=alpha)


@pytest.mark.parametrize("key, value, exc, message", [
    ("eps_rel", -1e-6, ValueError, "eps_rel must be a finite number >= 0, got -1e-06"),
    ("eps_rel", float("nan"), ValueError, "eps_rel must be a finite number >= 0, got nan"),
    ("metric", "euclid", ValueError, "metric must be one of 'inv', 'mix'; got 'euclid'"),
    ("rest", "flat", ValueError, "rest must be one of 'adaptive', 'euclidean'; got 'flat'"),
    ("rest_metric", "flat", ValueError, "rest must be one of 'adaptive', 'euclidean'; got 'flat'"),
    ("quotient", "mix", TypeError, "quotient must be a Quotient (or None), got str"),
])
def test_geodesic_sam_geometry_arguments(key, value, exc, message):
    with pytest.raises(exc, match=rf"GeodesicSAM: {re.escape(message)}"):
        build("GeodesicSAM", vit(), **{key: value})


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 0.0, -1.0])
def test_riemannian_sgd_lr(lr):
    model = vit()
    with pytest.raises(ValueError, match=rf"RiemannianSGD: lr must be a finite number > 0, got {re.escape(repr(lr))}"):
        RiemannianSGD(model.parameters(), lr=lr, model=model)


@pytest.mark.parametrize("name", ["SAF", "MESA"])
@pytest.mark.parametrize("key, value, exc, message", [
    ("lam", float("nan"), ValueError, "lam must be a finite number >= 0, got nan"),
    ("lam", -0.3, ValueError, "lam must be a finite number >= 0, got -0.3"),
    ("tau", 0.0, ValueError, "tau must be a finite number > 0, got 0.0"),
    ("tau", float("inf"), ValueError, "tau must be a finite number > 0, got inf"),
    ("label_smoothing", 1.5, ValueError, "label_smoothing must be a finite number >= 0 and <= 1, got 1.5"),
    ("start_epoch", 2.5, TypeError, "start_epoch must be an integer >= 0, got 2.5 (float)"),
    ("end_epoch", 5, ValueError, "end_epoch must be a number > 5, got 5"),
    ("end_epoch", float("nan"), ValueError, "end_epoch must be a number > 5, got nan"),
])
def test_distillation_hyperparameters(name, key, value, exc, message):
    with pytest.raises(exc, match=rf"{name}: {re.escape(message)}"):
        build(name, mlp(), **{key: value})


@pytest.mark.parametrize("key, value, exc, message", [
    ("num_samples", 0, ValueError, "num_samples must be an integer >= 1, got 0"),
    ("num_classes", 3.0, TypeError, "num_classes must be an integer >= 1, got 3.0 (float)"),
    ("lag_epochs", 0, ValueError, "lag_epochs must be an integer >= 1, got 0"),
])
def test_saf_counts(key, value, exc, message):
    with pytest.raises(exc, match=rf"SAF: {re.escape(message)}"):
        build("SAF", mlp(), **{key: value})


@pytest.mark.parametrize("kw, message", [
    ({"decay": float("nan")}, "decay must be a finite number >= 0 and < 1, got nan"),
    ({"decay": 1.0}, "decay must be a finite number >= 0 and < 1, got 1.0"),
    ({"ema_horizon_epochs": float("nan"), "steps_per_epoch": 10}, "ema_horizon_epochs must be a finite number > 0, got nan"),
    ({"ema_horizon_epochs": 2, "steps_per_epoch": 0}, "steps_per_epoch must be an integer >= 1, got 0"),
    ({"ema_horizon_epochs": 2}, "ema_horizon_epochs needs steps_per_epoch"),
])
def test_mesa_decay(kw, message):
    with pytest.raises(ValueError, match=rf"MESA: {re.escape(message)}"):
        build("MESA", mlp(), **kw)


def test_infinite_end_epoch_and_tensor_lr_are_accepted():
    assert math.isinf(build("SAF", mlp()).end_epoch)
    assert build("SAM", mlp(), lr=torch.tensor(0.1)).param_groups[0]["lr"] == pytest.approx(0.1)


# ----- item 9: davda54's adaptive=True -----------------------------------------------------------
def test_sam_adaptive_true_points_to_asam():
    with pytest.raises(TypeError, match=r"SAM\(adaptive=True\).*ASAM\(params, base_optimizer_cls, rho=\.\.\., "
                                        r"eta=0\.0, adaptive_filter=None"):
        SAM(mlp().parameters(), torch.optim.SGD, rho=2.0, adaptive=True, lr=0.1, momentum=0.9)


def test_the_asam_the_error_names_is_davda54s_adaptive_step():
    """davda54/sam, adaptive=True: ε = ρ·θ²⊙g / ‖|θ|⊙g‖ over all tensors (float64 closed form)."""
    model = mlp()
    x, y = batch()
    rho = 2.0
    opt = ASAM(model.parameters(), torch.optim.SGD, rho=rho, eta=0.0, adaptive_filter=None, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    theta = [p.detach().clone() for p in params]
    norm = torch.cat([(t.abs() * g).reshape(-1) for t, g in zip(theta, grads)]).norm()
    expected = [t + rho * t**2 * g / (norm + 1e-12) for t, g in zip(theta, grads)]
    opt.first_step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-15)


def test_sam_adaptive_false_is_plain_sam():
    x, y = batch()
    results = []
    for kw in ({}, {"adaptive": False}):
        model = mlp()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, **kw)
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_readme_sam_snippet_runs_as_written():
    text = README.read_text()
    section = text.split("## Sharpness-aware training", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "opt = SAM(" in block
    torch.set_default_dtype(torch.float32)  # the snippet runs in a fresh interpreter's default
    namespace: dict = {}
    exec(compile(block, "README.md (SAM snippet)", "exec"), namespace)
    model, opt = namespace["model"], namespace["opt"]
    assert isinstance(opt, SAM) and opt.stats["perturbed"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())

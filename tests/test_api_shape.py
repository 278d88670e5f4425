"""Issue 15 items 6, 7, 8: one call shape ``measure(model, loader, loss_fn, ...)`` and one result
field ``.value`` for sharpness and curvature; clear errors for swapped arguments, bad counts and
batches whose dtype or device is not the model's; the main API at the top level."""
import doctest
import inspect
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quotientsharp
from quotientsharp import curvature, measures
from quotientsharp.curvature import GGNOperator, HessianOperator, QuotientHessianOperator, hutchinson, slq
from quotientsharp.models.vit import TinyViT
from quotientsharp.validation import BatchMismatchError, conform_batch, conform_inputs

LOSS = F.cross_entropy


def vit():
    torch.manual_seed(0)
    return TinyViT(image_size=4, patch_size=2, in_channels=1, n_classes=3, d_model=8, depth=1,
                   n_heads=2, mlp_dim=8).double()


def batches(dtype=torch.float64, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 4, 4, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g))]


QUICK = {"progress": False}
# every model-level measure, with cheap settings
MEASURES = {
    "geodesic_sharpness": (measures.geodesic_sharpness, {"rho": 0.01, "n_iter": 2, **QUICK}),
    "adaptive_sharpness": (measures.adaptive_sharpness, {"rho": 0.01, "n_iter": 2, **QUICK}),
    "euclidean_sharpness": (measures.euclidean_sharpness, {"rho": 0.01, "n_iter": 2, **QUICK}),
    "hessian_trace": (curvature.hessian_trace, {"n_probes": 2, **QUICK}),
    "hessian_top_eigenvalues": (curvature.hessian_top_eigenvalues, {"tol": 1e-2, **QUICK}),
    "hessian_max_eigenvalue": (curvature.hessian_max_eigenvalue, {"tol": 1e-2, **QUICK}),
    "hessian_slq": (curvature.hessian_slq, {"m": 3, "n_probes": 1, **QUICK}),
    "hessian_log_det": (curvature.hessian_log_det, {"m": 3, "n_probes": 1, "clamp_min": 1e-3, **QUICK}),
    "hessian_shannon_entropy": (curvature.hessian_shannon_entropy, {"m": 3, "n_probes": 1, **QUICK}),
    "hessian_spectral_density": (curvature.hessian_spectral_density, {"m": 3, "n_probes": 1, "n_grid": 10, **QUICK}),
    "renyi_sharpness": (curvature.renyi_sharpness, {"m": 3, "n_probes": 1, **QUICK}),
    "fisher_rao_norm": (curvature.fisher_rao_norm, {}),
    "sam_sharpness": (curvature.sam_sharpness, {}),
    "asam_sharpness": (curvature.asam_sharpness, {}),
    "curvature_operator": (curvature.curvature_operator, {}),
    "HessianOperator": (HessianOperator, {}),
    "GGNOperator": (GGNOperator, {}),
    "QuotientHessianOperator": (QuotientHessianOperator, {}),
    "quotient_hessian_trace": (curvature.quotient_hessian_trace, {"n_probes": 1, **QUICK}),
    "quotient_hessian_top_eigenvalues": (curvature.quotient_hessian_top_eigenvalues, {"m": 4, "tol": 1e-2, **QUICK}),
    "quotient_hessian_slq": (curvature.quotient_hessian_slq, {"m": 3, "n_probes": 1, **QUICK}),
    "quotient_hessian_spectral_density": (curvature.quotient_hessian_spectral_density,
                                          {"m": 3, "n_probes": 1, "n_grid": 10, **QUICK}),
    "quotient_renyi_sharpness": (curvature.quotient_renyi_sharpness, {"m": 3, "n_probes": 1, **QUICK}),
}


# ----- item 6: one argument order ------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MEASURES))
def test_every_measure_takes_model_loader_loss_fn(name):
    fn = MEASURES[name][0]
    params = list(inspect.signature(fn).parameters)
    assert params[:3] == ["model", "loader", "loss_fn"], (name, params[:3])


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_swapped_loader_and_loss_raise_a_type_error_naming_each(name):
    fn, kwargs = MEASURES[name]
    with pytest.raises(TypeError, match=(
            r"\(model, loader, loss_fn, \.\.\.\): loader and loss_fn are swapped: the 2nd argument "
            r"\(loader\) is the function cross_entropy and the 3rd \(loss_fn\) is an iterable \(list\)")):
        fn(vit(), LOSS, batches(), **kwargs)


@pytest.mark.parametrize("name", ["geodesic_sharpness", "hessian_trace", "HessianOperator", "fisher_rao_norm"])
def test_a_loss_that_is_not_callable_or_a_loader_that_is_not_iterable(name):
    fn, kwargs = MEASURES[name]
    with pytest.raises(TypeError, match=r"the 3rd argument \(loss_fn\) must be callable.*got str"):
        fn(vit(), batches(), "cross_entropy", **kwargs)
    with pytest.raises(TypeError, match=r"the 2nd argument \(loader\) must be an iterable of batches.*got int"):
        fn(vit(), 5, LOSS, **kwargs)


def test_pac_bayes_flatness_checks_its_model_and_loader():
    with pytest.raises(TypeError, match=r"pac_bayes_flatness\(model, loader, \.\.\.\)"):
        curvature.pac_bayes_flatness(vit(), LOSS)


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_the_right_order_runs_and_scalars_are_in_value(name):
    fn, kwargs = MEASURES[name]
    result = fn(vit(), batches(), LOSS, **kwargs)
    if isinstance(result, (measures.SharpnessResult, curvature.Estimate)):
        assert isinstance(result.value, float) and result.value == result.value  # not NaN
        assert "value" in result.to_dict()


def test_estimate_is_a_read_only_alias_of_value():
    result = curvature.hessian_trace(vit(), batches(), LOSS, n_probes=3, progress=False)
    assert result.estimate == result.value
    assert result.to_dict()["value"] == result.value and "estimate" not in result.to_dict()
    with pytest.raises(AttributeError):
        result.estimate = 1.0
    assert curvature.Estimate(2.5).value == 2.5 == curvature.Estimate(2.5).estimate


# ----- item 6: counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, message", [
    ("hessian_trace", {"n_probes": 0}, "hessian_trace: n_probes must be an integer >= 1, got 0"),
    ("hessian_trace", {"method": "hutch++", "n_probes": 3}, "hessian_trace: n_probes must be an integer >= 4, got 3"),
    ("hessian_trace", {"method": "slq", "m": 0}, "hessian_trace: m must be an integer >= 1, got 0"),
    ("hessian_top_eigenvalues", {"k": 0}, "hessian_top_eigenvalues: k must be an integer >= 1, got 0"),
    ("hessian_top_eigenvalues", {"tol": -1.0}, "hessian_top_eigenvalues: tol must be a finite number > 0, got -1.0"),
    ("hessian_slq", {"n_probes": 0}, "hessian_slq: n_probes must be an integer >= 1, got 0"),
    ("renyi_sharpness", {"n_probes": -1}, "renyi_sharpness: n_probes must be an integer >= 1, got -1"),
    ("renyi_sharpness", {"m": 0}, "renyi_sharpness: m must be an integer >= 1, got 0"),
    ("hessian_spectral_density", {"n_grid": 1}, "hessian_spectral_density: n_grid must be an integer >= 2, got 1"),
    ("quotient_hessian_trace", {"n_probes": 0}, "quotient_hessian_trace: n_probes must be an integer >= 1, got 0"),
    ("quotient_hessian_slq", {"m": 0}, "quotient_hessian_slq: m must be an integer >= 1, got 0"),
    ("quotient_renyi_sharpness", {"n_probes": 0}, "quotient_hessian_slq: n_probes must be an integer >= 1, got 0"),
    ("sam_sharpness", {"rho": float("nan")}, "sam_sharpness: rho must be a finite number > 0, got nan"),
    ("asam_sharpness", {"eta": -1.0}, "asam_sharpness: eta must be a finite number >= 0, got -1.0"),
    ("geodesic_sharpness", {"n_iter": 0}, "geodesic_sharpness: n_iter must be an integer >= 1, got 0"),
    ("adaptive_sharpness", {"kind": "average", "n_samples": 0}, "adaptive_sharpness: n_samples must be an integer >= 1, got 0"),
    ("euclidean_sharpness", {"n_restarts": -1}, "euclidean_sharpness: n_restarts must be an integer >= 0, got -1"),
    ("euclidean_sharpness", {"momentum": float("nan")}, "euclidean_sharpness: momentum must be a finite number >= 0 and <= 1, got nan"),
])
def test_counts_and_numbers_are_validated(name, kwargs, message):
    fn, defaults = MEASURES[name]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fn(vit(), batches(), LOSS, **{**defaults, **kwargs})


def test_count_of_the_wrong_type_and_low_level_estimators():
    with pytest.raises(TypeError, match=r"hessian_trace: n_probes must be an integer >= 1, got 2.0 \(float\)"):
        curvature.hessian_trace(vit(), batches(), LOSS, n_probes=2.0)
    matrix = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="hutchinson: n_probes must be an integer >= 1, got 0"):
        hutchinson(matrix, n_probes=0, progress=False)
    with pytest.raises(ValueError, match="slq: n_probes must be an integer >= 1, got 0"):
        slq(matrix, m=3, n_probes=0, progress=False)
    with pytest.raises(ValueError, match="slq: m must be an integer >= 1, got 0"):
        slq(matrix, m=0, n_probes=2, progress=False)
    with pytest.raises(ValueError, match="pac_bayes_flatness: n_samples must be an integer >= 1, got 0"):
        curvature.pac_bayes_flatness(vit(), batches(), n_samples=0, progress=False)


# ----- item 7: batch dtype and device --------------------------------------------------------------
def _number(result):
    """The scalar (or, for an operator, loss and gradient) that a measure returns."""
    if isinstance(result, QuotientHessianOperator):
        result = result.hessian
    if isinstance(result, (HessianOperator, GGNOperator)):
        return (result.loss, result.gradient.tolist())
    if isinstance(result, dict):
        return {k: v.value if hasattr(v, "value") else v.estimate for k, v in result.items()}
    return result.value if hasattr(result, "value") else result.estimate


@pytest.mark.parametrize("name", ["geodesic_sharpness", "adaptive_sharpness", "euclidean_sharpness", "hessian_trace",
                                  "HessianOperator", "GGNOperator", "QuotientHessianOperator", "fisher_rao_norm",
                                  "sam_sharpness", "renyi_sharpness"])
def test_a_float32_batch_is_cast_to_the_float64_model(name):
    """Documented rule: floating inputs are cast to the model's dtype (before: a raw torch error
    "mat1 and mat2 must have the same dtype"); float32 -> float64 is exact, so the result is the
    float64 batch's, bit for bit."""
    fn, kwargs = MEASURES[name]
    data32 = batches(torch.float32)
    data64 = [(x.double(), y) for x, y in data32]
    assert _number(fn(vit(), data32, LOSS, **kwargs)) == _number(fn(vit(), data64, LOSS, **kwargs))


def test_average_case_and_pac_bayes_cast_too():
    data32 = batches(torch.float32)
    data64 = [(x.double(), y) for x, y in data32]
    kw = {"rho": 0.01, "kind": "average", "n_samples": 2, "progress": False}
    assert (measures.geodesic_sharpness(vit(), data32, LOSS, **kw).value
            == measures.geodesic_sharpness(vit(), data64, LOSS, **kw).value)
    kw = {"n_samples": 2, "depth": 2, "progress": False}
    assert curvature.pac_bayes_flatness(vit(), data32, **kw).value == curvature.pac_bayes_flatness(vit(), data64, **kw).value


def test_a_float64_batch_for_a_float32_model_runs_in_float32():
    model, data = vit().float(), batches(torch.float64)
    op = HessianOperator(model, data, LOSS)
    assert op.batches[0][0].dtype == torch.float32 and op.compute_dtype == torch.float32
    assert measures.adaptive_sharpness(model, data, LOSS, rho=0.01, n_iter=2, progress=False).config["dtype"] == "torch.float32"


def test_the_operators_dtype_option_casts_the_batch_itself():
    model = vit().float()
    op = HessianOperator(model, batches(torch.float32), LOSS, dtype=torch.float64)
    assert op.compute_dtype == torch.float64 and op.batches[0][0].dtype == torch.float64


def test_integer_inputs_and_targets_are_not_cast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    tokens = torch.randint(0, 10, (8, 3))
    result = measures.adaptive_sharpness(model, [(tokens, torch.randint(0, 3, (8,)))], LOSS, rho=0.01, n_iter=2,
                                         progress=False)
    assert result.value >= 0
    regression = nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3), torch.randn(8, 1)  # float32 inputs and targets
    op = HessianOperator(regression, [(x, y)], F.mse_loss)
    assert op.batches[0][0].dtype == torch.float64 and op.batches[0][1].dtype == torch.float32
    out = conform_batch({"x": x, "mask": tokens, "labels": y}, torch.float64)
    assert torch.equal(out["x"], x.double()) and out["mask"] is tokens and out["labels"] is y


def test_a_tensor_left_on_another_device_is_named():
    inputs = {"pixels": torch.empty(2, 3, device="meta")}
    with pytest.raises(BatchMismatchError, match=(r"HessianOperator: batch 3: inputs\['pixels'\] is on device meta but "
                                                  r"the model's parameters are on cpu")):
        conform_inputs(inputs, torch.float32, {torch.device("cpu")}, "HessianOperator", 3)
    assert conform_inputs(inputs, torch.float32, {torch.device("meta")})["pixels"].dtype == torch.float32


# ----- item 8: the top level -----------------------------------------------------------------------
def test_main_api_importable_from_the_top_level():
    from quotientsharp import (
        ASAM,
        SAM,
        GeodesicSAM,
        Quotient,
        adaptive_sharpness,
        average_geodesic_sharpness,
        euclidean_sharpness,
        find_symmetries,
        geodesic_sharpness,
        groups,
        hessian_trace,
        renyi_sharpness,
    )
    from quotientsharp.adapters import find_symmetries as direct
    assert all(callable(obj) for obj in (ASAM, GeodesicSAM, Quotient, adaptive_sharpness, average_geodesic_sharpness,
                                         euclidean_sharpness, hessian_trace, renyi_sharpness))
    assert hessian_trace is curvature.hessian_trace and ASAM is quotientsharp.optim.ASAM
    assert find_symmetries is direct and geodesic_sharpness is measures.geodesic_sharpness
    assert groups is quotientsharp.groups and SAM is quotientsharp.optim.SAM
    for name in quotientsharp.__all__:
        assert getattr(quotientsharp, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        quotientsharp.no_such_thing  # noqa: B018


def test_top_level_imports_are_lazy():
    code = ("import sys, quotientsharp; heavy = [m for m in ('quotientsharp.measures', 'quotientsharp.curvature', "
            "'quotientsharp.optim') if m in sys.modules]; print(heavy); quotientsharp.hessian_trace; "
            "print('quotientsharp.curvature' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"


def test_package_docstring_example_runs():
    result = doctest.testmod(quotientsharp, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


def test_average_case_wrappers_are_the_average_kind():
    model, data = vit(), batches()
    kw = {"rho": 0.01, "n_samples": 3, "progress": False}
    for wrapper, measure in [(quotientsharp.average_geodesic_sharpness, measures.geodesic_sharpness),
                             (quotientsharp.average_adaptive_sharpness, measures.adaptive_sharpness),
                             (quotientsharp.average_euclidean_sharpness, measures.euclidean_sharpness)]:
        a, b = wrapper(model, data, LOSS, **kw), measure(model, data, LOSS, kind="average", **kw)
        assert a.config["kind"] == "average" and a.value == b.value

"""Architecture rules (issue 16): one default-quotient resolver, one vocabulary, one JSON policy, no import cycles or private cross-module imports."""
import pytest
import torch

from quotientsharp import Quotient
from quotientsharp.adapters.resolve import default_quotient
from quotientsharp.geodesic import geodesic_order
from quotientsharp.groups import DiagonalRescaling
from quotientsharp.models import TinyViT
from quotientsharp.optim import GeodesicSAM


@pytest.mark.parametrize("name, canonical", [(1, 1), ("first", 1), ("retraction", 1), (2, 2), ("second", 2),
                                             ("second_order", 2), ("exact", "exact"), ("ode", "ode")])
def test_every_spelling_of_an_order_means_the_same_geodesic(name, canonical):
    assert geodesic_order(name) == canonical
    g = DiagonalRescaling("u", "v", "inv")
    gen = torch.Generator().manual_seed(0)
    w = {"u": torch.rand(5, generator=gen, dtype=torch.float64) + 0.5,
         "v": torch.rand(5, generator=gen, dtype=torch.float64) + 0.5}
    xi = g.horizontal_projection(w, {k: 0.3 * torch.randn(5, generator=gen, dtype=torch.float64) for k in w})
    a, b = g.geodesic(w, xi, order=name), g.geodesic(w, xi, order=canonical)
    assert all(torch.equal(a[k], b[k]) for k in w)
    assert Quotient([g], ("u", "v"), order=name).order == canonical


@pytest.mark.parametrize("bad", [3, "third", True, [2], None])
def test_unknown_order_is_refused_listing_the_vocabulary(bad):
    with pytest.raises(ValueError, match="'second_order'"):
        geodesic_order(bad)


def test_resolver_checks_and_unwraps():
    model = TinyViT(image_size=8, patch_size=4, n_classes=3, d_model=8, depth=1, n_heads=2, mlp_dim=8)
    q = default_quotient(model)
    assert [g.metric for g in q.groups] == ["mix"] and q.rest_kind == "adaptive"
    assert default_quotient(model, "inv", "euclidean").rest_kind == "euclidean"
    with pytest.raises(ValueError, match="GeodesicSAM: rest must be one of"):
        default_quotient(model, rest="flat", owner="GeodesicSAM")
    with pytest.raises(ValueError, match="eps_rel must be"):
        default_quotient(model, eps_rel=-1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        default_quotient(lambda p, x: x)


def test_geodesic_sam_rest_spellings_agree():
    model = TinyViT(image_size=8, patch_size=4, n_classes=3, d_model=8, depth=1, n_heads=2, mlp_dim=8)
    a = GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, rest="euclidean", lr=0.1)
    b = GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, rest_metric="euclidean", lr=0.1)
    assert a.quotient.rest_kind == b.quotient.rest_kind == "euclidean"
    with pytest.raises(TypeError, match="not both"):
        GeodesicSAM(model.parameters(), torch.optim.SGD, model=model, rest="euclidean", rest_metric="adaptive", lr=0.1)


def test_one_json_policy_for_every_result_record():
    import json

    from quotientsharp.curvature.results import Estimate
    from quotientsharp.measures.result import SharpnessResult
    est = Estimate(value=float("nan"), stderr=float("inf"), samples=torch.tensor([1.0, float("-inf")]))
    res = SharpnessResult(float("nan"), [float("inf"), 2.0], None, [1.0], None, config={"rho": float("nan")})
    e, r = json.loads(json.dumps(est.to_dict(), allow_nan=False)), json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert e["value"] is None and e["stderr"] is None and e["samples"] == [1.0, None]
    assert r["value"] is None and r["per_batch"] == [None, 2.0] and r["config"]["rho"] is None


def _imports(path):
    import ast
    tree = ast.parse(open(path).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.level, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(0, a.name, []) for a in node.names]
    return out


def test_slq_does_not_import_renyi():
    """renyi consumes SLQ results; slq must not import renyi back (the former cycle)."""
    import importlib
    slq = importlib.import_module("quotientsharp.curvature.slq")
    assert slq.__file__.endswith("slq.py")
    assert not any("renyi" in mod for _, mod, _ in _imports(slq.__file__))



@pytest.mark.parametrize("module", ["slq", "trace", "lanczos"])
def test_estimators_do_not_probe_the_operator(module):
    """Probes and the effective dimension come from the operator's declared interface
    (LinearOperator.sample_probes / effective_dimension), not from getattr/hasattr on it."""
    import ast
    import importlib
    from pathlib import Path
    source = Path(importlib.import_module(f"quotientsharp.curvature.{module}").__file__).read_text()
    tree = ast.parse(source)
    probes = [ast.unparse(node) for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in ("op", "obj", "operator")]
    assert probes == []
    if module == "slq":  # no probing of any kind, and the probes are the operator's
        assert "getattr(" not in source and "hasattr(" not in source
        assert "op.sample_probes(" in source and "op.effective_dimension" in source


def test_one_parameter_layout_behind_every_flatten():
    """tangent, the curvature operators, the quotient Hessian and the manifold flatten through
    quotientsharp.layout.ParameterLayout (no torch.cat/split of their own)."""
    import inspect

    from quotientsharp import tangent
    from quotientsharp.curvature.operators import ModelOperator
    from quotientsharp.curvature.quotient_hessian import QuotientHessianOperator
    from quotientsharp.manifold import QuotientManifold
    helpers = [tangent.flatten, tangent.unflatten, ModelOperator.flatten, ModelOperator.unflatten,
               QuotientHessianOperator.to_flat, QuotientHessianOperator.to_dict,
               QuotientManifold.flatten, QuotientManifold.unflatten]
    for helper in helpers:
        source = inspect.getsource(helper)
        assert "layout" in source.lower() and "torch.cat" not in source and ".split(" not in source, helper.__qualname__


def test_no_module_imports_another_modules_private_names():
    import pathlib

    import quotientsharp
    offenders = []
    for path in pathlib.Path(quotientsharp.__file__).parent.rglob("*.py"):
        for _, mod, names in _imports(path):
            offenders += [f"{path.name}: {mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert offenders == []

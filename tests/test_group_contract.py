"""The ``SymmetryGroup`` contract is declared on the base class, not probed by its consumers."""
import inspect

import pytest
import torch

from quotientsharp import Quotient, SymmetryGroup
from quotientsharp.groups import AttentionGL, DiagonalRescaling, Euclidean, PositiveRescaling

REQUIRED = {"action", "vertical", "algebra_zeros", "inner"}
HOOKS = {"random_element", "with_metric", "masked_count", "relative_perturbation", "kernel_dimension",
         "restrict_to_domain", "check_domain", "horizontal_projection", "egrad_to_rgrad",
         "christoffel", "geodesic", "geodesic_vjp", "whiten", "pushforward", "is_horizontal"}


def test_required_methods_are_abstract():
    assert SymmetryGroup.__abstractmethods__ == frozenset(REQUIRED)


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_subclass_missing_a_required_method_cannot_be_built(missing):
    body = {m: (lambda self, *a, **k: None) for m in REQUIRED - {missing}}
    Incomplete = type("Incomplete", (SymmetryGroup,), body)
    with pytest.raises(TypeError, match=missing):
        Incomplete(["w"])


def test_every_hook_is_declared_with_a_docstring():
    for name in REQUIRED | HOOKS:
        fn = getattr(SymmetryGroup, name)
        assert inspect.getdoc(fn), f"SymmetryGroup.{name} has no docstring"


class _Scale(SymmetryGroup):
    """w -> a w on one parameter with the metric <xi, zeta>/|w|^2: a minimal complete group."""

    def action(self, w, a):
        return {"w": a * w["w"]}

    def vertical(self, w, omega):
        return {"w": omega[0] * w["w"]}

    def algebra_zeros(self, w):
        return torch.zeros(1, dtype=w["w"].dtype)

    def inner(self, w, xi, zeta):
        return (xi["w"] * zeta["w"]).sum() / w["w"].pow(2).sum()


def test_hook_defaults_of_a_minimal_group():
    w = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    g = _Scale(["w"])
    assert g.metric is None and g.with_metric("mix") is g
    assert g.masked_count(w) == 0 and g.relative_perturbation(w, w) is None
    assert g.kernel_dimension(w) == 1            # the orbit direction w itself
    with pytest.raises(NotImplementedError, match="random_element"):
        g.random_element(w)
    xi = {"w": torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)}
    p = g.horizontal_projection(w, xi)["w"]      # generic default: remove the component along w
    assert abs(float(p @ w["w"])) < 1e-12


def test_kernel_dimension_of_built_in_groups():
    w = {"u": torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), "v": torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)}
    assert PositiveRescaling(["u"]).kernel_dimension(w) == 1       # one zero entry masked
    assert Euclidean(["u"]).kernel_dimension(w) == 0
    assert DiagonalRescaling("u", "v").kernel_dimension(w) == 3    # generic default: rank of the basis
    gen = torch.Generator().manual_seed(0)
    from quotientsharp.adapters import attention_blocks
    from quotientsharp.models import MultiHeadSelfAttention
    m = MultiHeadSelfAttention(8, 2).double()
    params = dict(m.named_parameters())
    group = AttentionGL(attention_blocks(m), "inv", eps_rel=0.0)
    closed = group.kernel_dimension(params)
    generic = SymmetryGroup.kernel_dimension(group, params)
    assert closed == generic == 2 * 2 * 4 * 4    # QK and VO, 2 heads, h = 4, full rank
    del gen


def test_quotient_with_metric_asks_every_group():
    names = ("u", "v", "b")
    q = Quotient([DiagonalRescaling("u", "v", "inv")], names).with_metric("mix")
    assert q.groups[0].metric == "mix" and isinstance(q.rest, PositiveRescaling)


def test_diagonal_metric_is_a_subclass_not_a_branch():
    from quotientsharp.groups import DiagonalRescalingInv, DiagonalRescalingMix
    assert type(DiagonalRescaling("u", "v", "inv")) is DiagonalRescalingInv
    assert type(DiagonalRescaling("u", "v", "mix")) is DiagonalRescalingMix
    assert type(DiagonalRescaling("u", "v", "inv").with_metric("mix")) is DiagonalRescalingMix
    with pytest.raises(ValueError, match="metric"):
        DiagonalRescaling("u", "v", "euclid")
    with pytest.raises(ValueError, match="has metric 'inv'"):
        DiagonalRescalingInv("u", "v", "mix")

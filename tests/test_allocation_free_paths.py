"""The allocation-light paths of the adaptive geometry and the ascent (issue 17) against plain
dense formulas: chunked reductions, the zero mask of the adaptive metric on tensors larger than a
chunk, and the in-place iterate updates of the solver."""
import pytest
import torch

from quotientsharp import tangent as T
from quotientsharp.groups.elementwise import Euclidean, PositiveRescaling
from quotientsharp.measures.feasible import HorizontalBall
from quotientsharp.quotient import Quotient


def _big(generator, zeros_at=()):
    w = torch.randn(3 * T.CHUNK + 7, generator=generator, dtype=torch.float64)
    w[list(zeros_at)] = 0.0
    return w


def test_chunked_sum_matches_the_dense_sum_with_masked_chunks():
    g = torch.Generator().manual_seed(0)
    a, b = _big(g), _big(g)
    dense = (a * b).sum()
    assert torch.allclose(T.chunked_sum(lambda x, y: x * y, a, b), dense, rtol=1e-13, atol=0)
    # a masked chunk uses its own function: here it doubles chunk 1 only
    expected = dense + (a[T.CHUNK:2 * T.CHUNK] * b[T.CHUNK:2 * T.CHUNK]).sum()
    got = T.chunked_sum(lambda x, y: x * y, a, b, masked_fn=lambda x, y: 2 * x * y, masked_chunks={1})
    assert torch.allclose(got, expected, rtol=1e-13, atol=0)
    # non-contiguous input is one chunk
    m = torch.randn(8, 6, generator=g, dtype=torch.float64).T
    assert torch.allclose(T.dot({"m": m}, {"m": m}), (m * m).sum(), rtol=1e-14, atol=0)


def test_chunked_sum_is_accurate_in_float32():
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(5 * T.CHUNK, generator=g) * 1e-3 + 1e-4)
    exact = (a.double() ** 2).sum()
    assert abs(float(T.dot({"a": a}, {"a": a})) - float(exact)) <= 1e-6 * float(exact)


def test_adaptive_metric_masks_zero_weights_in_a_large_tensor():
    g = torch.Generator().manual_seed(2)
    zeros = (5, T.CHUNK + 3, 3 * T.CHUNK + 6)
    w = {"e": _big(g, zeros), "b": torch.zeros(4, dtype=torch.float64)}
    xi = {"e": _big(g), "b": torch.randn(4, generator=g, dtype=torch.float64)}
    zeta = {"e": _big(g), "b": torch.randn(4, generator=g, dtype=torch.float64)}
    group = PositiveRescaling(["e", "b"])
    mask = w["e"] != 0
    dense = (xi["e"] * zeta["e"] * torch.where(mask, 1 / w["e"] ** 2, 0.0)).sum()
    assert torch.allclose(group.inner(w, xi, zeta), dense, rtol=1e-12, atol=0)  # "b" is all masked
    p = group.horizontal_projection(w, xi)
    assert torch.equal(p["e"], torch.where(mask, xi["e"], 0.0)) and not p["b"].any()
    assert xi["e"][5] != 0  # the input is left as it was
    again = group.horizontal_projection(w, p)
    assert again["e"] is p["e"]  # already horizontal: no copy
    egrad = {"e": _big(g), "b": torch.full((4,), float("inf"), dtype=torch.float64)}
    egrad["e"][5] = float("inf")  # inf * 0 would be nan without the mask
    r = group.riemannian_gradient(w, egrad)
    assert torch.equal(r["e"], torch.where(mask, egrad["e"] * w["e"] * w["e"], 0.0)) and not r["b"].any()


@pytest.mark.parametrize("rest", [PositiveRescaling, Euclidean])
def test_ascent_direction_never_rescales_the_gradient_in_place(rest):
    g = torch.Generator().manual_seed(3)
    w = {"a": torch.randn(5, generator=g, dtype=torch.float64) + 3}
    quotient = Quotient([], ["a"], rest="adaptive" if rest is PositiveRescaling else "euclidean")
    ball = HorizontalBall(quotient, w, 0.1)
    egrad = {"a": torch.randn(5, generator=g, dtype=torch.float64)}
    before = egrad["a"].clone()
    d = ball.ascent_direction(egrad, g)
    assert torch.equal(egrad["a"], before)
    assert torch.allclose(quotient.norm(w, d), torch.tensor(1.0, dtype=torch.float64), atol=1e-14)


def test_in_place_combinations_match_out_of_place():
    g = torch.Generator().manual_seed(4)
    z, xi, prev = ({"a": torch.randn(7, generator=g, dtype=torch.float64)} for _ in range(3))
    expected = T.lincomb((1.0, xi), (0.75, T.sub(z, xi)), (0.25, T.sub(xi, prev)))
    got = T.lincomb_(0.75, {"a": z["a"].clone()}, (0.5, xi), (-0.25, prev))
    assert torch.allclose(got["a"], expected["a"], rtol=1e-14, atol=1e-15)


def test_adaptive_projection_with_zeros_runs_under_vmap():
    """No data-dependent branch under torch.func (the quotient Hessian vmaps its geometry)."""
    group = PositiveRescaling(["a"])
    w = {"a": torch.tensor([[1.0, 0.0], [2.0, -3.0]], dtype=torch.float64)}
    X = torch.randn(5, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = torch.func.vmap(lambda x: group.horizontal_projection(w, {"a": x})["a"])(X)
    assert torch.equal(out, torch.where(w["a"] != 0, X, 0.0))

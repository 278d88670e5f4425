"""ParameterLayout: the one dict <-> flat conversion (issue 16 item 3)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quotientsharp import tangent as T
from quotientsharp.layout import ParameterLayout


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Mixed shapes (scalar, vector, matrix, 3-d, empty) and floating dtypes, values that are not
    exactly representable in a narrower dtype (so a lossy round trip would show)."""
    g = torch.Generator().manual_seed(0)
    return {
        "scale": torch.randn((), generator=g, dtype=torch.float64),
        "bias": torch.randn(5, generator=g, dtype=torch.float32),
        "weight": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "conv": torch.randn(2, 3, 2, generator=g).to(torch.bfloat16),
        "half": torch.randn(7, generator=g).to(torch.float16),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }


def test_round_trip_is_bit_exact_over_mixed_shapes_and_dtypes():
    d = mixed_tensors()
    layout = ParameterLayout.from_tensors(d)
    assert layout.numel == 1 + 5 + 12 + 12 + 7 + 0
    assert layout.offsets == (0, 1, 6, 18, 30, 37, 37)
    assert layout.dtype == torch.float64
    flat = layout.flatten(d)
    assert flat.shape == (layout.numel,) and flat.dtype == torch.float64
    back = layout.unflatten(flat)
    assert list(back) == list(d)
    for n, t in d.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape
        assert torch.equal(back[n], t), n
        assert torch.equal(flat[layout.slice(n)], t.reshape(-1).to(torch.float64)), n
    # flatten of the round trip gives the same bits again
    assert torch.equal(layout.flatten(back), flat)


def test_unflatten_without_cast_returns_views_and_casts_on_request():
    d = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(2.0)}
    layout = ParameterLayout.from_tensors(d)
    flat = layout.flatten(d)
    views = layout.unflatten(flat)
    views["a"][0, 0] = 42.0
    assert flat[0] == 42.0  # a view, no copy
    as64 = layout.unflatten(flat, torch.float64)
    assert all(t.dtype == torch.float64 for t in as64.values())
    assert torch.equal(layout.flatten(as64, torch.float32), flat)


def test_columns_round_trip_and_match_column_by_column_flatten():
    d = mixed_tensors()
    layout = ParameterLayout.from_tensors({n: t.double() for n, t in d.items()})
    V = torch.randn(layout.numel, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    columns = layout.unflatten_columns(V)
    assert {n: tuple(t.shape) for n, t in columns.items()} == {n: (4, *t.shape) for n, t in d.items()}
    for j in range(4):
        assert torch.equal(layout.flatten({n: c[j] for n, c in columns.items()}), V[:, j])
    assert torch.equal(layout.flatten_columns(columns), V)
    assert torch.equal(layout.flatten_columns(list(columns.values())), V)


def test_wrong_shapes_raise_naming_the_parameter():
    d = mixed_tensors()
    layout = ParameterLayout.from_tensors(d)
    bad = dict(d, weight=torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"'weight' has shape \(4, 3\), the layout expects \(3, 4\)"):
        layout.flatten(bad)
    # same number of entries, different shape: still refused
    with pytest.raises(ValueError, match="'weight'"):
        layout.flatten(dict(d, weight=torch.zeros(12, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"missing parameter\(s\) \['half'\]"):
        layout.flatten({n: t for n, t in d.items() if n != "half"})
    with pytest.raises(ValueError, match="got 2 tensors"):
        layout.flatten(list(d.values())[:2])
    with pytest.raises(ValueError, match=rf"shape \({layout.numel},\), got \({layout.numel + 1},\)"):
        layout.unflatten(torch.zeros(layout.numel + 1))
    cols = layout.unflatten_columns(torch.zeros(layout.numel, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="'bias' has 3 columns, 'scale' has 2"):
        layout.flatten_columns(dict(cols, bias=torch.zeros(3, 5)))
    with pytest.raises(KeyError, match="'nope'"):
        layout.slice("nope")
    with pytest.raises(ValueError, match="duplicate"):
        ParameterLayout(("a", "a"), ((1,), (2,)), (torch.float32, torch.float32))


def test_from_model_subset_by_dtype_and_zeros():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    model[1].bias.requires_grad_(False)
    layout = ParameterLayout.from_model(model)
    assert layout.names == ("0.weight", "0.bias", "1.weight")
    assert layout.shapes == (torch.Size([2, 3]), torch.Size([2]), torch.Size([2]))
    flat = layout.flatten(dict(model.named_parameters()))  # extra keys (1.bias) are ignored
    assert torch.equal(flat, torch.cat([model[0].weight.reshape(-1), model[0].bias, model[1].weight]).detach())
    sub = layout.subset(["1.weight", "0.bias"])
    assert sub.names == ("1.weight", "0.bias") and sub.offsets == (0, 2, 4)
    mixed = ParameterLayout.from_tensors({"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.float64),
                                          "c": torch.zeros(1)})
    groups = mixed.by_dtype()
    assert {d: g.names for d, g in groups.items()} == {torch.float32: ("a", "c"), torch.float64: ("b",)}
    assert mixed.zeros().shape == (6,) and mixed.zeros().dtype == torch.float64
    assert {n: t.dtype for n, t in mixed.zeros_dict().items()} == dict(zip("abc", mixed.dtypes))


def test_tangent_wrappers_use_the_layout():
    d = {"x": torch.arange(4.0).reshape(2, 2), "y": torch.arange(3.0)}
    flat = T.flatten(d, ["y", "x"])
    assert torch.equal(flat, torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0]))
    back = T.unflatten(flat.double(), {"y": d["y"], "x": d["x"]})
    assert back["x"].dtype == torch.float64 and torch.equal(back["x"], d["x"].double())
    with pytest.raises(ValueError, match=r"shape \(7,\), got \(6,\)"):
        T.unflatten(flat[:6], {"y": d["y"], "x": d["x"]})

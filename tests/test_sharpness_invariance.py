"""Invariance of the measures under the symmetries they quotient (spec part 1 §8 items 11, 15)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_sharpness_common import attention_quotient, attention_setup, one_thread  # noqa: F401

from quotientsharp import PositiveRescaling, Quotient
from quotientsharp.measures import adaptive_sharpness, euclidean_sharpness, geodesic_sharpness
from quotientsharp.models import MLP

pytestmark = pytest.mark.usefixtures("one_thread")
RHO = 0.05


def _transformed(model, quotient, generator, **kw):
    w = {n: p.detach() for n, p in model.named_parameters()}
    w2 = quotient.action(w, quotient.random_element(w, generator=generator, **kw))
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            p.copy_(w2[n])
    return out


@pytest.mark.parametrize("metric", ["mix", "inv"])
def test_geodesic_sharpness_invariant_under_gl_actions(metric):
    model, batches = attention_setup(seed=3, n_batches=1)
    q = attention_quotient(model, metric, eps_rel=0.0)
    moved = _transformed(model, q, torch.Generator().manual_seed(7), max_cond=1e3)
    x = batches[0][0]
    assert torch.allclose(model(x), moved(x), rtol=0, atol=1e-10)  # function preserved
    kw = dict(rho=RHO, progress=False)
    s0 = geodesic_sharpness(model, batches, F.cross_entropy, quotient=q, **kw).value
    s1 = geodesic_sharpness(moved, batches, F.cross_entropy, quotient=attention_quotient(moved, metric), **kw).value
    assert s0 > 0
    assert abs(s1 - s0) <= 1e-6 * s0
    e0 = euclidean_sharpness(model, batches, F.cross_entropy, **kw).value
    e1 = euclidean_sharpness(moved, batches, F.cross_entropy, **kw).value
    assert abs(e1 - e0) > 0.1 * e0  # negative control


def test_adaptive_sharpness_invariant_under_neuron_rescaling():
    torch.manual_seed(0)
    model = MLP([4, 6, 3]).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))]
    a = torch.exp(2 * torch.rand(6, generator=g, dtype=torch.float64) - 1) * 10.0 ** torch.randint(-1, 2, (6,), generator=g).double()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[0].weight.mul_(a[:, None])
        moved[0].bias.mul_(a)
        moved[2].weight.div_(a[None, :])
    x = batches[0][0]
    assert torch.allclose(model(x), moved(x), rtol=1e-12, atol=1e-12)
    kw = dict(rho=RHO, progress=False)
    s0 = adaptive_sharpness(model, batches, F.cross_entropy, **kw).value
    s1 = adaptive_sharpness(moved, batches, F.cross_entropy, **kw).value
    assert s0 > 0 and abs(s1 - s0) <= 1e-8 * s0
    e0 = euclidean_sharpness(model, batches, F.cross_entropy, **kw).value
    e1 = euclidean_sharpness(moved, batches, F.cross_entropy, **kw).value
    assert abs(e1 - e0) > 0.1 * e0


@pytest.mark.parametrize("kind", ["worst", "average"])
def test_adaptive_equals_first_order_positive_rescaling_geodesic_bit_for_bit(kind):
    model, batches = attention_setup(seed=5, n_batches=2)
    names = [n for n, _ in model.named_parameters()]
    q = Quotient([PositiveRescaling(names)], names, rest="euclidean", order=1)
    kw = dict(rho=RHO, kind=kind, n_samples=4, progress=False)
    a = adaptive_sharpness(model, batches, F.cross_entropy, **kw)
    g = geodesic_sharpness(model, batches, F.cross_entropy, quotient=q, geodesic="first", **kw)
    assert a.per_batch == g.per_batch  # exact float equality
    assert a.value == g.value

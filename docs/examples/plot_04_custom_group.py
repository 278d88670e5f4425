"""
Adding a symmetry group of your own
===================================

A new group writes four methods of :class:`~quotientsharp.groups.SymmetryGroup`: the action, the
vertical vector of a Lie-algebra element, the Lie algebra's shape (a zero element) and an
invariant metric. Horizontal projection, Riemannian gradient, Christoffel term, exact (RK4)
geodesic, whitening and the ``check_*`` diagnostics come from exact generic defaults (dense
linear algebra and autodiff: fine for small groups, override them with closed forms for speed).

The example: the whole-layer rescaling of a bias-free ReLU net ``W2 relu(W1 x)``,
``(W1, W2) → (a W1, W2 / a)`` with ``a > 0``, which leaves the function unchanged because ReLU
is positively homogeneous.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from quotientsharp import Quotient, SymmetryGroup, euclidean_sharpness, geodesic_sharpness


class LayerRescaling(SymmetryGroup):
    """(W1, W2) -> (a W1, W2 / a), a > 0, with the invariant metric
    <η, ζ> = <η1, ζ1>/|W1|² + <η2, ζ2>/|W2|²."""

    def __init__(self, first, second):
        super().__init__((first, second))
        self.first, self.second = first, second

    def action(self, w, a):
        return {self.first: a * w[self.first], self.second: w[self.second] / a}

    def random_element(self, w, scale=1.0, generator=None):      # optional: used by the checks
        return torch.exp(scale * torch.randn((), generator=generator, dtype=w[self.first].dtype))

    def algebra_zeros(self, w):
        return torch.zeros(1, dtype=w[self.first].dtype)

    def vertical(self, w, omega):                                   # d/dt action(exp(t omega), w)
        return {self.first: omega[0] * w[self.first], self.second: -omega[0] * w[self.second]}

    def inner(self, w, xi, zeta):
        a, b = self.first, self.second
        return (xi[a] * zeta[a]).sum() / w[a].pow(2).sum() + (xi[b] * zeta[b]).sum() / w[b].pow(2).sum()


torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False)).double()
x, y = torch.randn(128, 4, dtype=torch.float64), torch.randint(0, 3, (128,))
opt = torch.optim.SGD(model.parameters(), lr=0.2)
for _ in range(100):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()

# %%
# The group's own diagnostics check the contract with the generic defaults.
group = LayerRescaling("0.weight", "2.weight")
w = {n: p.detach() for n, p in model.named_parameters()}
gen = torch.Generator().manual_seed(0)
a = group.random_element(w, generator=gen)
xi = {n: torch.randn(w[n].shape, generator=gen, dtype=torch.float64) for n in group.names}
zeta = {n: torch.randn(w[n].shape, generator=gen, dtype=torch.float64) for n in group.names}
fn = lambda params: torch.func.functional_call(model, params, (x,))   # noqa: E731
for check, result in [
        ("function invariance", group.check_function_invariance(fn, w, a)),
        ("projection", group.check_projection(w, xi)),
        ("metric invariance", group.check_metric_invariance(w, a, xi, zeta)),
        ("geodesic order (2nd order vs RK4)", group.check_geodesic_order(w, xi))]:
    print(f"{check:36s} {'ok ' if result[0] else 'FAIL'} {result[1]}")
    assert result[0], result[1]

# %%
# Put the group in a :class:`~quotientsharp.quotient.Quotient` (every other parameter — none
# here — would get the adaptive metric) and every measure uses it. Rescale the layers by
# ``a = 20``: geodesic sharpness does not move, Euclidean sharpness does. (Adaptive sharpness
# would not move either: its metric ``Σ ξ²/w²`` respects every elementwise rescaling, this one
# included — the GL(h) action of attention is where it fails, see the invariance example.)
quotient = Quotient([group], names=list(w))
batches = [(x[:64], y[:64]), (x[64:], y[64:])]
twin = copy.deepcopy(model)
twin.load_state_dict(group.action(w, torch.tensor(20.0, dtype=torch.float64)))
with torch.no_grad():
    assert torch.allclose(twin(x), model(x), rtol=1e-12, atol=1e-12)

geo = [geodesic_sharpness(m, batches, F.cross_entropy, 0.1, quotient=quotient, n_iter=10, progress=False).value
       for m in (model, twin)]
euc = [euclidean_sharpness(m, batches, F.cross_entropy, 0.1, n_iter=10, progress=False).value for m in (model, twin)]
print(f"geodesic sharpness:  {geo[0]:.12g} -> {geo[1]:.12g}")
print(f"Euclidean sharpness: {euc[0]:.6g} -> {euc[1]:.6g}")
assert abs(geo[1] - geo[0]) <= 1e-9 * geo[0]
assert abs(euc[1] - euc[0]) > 0.1 * euc[0]

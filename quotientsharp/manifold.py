"""The quotient as a ``geoopt.Manifold`` over one flat parameter vector, so that geoopt's
Riemannian optimizers run on it.

``proju`` is the horizontal projection, ``egrad2rgrad`` the horizontal Riemannian gradient,
``inner`` the quotient metric, ``retr`` the 2nd-order geodesic, ``expmap`` the exact geodesic and
``transp`` the projection onto the horizontal space at the new point (vector transport by
projection). Points are flat vectors holding ``quotient.names`` in order; use
:meth:`QuotientManifold.flatten` / :meth:`QuotientManifold.unflatten` to move between dicts and vectors.

Example::

    man = QuotientManifold(quotient, params)
    x = geoopt.ManifoldParameter(man.flatten(params), manifold=man)
    opt = geoopt.optim.RiemannianSGD([x], lr=1e-2)
    loss = loss_fn(functional_call(model, man.unflatten(x), inputs), targets)
"""
from __future__ import annotations

from collections.abc import Mapping

import geoopt
import torch

from .layout import ParameterLayout
from .quotient import Quotient


class QuotientManifold(geoopt.Manifold):
    """``quotient`` as a ``geoopt.Manifold`` on the flat vector of the parameters ``like`` (a dict
    ``{name: tensor}`` over ``quotient.names``), for geoopt's Riemannian optimizers.

    ``retr`` follows the geodesic of order ``order_retr`` (default 2: ``x + u - 1/2 Gamma_x(u, u)``),
    ``expmap`` the exact one; ``proju`` is the horizontal projection, ``egrad2rgrad`` the horizontal
    Riemannian gradient and ``transp(x, y, v)`` projects ``v`` at ``y``. Points and tangent vectors
    are ``(n,)`` tensors in ``quotient.names`` order (:meth:`flatten` / :meth:`unflatten`).
    """
    name = "Quotient"
    ndim = 1
    reversible = False

    def __init__(self, quotient: Quotient, like: Mapping[str, torch.Tensor], order_retr: int | str = 2):
        super().__init__()
        self.quotient = quotient
        self.layout = ParameterLayout.from_tensors(like, quotient.names)
        self.order_retr = order_retr

    # ------------------------------------------------------------------ dict <-> vector
    def flatten(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``d`` over ``quotient.names`` → flat vector (see :class:`~quotientsharp.layout.ParameterLayout`)."""
        return self.layout.flatten(d)

    def unflatten(self, x: torch.Tensor) -> dict:
        """Flat ``x`` → dict over ``quotient.names``: views of ``x``, in its dtype."""
        return self.layout.unflatten(x, dtype=x.dtype)

    # ------------------------------------------------------------------ geoopt API
    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        ok = bool(torch.isfinite(x).all())
        return ok, None if ok else "non-finite point"

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        leak = float(self.quotient.is_horizontal(self.unflatten(x), self.unflatten(u)))
        return leak <= atol, None if leak <= atol else f"vertical component {leak:.2e}"

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.quotient.horizontal_projection(self.unflatten(x), self.unflatten(u)))

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.quotient.riemannian_gradient(self.unflatten(x), self.unflatten(u)))

    def inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None, *, keepdim=False):
        v = u if v is None else v
        val = self.quotient.inner(self.unflatten(x), self.unflatten(u), self.unflatten(v))
        return val.reshape(1) if keepdim else val

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim=False):
        return self.inner(x, u, keepdim=keepdim).clamp_min(0).sqrt()

    def component_inner(self, x, u, v=None):
        raise TypeError("the quotient metric does not factor over components")

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.quotient.geodesic(self.unflatten(x), self.unflatten(u), order=self.order_retr))

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.quotient.geodesic(self.unflatten(x), self.unflatten(u), order="exact",
                                                   rest_order="exact"))

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.proju(y, v)

    def retr_transp(self, x, u, v):
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def expmap_transp(self, x, u, v):
        y = self.expmap(x, u)
        return y, self.transp(x, y, v)

    def logmap(self, x, y):
        raise TypeError("QuotientManifold has no logarithm map")

    def dist(self, x, y, *, keepdim=False):
        raise TypeError("QuotientManifold has no closed-form distance")

    def random(self, *size, dtype=None, device=None, **kwargs):
        raise TypeError("QuotientManifold has no random point; start from a model's weights")

    def origin(self, *size, dtype=None, device=None, seed=42):
        raise TypeError("QuotientManifold has no origin; start from a model's weights")

    def extra_repr(self) -> str:
        return repr(self.quotient)

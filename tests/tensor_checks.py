"""Small helpers shared by the tests written against mutation survivors: seeded float64 draws,
closeness of tensors or of tangent dicts, and one classical RK4 step typed in by hand."""
from __future__ import annotations

from collections.abc import Callable

import torch

from quotientsharp import tangent as T

DT = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, dtype: torch.dtype = DT) -> torch.Tensor:
    """``N(0, 1)`` of ``shape`` from :func:`gen` ``(seed)``."""
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def assert_close_tree(a, b, rtol: float, atol: float, ordered: bool = False) -> None:
    """``torch.testing.assert_close`` on two tensors, or per name on two dicts with the same names
    (in the same order too when ``ordered``)."""
    if isinstance(a, dict):
        if ordered:
            assert list(a) == list(b), (list(a), list(b))
        else:
            assert set(a) == set(b)
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol)
    else:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def rk4_step(gam: Callable[[dict, dict], dict], w: dict, v: dict, t: float) -> dict:
    """One classical RK4 step of ``(w, v)' = (v, -Gamma_w(v, v))`` over ``[0, t]``, typed in."""
    def f(p, u):
        return u, T.scale(gam(p, u), -1.0)

    def ax(p, d, c):
        return {n: p[n] + c * d[n] for n in p}
    k1 = f(w, v)
    k2 = f(ax(w, k1[0], t / 2), ax(v, k1[1], t / 2))
    k3 = f(ax(w, k2[0], t / 2), ax(v, k2[1], t / 2))
    k4 = f(ax(w, k3[0], t), ax(v, k3[1], t))
    return {n: w[n] + t / 6 * (k1[0][n] + 2 * k2[0][n] + 2 * k3[0][n] + k4[0][n]) for n in w}


class DeviceProbe(StopIteration):
    """Raised by :func:`meta_operator` at its first product."""


def meta_operator(n: int):
    """An ``(n, n)`` operator on the ``meta`` device (a stand-in for a GPU) whose first ``matvec``
    or ``matmat`` records the device of its argument in ``seen`` and raises :class:`DeviceProbe`:
    whether a routine sends its vectors to ``op.device`` shows on a CPU-only machine."""
    from quotientsharp.curvature import FunctionOperator

    seen: list[torch.device] = []

    def product(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.device)
        raise DeviceProbe

    return FunctionOperator(n, product, product, device="meta"), seen

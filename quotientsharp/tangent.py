"""Tangent vectors as dicts ``{parameter name: tensor}`` and the few operations on them.

Points (parameter dicts) and tangent vectors share this representation; every tensor of a
tangent vector has the shape, dtype and device of the parameter it perturbs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from quotientsharp.layout import ParameterLayout

Tangent = dict[str, torch.Tensor]


def check_tangent(
    params: Mapping[str, torch.Tensor],
    xi: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
    what: str = "tangent vector",
) -> None:
    """Raise ``ValueError`` unless ``xi`` has exactly ``names`` (default: those of ``params``)
    with matching shapes, dtypes and devices."""
    names = list(params) if names is None else list(names)
    missing = [n for n in names if n not in xi]
    extra = [n for n in xi if n not in set(names)]
    if missing:
        raise ValueError(f"{what} is missing parameter(s) {missing}")
    if extra:
        raise ValueError(f"{what} has parameter(s) {extra} that this geometry does not act on")
    for n in names:
        p, t = params[n], xi[n]
        if t.shape != p.shape:
            raise ValueError(f"{what}[{n!r}] has shape {tuple(t.shape)}, parameter has {tuple(p.shape)}")
        if t.dtype != p.dtype:
            raise ValueError(f"{what}[{n!r}] has dtype {t.dtype}, parameter has {p.dtype}")
        if t.device != p.device:
            raise ValueError(f"{what}[{n!r}] is on {t.device}, parameter is on {p.device}")


def check_consistent(params: Mapping[str, torch.Tensor]) -> None:
    """Raise if the tensors of a point live on different devices or have different dtypes."""
    kinds = {(t.device, t.dtype) for t in params.values()}
    if len(kinds) > 1:
        detail = ", ".join(f"{n}: {t.dtype} on {t.device}" for n, t in params.items())
        raise ValueError(f"parameters mix devices or dtypes ({detail})")


def zeros_like(xi: Mapping[str, torch.Tensor]) -> Tangent:
    """The zero tangent vector: ``{n: zeros_like(xi[n])}``."""
    return {n: torch.zeros_like(t) for n, t in xi.items()}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float = 1.0) -> Tangent:
    """``a + alpha * b`` over the names of ``a`` (one fused pass per tensor)."""
    return {n: torch.add(a[n], b[n], alpha=alpha) for n in a}


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Tangent:
    """``a - b`` entry by entry over the names of ``a`` (``b`` must hold them all)."""
    return {n: a[n] - b[n] for n in a}


def scale(a: Mapping[str, torch.Tensor], c) -> Tangent:
    """``c * a``; ``c`` may be a Python number or a 0-d tensor."""
    return {n: c * t for n, t in a.items()}


def lincomb(*terms: tuple[float, Mapping[str, torch.Tensor]]) -> Tangent:
    """``sum_i c_i * a_i`` for ``terms = ((c_1, a_1), (c_2, a_2), ...)``: one new tensor per
    name, accumulated in place (no temporary per term)."""
    (c0, a0), rest = terms[0], terms[1:]
    return lincomb_(1.0, {n: c0 * t for n, t in a0.items()}, *rest)


def lincomb_(c0, a0: dict[str, torch.Tensor], *terms: tuple[float, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``a0 <- c0 * a0 + sum_i c_i * a_i`` in place (``a0``'s tensors are the caller's own
    temporaries); returns ``a0``."""
    for n, t in a0.items():
        if c0 != 1:
            t.mul_(c0)
        for c, a in terms:
            t.add_(a[n], alpha=c)
    return a0


def scale_(a: dict[str, torch.Tensor], c) -> dict[str, torch.Tensor]:
    """``a *= c`` in place (for tensors the caller owns); returns ``a``."""
    for t in a.values():
        t.mul_(c)
    return a


CHUNK = 1 << 20
"""Elements per chunk of :func:`chunked_sum`: its temporaries (4-8 MB) come from the allocator's
heap, while a temporary of a whole embedding matrix (~100 MB) is a fresh ``mmap`` whose page
faults cost ~10x the arithmetic on CPU."""


def chunked_sum(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor,
                masked_fn: Callable[..., torch.Tensor] | None = None, masked_chunks: Iterable[int] = ()) -> torch.Tensor:
    """``fn(*tensors).sum()`` for an elementwise ``fn`` of same-shaped tensors, evaluated on
    chunks of :data:`CHUNK` elements (contiguous tensors) so that no full-size temporary is made;
    each chunk is summed pairwise as ``Tensor.sum`` does (accurate in float32, unlike a BLAS dot).
    Chunks whose index is in ``masked_chunks`` use ``masked_fn`` instead (a small tensor, or a
    non-contiguous one, is one chunk: index 0)."""
    masked_chunks = frozenset(masked_chunks)
    first = tensors[0]
    if first.numel() <= CHUNK or not all(t.is_contiguous() for t in tensors):
        return (masked_fn if masked_chunks else fn)(*tensors).sum()
    flat = [t.view(-1) for t in tensors]
    return sum((masked_fn if i // CHUNK in masked_chunks else fn)(*(f[i : i + CHUNK] for f in flat)).sum()
               for i in range(0, first.numel(), CHUNK))


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * b


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Euclidean (Frobenius) inner product ``sum_n <a_n, b_n>``, a 0-d tensor (no full-size
    temporaries: :func:`chunked_sum`)."""
    return sum(chunked_sum(_product, a[n], b[n]) for n in a)


def restrict(a: Mapping[str, torch.Tensor], names: Iterable[str]) -> Tangent:
    """The entries of ``a`` named in ``names``, in that order (``KeyError`` for a missing name)."""
    return {n: a[n] for n in names}


def flatten(a: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> torch.Tensor:
    """``a`` over ``names`` (default: all keys) as one flat vector; see
    :meth:`~quotientsharp.layout.ParameterLayout.flatten`."""
    return ParameterLayout.from_tensors(a, names).flatten(a)


def unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Tangent:
    """Flat ``vec`` → dict shaped like ``like`` (views of ``vec``, in its dtype); see
    :meth:`~quotientsharp.layout.ParameterLayout.unflatten`."""
    return ParameterLayout.from_tensors(like).unflatten(vec, dtype=vec.dtype)


def randn_like(a: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> Tangent:
    """Standard normal tensors shaped like ``a`` (drawn on CPU with ``generator`` if given, for
    device-independent reproducibility, then moved)."""
    if generator is None:
        return {n: torch.randn_like(t) for n, t in a.items()}
    return {
        n: torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device).to(t.device)
        for n, t in a.items()
    }

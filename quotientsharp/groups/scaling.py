"""``HeadScaling``: one positive scale per head, the QK symmetry left by QK-norm (spec part 6 §4).

With ``q = RMSNorm(x W_q,i + b_q,i)`` per head (likewise for keys) the only continuous symmetry
on QK is ``W_i -> s_i W_i`` (``s_i > 0``) for every query head and every key head independently,
``W_i = [W_q,i; b_q,i^T]`` the ``(d+1) x h`` slice of the head. Each head slice is a
scale-invariant block with the invariant metric

    <eta, zeta>_W = <eta, zeta>_F / ||W||_F^2

(log-polar coordinates: the cylinder ``R x S^{n-1}``). Vertical space ``span{W}``; horizontal:
``xi`` Frobenius-orthogonal to ``W``; ``Gamma(xi, xi) = (|xi|^2 W - 2 <W, xi> xi) / ||W||^2``;
geodesic (exact, closed form) with ``a = <W, xi>/||W||^2``, ``xi_perp = xi - a W``,
``phi = ||xi_perp|| / ||W||``:

    W(t) = e^{a t} (cos(phi t) W + sin(phi t) ||W|| xi_perp / ||xi_perp||),

a great circle at constant norm for horizontal ``xi``. The metric does not depend on the
``inv``/``mix`` choice of the GL blocks (``with_metric`` returns the group itself).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention import Piece, extract_pieces, head_index, insert_pieces, piece_rows
from .base import Params, SymmetryGroup


@dataclass(frozen=True)
class ScaleBlock:
    """``n_heads`` scale-invariant head slices, each the row-stack of ``pieces`` (as in
    :class:`~quotientsharp.groups.attention.GLBlock`'s factors)."""

    pieces: tuple[Piece, ...]
    n_heads: int
    head_dim: int
    label: str = ""
    kind: str = ""


class HeadScaling(SymmetryGroup):
    """Per-head positive rescaling ``W_i -> s_i W_i`` with the metric ``<., .>_F / ||W_i||^2``.

    Group elements and Lie-algebra elements are lists with one ``(B_s,)`` tensor (scales,
    respectively log-scale velocities) per stack of equally-shaped head slices."""

    has_closed_form_geodesic = True

    def __init__(self, blocks: Sequence[ScaleBlock], shares_tensors: bool = False):
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("HeadScaling needs at least one block")
        names: list[str] = []
        for b in blocks:
            for pc in b.pieces:
                if pc.name not in names:
                    names.append(pc.name)
        super().__init__(names)
        self.blocks = blocks
        #: the head slices may cover their tensors only partly (see ``AttentionGL.shares_tensors``)
        self.shares_tensors = shares_tensors
        self.stacks: list[list[int]] | None = None
        self._signature: tuple | None = None

    def __repr__(self) -> str:
        return f"HeadScaling({len(self.blocks)} blocks, {sum(b.n_heads for b in self.blocks)} heads)"

    def block_summaries(self) -> list[tuple[str, str, str]]:
        """``(layer, "QK", description)`` per block (label ``"<layer>/<q|k...>"``)."""
        return [(b.label.rpartition("/")[0] or b.label, "QK", b.kind or f"ℝ₊ × {b.n_heads} heads")
                for b in self.blocks]

    # ------------------------------------------------------------------ layout
    def validate(self, w: Params) -> None:
        super().validate(w)
        signature = self.shape_signature(w)
        if self._signature == signature:
            return
        cover = {n: torch.zeros(w[n].shape, dtype=torch.int32) for n in self.names}
        for b in self.blocks:
            for pc in b.pieces:
                p = w[pc.name]
                axis = 1 if pc.kind == "cols" else 0
                idx = head_index(pc, b.n_heads, b.head_dim).reshape(-1)
                if int(idx.max()) >= p.shape[axis]:
                    raise ValueError(f"{b.label}: parameter {pc.name!r} of shape {tuple(p.shape)} has no room "
                                     f"for {b.n_heads} heads of size {b.head_dim} at offset {pc.offset}")
                sl = [slice(None)] * p.ndim
                sl[axis] = idx
                cover[pc.name][tuple(sl)] += 1
        for n, c in cover.items():
            if int(c.max()) > 1 or (int(c.min()) == 0 and not self.shares_tensors):
                raise ValueError(f"parameter {n!r} must be covered exactly once by the head slices of HeadScaling")
        shapes: dict[tuple, list[int]] = {}  # blocks of equal shapes stack (anew for new shapes)
        for i, b in enumerate(self.blocks):
            shapes.setdefault((sum(piece_rows(w, pc) for pc in b.pieces), b.head_dim), []).append(i)
        self.stacks = list(shapes.values())
        self._signature = signature

    def _layout(self, w: Params) -> None:
        """Validate ``w`` (and stack its blocks) unless its shapes are the ones last validated."""
        if self.stacks is None or self._signature != self.shape_signature(w):
            self.validate(w)

    def extract(self, w: Params) -> list[torch.Tensor]:
        """Head slices per stack, each ``(B_s, n, h)``."""
        self._layout(w)
        return [torch.cat([extract_pieces(w, self.blocks[i].pieces, self.blocks[i].n_heads,
                                          self.blocks[i].head_dim) for i in s], 0) for s in self.stacks]

    def insert(self, base: Params, slices: Sequence[torch.Tensor]) -> dict:
        """Inverse of :meth:`extract` (bit-exact)."""
        self._layout(base)
        out = {n: base[n] for n in self.names}
        for s, X in zip(self.stacks, slices):
            start = 0
            for i in s:
                b = self.blocks[i]
                insert_pieces(out, b.pieces, X[start:start + b.n_heads], b.n_heads, b.head_dim)
                start += b.n_heads
        return out

    def _zeros(self, like: Params) -> dict:
        return {n: torch.zeros_like(like[n]) for n in self.names}

    def _per_stack(self, w: Params, vecs: Sequence[Params], fn, base: Params | None = None) -> dict:
        Ws = self.extract(w)
        vs = [self.extract(v) for v in vecs]
        res = [fn(W.double(), W.double().pow(2).sum((-1, -2))[:, None, None], *[v[s].double() for v in vs])
               for s, W in enumerate(Ws)]
        like = vecs[0] if vecs else w
        res = [r.to(like[self.names[0]].dtype) for r in res]
        return self.insert(self._zeros(like) if base is None else base, res)

    # ------------------------------------------------------------------ group
    def action(self, w: Params, g) -> dict:
        return self.insert(w, [W * s.to(W.dtype)[:, None, None] for W, s in zip(self.extract(w), g)])

    def pushforward(self, w: Params, g, xi: Params) -> dict:
        return self.insert(self._zeros(xi), [x * s.to(x.dtype)[:, None, None] for x, s in zip(self.extract(xi), g)])

    def random_element(self, w: Params, scale: float = 1.0, generator: torch.Generator | None = None,
                       max_cond: float | None = None) -> list[torch.Tensor]:
        """Scales ``scale * exp(u)``, ``u`` uniform in ``[-log(c)/2, log(c)/2]`` (``c = max_cond``,
        default ``e^2``), so the ratio of two scales stays below ``c``."""
        logc = math.log(max_cond) if max_cond is not None else 2.0
        dev = generator.device if generator is not None else "cpu"
        out = []
        for W in self.extract(w):
            u = torch.rand(W.shape[0], generator=generator, dtype=torch.float64, device=dev)
            out.append((scale * torch.exp(logc * (u - 0.5))).to(device=W.device, dtype=W.dtype))
        return out

    def algebra_zeros(self, w: Params) -> list[torch.Tensor]:
        return [torch.zeros(W.shape[0], dtype=W.dtype, device=W.device) for W in self.extract(w)]

    def vertical(self, w: Params, omega) -> dict:
        return self.insert(self._zeros(w), [W * om.to(W.dtype)[:, None, None] for W, om in zip(self.extract(w), omega)])

    # ------------------------------------------------------------------ geometry
    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        dt = next(iter(xi.values())).dtype
        total = torch.zeros((), dtype=torch.float64)
        for W, x, z in zip(self.extract(w), self.extract(xi), self.extract(zeta)):
            n2 = W.double().pow(2).sum((-1, -2))
            total = total + ((x.double() * z.double()).sum((-1, -2)) / n2).sum().to(total.device)
        return total.to(dt)

    def horizontal_projection(self, w: Params, xi: Params) -> dict:
        """``xi - (<xi, W>/||W||^2) W`` per head."""
        return self._per_stack(w, [xi], lambda W, n2, x: x - ((x * W).sum((-1, -2), keepdim=True) / n2) * W)

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        """``||W||^2 grad`` per head."""
        return self._per_stack(w, [egrad], lambda W, n2, d: n2 * d)

    def christoffel(self, w: Params, xi: Params) -> dict:
        """``(|xi|^2 W - 2 <W, xi> xi) / ||W||^2`` per head."""
        def gam(W, n2, x):
            return (x.pow(2).sum((-1, -2), keepdim=True) * W - 2 * (W * x).sum((-1, -2), keepdim=True) * x) / n2
        return self._per_stack(w, [xi], gam)

    def whiten(self, w: Params, zeta: Params) -> dict:
        """``||W|| zeta`` per head (covariance ``g^{-1} = ||W||^2 I``)."""
        return self._per_stack(w, [zeta], lambda W, n2, z: n2.sqrt() * z)

    def geodesic_exact(self, w: Params, xi: Params, t: float = 1.0, **ode_kw) -> dict:
        """The closed-form geodesic of the module docstring (any ``xi``, not only horizontal)."""
        def geo(W, n2, x):
            a = (W * x).sum((-1, -2), keepdim=True) / n2
            perp = x - a * W
            phi = perp.pow(2).sum((-1, -2), keepdim=True).sqrt() / n2.sqrt()
            # sin(phi t) ||W|| perp / ||perp|| = perp * sin(phi t) / phi = perp * t sinc(phi t / pi)
            return torch.exp(a * t) * (torch.cos(phi * t) * W + perp * (t * torch.sinc(phi * t / math.pi)))
        return self._per_stack(w, [xi], geo, base=w)

    def check_domain(self, w: Params) -> None:
        for s, W in enumerate(self.extract(w)):
            n = W.double().pow(2).sum((-1, -2))
            if bool((n == 0).any()):
                i = int((n == 0).nonzero()[0, 0])
                raise ValueError(f"HeadScaling: head slice {i} of stack {s} is zero; its scale orbit is degenerate")

    def kernel_dimension(self, w: Params) -> int:
        """One direction per nonzero head slice."""
        return sum(int((W.double().pow(2).sum((-1, -2)) > 0).sum()) for W in self.extract(w))

    def relative_perturbation(self, w: Params, xi: Params) -> torch.Tensor:
        """``max_heads ||xi_i||_F / ||W_i||_F``."""
        worst = torch.zeros((), dtype=torch.float64)
        for W, x in zip(self.extract(w), self.extract(xi)):
            r = x.double().norm(dim=(-1, -2)) / W.double().norm(dim=(-1, -2)).clamp_min(1e-300)
            worst = torch.maximum(worst, r.max().cpu())
        return worst

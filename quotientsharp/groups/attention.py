"""``AttentionGL``: the per-head GL(h) symmetries of attention (spec part 1 §3, §4.1).

Every head gives two blocks, QK with ``G = [W_q; b_q^T]``, ``H = [W_k; b_k^T]`` and VO with
``G = [W_v; b_v^T]``, ``H = W_o^T`` (row-vector convention, biases appended as a last row). A
block is described by :class:`GLBlock`: which slices of which named parameters form G and H.
All blocks of equal shape are stacked into one ``(B, n, h)`` batch, so every operation is a few
batched matmuls over all heads of all layers.

The same class serves any ``(G, H) -> (G A^{-1}, H A^T)`` symmetry (two-layer linear nets, LoRA)
through hand-written :class:`GLBlock` descriptions.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..geodesic import GLBlockODE, differentiable_endpoint, geodesic_order, geodesic_trajectory, is_transformed
from . import gl_math as M
from .base import Params, SymmetryGroup
from .gl_math import SingularHeadError  # noqa: F401  (re-exported: raised by AttentionGL)
from .residual import SubAlgebra, subalgebra_factors, subalgebra_project


@dataclass(frozen=True)
class Piece:
    """A slice of a named parameter that contributes rows to a block factor, per head.

    ``kind`` (head ``i`` occupies indices ``offset + [i*h, (i+1)*h)``):
      * ``"rows"`` -- ``param[idx, :].T``: an ``nn.Linear`` weight ``(out, in)`` giving ``(in, h)``;
      * ``"cols"`` -- ``param[:, idx]``: an input-major weight (GPT-2 Conv1D, or ``W_o`` of
        ``nn.Linear`` as ``H_O``) giving ``(rows, h)``;
      * ``"bias"`` -- ``param[idx][None]``: a bias giving ``(1, h)``.
    """

    name: str
    kind: Literal["rows", "cols", "bias"]
    offset: int = 0
    #: distance between the starts of consecutive heads (default ``h``: contiguous heads); a
    #: grouped-query block stacks the ``r`` query heads of a KV group as ``r`` pieces with
    #: offsets ``j*h`` and stride ``r*h`` (spec part 6 §2)
    stride: int | None = None


@dataclass(frozen=True)
class GLBlock:
    """``n_heads`` GL(``head_dim``) blocks whose G and H stack the given pieces row-wise."""

    G: tuple[Piece, ...]
    H: tuple[Piece, ...]
    n_heads: int
    head_dim: int
    label: str = ""
    #: the residual Lie sub-algebra of ``gl(head_dim)`` acting on the block (spec part 6), e.g.
    #: the rotary commutant; ``None`` is the full ``gl(h)`` with part 1's closed forms
    algebra: SubAlgebra | None = None
    #: human-readable description of the block for :meth:`Quotient.summary` (adapters set it)
    kind: str = ""


def _head_index(pc: Piece, heads: int, h: int, device=None):
    """Indices ``offset + i*stride + [0, h)`` of every head, ``(heads, h)`` (cached)."""
    st = h if pc.stride is None else pc.stride
    return _strided_index(pc.offset, st, heads, h, str(device) if device is not None else "cpu")


@functools.lru_cache(maxsize=1024)
def _strided_index(offset: int, stride: int, heads: int, h: int, device: str) -> torch.Tensor:
    return (offset + stride * torch.arange(heads, device=device)[:, None]
            + torch.arange(h, device=device)[None, :])


def _span(pc: Piece, heads: int, h: int) -> int:
    """One past the last index a piece touches."""
    st = h if pc.stride is None else pc.stride
    return pc.offset + st * (heads - 1) + h


@functools.lru_cache(maxsize=4096)
def _runs(pieces: tuple[Piece, ...], h: int) -> tuple[tuple, ...]:
    """Group the pieces into runs read with one reshape: ``("run", name, kind, offset, r)`` for
    ``r`` consecutive pieces of one tensor with offsets ``offset + j*h`` and stride ``r*h`` (the
    ``r`` query heads of a KV group; ``r = 1``: contiguous heads), ``("strided", piece)`` else."""
    out, i = [], 0
    while i < len(pieces):
        pc = pieces[i]
        st = h if pc.stride is None else pc.stride
        r = st // h if st % h == 0 else 0
        run = pieces[i:i + r] if r else ()
        if r and len(run) == r and all(
                q.name == pc.name and q.kind == pc.kind and (h if q.stride is None else q.stride) == st
                and q.offset == pc.offset + j * h for j, q in enumerate(run)):
            out.append(("run", pc.name, pc.kind, pc.offset, r))
            i += r
        else:
            out.append(("strided", pc))
            i += 1
    return tuple(out)


def _extract(w: Mapping[str, torch.Tensor], pieces: Sequence[Piece], heads: int, h: int) -> torch.Tensor:
    parts = []
    for item in _runs(tuple(pieces), h):
        if item[0] == "strided":  # heads at a stride: a view by unfold
            pc = item[1]
            p = w[pc.name]
            if pc.kind == "rows":
                parts.append(p[pc.offset:].unfold(0, h, pc.stride)[:heads])
            elif pc.kind == "cols":
                parts.append(p[:, pc.offset:].unfold(1, h, pc.stride)[:, :heads].transpose(0, 1))
            else:
                parts.append(p[pc.offset:].unfold(0, h, pc.stride)[:heads, None, :])
            continue
        _, name, kind, lo, r = item
        p = w[name]
        hi = lo + heads * r * h
        if kind == "rows":
            k = p.shape[1]
            parts.append(p[lo:hi, :].reshape(heads, r, h, k).transpose(2, 3).reshape(heads, r * k, h))
        elif kind == "cols":
            k = p.shape[0]
            parts.append(p[:, lo:hi].reshape(k, heads, r, h).permute(1, 2, 0, 3).reshape(heads, r * k, h))
        else:
            parts.append(p[lo:hi].reshape(heads, r, h))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _piece_views(p: torch.Tensor, item: tuple, heads: int, h: int) -> list[torch.Tensor]:
    """Views ``(heads, rows, h)`` into ``p`` of one item of :func:`_runs` (no copy): the parts
    :func:`_extract` concatenates (a run of ``r`` weight pieces gives ``r`` views)."""
    if item[0] == "strided":
        pc = item[1]
        if pc.kind == "rows":
            return [p[pc.offset:].unfold(0, h, pc.stride)[:heads]]
        if pc.kind == "cols":
            return [p[:, pc.offset:].unfold(1, h, pc.stride)[:, :heads].transpose(0, 1)]
        return [p[pc.offset:].unfold(0, h, pc.stride)[:heads, None, :]]
    _, _, kind, lo, r = item
    hi = lo + heads * r * h
    if kind == "rows":
        q = p[lo:hi].reshape(heads, r, h, p.shape[1])
        return [q[:, j].transpose(1, 2) for j in range(r)]
    if kind == "cols":
        q = p[:, lo:hi].reshape(p.shape[0], heads, r, h)
        return [q[:, :, j].transpose(0, 1) for j in range(r)]
    return [p[lo:hi].reshape(heads, r, h)]


class _LazyStacks:
    """``group.extract(w)``, computed on first use (only sub-algebra projections and the autograd
    path need the stacked copies of the base point)."""

    def __init__(self, group, w):
        self.group, self.w, self.value = group, w, None

    def _get(self) -> list:
        if self.value is None:
            self.value = self.group.extract(self.w)
        return self.value

    def __getitem__(self, i):
        return self._get()[i]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _stamp(d: Mapping[str, torch.Tensor], names: Sequence[str]) -> tuple:
    """Weak references to ``d``'s tensors and their versions (:func:`_same` compares)."""
    return tuple((weakref.ref(d[n]), d[n]._version) for n in names)


def _same(stamp: tuple, d: Mapping[str, torch.Tensor], names: Sequence[str]) -> bool:
    """Whether ``d`` holds the very tensors of ``stamp``, unmodified since."""
    return all(r() is d[n] and d[n]._version == v for (r, v), n in zip(stamp, names))


def _traced(t: torch.Tensor) -> bool:
    """Whether ``t`` requires grad or lives inside a ``torch.func`` transform."""
    return t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t)


def _insert(out: dict, pieces: Sequence[Piece], X: torch.Tensor, heads: int, h: int) -> None:
    """Write block factor ``X`` (heads, n, h) back into the tensors of ``out`` (in place in the
    dict, functionally on the tensors)."""
    row = 0
    for item in _runs(tuple(pieces), h):
        if item[0] == "strided":
            pc = item[1]
            p = out[pc.name]
            idx = _head_index(pc, heads, h, p.device).reshape(-1)
            if pc.kind == "rows":
                k = p.shape[1]
                out[pc.name] = p.index_copy(0, idx, X[:, row:row + k, :].transpose(1, 2).reshape(heads * h, k).to(p.dtype))
            elif pc.kind == "cols":
                k = p.shape[0]
                out[pc.name] = p.index_copy(1, idx, X[:, row:row + k, :].transpose(0, 1).reshape(k, heads * h).to(p.dtype))
            else:
                k = 1
                out[pc.name] = p.index_copy(0, idx, X[:, row, :].reshape(heads * h).to(p.dtype))
            row += k
            continue
        _, name, kind, lo, r = item
        p = out[name]
        hi = lo + heads * r * h
        if kind == "rows":
            k = p.shape[1]
            src = X[:, row:row + r * k, :].reshape(heads, r, k, h).transpose(2, 3).reshape(heads * r * h, k)
            out[name] = torch.slice_scatter(p, src.to(p.dtype), 0, lo, hi)
        elif kind == "cols":
            k = p.shape[0]
            src = X[:, row:row + r * k, :].reshape(heads, r, k, h).permute(2, 0, 1, 3).reshape(k, heads * r * h)
            out[name] = torch.slice_scatter(p, src.to(p.dtype), 1, lo, hi)
        else:
            k = 1
            out[name] = torch.slice_scatter(p, X[:, row:row + r, :].reshape(heads * r * h).to(p.dtype), 0, lo, hi)
        row += r * k


def _piece_rows(w: Mapping[str, torch.Tensor], pc: Piece) -> int:
    p = w[pc.name]
    return p.shape[1] if pc.kind == "rows" else (p.shape[0] if pc.kind == "cols" else 1)


#: public names of the slicing helpers, for other groups over head slices (``HeadScaling``)
extract_pieces, insert_pieces, piece_rows, head_index = _extract, _insert, _piece_rows, _head_index


class AttentionGL(SymmetryGroup):
    """Per-head GL(h) symmetry of (W_Q, W_K) and (W_V, W_O) with the inverse or mixed metric.

    Args:
        blocks: the GL blocks (usually built by :mod:`quotientsharp.adapters`).
        metric: ``"inv"`` (Eq. 9, dimensionless) or ``"mix"`` (Eq. 10).
        eps_rel: relative relaxation, ``eps_P = eps_rel * tr(G^T G)/h`` (likewise for Q); default
            0, no relaxation, so the geometry is exactly invariant. A relaxation ``> 0`` breaks
            invariance by ``O(eps)`` (spec part 1 §4.3).
        eps: absolute relaxation added to both Gram matrices (default 0).

    A singular Gram matrix (a dead head, or one numerically singular in float64 after the
    relaxation) raises :class:`~quotientsharp.groups.gl_math.SingularHeadError` naming the head.

    Group elements and Lie-algebra elements are lists with one ``(B_s, h, h)`` tensor per stack
    of equally-shaped blocks (see ``stacks``, set by :meth:`validate`). A stack of blocks with a residual
    :class:`~quotientsharp.groups.residual.SubAlgebra` (rotary, partial rotary: spec part 6) has
    Lie-algebra elements ``(B_s, dim)`` (coefficients) and a projection onto the complement of
    that smaller vertical space; its metric, Christoffel term and geodesics are unchanged.
    """

    has_closed_form_geodesic = False

    def __init__(self, blocks: Sequence[GLBlock], metric: str = "mix", eps_rel: float = 0.0, eps: float = 0.0,
                 shares_tensors: bool = False):
        if metric not in M.METRICS:
            raise ValueError(f"metric must be one of {M.METRICS}, got {metric!r}")
        if eps_rel < 0 or eps < 0:
            raise ValueError("eps and eps_rel must be >= 0")
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("AttentionGL needs at least one block")
        names = []
        for b in blocks:
            for pc in b.G + b.H:
                if pc.name not in names:
                    names.append(pc.name)
        super().__init__(names)
        self.blocks, self.metric, self.eps_rel, self.eps = blocks, metric, eps_rel, eps
        #: the blocks may cover their tensors only partly (the rest belongs to another part of a
        #: :class:`~quotientsharp.groups.joint.JointGroup`, which checks the coverage)
        self.shares_tensors = shares_tensors
        self.stacks: list[list[int]] | None = None  # block indices per stack, set by validate
        self._sub_cache: tuple | None = None  # (base factors, sub-algebra factors per stack)

    def __repr__(self) -> str:
        heads = sum(b.n_heads for b in self.blocks)
        return f"AttentionGL(metric={self.metric!r}, {len(self.blocks)} blocks, {heads} heads)"

    def block_summaries(self) -> list[tuple[str, str, str]]:
        """``(layer, "QK"|"VO", description)`` per block (label ``"<layer>/<part>"``)."""
        out = []
        for b in self.blocks:
            layer, _, part = b.label.rpartition("/")
            alg = b.algebra.describe() if b.algebra is not None else f"GL({b.head_dim})"
            out.append((layer or b.label, part.upper() or "GL", b.kind or f"{alg} × {b.n_heads} heads"))
        return out

    def with_metric(self, metric: str, **kw) -> AttentionGL:
        """The same blocks under another metric / relaxation."""
        kw = {"eps_rel": self.eps_rel, "eps": self.eps, "shares_tensors": self.shares_tensors, **kw}
        return AttentionGL(self.blocks, metric, **kw)

    # ------------------------------------------------------------------ layout
    def validate(self, w: Params) -> None:
        super().validate(w)
        signature = self.shape_signature(w)
        if getattr(self, "_validated", None) == signature:
            return
        cover = {n: torch.zeros(w[n].shape, dtype=torch.int32) for n in self.names}
        for b in self.blocks:
            span = b.n_heads * b.head_dim
            for pc in b.G + b.H:
                p = w[pc.name]
                if pc.kind in ("rows", "cols") and p.ndim != 2 or pc.kind == "bias" and p.ndim != 1:
                    raise ValueError(f"{b.label}: parameter {pc.name!r} of shape {tuple(p.shape)} "
                                     f"does not fit a {pc.kind!r} slice")
                axis = 1 if pc.kind == "cols" else 0
                if _span(pc, b.n_heads, b.head_dim) > p.shape[axis]:
                    raise ValueError(
                        f"{b.label}: parameter {pc.name!r} of shape {tuple(p.shape)} has no room for "
                        f"{b.n_heads} heads of size {b.head_dim} at offset {pc.offset} along dim {axis}")
                idx = [slice(None)] * p.ndim
                idx[axis] = (_head_index(pc, b.n_heads, b.head_dim).reshape(-1) if pc.stride is not None
                             else slice(pc.offset, pc.offset + span))
                cover[pc.name][tuple(idx)] += 1
            if b.algebra is not None and b.algebra.head_dim != b.head_dim:
                raise ValueError(f"{b.label}: sub-algebra of gl({b.algebra.head_dim}) on blocks of head dim "
                                 f"{b.head_dim}")
            for side in ("G", "H"):
                rows = sum(_piece_rows(w, pc) for pc in getattr(b, side))
                if rows < b.head_dim:
                    raise ValueError(f"{b.label}: factor {side} has {rows} rows < head dim {b.head_dim}; "
                                     "the GL(h) orbit is degenerate")
        for n, c in cover.items():
            if int(c.max()) > 1:
                raise ValueError(f"parameter {n!r} is claimed by more than one GL block")
            if int(c.min()) == 0 and not self.shares_tensors:
                raise ValueError(
                    f"parameter {n!r} is only partly covered by GL blocks; a group must own whole "
                    "tensors (add the missing block, e.g. VO next to QK for a packed in_proj_weight)")
        shapes: dict[tuple, list[int]] = {}  # blocks of equal shapes stack (anew for new shapes)
        for i, b in enumerate(self.blocks):
            key = (sum(_piece_rows(w, pc) for pc in b.G), sum(_piece_rows(w, pc) for pc in b.H), b.head_dim,
                   b.algebra)
            shapes.setdefault(key, []).append(i)
        self.stacks = list(shapes.values())
        self._validated = signature

    def _stacks(self, w: Params) -> list[list[int]]:
        if self.stacks is None or self._validated != self.shape_signature(w):
            self.validate(w)
        return self.stacks

    def extract(self, w: Params) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(G, H), ...]`` per stack, each ``(B_s, n, h)`` / ``(B_s, m, h)``."""
        out = []
        for stack in self._stacks(w):
            Gs = [_extract(w, self.blocks[i].G, self.blocks[i].n_heads, self.blocks[i].head_dim) for i in stack]
            Hs = [_extract(w, self.blocks[i].H, self.blocks[i].n_heads, self.blocks[i].head_dim) for i in stack]
            out.append((torch.cat(Gs, 0), torch.cat(Hs, 0)))
        return out

    def insert(self, base: Params, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Inverse of :meth:`extract`: the dict over ``self.names`` with the blocks written into
        the tensors of ``base`` (bit-exact round trip)."""
        out = {n: base[n] for n in self.names}
        for stack, (G, H) in zip(self._stacks(base), factors):
            start = 0
            for i in stack:
                b = self.blocks[i]
                sl = slice(start, start + b.n_heads)
                _insert(out, b.G, G[sl], b.n_heads, b.head_dim)
                _insert(out, b.H, H[sl], b.n_heads, b.head_dim)
                start += b.n_heads
        return out

    def labels(self, w: Params) -> list[list[str]]:
        """Human-readable label of every batch entry, per stack (``"<block label>/head i"``)."""
        return [[f"{self.blocks[i].label}/head {j}" for i in s for j in range(self.blocks[i].n_heads)]
                for s in self._stacks(w)]

    def _base(self, w: Params) -> tuple[list[M.GLFactors], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Base-point factors and extracted blocks ``[(G, H), ...]``, cached together per ``w``."""
        def build(wr):
            self.validate(wr)
            labels = self.labels(wr)
            if not self._fast(wr):  # differentiable: from the extracted stacks
                blocks = self.extract(wr)
                return [M.gl_factors(G, H, self.metric, self.eps_rel, self.eps, lab)
                        for (G, H), lab in zip(blocks, labels)], blocks
            fs = []
            for s, lab in enumerate(labels):  # float64 Gram matrices from views, no copy of w
                grams = []
                for X in self._views(wr, s, cache=True):
                    grams.append(M.views_gram(X, X, torch.float64))
                    X.cache.pin(X, grams[-1])
                fs.append(M.gl_factors_from_grams(*grams, self.metric, self.eps_rel, self.eps, lab))
            return fs, _LazyStacks(self, wr)
        return self._cached(w, build)

    def _factors(self, w: Params) -> list[M.GLFactors]:
        return self._base(w)[0]

    def stack_algebras(self, w: Params) -> list[SubAlgebra | None]:
        """The residual sub-algebra of every stack (``None``: full ``gl(h)``)."""
        return [self.blocks[s[0]].algebra for s in self._stacks(w)]

    def _projection_factors(self, w: Params) -> list:
        """Per stack: ``None`` (full gl, closed forms) or the cached
        :class:`~quotientsharp.groups.residual.SubAlgebraFactors` of its sub-algebra."""
        fs, blocks = self._base(w)
        if self._sub_cache is not None and self._sub_cache[0] is fs:
            return self._sub_cache[1]
        val = [None if alg is None else subalgebra_factors(self.metric, f, G, H, alg)
               for alg, f, (G, H) in zip(self.stack_algebras(w), fs, blocks)]
        self._sub_cache = (fs, val)  # keyed by the identity of the cached base factors
        return val

    def _layout(self, w: Params) -> list[tuple[tuple, tuple]]:
        """Per stack, per factor (G, H): ``((lo, hi, name, run item), ...)``, the head range
        ``[lo, hi)`` of the stack that a run of pieces (:func:`_runs`) of one tensor fills."""
        stacks = self._stacks(w)
        if getattr(self, "_layout_cache", None) is not None and self._layout_cache[0] is stacks:
            return self._layout_cache[1]
        out = []
        for stack in stacks:
            sides: tuple[list, list] = ([], [])
            lo = 0
            for i in stack:
                b = self.blocks[i]
                for side, pieces in zip(sides, (b.G, b.H)):
                    for item in _runs(tuple(pieces), b.head_dim):
                        name = item[1].name if item[0] == "strided" else item[1]
                        side.append((lo, lo + b.n_heads, name, item))
                lo += b.n_heads
            out.append((tuple(sides[0]), tuple(sides[1])))
        self._layout_cache = (stacks, out)
        return out

    def _views(self, v: Params, s: int, cache: bool = False) -> tuple[M.Views, M.Views]:
        """``(G, H)`` of stack ``s`` of the dict ``v`` as :class:`~quotientsharp.groups.gl_math.Views`
        into its tensors (no copy); ``cache``: their Gram matrices go through the group's
        :class:`~quotientsharp.groups.gl_math.GramCache` (inputs only, never outputs being written)."""
        layout = self._layout(v)[s]
        h = self.blocks[self._stacks(v)[s][0]].head_dim
        B = layout[0][-1][1]
        grams = None
        if cache:
            grams = getattr(self, "_gram_cache", None)
            if grams is None:
                grams = self._gram_cache = M.GramCache(size=8 * len(self._stacks(v)))  # a few per stack
        return tuple(M.Views([(lo, hi, view) for lo, hi, name, item in side
                              for view in _piece_views(v[name], item, hi - lo, h)], B, h, side,
                             sources=tuple(dict.fromkeys(v[name] for _, _, name, _ in side)) if cache else (),
                             cache=grams)
                     for side in layout)

    def _blocks(self, v: Params, s: int) -> tuple[M.Blocks, M.Blocks]:
        G, H = self._views(v, s, cache=True)
        return M.Blocks.of(G), M.Blocks.of(H)

    def _fast(self, *dicts: Params) -> bool:
        """Whether the views path applies: no tensor requires grad or lives in a ``torch.func``
        transform (its in-place writes are not differentiable; the extract/insert path is)."""
        return not any(_traced(d[n]) for d in dicts for n in self.names)

    def _run(self, w: Params, vecs: Sequence[Params], fn, point: bool = False) -> dict:
        """Apply ``fn(s, factors, (G, H), *[(xG, xH) per vec]) -> (yG, yH)`` to every stack ``s``
        and assemble a dict over ``self.names`` (``point``: a point, which is ``w`` outside the
        blocks; else a tangent vector, 0 there).

        Fast path: the factors are :class:`~quotientsharp.groups.gl_math.Blocks` over views of the
        dicts and each result is written straight into views of the output tensors. Under autograd
        or ``torch.func``: the stacked tensors of :meth:`extract` and :meth:`insert`."""
        fs, blocks_w = self._base(w)
        like = w if point or not vecs else vecs[0]
        if self._fast(w, *vecs):
            dense = torch.contiguous_format  # the output views are reshapes: they must not copy
            if self.shares_tensors:
                out = {n: like[n].clone(memory_format=dense) if point else torch.zeros_like(like[n], memory_format=dense)
                       for n in self.names}
            else:
                out = {n: torch.empty_like(like[n], memory_format=dense) for n in self.names}
            written = []
            for s, f in enumerate(fs):
                W = self._blocks(w, s)
                res = fn(s, f, W, *[self._blocks(v, s) for v in vecs])
                for y, o in zip(res, self._views(out, s)):
                    y.write(o)
                written.append((W, res))
            for s, (W, res) in enumerate(written):  # the outputs' Gram matrices with w, from the inputs'
                for x, y, o in zip(W, res, self._views(out, s, cache=True)):
                    o.cache.derive(x.terms[0][0], o, y)
            return out
        ext = [self.extract(v) for v in vecs]
        res = [fn(s, f, blocks_w[s], *[e[s] for e in ext]) for s, f in enumerate(fs)]
        return self.insert(w if point else {n: torch.zeros_like(like[n]) for n in self.names}, res)

    def _project_stacks(self, w: Params, vec: Params, pre=None) -> dict:
        """``Pi`` per stack (closed form on full-gl stacks, sub-algebra solve otherwise), after
        the optional per-stack map ``pre(f, xG, xH)`` (lazy on the fast path: ``Pi(g^{-1} d)``
        costs what ``Pi`` alone does)."""
        subs = self._projection_factors(w)

        def project(s, f, W, x):
            xG, xH = x if pre is None else pre(f, *x)
            return (M.gl_project(self.metric, f, *W, xG, xH) if subs[s] is None
                    else subalgebra_project(subs[s], *W, xG, xH))
        return self._run(w, [vec], project)

    # ------------------------------------------------------------------ group
    def action(self, w: Params, g) -> dict:
        res = [M.gl_action(G, H, A) for (G, H), A in zip(self.extract(w), g)]
        return self.insert(w, res)

    def pushforward(self, w: Params, g, xi: Params) -> dict:
        res = [M.gl_action(xG, xH, A) for (xG, xH), A in zip(self.extract(xi), g)]
        return self.insert({n: torch.zeros_like(xi[n]) for n in self.names}, res)

    def random_element(self, w: Params, scale: float = 1.0, generator: torch.Generator | None = None,
                       max_cond: float | None = None) -> list[torch.Tensor]:
        """``A = scale * N(0, I)`` per head (the paper's invariance protocol); with ``max_cond``,
        resample singular values log-uniformly in ``[1, max_cond]`` (orthogonal factors random)."""
        out = []
        for (G, _), alg in zip(self.extract(w), self.stack_algebras(w)):
            B, _, h = G.shape
            dev = generator.device if generator is not None else "cpu"
            if alg is not None:
                A = alg.random_element(B, generator, max_cond)
                out.append((scale * A).to(device=G.device, dtype=G.dtype))
                continue
            A = torch.randn(B, h, h, generator=generator, dtype=torch.float64, device=dev)
            if max_cond is not None:
                U, _, Vh = torch.linalg.svd(A)
                u = torch.rand(B, h, generator=generator, dtype=torch.float64, device=dev)
                s = torch.exp(u * torch.log(torch.tensor(float(max_cond), dtype=torch.float64)))
                s[:, 0] = 1.0
                s[:, -1] = max_cond if h > 1 else 1.0
                A = U @ torch.diag_embed(s) @ Vh
            out.append((scale * A).to(device=G.device, dtype=G.dtype))
        return out

    def algebra_zeros(self, w: Params) -> list[torch.Tensor]:
        return [torch.zeros(G.shape[0], G.shape[-1], G.shape[-1], dtype=G.dtype, device=G.device)
                if alg is None else torch.zeros(G.shape[0], alg.dim, dtype=G.dtype, device=G.device)
                for (G, _), alg in zip(self.extract(w), self.stack_algebras(w))]

    def vertical(self, w: Params, omega) -> dict:
        res = [M.gl_vertical(G, H, om if alg is None else alg.matrix(om))
               for (G, H), om, alg in zip(self.extract(w), omega, self.stack_algebras(w))]
        return self.insert({n: torch.zeros_like(w[n]) for n in self.names}, res)

    # ------------------------------------------------------------------ geometry
    def inner_per_block(self, w: Params, xi: Params, zeta: Params) -> list[torch.Tensor]:
        """Metric contributions per stack, each ``(B_s,)`` (float64)."""
        fs = self._factors(w)
        if self._fast(w, xi, zeta):
            return [M.gl_inner(self.metric, f, *self._blocks(xi, s), *self._blocks(zeta, s)) for s, f in enumerate(fs)]
        return [M.gl_inner(self.metric, f, xG, xH, zG, zH)
                for f, (xG, xH), (zG, zH) in zip(fs, self.extract(xi), self.extract(zeta))]

    def inner(self, w: Params, xi: Params, zeta: Params) -> torch.Tensor:
        dt = next(iter(xi.values())).dtype
        return sum(v.sum() for v in self.inner_per_block(w, xi, zeta)).to(dt)

    def norm_sq(self, w: Params, xi: Params) -> torch.Tensor:
        """``g_w(xi, xi)``, reading the blocks of ``xi`` once; for the unchanged output ``d`` of the
        last :meth:`riemannian_gradient` call at ``w``, ``<egrad, d>_F`` (``Pi`` is g-orthogonal, so
        ``g(d, d) = g(g^{-1} egrad, d)``): one elementwise pass instead of two Gram matrices. Under
        autograd, ``g_w(xi, xi)`` itself (the shortcut's gradient in ``xi`` would be ``egrad``)."""
        dt = next(iter(xi.values())).dtype
        fast = self._fast(w, xi)
        memo = getattr(self, "_rgrad_memo", None) if fast else None
        if memo is not None and _same(memo[0], w, self.names) and _same(memo[1], xi, self.names):
            egrad = [r() for r, _ in memo[2]]
            if all(e is not None and e._version == v for e, (_, v) in zip(egrad, memo[2])):
                return sum((e.detach() * xi[n]).sum(dtype=torch.float64) for e, n in zip(egrad, self.names)).to(dt)
        fs = self._factors(w)
        blocks = [self._blocks(xi, s) for s in range(len(fs))] if fast else self.extract(xi)
        return sum(M.gl_inner(self.metric, f, xG, xH, xG, xH).sum() for f, (xG, xH) in zip(fs, blocks)).to(dt)

    def horizontal_projection(self, w: Params, xi: Params) -> dict:
        return self._project_stacks(w, xi)

    def egrad_to_rgrad(self, w: Params, egrad: Params) -> dict:
        return self._run(w, [egrad], lambda s, f, W, d: M.gl_rgrad(self.metric, f, *d))

    def riemannian_gradient(self, w: Params, egrad: Params) -> dict:
        """``Pi(g^{-1} egrad)`` in one pass over the blocks (remembered for :meth:`norm_sq`)."""
        out = self._project_stacks(w, egrad, lambda f, dG, dH: M.gl_rgrad(self.metric, f, dG, dH))
        self._rgrad_memo = ((_stamp(w, self.names), _stamp(out, self.names), _stamp(egrad, self.names))
                            if self._fast(w, egrad) else None)
        return out

    def christoffel(self, w: Params, xi: Params) -> dict:
        return self._run(w, [xi], lambda s, f, W, x: M.gl_christoffel(self.metric, f, *W, *x))

    def geodesic_2nd(self, w: Params, xi: Params, t: float = 1.0) -> dict:
        """``w + t xi - t^2/2 Gamma_w(xi, xi)`` computed on the blocks and written once."""
        def step(s, f, W, x):
            gG, gH = M.gl_christoffel(self.metric, f, *W, *x)
            return W[0] + t * x[0] - 0.5 * t * t * gG, W[1] + t * x[1] - 0.5 * t * t * gH
        return self._run(w, [xi], step, point=True)

    def geodesic_vjp(self, w: Params, xi: Params, cotangent: Params, order: int | str = 2, **ode_kw) -> dict:
        """Order 2: ``J^T c = c - 1/2 (D Gamma_w(xi, xi))^T c`` in closed form on the blocks
        (:func:`gl_math.gl_christoffel_vjp`); ``"exact"``/``"ode"``: the discrete adjoint of the RK4
        integration (:meth:`GeodesicTrajectory.vjp <quotientsharp.geodesic.GeodesicTrajectory.vjp>`,
        reusing the one :meth:`geodesic_ode` kept for the same ``w``, ``xi`` and options); order 1
        by the base class."""
        order = geodesic_order(order)
        if order in ("exact", "ode"):
            return self._geodesic_ode_vjp(w, xi, cotangent, **ode_kw)
        if order != 2:
            return super().geodesic_vjp(w, xi, cotangent, order, **ode_kw)

        def vjp(s, f, W, x, c):
            dG, dH = M.gl_christoffel_vjp(self.metric, f, *W, *x, *c)
            return c[0] - 0.5 * dG, c[1] - 0.5 * dH
        return self._run(w, [xi, cotangent], vjp)

    def _geodesic_ode_vjp(self, w: Params, xi: Params, cotangent: Params, n_steps: int = 64,
                          tol: float | None = 1e-10) -> dict:
        """``J^T c`` of ``xi -> geodesic_ode(w, xi, 1, n_steps, tol)`` by the discrete adjoint of
        the run :meth:`geodesic_ode` kept for the same inputs (else a new run)."""
        pins = tuple(w[n] for n in self.names) + tuple(xi[n] for n in self.names)
        key = (tuple((id(x), x._version) for x in pins), 1.0, n_steps, tol)
        cached = getattr(self, "_ode_cache", None)
        run = cached[2] if cached is not None and cached[0] == key else self._geodesic_ode_run(w, xi, 1.0, n_steps, tol)
        self._ode_cache = None  # served: release the kept integration
        return run.vjp_xi(cotangent)

    def whiten(self, w: Params, zeta: Params) -> dict:
        return self._run(w, [zeta], lambda s, f, W, z: M.gl_whiten(self.metric, f, *z))

    def geodesic_ode(self, w: Params, xi: Params, t: float = 1.0, n_steps: int = 64,
                     tol: float | None = 1e-10) -> dict:
        """RK4 on the stacked blocks ``(G, H)`` (spec §6.5), in the exact compressed coordinates
        of :class:`~quotientsharp.geodesic.GLBlockODE` (rows ``[G, xG] = U Y``, all stacks of one
        head dimension in one batch): P(t), Q(t) and the relaxation are recomputed at every
        stage; a Gram matrix turning singular (eps = 0: not positive definite at a stage, or
        singular at either end) raises :class:`SingularHeadError`. The
        integration is kept for :meth:`geodesic_vjp` (its discrete adjoint); under autograd the
        endpoint is differentiable through the same adjoint (inside a ``torch.func`` transform: the
        plain RK4 of the base class on :meth:`christoffel`)."""
        if any(is_transformed(x) for x in (*self.restrict(w).values(), *xi.values())):
            return SymmetryGroup.geodesic_ode(self, w, xi, t, n_steps, tol)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (*w.values(), *xi.values())):
            return differentiable_endpoint(lambda w_, xi_: self._geodesic_ode_run(w_, xi_, t, n_steps, tol),
                                           self.restrict(w), {n: xi[n] for n in self.names})
        return self._geodesic_ode_run(w, xi, t, n_steps, tol).end

    def _geodesic_ode_run(self, w: Params, xi: Params, t: float, n_steps: int, tol: float | None):
        """Integrate (no graph) and keep the run for :meth:`geodesic_vjp`; returns an object with
        ``end`` (the endpoint dict) and ``vjp(cot) -> (dL/dw, dL/dxi)``."""
        self._stacks(w)
        wb, xb = self.extract(w), self.extract(xi)
        shapes = [(tuple(G.shape), tuple(H.shape)) for G, H in wb]
        ode = getattr(self, "_block_ode_cache", None)
        if ode is None or ode.shapes != shapes:
            ode = self._block_ode_cache = GLBlockODE(self.metric, shapes, self.eps_rel, self.eps)
        ode._labels = lambda: self.labels(w)
        pins = tuple(w[n] for n in self.names) + tuple(xi[n] for n in self.names)
        key = (tuple((id(x), x._version) for x in pins), float(t), n_steps, tol)
        group = self
        with torch.no_grad():
            wc, vc, bases = ode.compress(wb, xb)
            checked = getattr(self, "_ode_checked", None)
            if checked is None or checked[0] != key[0][:len(self.names)]:
                ode.check(wc)  # the geodesic starts on the full-rank manifold (once per base point)
                self._ode_checked = (key[0][:len(self.names)], pins[:len(self.names)])
            if not bool(torch.stack([x.abs().amax() for _, x in vc.items()]).amax() > 0):
                # xi = 0: the geodesic stays at w and the RK4 map's Jacobian there is exactly I
                # (Gamma is quadratic in the velocity), so the endpoint is w and J^T c = c

                class Still:
                    end = self.insert(w, wb)

                    def vjp(self, cot):
                        return {n: cot[n] for n in group.names}, {n: cot[n] for n in group.names}

                    def vjp_xi(self, cot):
                        return {n: cot[n] for n in group.names}
                self._ode_cache = (key, pins, Still())
                return self._ode_cache[2]
            ode.start()  # and stays there: Cholesky of every stage, eigenvalues at the end
            traj = geodesic_trajectory(ode.christoffel, wc, vc, t, n_steps, tol, linearize=ode.linearize,
                                       velocity=False)
            ode.finish(traj.end)
            end = self.insert(w, ode.expand(traj.end, bases, [x.dtype for x, _ in wb]))

        class Run:
            def vjp(self, cot: Params) -> tuple[dict, dict]:
                with torch.no_grad():
                    cb = group.extract(cot)
                    cc, perps = ode.compress_cotangent(cb, bases)
                    dw, dv = traj.vjp(cc)
                    dws = ode.expand_cotangent(dw, bases, perps, [x.dtype for x, _ in wb])
                    dvs = ode.expand_cotangent(dv, bases, perps, [x.dtype for x, _ in xb])
                    # entries of w outside the blocks pass through the endpoint unchanged
                    return (group.insert({n: cot[n] for n in group.names}, dws),
                            group.insert({n: torch.zeros_like(xi[n]) for n in group.names}, dvs))

            def vjp_xi(self, cot: Params) -> dict:
                with torch.no_grad():
                    cc, perps = ode.compress_cotangent(group.extract(cot), bases)
                    _, dv = traj.vjp(cc)
                    dvs = ode.expand_cotangent(dv, bases, perps, [x.dtype for x, _ in xb])
                    return group.insert({n: torch.zeros_like(xi[n]) for n in group.names}, dvs)

        run = Run()
        run.end, run.traj = end, traj
        self._ode_cache = (key, pins, run)  # pins keep the ids of the key from being reused
        return run

    def kernel_dimension(self, w: Params) -> int:
        """``sum over heads of h^2 - (h - rk G)(h - rk H)`` (``h^2`` per head at full rank)."""
        total = 0
        for (G, H), alg in zip(self.extract(w), self.stack_algebras(w)):
            h = G.shape[-1]
            a = h - torch.linalg.matrix_rank(G.double())
            b = h - torch.linalg.matrix_rank(H.double())
            if alg is None:
                total += int((h * h - a * b).sum())
            else:  # nu is injective on the sub-algebra when G or H has full column rank
                full = (a == 0) | (b == 0)
                total += int(full.sum()) * alg.dim
                for i in (~full).nonzero()[:, 0].tolist():
                    E = alg.matrix(torch.eye(alg.dim, dtype=torch.float64))
                    V = torch.cat([(G[i].double() @ E).flatten(1), (H[i].double() @ E.transpose(1, 2)).flatten(1)], 1)
                    total += int(torch.linalg.matrix_rank(V))
        return total

    def check_domain(self, w: Params) -> None:
        """Raise :class:`SingularHeadError` naming the head if a Gram matrix is singular."""
        for (G, H), lab in zip(self.extract(w), self.labels(w)):
            M.gl_factors(G, H, self.metric, self.eps_rel, self.eps, lab, for_projection=False)

    def relative_perturbation(self, w: Params, xi: Params) -> torch.Tensor:
        """``max_blocks max(||xi_G||_F / ||G||_F, ||xi_H||_F / ||H||_F)`` (for the warning of
        spec part 2 §1); an all-zero block (a dead head under an absolute ``eps``) has no scale
        and counts 0."""
        def ratio(x, X):
            n = X.double().norm(dim=(-1, -2))
            return torch.where(n > 0, x.double().norm(dim=(-1, -2)) / n.clamp_min(1e-300), 0.0).max()

        worst = torch.zeros((), dtype=torch.float64)
        for (G, H), (xG, xH) in zip(self.extract(w), self.extract(xi)):
            worst = torch.maximum(worst, torch.maximum(ratio(xG, G), ratio(xH, H)).cpu())
        return worst

"""One parameter layout: how a dict of parameter-shaped tensors maps onto one flat vector.

A :class:`ParameterLayout` records, for an ordered list of parameters, their ``names``, ``shapes``,
``dtypes`` and ``offsets`` (``offsets[i]:offsets[i + 1]`` is parameter ``i``'s slice of the flat
vector, ``offsets[-1] = numel``). It is the single place where dicts ``{name: tensor}`` and flat
vectors ``(numel,)`` (or blocks of column vectors ``(numel, k)``) are converted into each other:
the tangent helpers, the curvature operators, the quotient Hessian and the geoopt manifold all
go through it.

Conventions:

* ``flatten`` reads the layout's names from a mapping (other keys are ignored, so a layout may
  cover a subset of a model's parameters) or takes a sequence in layout order; every tensor must
  have its parameter's shape, else ``ValueError`` naming the parameter.
* ``unflatten`` returns views of the flat vector when no cast is needed; ``dtype=None`` restores
  each parameter's own dtype, so ``unflatten(flatten(d))`` is bit-exact for any mix of floating
  dtypes (the flat vector has their promoted dtype, which holds every value exactly).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

TensorsIn = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes, dtypes and flat offsets of an ordered list of parameters.

    Attributes: ``names`` (tuple of str), ``shapes`` (tuple of ``torch.Size``), ``dtypes`` (tuple
    of ``torch.dtype``), ``offsets`` (tuple of int, length ``len(names) + 1``), ``numel`` (total
    entries ``n``) and ``numels`` (per parameter). Build with :meth:`from_tensors` or
    :meth:`from_model`.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...] = dataclasses.field(init=False)

    def __post_init__(self):
        names = tuple(self.names)
        shapes = tuple(torch.Size(s) for s in self.shapes)
        dtypes = tuple(self.dtypes)
        if not len(names) == len(shapes) == len(dtypes):
            raise ValueError(f"ParameterLayout: {len(names)} names, {len(shapes)} shapes and {len(dtypes)} dtypes")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"ParameterLayout: duplicate parameter name(s) {duplicates}")
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + math.prod(s))
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "dtypes", dtypes)
        object.__setattr__(self, "offsets", tuple(offsets))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> ParameterLayout:
        """The layout of ``tensors`` (a dict ``{name: tensor}``), over ``names`` in that order
        (default: every key, in dict order)."""
        names = list(tensors) if names is None else list(names)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"ParameterLayout: no tensor for parameter(s) {missing}")
        return cls(tuple(names), tuple(tensors[n].shape for n in names), tuple(tensors[n].dtype for n in names))

    @classmethod
    def from_model(cls, model: nn.Module, names: Iterable[str] | None = None) -> ParameterLayout:
        """The layout of ``model``'s parameters ``names`` (in that order; default: every parameter
        that requires grad, in model order)."""
        named = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in named.items() if p.requires_grad]
        return cls.from_tensors(named, names)

    # ------------------------------------------------------------------ sizes
    @property
    def numel(self) -> int:
        """Total number of entries ``n`` of the flat vector."""
        return self.offsets[-1]

    @property
    def numels(self) -> tuple[int, ...]:
        """Entries per parameter, in layout order."""
        return tuple(b - a for a, b in zip(self.offsets, self.offsets[1:]))

    @property
    def dtype(self) -> torch.dtype:
        """The promoted dtype of all parameters: the dtype :meth:`flatten` gives by default."""
        out = self.dtypes[0] if self.dtypes else torch.get_default_dtype()
        for d in self.dtypes[1:]:
            out = torch.promote_types(out, d)
        return out

    def __len__(self) -> int:
        return len(self.names)

    def slice(self, name: str) -> slice:
        """The slice of the flat vector that holds parameter ``name``."""
        try:
            i = self.names.index(name)
        except ValueError:
            raise KeyError(f"parameter {name!r} is not in this layout; it has {list(self.names)}") from None
        return slice(self.offsets[i], self.offsets[i + 1])

    def subset(self, names: Iterable[str]) -> ParameterLayout:
        """The layout of the parameters ``names`` only (in that order)."""
        index = {n: i for i, n in enumerate(self.names)}
        names = list(names)
        unknown = [n for n in names if n not in index]
        if unknown:
            raise KeyError(f"parameter(s) {unknown} are not in this layout; it has {list(self.names)}")
        return ParameterLayout(tuple(names), tuple(self.shapes[index[n]] for n in names),
                               tuple(self.dtypes[index[n]] for n in names))

    def by_dtype(self) -> dict[torch.dtype, ParameterLayout]:
        """One sub-layout per dtype (parameters in layout order), e.g. for one flat buffer per dtype."""
        groups: dict[torch.dtype, list[str]] = {}
        for n, d in zip(self.names, self.dtypes):
            groups.setdefault(d, []).append(n)
        return {d: self.subset(names) for d, names in groups.items()}

    # ------------------------------------------------------------------ conversions
    def _parts(self, tensors: TensorsIn, where: str, leading: int = 0) -> list[torch.Tensor]:
        """The tensors in layout order, each checked to have its parameter's shape (after
        ``leading`` ∈ {0, 1} leading column dimension, whose size must agree)."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.names if n not in tensors]
            if missing:
                raise ValueError(f"{where}: missing parameter(s) {missing}")
            parts = [tensors[n] for n in self.names]
        else:
            parts = list(tensors)
            if len(parts) != len(self.names):
                raise ValueError(f"{where}: got {len(parts)} tensors, the layout has {len(self.names)} "
                                 f"parameters {list(self.names)}")
        first = None
        for n, s, t in zip(self.names, self.shapes, parts):
            if t.shape[leading:] != s or t.ndim != len(s) + leading:
                raise ValueError(f"{where}: parameter {n!r} has shape {tuple(t.shape)}, the layout expects "
                                 f"{tuple(s) if not leading else ('k', *s)}")
            if leading:
                first = first or (n, t.shape[0])
                if t.shape[0] != first[1]:
                    raise ValueError(f"{where}: parameter {n!r} has {t.shape[0]} columns, {first[0]!r} has {first[1]}")
        return parts

    def flatten(self, tensors: TensorsIn, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``{name: tensor}`` (or a sequence in layout order) → flat ``(numel,)``, in ``dtype``
        (default: the promoted dtype of the given tensors)."""
        parts = self._parts(tensors, "flatten")
        if dtype is None:
            return torch.cat([t.reshape(-1) for t in parts])
        return torch.cat([t.reshape(-1).to(dtype) for t in parts])

    def unflatten(self, flat: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Flat ``(numel,)`` → ``{name: tensor}`` of the layout's shapes; each in its parameter's
        dtype (``dtype=None``) or all in ``dtype``. Views of ``flat`` where no cast is needed."""
        if flat.ndim != 1 or flat.shape[0] != self.numel:
            raise ValueError(f"unflatten: expected a flat vector of shape ({self.numel},), got {tuple(flat.shape)}")
        if dtype is not None:
            flat = flat.to(dtype)
            return {n: p.view(s) for n, p, s in zip(self.names, flat.split(self.numels), self.shapes)}
        return {n: p.view(s).to(d) for n, p, s, d in zip(self.names, flat.split(self.numels), self.shapes, self.dtypes)}

    def flatten_columns(self, tensors: TensorsIn, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``{name: (k, *shape)}`` (or a sequence in layout order) → ``(numel, k)``: column ``j``
        is the flattening of the ``j``-th slices."""
        parts = self._parts(tensors, "flatten_columns", leading=1)
        out = torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1).T
        return out if dtype is None else out.to(dtype)

    def unflatten_columns(self, flat: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``(numel, k)`` → ``{name: (k, *shape)}`` (columns first, ready for ``vmap``), all in
        ``dtype`` (default: the dtype of ``flat``)."""
        if flat.ndim != 2 or flat.shape[0] != self.numel:
            raise ValueError(f"unflatten_columns: expected shape ({self.numel}, k), got {tuple(flat.shape)}")
        parts = (flat.T if dtype is None else flat.T.to(dtype)).split(self.numels, dim=1)
        return {n: p.reshape(p.shape[0], *s) for n, p, s in zip(self.names, parts, self.shapes)}

    def zeros(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """A flat zero vector ``(numel,)`` in ``dtype`` (default: :attr:`dtype`)."""
        return torch.zeros(self.numel, dtype=dtype or self.dtype, device=device)

    def zeros_dict(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """``{name: zeros}`` of each parameter's shape and dtype."""
        return {n: torch.zeros(s, dtype=d, device=device) for n, s, d in zip(self.names, self.shapes, self.dtypes)}

    def __repr__(self) -> str:
        return f"ParameterLayout({len(self.names)} parameters, numel={self.numel})"

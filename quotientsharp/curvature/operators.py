"""Curvature matrices as symmetric linear operators on flat float64 vectors.

Every estimator in :mod:`quotientsharp.curvature` takes a :class:`LinearOperator`: an ``n × n``
operator ``A`` that is self-adjoint in an inner product ``⟨u, v⟩`` (Euclidean by default; a
metric ``uᵀ M v`` when a subclass overrides :meth:`LinearOperator.inner`). Vectors are flat
float64 tensors of shape ``(n,)``; blocks of vectors are ``(n, k)`` with one vector per column.

:class:`HessianOperator` and :class:`GGNOperator` apply the curvature of the data-averaged loss
``L(θ) = Σ_b (n_b/N) L_b(θ)`` (per-batch weights ``n_b/N``, spec §1) with respect to a block of
parameters ("target"); all other parameters stay frozen at their current values. With
``process_group=`` (or ``distributed=True``) each rank keeps its shard of the batches and the
weighted gradients/HVPs are all-reduced (:mod:`quotientsharp.distributed`). Both are written on
the :class:`ModelOperator` template, which owns that batch loop: a new curvature matrix
``Σ_b (n_b/N) A_b`` only implements :meth:`ModelOperator.batch_product` (``V ↦ A_b V``).
Flat vectors and parameter dicts are converted by one :class:`~quotientsharp.layout.ParameterLayout`.
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from quotientsharp.curvature.probes import sample_probes
from quotientsharp.distributed import data_parallel
from quotientsharp.functional import (
    LossFn,
    Params,
    batch_loss,
    check_finite,
    eval_mode,
    forward,
    has_batchnorm,
    map_tensors,
    math_attention,
    model_device_dtype,
    split_batch,
)
from quotientsharp.layout import ParameterLayout
from quotientsharp.validation import check_model_loader_loss, conform_batch

HVP_MODES = ("reverse_over_reverse", "forward_over_reverse", "finite_difference")
# Default from benchmarks/hessian_cost.py (CPU, torch 2.13, 35k-param transformer, 1 thread):
# one double-backward HVP cost 2.7-3.6x a gradient vs 6.5-7.5x for jvp(grad) (and 7-8x for
# curvlinops), at ~3.7x vs ~21x the gradient's peak memory. Lanczos/SLQ apply one vector at a
# time, so the single-HVP cost decides. Re-measure on GPU before changing it there.
DEFAULT_HVP_MODE = "reverse_over_reverse"


class LinearOperator:
    """A symmetric ``n × n`` operator on flat float64 vectors, self-adjoint in :meth:`inner`.

    Subclasses implement :meth:`matvec`; :meth:`matmat` defaults to one matvec per column.

    Stochastic estimators (SLQ) take their probes from the operator: :meth:`sample_probes` draws
    ``z`` with ``E[⟨z, f(A) z⟩] = Σ f(λ)`` over the :attr:`effective_dimension` eigenvalues of the
    space the operator's spectrum lives on (by default all ``n``, Rademacher or Gaussian entries);
    an operator on a subspace (the quotient Hessian's horizontal space) overrides both.
    """

    shape: tuple[int, int]
    device: torch.device = torch.device("cpu")
    probe_distribution: str = "rademacher"
    """The default distribution of :meth:`sample_probes`."""

    @property
    def effective_dimension(self) -> int:
        """Number of eigenvalues the spectral estimators sum over (default ``n``)."""
        return self.shape[0]

    def sample_probes(
        self, count: int, seed: int = 0, distribution: str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(n, count)`` float64 probes with ``E[z zᵀ] = I``: Rademacher (±1, default) or standard
        Gaussian entries, drawn on CPU from ``generator`` (default: a new one seeded by ``seed``)."""
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        return sample_probes(self.shape[0], count, distribution or self.probe_distribution, generator)

    def describe(self) -> dict:
        """Entries this operator adds to an estimator's config record (default: none)."""
        return {}

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(n,)``."""
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V`` of shape ``(n, k)``."""
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def inner(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``uᵀ v`` (Euclidean); ``u`` is ``(n,)`` or ``(n, j)``, ``v`` is ``(n,)``.

        Override with ``uᵀ M v`` to run Lanczos and power iteration in a metric inner product.
        """
        return (u.mT if u.ndim == 2 else u) @ v

    def metric_matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``M V`` for ``V`` ``(n, k)``: the metric of :meth:`inner` (``⟨u, v⟩ = uᵀ M v``) applied to
        every column, so that batched estimators (lockstep SLQ) take all column-wise inner
        products at once. Default: ``V`` itself (Euclidean). A subclass that overrides
        :meth:`inner` overrides this too; if it does not, :attr:`has_metric_matmat` is False,
        this raises ``NotImplementedError`` and the estimators use :meth:`inner` column by column."""
        if not self.has_metric_matmat:
            raise NotImplementedError(f"{type(self).__name__} overrides inner() but not metric_matmat()")
        return V

    @property
    def has_metric_matmat(self) -> bool:
        """Whether :meth:`metric_matmat` applies the metric of :meth:`inner` (else only ``inner`` is known)."""
        return type(self).inner is LinearOperator.inner or type(self).metric_matmat is not LinearOperator.metric_matmat

    def reuse_batch_products(self, max_batches: int | None = None) -> contextlib.AbstractContextManager:
        """A block inside which repeated products may reuse per-batch work (the model operators
        keep their gradient graphs, :meth:`ModelOperator.reuse_batch_products`); results are
        unchanged. Default: nothing to reuse."""
        return contextlib.nullcontext()

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    def to_dense(self, chunk_size: int = 256) -> torch.Tensor:
        """The ``(n, n)`` float64 matrix, built column block by column block."""
        n = self.shape[0]
        eye = torch.eye(n, dtype=torch.float64, device=self.device)
        return torch.cat([self.matmat(eye[:, i : i + chunk_size]) for i in range(0, n, chunk_size)], 1)

    def to_scipy(self):
        """A float64 ``scipy.sparse.linalg.LinearOperator`` (NumPy in, NumPy out)."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def as_torch(x):
            return torch.as_tensor(x, dtype=torch.float64, device=self.device)

        return ScipyOperator(
            self.shape,
            matvec=lambda x: self.matvec(as_torch(x).reshape(-1)).cpu().numpy(),
            matmat=lambda X: self.matmat(as_torch(X)).cpu().numpy(),
            rmatvec=lambda x: self.matvec(as_torch(x).reshape(-1)).cpu().numpy(),
            dtype="float64",
        )


class MatrixOperator(LinearOperator):
    """A dense symmetric matrix (cast to float64) as an operator."""

    def __init__(self, matrix: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix.to(torch.float64)
        self.shape = tuple(self.matrix.shape)
        self.device = self.matrix.device

    def matvec(self, v):
        return self.matrix @ v

    def matmat(self, V):
        return self.matrix @ V

    def to_dense(self, chunk_size: int = 256):
        return self.matrix.clone()


class FunctionOperator(LinearOperator):
    """An operator from callables: ``matvec`` and optionally ``matmat``, ``inner`` and
    ``metric_matmat`` (``V ↦ M V`` for the metric of ``inner``; without it, a custom ``inner``
    is used column by column)."""

    def __init__(
        self,
        n: int,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        matmat: Callable[[torch.Tensor], torch.Tensor] | None = None,
        inner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        metric_matmat: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.shape, self.device = (n, n), torch.device(device)
        self._matvec, self._matmat, self._inner, self._metric_matmat = matvec, matmat, inner, metric_matmat

    def matvec(self, v):
        return self._matvec(v)

    def matmat(self, V):
        return self._matmat(V) if self._matmat is not None else super().matmat(V)

    def inner(self, u, v):
        if self._inner is not None:
            return self._inner(u, v)
        if self._metric_matmat is not None:
            return (u.mT if u.ndim == 2 else u) @ self._metric_matmat(v[:, None])[:, 0]
        return super().inner(u, v)

    def metric_matmat(self, V):
        if self._metric_matmat is not None:
            return self._metric_matmat(V)
        if self._inner is not None:
            raise NotImplementedError("FunctionOperator with inner= but no metric_matmat=")
        return V

    @property
    def has_metric_matmat(self) -> bool:
        return self._metric_matmat is not None or self._inner is None


def as_operator(obj: Any) -> LinearOperator:
    """A :class:`LinearOperator` from an operator, a square tensor, or any object with
    ``shape`` and ``matvec`` (optionally ``matmat``/``inner``/``device``/``metric_matmat``)."""
    if isinstance(obj, LinearOperator):
        return obj
    if isinstance(obj, torch.Tensor):
        return MatrixOperator(obj)
    if hasattr(obj, "matvec") and hasattr(obj, "shape"):
        return FunctionOperator(
            int(obj.shape[0]), obj.matvec, getattr(obj, "matmat", None),
            getattr(obj, "inner", None), getattr(obj, "device", "cpu"), getattr(obj, "metric_matmat", None),
        )
    raise TypeError(f"cannot use {type(obj).__name__} as a linear operator (needs shape and matvec)")


def select_parameters(model: nn.Module, params: str | Sequence[str] = "all") -> list[str]:
    """Names of the target parameters, in model order.

    ``params``: ``"all"`` (every parameter that requires grad), an exact name, a glob
    (``"blocks.*.weight"``), a regular expression searched in each name (``"weight$"``), or a list
    of exact names. Raises ``ValueError`` when nothing matches or a target does not require grad.
    """
    named = dict(model.named_parameters())
    if isinstance(params, str) and params == "all":
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise ValueError("no parameter of the model requires grad: nothing to differentiate")
        return names
    if isinstance(params, str):
        if params in named:
            names = [params]
        else:
            names = [n for n in named if fnmatch.fnmatchcase(n, params)]
            names = names or [n for n in named if re.search(params, n)]
    else:
        missing = [n for n in params if n not in named]
        if missing:
            raise ValueError(f"model has no parameter(s) {missing}; available: {list(named)}")
        wanted = set(params)
        names = [n for n in named if n in wanted]
    if not names:
        raise ValueError(f"no parameter name matches {params!r}; available: {list(named)}")
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        raise ValueError(
            f"target parameter(s) {frozen} do not require grad; set requires_grad=True or leave "
            "them out of `params`"
        )
    return names


@contextlib.contextmanager
def batch_statistics_only(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm without touching its running statistics (restored on exit)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked, m.track_running_stats))
            m.running_mean = m.running_var = m.num_batches_tracked = None
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, mean, var, count, track in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
            m.track_running_stats = track


def _cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, obj)


class ModelOperator(LinearOperator):
    """Template of the model curvature operators: data, target block, batch loop, weighting,
    all-reduce and determinism check live here; a subclass writes only the per-batch product.

    For a curvature matrix ``A = Σ_b (n_b/N) A_b`` of the data-averaged loss
    ``L = Σ_b (n_b/N) L_b`` (``n_b`` the size of batch ``b``, ``N`` the total), a subclass
    implements :meth:`batch_product`: given one batch, return ``apply(V)`` that maps a block of
    target-shaped columns ``{name: (k, *shape)}`` (compute dtype) to ``A_b V`` in the same format.
    :meth:`matmat` then loops over this rank's batches inside :meth:`context`, applies ``apply``
    to ``chunk_size`` columns at a time, weights by ``n_b/N``, sums, and all-reduces over
    ``process_group``. Work that does not depend on ``V`` (a forward pass, a gradient graph) goes
    in ``batch_product`` before ``apply`` and is shared by all chunks of that batch.

    Constructed as ``(model, loader, loss_fn, params="all", ...)``, the order of every measure;
    batches follow the batch rule of :mod:`quotientsharp.validation`. ``ModelOperator`` itself
    (no product) serves ``loss``/``gradient``/:meth:`loss_and_gradient`.

    Attributes after construction: ``param_names``, ``layout`` (the target block's
    :class:`~quotientsharp.layout.ParameterLayout`), ``n`` (target size), ``batches`` and
    ``batch_weights`` (``n_b/N``) of this rank, ``loss`` (float, L(θ)) and ``gradient`` (flat
    float64 ∇L(θ) over the target), summed over the ranks of ``process_group``.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable,
        loss_fn: LossFn,
        params: str | Sequence[str] = "all",
        train_mode: bool = False,
        check_deterministic: bool = True,
        dtype: torch.dtype | None = None,
        chunk_size: int = 32,
        process_group=None,
        distributed: bool = False,
    ):
        check_model_loader_loss(type(self).__name__, model, loader, loss_fn)
        self.model, self.loss_fn, self.train_mode, self.chunk_size = model, loss_fn, train_mode, chunk_size
        self.device, model_dtype = model_device_dtype(model)
        self.compute_dtype = dtype or model_dtype
        self.data_parallel = data_parallel(process_group, distributed)
        index, batches, sizes = self.data_parallel.shard(loader, self.device)
        self.batches = batches if dtype is None else [_cast_floating(b, dtype) for b in batches]
        self.batches = [conform_batch(b, self.compute_dtype, {self.device}, type(self).__name__, i)
                        for i, b in zip(index, self.batches)]
        self.num_data = sum(sizes)
        self.batch_weights = [sizes[i] / self.num_data for i in index]
        self.param_names = select_parameters(model, params)
        self._check_batchnorm()

        named = dict(model.named_parameters())
        self.data_parallel.check_same(named, sizes)
        self.target: Params = {n: named[n].detach().to(self.compute_dtype) for n in self.param_names}
        self.frozen: Params = {
            n: p.detach().to(self.compute_dtype) for n, p in named.items() if n not in self.target
        }
        if self.compute_dtype != model_dtype:
            self.frozen.update(
                {n: b.to(self.compute_dtype) for n, b in model.named_buffers() if b.is_floating_point()}
            )
        check_finite(self.target)
        self.layout = ParameterLayout.from_tensors(self.target)
        self.n = self.layout.numel
        self.shape = (self.n, self.n)

        self.loss, self.gradient = self.loss_and_gradient()
        if check_deterministic:
            self._check_deterministic()

    # --- flat <-> dict (the layout, in float64 / the compute dtype) --------------------------
    @property
    def shapes(self) -> tuple[torch.Size, ...]:
        """Shapes of the covered parameters, in ``param_names`` order."""
        return self.layout.shapes

    @property
    def numels(self) -> tuple[int, ...]:
        """Element counts of the covered parameters (they sum to ``n``)."""
        return self.layout.numels

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Target-block dict (or list in target order) → flat float64 ``(n,)``."""
        return self.layout.flatten(tensors, torch.float64)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``(n,)`` → target-block dict in the compute dtype."""
        return self.layout.unflatten(flat, self.compute_dtype)

    # --- the template ------------------------------------------------------------------------
    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Model mode (eval unless ``train_mode``), SDPA math backend, frozen BatchNorm stats."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(eval_mode(self.model, self.train_mode))
            stack.enter_context(math_attention())
            if self.train_mode:
                stack.enter_context(batch_statistics_only(self.model))
            yield

    def sum_over_batches(self, per_batch: Callable[[int, Any], torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """``Σ_b (n_b/N) per_batch(i_b, b)`` over this rank's batches (inside :meth:`context`),
        all-reduced over the ranks: the one batch loop of every model operator. ``per_batch``
        returns a float64 tensor of ``shape``; ``i_b`` is the batch's index on this rank."""
        total = torch.zeros(shape, dtype=torch.float64, device=self.device)
        with self.context():
            for i, (w, b) in enumerate(zip(self.batch_weights, self.batches)):
                total += w * per_batch(i, b)
        return self.data_parallel.sum(total)

    def batch_product(self, batch: Any) -> Callable[[dict[str, torch.Tensor]], Params | Sequence[torch.Tensor]]:
        """The per-batch product (subclasses): ``apply`` with ``apply(V) = A_b V`` for columns
        ``V = {name: (k, *shape)}`` in the compute dtype, returned as a dict (or a sequence in
        target order) of ``(k, *shape)`` tensors. Called inside :meth:`context`."""
        raise NotImplementedError(
            f"{type(self).__name__} has no curvature product: subclass ModelOperator and implement "
            "batch_product(batch), or use HessianOperator / GGNOperator"
        )

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V = Σ_b (n_b/N) A_b V`` for ``V`` of shape ``(n, k)``, ``chunk_size`` columns per
        call of the per-batch product."""
        if V.ndim != 2 or V.shape[0] != self.n:
            raise ValueError(f"{type(self).__name__}.matmat: expected shape ({self.n}, k), got {tuple(V.shape)}")

        def per_batch(i: int, batch: Any) -> torch.Tensor:
            apply = self._batch_product(i, batch)
            chunks = [self._apply_columns(apply, V[:, i : i + self.chunk_size])
                      for i in range(0, V.shape[1], self.chunk_size)]
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

        return self.sum_over_batches(per_batch, tuple(V.shape))

    @contextlib.contextmanager
    def reuse_batch_products(self, max_batches: int | None = None) -> Iterator[None]:
        """Inside this block, :meth:`matmat` keeps the products of the first ``max_batches``
        batches (default: all; for ``"reverse_over_reverse"`` each is a gradient graph built with
        ``create_graph=True``, about an activation's worth of memory per batch) and reuses them in
        later calls instead of rebuilding them. Opt-in: the kept graphs stay in memory until the
        block ends. Results are unchanged; nested blocks share the outer cache. (The sizes are
        not measured with ``saved_tensors_hooks``: a pack hook that returns the tensor makes a
        saved output and its node a reference cycle that is never freed.)"""
        if self._product_cache is not None:
            yield
            return
        self._product_cache, self._product_cache_room = {}, max_batches
        try:
            yield
        finally:
            self._product_cache = None

    _product_cache: dict | None = None

    def _batch_product(self, i: int, batch: Any) -> Callable:
        """``batch_product(batch)``, from the cache of :meth:`reuse_batch_products` when active."""
        cache = self._product_cache
        if cache is None:
            return self.batch_product(batch)
        if i in cache:
            return cache[i]
        apply = self.batch_product(batch)
        if self._product_cache_room is None or len(cache) < self._product_cache_room:
            cache[i] = apply
        return apply

    def _apply_columns(self, apply: Callable, V: torch.Tensor) -> torch.Tensor:
        """``(n, k)`` float64 → per-batch product → ``(n, k)`` float64, through the layout."""
        return self.layout.flatten_columns(apply(self.layout.unflatten_columns(V, self.compute_dtype)), torch.float64)

    # --- loss and gradient -------------------------------------------------------------------
    def batch_loss(self, target: Params, batch: Any) -> torch.Tensor:
        """Mean loss on one batch with the target block replaced by ``target``."""
        return batch_loss(self.model, {**self.frozen, **target}, batch, self.loss_fn)

    def loss_and_gradient(self, delta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """``L(θ + δ)`` and flat float64 ``∇L(θ + δ)`` over the loader (weights ``n_b/N``)."""
        point = self.target if delta is None else {
            n: t + d for (n, t), d in zip(self.target.items(), self.unflatten(delta).values())
        }

        def per_batch(i: int, batch: Any) -> torch.Tensor:
            leaves = {n: t.detach().requires_grad_() for n, t in point.items()}
            loss = self.batch_loss(leaves, batch)
            if not torch.isfinite(loss):
                raise ValueError(
                    f"non-finite loss ({loss.item()}) on batch {i}: check the inputs, the "
                    "weights and the loss function"
                )
            if not loss.requires_grad:
                raise ValueError(f"the loss does not depend on the target parameters {self.param_names}: "
                                 "select parameters that the forward pass reads")
            grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
            return torch.cat([self.flatten(grads), torch.tensor([loss.item()], dtype=torch.float64, device=self.device)])

        packed = self.sum_over_batches(per_batch, (self.n + 1,))
        return packed[-1].item(), packed[:-1]

    # --- checks ------------------------------------------------------------------------------
    def _check_batchnorm(self) -> None:
        if self.train_mode or not has_batchnorm(self.model):
            return
        untracked = [
            n for n, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
        ]
        if untracked:
            raise ValueError(
                f"BatchNorm module(s) {untracked} have no running statistics "
                "(track_running_stats=False), so they normalise with batch statistics even in eval "
                "mode and the Hessian would depend on how the data are split into batches; pass "
                "train_mode=True to accept that explicitly"
            )

    def _check_deterministic(self) -> None:
        loss, gradient = self.loss_and_gradient()
        if loss != self.loss or not torch.equal(gradient, self.gradient):
            raise ValueError(
                "two passes over the data gave different loss/gradient "
                f"(loss {self.loss!r} vs {loss!r}, max gradient difference "
                f"{(gradient - self.gradient).abs().max().item():.3g}); likely causes: dropout "
                "(train_mode=True), data augmentation, a shuffling loader or drop_last=True. Pass "
                "a fixed list of batches, or check_deterministic=False to skip this check"
            )


class HessianOperator(ModelOperator):
    """Hessian ``H = Σ_b (n_b/N) ∇²_θ L_b(θ)`` over the target block, as an ``(n, n)`` operator.

    Per-batch products (all inside the SDPA math backend):

    - ``"reverse_over_reverse"``: ``g = ∇L_b`` with ``create_graph=True``, then ``∇(gᵀv)``; the
      graph is built once per batch and reused for every column.
    - ``"forward_over_reverse"``: ``jvp(torch.func.grad(L_b), (θ,), (v,))``, vmapped over
      ``chunk_size`` columns at a time. Never ``jacrev`` (wrong through LayerNorm, §2).
    - ``"finite_difference"``: ``‖v‖·(∇L_b(θ+h v̂) − ∇L_b(θ−h v̂))/(2h)``, ``v̂ = v/‖v‖``;
      ``fd_step`` defaults to 1e-5 in float64 and 1e-2 otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable,
        loss_fn: LossFn,
        params: str | Sequence[str] = "all",
        mode: str = DEFAULT_HVP_MODE,
        train_mode: bool = False,
        check_deterministic: bool = True,
        dtype: torch.dtype | None = None,
        chunk_size: int = 32,
        fd_step: float | None = None,
        process_group=None,
        distributed: bool = False,
    ):
        if mode not in HVP_MODES:
            raise ValueError(f"unknown HVP mode {mode!r}; choose one of {HVP_MODES}")
        self.mode = mode
        super().__init__(model, loader, loss_fn, params, train_mode, check_deterministic, dtype, chunk_size,
                         process_group, distributed)
        self.fd_step = fd_step or (1e-5 if self.compute_dtype == torch.float64 else 1e-2)

    def batch_product(self, batch: Any) -> Callable[[Params], Params | Sequence[torch.Tensor]]:
        if self.mode == "reverse_over_reverse":
            return self._reverse_over_reverse(batch)
        if self.mode == "forward_over_reverse":
            return self._forward_over_reverse(batch)
        return self._finite_difference(batch)

    def _reverse_over_reverse(self, batch: Any) -> Callable[[Params], list[torch.Tensor]]:
        leaves = {n: t.detach().requires_grad_() for n, t in self.target.items()}
        inputs = list(leaves.values())
        # materialize_grads: a parameter the forward pass never reads has a zero gradient (and
        # zero Hessian rows), not None
        grads = torch.autograd.grad(self.batch_loss(leaves, batch), inputs, create_graph=True,
                                    materialize_grads=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # others have zero Hessian rows

        def apply(V: Params) -> list[torch.Tensor]:
            columns = list(V.values())
            if not live:  # the loss is at most linear in the target
                return [torch.zeros_like(c) for c in columns]
            products = [
                torch.autograd.grad([grads[i] for i in live], inputs, [columns[i][j] for i in live],
                                    retain_graph=True, materialize_grads=True)
                for j in range(columns[0].shape[0])
            ]
            return [torch.stack(per_param) for per_param in zip(*products)]

        return apply

    def _forward_over_reverse(self, batch: Any) -> Callable[[Params], Params]:
        gradient_fn = grad(lambda target: self.batch_loss(target, batch))

        def hvp(v: Params) -> Params:
            return jvp(gradient_fn, (self.target,), (v,))[1]

        def apply(V: Params) -> Params:
            try:
                return vmap(hvp)(V)
            except RuntimeError as err:  # torch 2.13: F.mse_loss (ZeroTensor), F.huber_loss (no rule)
                if "ZeroTensor" not in str(err) and "forward AD" not in str(err):
                    raise
                raise RuntimeError(
                    f"{type(self).__name__}(mode='forward_over_reverse'): torch's forward-mode AD cannot "
                    f"differentiate the gradient of this model and loss_fn ({err}); use "
                    "mode='reverse_over_reverse' (the default)") from err

        return apply

    def _finite_difference(self, batch: Any) -> Callable[[Params], list[torch.Tensor]]:
        def gradient_at(point: Params) -> tuple[torch.Tensor, ...]:
            leaves = {n: t.detach().requires_grad_() for n, t in point.items()}
            with torch.enable_grad():
                loss = self.batch_loss(leaves, batch)
                if not torch.isfinite(loss):
                    raise ValueError(f"non-finite loss ({loss.item()}) at a finite-difference point θ ± h·v/‖v‖ "
                                     f"(fd_step={self.fd_step}); lower fd_step or check the model")
                return torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)

        def apply(V: Params) -> list[torch.Tensor]:
            out = []
            for j in range(next(iter(V.values())).shape[0]):
                v = {n: c[j] for n, c in V.items()}
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in v.values()]))
                if norm == 0:
                    out.append([torch.zeros_like(t) for t in v.values()])
                    continue
                step = {n: (self.fd_step / norm) * t for n, t in v.items()}
                plus = gradient_at({n: t + step[n] for n, t in self.target.items()})
                minus = gradient_at({n: t - step[n] for n, t in self.target.items()})
                out.append([norm * (p - m) / (2 * self.fd_step) for p, m in zip(plus, minus)])
            return [torch.stack(per_param) for per_param in zip(*out)]

        return apply


class GGNOperator(ModelOperator):
    """Generalized Gauss–Newton ``G = Σ_b (n_b/N) J_bᵀ (∇²_f ℓ_b) J_b`` over the target block.

    ``J_b``: Jacobian of the batch outputs w.r.t. the target, ``∇²_f ℓ_b``: Hessian of the (mean)
    batch loss w.r.t. the outputs. PSD when the loss is convex in the outputs (cross-entropy,
    MSE). Per batch, ``G_b v = J_bᵀ (∇²_f ℓ_b (J_b v))``, vmapped over columns: ``J_b v`` by
    ``jvp``, then the output Hessian (symmetric) as the vjp of ``∇_f ℓ_b``, then ``J_bᵀ`` by vjp.
    Only the model goes through forward-mode AD: torch 2.13 fails forward-over-reverse through
    ``F.mse_loss`` (a ZeroTensor error) and has none for ``F.huber_loss``.
    """

    def batch_product(self, batch: Any) -> Callable[[Params], Params]:
        inputs, targets = split_batch(batch)

        def outputs_of(target: Params) -> torch.Tensor:
            return forward(self.model, {**self.frozen, **target}, inputs)

        outputs, pullback = vjp(outputs_of, self.target)
        _, output_hessian = vjp(grad(lambda out: self.loss_fn(out, targets)), outputs)

        def ggnvp(v: Params) -> Params:
            jv = jvp(outputs_of, (self.target,), (v,))[1]
            return pullback(output_hessian(jv)[0])[0]

        return vmap(ggnvp)

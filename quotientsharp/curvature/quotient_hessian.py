"""The quotient Hessian: the Riemannian Hessian of the loss on the quotient by the symmetries.

At ``w``, with metric ``M = M_w`` (the sum of the block metrics of a
:class:`~quotientsharp.quotient.Quotient`), horizontal projector ``Π = Π_w`` and Christoffel
form ``Γ = Γ_w``, the Riemannian Hessian of ``L`` on horizontal vectors is the bilinear form

    q(ξ, ξ) = d²/dt² L(γ_ξ(t))|_{t=0} = ξᵀHξ − ⟨∇L, Γ(ξ, ξ)⟩,   B(ξ, ζ) = ξᵀ(H − C)ζ,

``γ_ξ`` the geodesic of ``M`` and ``C_ij = Σ_k ∇L_k Γ^k_ij``. As ``Γ(v, v)`` is a closed-form
quadratic polynomial in ``v``, ``C v = ∇_v[½⟨∇L, Γ(v, v)⟩]`` is one reverse pass through it
(no forward-over-forward through solves, spec §2). Made an operator, self-adjoint in ``M``:

    A = Π M⁻¹ (H − C) Π = M⁻¹ Πᵀ(H − C)Π        (ΠM⁻¹ = M⁻¹Πᵀ because MΠ = ΠᵀM).

Because the loss is invariant, horizontal geodesics project to quotient geodesics, so the
spectrum of ``A`` on the horizontal space (dimension ``n_h = n − dim V``) is the spectrum of the
Hessian of the loss on the quotient: invariant under the group action, unlike that of ``H``.

**The kernel.** ``A`` kills the vertical space ``V`` (``AΠ = A``): ``dim V = Σ h²`` over GL head
blocks at full rank (``h² − (h − rk G)(h − rk H)`` otherwise), plus the entries the adaptive
metric masks (zero weights). These zeros are not eigenvalues of the quotient Hessian. The
estimators here therefore work **inside the horizontal space**: probes are
``z = Π whiten(ζ)``, ``ζ ~ N(0, I)``, rescaled to ``‖z‖²_M = n_h``; in M-orthonormal coordinates
``z`` is uniform on the sphere of radius ``√n_h`` of the horizontal space, so
``E[⟨z, f(A) z⟩_M] = Tr(f(A) Π) = Σ_{horizontal} f(λ)`` and SLQ traces, densities and Rényi sums
are over the ``n_h`` quotient eigenvalues (``SLQResult.n = n_h``); no spike of mass dim V/n at 0.
For ``α > 0`` the kernel would add nothing to ``Σ|λ|^α`` anyway, but it would to ``n``, to the
density and to ``Tr f`` with ``f(0) ≠ 0``. Lanczos starts horizontal, so its Krylov space stays
horizontal (``m ≤ n_h``).

Using the generic estimators directly: :func:`~quotientsharp.curvature.lanczos.lanczos` and
:func:`~quotientsharp.curvature.lanczos.power_iteration` work unchanged (Euclidean Gaussian start,
M-normalised; the vertical part of the start only adds Ritz values ≈ 0). ``hutchinson(op)`` stays
unbiased (``E[zᵀAz] = Tr A`` for any square ``A``) but its variance is that of the non-symmetric
Euclidean matrix ``A``. :func:`~quotientsharp.curvature.slq.slq` draws its probes from
:meth:`QuotientHessianOperator.sample_probes` and sums over ``effective_dimension = n_h``
eigenvalues; do not pass Euclidean ``probes=``: with them it would estimate ``Tr(M f(A))``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import grad, vmap

from quotientsharp.adapters.resolve import default_quotient
from quotientsharp.curvature.lanczos import EigenResult, lanczos, power_iteration
from quotientsharp.curvature.operators import (
    DEFAULT_HVP_MODE,
    HessianOperator,
    LinearOperator,
    select_parameters,
)
from quotientsharp.curvature.renyi import RenyiResult, renyi_entropy
from quotientsharp.curvature.results import Estimate, mean_and_stderr
from quotientsharp.curvature.slq import SLQResult, SpectralDensity, slq
from quotientsharp.functional import LossFn
from quotientsharp.quotient import Quotient
from quotientsharp.validation import check_choice, check_count, check_model_loader_loss


def _transformed(tensors: dict) -> bool:
    """Whether the tensors are wrapped by a ``torch.func`` transform (e.g. inside ``vmap``)."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors.values())


def vertical_dimension(quotient: Quotient, w: dict[str, torch.Tensor]) -> int:
    """``dim ker Π_w``: the sum of every group's :meth:`~SymmetryGroup.kernel_dimension` (per GL
    head ``h² − (h − rk G)(h − rk H)``, the zero weights masked by the adaptive metric, ...)."""
    return sum(g.kernel_dimension(w) for g in quotient.all_groups)


class QuotientHessianOperator(LinearOperator):
    """``A = Π M⁻¹ (H − C) Π`` over all trainable parameters, self-adjoint in ``⟨u, v⟩ = uᵀMv``.

    Args:
        model, loader, loss_fn: as every measure (``loss_fn(outputs, targets)`` the batch mean).
        quotient: the geometry; default ``default_quotient(model, metric, rest, eps_rel)`` with
            ``metric="mix"``, ``rest="adaptive"``, ``eps_rel=0`` (give either ``quotient`` or
            these three). It must cover exactly the trainable parameters.
        mode, hessian_kwargs: ``mode`` and the keyword arguments ``**hessian_kwargs`` are passed to :class:`HessianOperator` (``train_mode``, ``dtype``, ...).

    Attributes: ``hessian`` (the plain :class:`HessianOperator`, whose HVP and loader-averaged
    gradient ``∇L`` are reused), ``quotient``, ``point`` (``w`` as float64 dict), ``n``,
    ``kernel_dim`` (``dim V``), ``n_horizontal`` (``n_h = n − dim V``). Vectors are flat float64
    ``(n,)`` in ``param_names`` order; the geometry runs in float64.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable,
        loss_fn: LossFn,
        quotient: Quotient | None = None,
        metric: str | None = None,
        rest: str | None = None,
        eps_rel: float | None = None,
        mode: str = DEFAULT_HVP_MODE,
        **hessian_kwargs,
    ):
        check_model_loader_loss("QuotientHessianOperator", model, loader, loss_fn)
        if quotient is None:
            quotient = default_quotient(model, metric, rest, 0.0 if eps_rel is None else eps_rel,
                                        owner="QuotientHessianOperator")
        elif (metric, rest, eps_rel) != (None, None, None):
            raise ValueError("metric/rest/eps_rel configure the default quotient; with quotient= given, "
                             "build it with those settings instead (find_symmetries(model, metric, rest, eps_rel))")
        names = select_parameters(model, "all")
        if sorted(quotient.names) != sorted(names):
            extra, missing = set(quotient.names) - set(names), set(names) - set(quotient.names)
            raise ValueError(f"the quotient must cover exactly the trainable parameters; "
                             f"not trainable: {sorted(extra)}, not covered: {sorted(missing)}")
        self.quotient = quotient
        self.hessian = HessianOperator(model, loader, loss_fn, names, mode=mode, **hessian_kwargs)
        self.param_names, self.n, self.shape = self.hessian.param_names, self.hessian.n, self.hessian.shape
        self.device, self.layout = self.hessian.device, self.hessian.layout
        self.point = {n: t.to(torch.float64) for n, t in self.hessian.target.items()}
        quotient.validate(self.point)
        self.gradient = self.hessian.gradient
        self._gradient = self.to_dict(self.gradient)
        self.kernel_dim = vertical_dimension(quotient, self.point)
        self.n_horizontal = self.n - self.kernel_dim
        self.vmap_failures: dict[str, str] = {}
        if self.n_horizontal <= 0:
            raise ValueError("the horizontal space is trivial: every direction is vertical")

    # --- flat <-> dict (the layout, in float64) ----------------------------------------------
    def to_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat float64 ``(n,)`` → float64 dict over ``param_names``."""
        return self.layout.unflatten(flat, torch.float64)

    def to_flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dict over ``param_names`` → flat float64 ``(n,)``."""
        return self.layout.flatten(tensors, torch.float64)

    # --- geometry on flat vectors ------------------------------------------------------------
    def project(self, v: torch.Tensor) -> torch.Tensor:
        """``Π v``."""
        return self.to_flat(self._project(self.to_dict(v)))

    def riemannian_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """``Π M⁻¹ g`` for a covector ``g``."""
        return self.to_flat(self._riemannian_gradient(self.to_dict(g)))

    def metric_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``M v = ∇_ζ g_w(v, ζ)`` (the metric is linear in ζ; one reverse pass)."""
        return self.to_flat(self._metric(self.to_dict(v)))

    def christoffel_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C v = ∇_v[½⟨∇L, Γ(v, v)⟩]``, ``C_ij = Σ_k ∇L_k Γ^k_ij``."""
        return self.to_flat(self._christoffel(self.to_dict(v)))

    # the same maps on float64 dicts, written with torch.func so that they vmap over columns
    def _project(self, xi: dict) -> dict:
        return self.quotient.horizontal_projection(self.point, xi)

    def _riemannian_gradient(self, g: dict) -> dict:
        return self.quotient.riemannian_gradient(self.point, g)

    def _whiten(self, zeta: dict) -> dict:
        return self.quotient.whiten(self.point, zeta)

    def _metric(self, v: dict) -> dict:
        """``M v`` = ∇_ζ g_w(v, ζ): ``torch.func.grad`` under a transform (vmap over columns),
        ``autograd.grad`` for a plain vector (less overhead per call)."""
        zeros = {n: torch.zeros_like(t) for n, t in self.point.items()}
        if _transformed(v):
            return grad(lambda zeta: self.quotient.inner(self.point, v, zeta))(zeros)
        zeta = {n: z.requires_grad_() for n, z in zeros.items()}
        with torch.enable_grad():
            value = self.quotient.inner(self.point, v, zeta)
            out = torch.autograd.grad(value, list(zeta.values()), materialize_grads=True)
        return dict(zip(zeta, out))

    def _christoffel(self, v: dict) -> dict:
        """``C v`` = ∇_v[½⟨∇L, Γ(v, v)⟩] (zero for a flat metric): ``torch.func.grad`` under a
        transform, ``autograd.grad`` for a plain vector."""
        def half_contracted(xi):
            gamma = self.quotient.christoffel(self.point, xi)
            return 0.5 * sum((self._gradient[n] * gamma[n]).sum() for n in self.param_names)

        if _transformed(v):
            return grad(half_contracted)(v)
        leaf = {n: t.detach().requires_grad_() for n, t in v.items()}
        with torch.enable_grad():
            value = half_contracted(leaf)
            if not value.requires_grad:  # flat metric: Γ = 0
                return {n: torch.zeros_like(t) for n, t in v.items()}
            out = torch.autograd.grad(value, list(leaf.values()), materialize_grads=True)
        return dict(zip(leaf, out))

    def map_columns(self, fn, V: torch.Tensor) -> torch.Tensor:
        """``(n, k)`` → ``(n, k)``: the dict map ``fn`` applied to every column of ``V``, batched
        with ``torch.func.vmap`` over the columns; column by column for a map whose geometry
        does not vmap (remembered per map, in ``vmap_failures``)."""
        if V.ndim != 2 or V.shape[0] != self.n:
            raise ValueError(f"{type(self).__name__}: expected columns of shape ({self.n}, k), got {tuple(V.shape)}")
        if V.shape[1] == 0:
            return torch.zeros_like(V, dtype=torch.float64)
        key = fn.__name__
        D = self.layout.unflatten_columns(V, torch.float64)
        if V.shape[1] > 1 and key not in self.vmap_failures:  # one column: a direct call
            try:
                return self.layout.flatten_columns(vmap(fn)(D), torch.float64)
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
                self.vmap_failures[key] = f"{type(error).__name__}: {error}"
        return torch.stack([self.to_flat(fn({n: t[j] for n, t in D.items()})) for j in range(V.shape[1])], 1)

    def metric_matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``M V`` column by column, vmapped (see :meth:`map_columns`)."""
        return self.map_columns(self._metric, V)

    # --- operator ----------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``Π M⁻¹ (H − C) Π V``: the HVPs of all columns share one graph per batch; the
        projection, Christoffel form and gradient conversion are vmapped over the columns."""
        U = self.map_columns(self._project, V)
        HU = self.hessian.matmat(U)
        return self.map_columns(self._riemannian_gradient, HU - self.map_columns(self._christoffel, U))

    def reuse_batch_products(self, max_batches: int | None = None):
        """Keep the Hessian's per-batch gradient graphs across products inside the block
        (:meth:`~quotientsharp.curvature.operators.ModelOperator.reuse_batch_products`)."""
        return self.hessian.reuse_batch_products(max_batches)

    def inner(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``uᵀ M v``; ``u`` is ``(n,)`` or ``(n, j)``, ``v`` is ``(n,)``."""
        return (u.mT if u.ndim == 2 else u) @ self.metric_matvec(v)

    # --- horizontal estimators ---------------------------------------------------------------
    probe_distribution = "horizontal_whitened_spherical"

    @property
    def effective_dimension(self) -> int:
        """``n_h``: the spectral estimators sum over the horizontal (quotient) eigenvalues."""
        return self.n_horizontal

    def describe(self) -> dict:
        return self._config()

    def sample_probes(self, count: int, seed: int = 0, distribution: str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, count)`` horizontal probes ``z = Π whiten(ζ)``, ``ζ ~ N(0, I)``, each scaled to
        ``‖z‖²_M = n_h`` (uniform on that sphere of the horizontal space in M-orthonormal
        coordinates), so that ``E[⟨z, f(A) z⟩_M] = Σ_{horizontal} f(λ)``. ``ζ`` is drawn from
        ``generator`` (default: a new one seeded by ``seed``); no other distribution exists."""
        if distribution not in (None, self.probe_distribution):
            raise ValueError(f"{type(self).__name__} samples its own probes ({self.probe_distribution}); "
                             f"distribution={distribution!r} cannot be used")
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        zeta = torch.randn(self.n, count, generator=generator, dtype=torch.float64).to(self.device)
        Z = self.map_columns(self._project, self.map_columns(self._whiten, zeta))
        return Z * (self.n_horizontal / (Z * self.metric_matmat(Z)).sum(0)).sqrt()

    def top_eigenvalues(self, k: int = 1, which: str = "LA", method: str = "lanczos", m: int | None = None,
                        tol: float | None = None, seed: int = 0, progress: bool = True) -> EigenResult:
        """``k`` extreme eigenpairs on the horizontal space: Lanczos from a horizontal start
        (``m ≤ n_h`` steps; default ``min(n_h, max(2k+20, 40))``), or power iteration."""
        if method == "lanczos":
            m = min(self.n_horizontal, m or max(2 * k + 20, 40))
            start = self.sample_probes(1, seed)[:, 0]
            result = lanczos(self, k, which, m, tol or 1e-4, seed, start, progress=progress)
        elif method == "power":
            result = power_iteration(self, k, tol or 1e-3, seed=seed, progress=progress)
        else:
            raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
        result.config.update(self._config())
        return result

    def hutchinson(self, n_probes: int = 100, seed: int = 0) -> Estimate:
        """``Tr A ≈ mean_p ⟨z_p, A z_p⟩_M`` over :meth:`sample_probes` (the trace over the
        horizontal space; variance that of spherical probes on the M-symmetric operator)."""
        Z = self.sample_probes(n_probes, seed)
        AZ = self.matmat(Z)
        samples = (Z * self.metric_matmat(AZ)).sum(0).cpu()
        estimate, stderr = mean_and_stderr(samples)
        return Estimate(estimate, stderr, samples, self._config(method="hutchinson", n_probes=n_probes, seed=seed))

    def slq(self, m: int = 15, n_probes: int = 100, seed: int = 0, progress: bool = True, **slq_kwargs) -> SLQResult:
        """SLQ over the horizontal space (``m ≤ n_h`` steps per probe); ``result.n = n_h``
        (:func:`~quotientsharp.curvature.slq.slq` with this operator's probes; ``slq_kwargs``:
        ``lockstep``, ``probe_block``)."""
        return slq(self, m, n_probes, seed=seed, progress=progress, **slq_kwargs)

    def _config(self, **extra) -> dict:
        return {"operator": "quotient_hessian", "quotient": repr(self.quotient), "n": self.n_horizontal,
                "n_total": self.n, "kernel_dim": self.kernel_dim, "probes": "horizontal_whitened_spherical",
                "params": self.param_names, **extra}


# --- model-level measures (mirror quotientsharp.curvature.measures) ---------------------------
def quotient_hessian_top_eigenvalues(
    model, loader, loss_fn, k: int = 1, which: str = "LA", method: str = "lanczos", m: int | None = None,
    tol: float | None = None, seed: int = 0, progress: bool = True, **operator_kwargs,
) -> EigenResult:
    """Top-k eigenpairs of the quotient Hessian (see :meth:`QuotientHessianOperator.top_eigenvalues`);
    ``operator_kwargs`` (``quotient``/``metric``/``rest``/``eps_rel``/``mode``/...) build the operator."""
    check_model_loader_loss("quotient_hessian_top_eigenvalues", model, loader, loss_fn)
    check_count("k", k, 1, "quotient_hessian_top_eigenvalues")
    op = QuotientHessianOperator(model, loader, loss_fn, **operator_kwargs)
    return op.top_eigenvalues(k, which, method, m, tol, seed, progress)


def quotient_hessian_trace(
    model, loader, loss_fn, method: str = "hutchinson", n_probes: int = 100, m: int = 15, seed: int = 0,
    progress: bool = True, **operator_kwargs,
) -> Estimate:
    """Trace over the horizontal space by metric ``"hutchinson"`` or ``"slq"`` (f = id)."""
    check_model_loader_loss("quotient_hessian_trace", model, loader, loss_fn)
    check_choice("method", method, ("hutchinson", "slq"), "quotient_hessian_trace")
    check_count("n_probes", n_probes, 1, "quotient_hessian_trace")
    check_count("m", m, 1, "quotient_hessian_trace")
    op = QuotientHessianOperator(model, loader, loss_fn, **operator_kwargs)
    if method == "hutchinson":
        return op.hutchinson(n_probes, seed)
    if method == "slq":
        return op.slq(m, n_probes, seed, progress).trace()
    raise ValueError(f"method must be 'hutchinson' or 'slq', got {method!r}")


def quotient_hessian_slq(
    model, loader, loss_fn, m: int = 15, n_probes: int = 100, seed: int = 0, progress: bool = True,
    lockstep: bool = True, **operator_kwargs,
) -> SLQResult:
    """One horizontal SLQ run of the quotient Hessian (``n = n_h``), for any spectral sum
    (``lockstep``: probes in lockstep, see :func:`~quotientsharp.curvature.slq.slq`)."""
    check_model_loader_loss("quotient_hessian_slq", model, loader, loss_fn)
    check_count("m", m, 1, "quotient_hessian_slq")
    check_count("n_probes", n_probes, 1, "quotient_hessian_slq")
    return QuotientHessianOperator(model, loader, loss_fn, **operator_kwargs).slq(m, n_probes, seed, progress,
                                                                                  lockstep=lockstep)


def quotient_hessian_spectral_density(
    model, loader, loss_fn, m: int = 100, n_probes: int = 3, n_grid: int = 10_000, **slq_kwargs,
) -> SpectralDensity:
    """Smoothed spectral density of the quotient Hessian on the horizontal space (spec §5)."""
    return quotient_hessian_slq(model, loader, loss_fn, m=m, n_probes=n_probes, **slq_kwargs).density(n_grid)


def quotient_renyi_sharpness(
    model, loader, loss_fn, alpha: float | str | Sequence[float | str] = 0.5, normalizer: str = "abs",
    m: int = 15, n_probes: int = 100, seed: int = 0, **slq_kwargs,
) -> RenyiResult | dict:
    """Rényi entropy/sharpness of the quotient Hessian's horizontal spectrum by SLQ (``n = n_h``);
    a sequence of α values shares one run and returns ``{alpha: RenyiResult}``."""
    result = quotient_hessian_slq(model, loader, loss_fn, m=m, n_probes=n_probes, seed=seed, **slq_kwargs)
    if isinstance(alpha, (str, int, float)):
        return renyi_entropy(result, alpha, normalizer)
    return {a: renyi_entropy(result, a, normalizer) for a in alpha}

"""Closed-form geometry of GL(h) blocks ``(G, H) -> (G A^{-1}, H A^T)`` (spec part 1 §4.1, §6.2-6.3).

Pure functions on batched blocks: ``G`` is ``(B, n, h)``, ``H`` is ``(B, m, h)``, tangent
components have the same shapes and Lie-algebra elements / group elements are ``(B, h, h)``.
``P = G^T G + eps_P I`` and ``Q = H^T H + eps_Q I`` (regularised everywhere, §4.3). Base-point
factors are computed once by :func:`gl_factors` in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("inv", "mix")


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _sym_fn(evals: torch.Tensor, evecs: torch.Tensor, power: float) -> torch.Tensor:
    """``V diag(evals^power) V^T`` for batched symmetric matrices."""
    return (evecs * evals.pow(power)[..., None, :]) @ _t(evecs)


@dataclass
class GLFactors:
    """Base-point quantities of a batch of GL blocks (all float64, shapes ``(B, h, h)``)."""

    P: torch.Tensor
    Q: torch.Tensor
    P_inv: torch.Tensor
    Q_inv: torch.Tensor
    P_half: torch.Tensor
    Q_half: torch.Tensor
    P_ihalf: torch.Tensor
    Q_ihalf: torch.Tensor
    # Sylvester factors of the inverse metric: A = P Q = U diag(lam) U^{-1}
    U: torch.Tensor | None = None
    U_inv: torch.Tensor | None = None
    lam_sum: torch.Tensor | None = None  # (B, h, h): lam_i + lam_j


def gram_eps(X: torch.Tensor, eps_rel: float, eps_abs: float) -> torch.Tensor:
    """Per-block relaxation ``eps_rel * tr(X^T X) / h + eps_abs``, shape ``(B,)``."""
    h = X.shape[-1]
    return eps_rel * X.pow(2).sum(dim=(-1, -2)) / h + eps_abs


class SingularHeadError(ValueError):
    """A GL block's Gram matrix ``P = G^T G + eps_P I`` or ``Q = H^T H + eps_Q I`` is singular in
    float64 (e.g. a dead head: ``W_Q, b_Q`` or ``W_V, b_V, W_O`` all zero), so the metric's inverse
    is infinite there. The message names the block and head and the relaxation that would help."""


#: ``lambda_min <= SINGULAR_RTOL * lambda_max`` counts as singular (float64 round-off of ``G^T G``)
SINGULAR_RTOL = 1e3 * torch.finfo(torch.float64).eps


def _check_gram(ev: torch.Tensor, side: str, labels: list[str] | None, eps_rel: float, eps_abs: float) -> None:
    """Raise :class:`SingularHeadError` for the first block whose Gram eigenvalues ``ev`` ``(B, h)``
    (ascending) are singular: ``lambda_max = 0`` or ``lambda_min <= SINGULAR_RTOL lambda_max``."""
    top = ev[:, -1]
    bad = (top <= 0) | (ev[:, 0] <= SINGULAR_RTOL * top)
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    where = labels[i] if labels is not None else f"block {i}"
    typical = float(top[~bad].median()) if bool((~bad).any()) else 1.0
    suggestion = f"{1e-6 * typical:.1e}"
    if float(top[i]) <= 0:
        what, fix = ("all zero (a dead head; a relative relaxation eps_rel * tr/h is 0 there too)",
                     "Pass an absolute relaxation")
    else:
        what = f"numerically singular (condition number {float(top[i] / ev[i, 0].clamp_min(1e-300)):.2e})"
        fix = "Pass eps_rel > 0 or an absolute relaxation"
    raise SingularHeadError(
        f"singular Gram matrix of {side} in {where}: the block is {what} [eps_rel={eps_rel:g}, "
        f"eps={eps_abs:g}], so the GL metric's inverse is infinite. {fix}, e.g. eps={suggestion} "
        "(1e-6 x the typical Gram eigenvalue of the other heads; invariance then holds only up to "
        "O(eps)), to find_symmetries / geodesic_sharpness, or leave this layer's blocks out of the "
        "quotient with find_symmetries(model, blocks=[...]) (its weights then get the rest metric)"
    )


def gl_factors(G: torch.Tensor, H: torch.Tensor, metric: str, eps_rel: float = 0.0,
               eps_abs: float = 0.0, labels: list[str] | None = None,
               for_projection: bool = True) -> GLFactors:
    """Cache P, Q, their inverses and square roots (and, if ``for_projection``, the Sylvester
    eigenbasis of the inverse metric).

    Raises :class:`SingularHeadError` naming the block when a Gram matrix is singular or
    numerically singular in float64 after the relaxation (always for an all-zero block unless
    ``eps_abs > 0``)."""
    G, H = G.double(), H.double()
    h = G.shape[-1]
    eye = torch.eye(h, dtype=torch.float64, device=G.device)
    eps_p, eps_q = gram_eps(G, eps_rel, eps_abs), gram_eps(H, eps_rel, eps_abs)
    P = _t(G) @ G + eps_p[:, None, None] * eye
    Q = _t(H) @ H + eps_q[:, None, None] * eye
    p, Vp = torch.linalg.eigh(P)
    q, Vq = torch.linalg.eigh(Q)
    _check_gram(p, "G (W_Q / W_V side)", labels, eps_rel, eps_abs)
    _check_gram(q, "H (W_K / W_O side)", labels, eps_rel, eps_abs)
    f = GLFactors(
        P=P, Q=Q,
        P_inv=_sym_fn(p, Vp, -1.0), Q_inv=_sym_fn(q, Vq, -1.0),
        P_half=_sym_fn(p, Vp, 0.5), Q_half=_sym_fn(q, Vq, 0.5),
        P_ihalf=_sym_fn(p, Vp, -0.5), Q_ihalf=_sym_fn(q, Vq, -0.5),
    )
    if metric == "inv" and for_projection:
        S = f.P_half @ Q @ f.P_half
        lam, V = torch.linalg.eigh(0.5 * (S + _t(S)))
        f.U, f.U_inv = f.P_half @ V, _t(V) @ f.P_ihalf
        f.lam_sum = lam[..., :, None] + lam[..., None, :]
    return f


def gl_inner(metric: str, f: GLFactors, xG, xH, zG, zH) -> torch.Tensor:
    """Per-block metric, shape ``(B,)``.
    inv: ``tr(P^{-1} xG^T zG) + tr(Q^{-1} xH^T zH)``; mix: ``tr(Q xG^T zG) + tr(P xH^T zH)``."""
    a, b = (f.P_inv, f.Q_inv) if metric == "inv" else (f.Q, f.P)
    return ((xG.double() @ a) * zG.double()).sum((-1, -2)) + ((xH.double() @ b) * zH.double()).sum((-1, -2))


def gl_vertical(G, H, omega):
    """``nu(Omega) = (-G Omega, H Omega^T)``."""
    return -G @ omega.to(G.dtype), H @ _t(omega).to(H.dtype)


def gl_action(G, H, A):
    """``(G A^{-1}, H A^T)``."""
    A = A.to(G.dtype)
    G2 = _t(torch.linalg.solve(_t(A), _t(G)))  # G A^{-1} = (A^{-T} G^T)^T
    return G2, H @ _t(A)


def gl_pushforward(A, xG, xH):
    """Tangent map of the action: ``(xG A^{-1}, xH A^T)`` (linear action, same as the action)."""
    return gl_action(xG, xH, A)


def gl_project(metric: str, f: GLFactors, G, H, xG, xH):
    """Horizontal projection ``(xG + G Lam, xH - H Lam^T)``.

    mix: ``Lam = 1/2 (xH^T H Q^{-1} - P^{-1} G^T xG)`` (closed form);
    inv: ``Lam = X^T`` with ``A X + X A = B``, ``A = P Q``, ``B = P H^T xH - xG^T G Q``, solved
    by the cached eigenbasis ``X = U [(U^{-1} B U) / (lam_i + lam_j)] U^{-1}`` (spec §4.1)."""
    dt = xG.dtype
    G, H, xG, xH = G.double(), H.double(), xG.double(), xH.double()
    if metric == "mix":
        lam = 0.5 * (_t(xH) @ H @ f.Q_inv - f.P_inv @ _t(G) @ xG)
    else:
        B = f.P @ _t(H) @ xH - _t(xG) @ G @ f.Q
        X = f.U @ ((f.U_inv @ B @ f.U) / f.lam_sum) @ f.U_inv
        lam = _t(X)
    return (xG + G @ lam).to(dt), (xH - H @ _t(lam)).to(dt)


def gl_rgrad(metric: str, f: GLFactors, dG, dH):
    """Riemannian gradient: inv ``(dG P, dH Q)``; mix ``(dG Q^{-1}, dH P^{-1})``."""
    a, b = (f.P, f.Q) if metric == "inv" else (f.Q_inv, f.P_inv)
    return (dG.double() @ a).to(dG.dtype), (dH.double() @ b).to(dH.dtype)


def gl_christoffel(metric: str, f: GLFactors, G, H, xG, xH):
    """``Gamma_w(xi, xi)`` (Eqs. 11 / 12 of the paper, checked forms of spec §6.2-6.3).

    - inv: ``Gamma_G = -xG P^{-1}(xG^T G + G^T xG) + G P^{-1} xG^T xG`` (H alike with Q);
    - mix: ``Gamma_G = xG (xH^T H + H^T xH) Q^{-1} - G (xH^T xH) Q^{-1}``,
      ``Gamma_H = xH (xG^T G + G^T xG) P^{-1} - H (xG^T xG) P^{-1}``.

    Shapes: ``G, xG`` ``(B, n, h)``, ``H, xH`` ``(B, m, h)``; returns ``(Gamma_G, Gamma_H)`` of
    the same shapes and dtypes (computed in float64)."""
    dt = xG.dtype
    G, H, xG, xH = G.double(), H.double(), xG.double(), xH.double()
    sG = _t(xG) @ G
    sH = _t(xH) @ H
    if metric == "inv":
        gG = -xG @ f.P_inv @ (sG + _t(sG)) + G @ f.P_inv @ (_t(xG) @ xG)
        gH = -xH @ f.Q_inv @ (sH + _t(sH)) + H @ f.Q_inv @ (_t(xH) @ xH)
    else:
        gG = (xG @ (sH + _t(sH)) - G @ (_t(xH) @ xH)) @ f.Q_inv
        gH = (xH @ (sG + _t(sG)) - H @ (_t(xG) @ xG)) @ f.P_inv
    return gG.to(dt), gH.to(dt)


def gl_christoffel_vjp(metric: str, f: GLFactors, G, H, xG, xH, cG, cH):
    """``(D_xi Gamma_w(xi, xi))^T c``: the gradient of ``<cG, Gamma_G> + <cH, Gamma_H>`` w.r.t. ``(xG, xH)``.

    With ``sym(X) = X + X^T``:

    - inv: ``dG = -cG sym(xG^T G) P^{-1} - G sym(P^{-1} xG^T cG) + xG sym(P^{-1} G^T cG)`` (H alike, Q);
    - mix: with ``aG = cG Q^{-1}``, ``aH = cH P^{-1}``,
      ``dG = aG sym(xH^T H) + G sym(xH^T aH) - xG sym(H^T aH)``,
      ``dH = aH sym(xG^T G) + H sym(xG^T aG) - xH sym(G^T aG)``."""
    dt = xG.dtype
    G, H, xG, xH, cG, cH = (t.double() for t in (G, H, xG, xH, cG, cH))

    def sym(X):
        return X + _t(X)

    if metric == "inv":
        def part(X, xX, cX, inv):
            return (-cX @ sym(_t(xX) @ X) @ inv - X @ sym(inv @ _t(xX) @ cX) + xX @ sym(inv @ _t(X) @ cX))
        dG, dH = part(G, xG, cG, f.P_inv), part(H, xH, cH, f.Q_inv)
    else:
        aG, aH = cG @ f.Q_inv, cH @ f.P_inv
        dG = aG @ sym(_t(xH) @ H) + G @ sym(_t(xH) @ aH) - xG @ sym(_t(H) @ aH)
        dH = aH @ sym(_t(xG) @ G) + H @ sym(_t(xG) @ aG) - xH @ sym(_t(G) @ aG)
    return dG.to(dt), dH.to(dt)


def gl_whiten(metric: str, f: GLFactors, zG, zH):
    """Covariance ``g^{-1}`` samples: inv ``(zG P^{1/2}, zH Q^{1/2})``; mix ``(zG Q^{-1/2}, zH P^{-1/2})``."""
    a, b = (f.P_half, f.Q_half) if metric == "inv" else (f.Q_ihalf, f.P_ihalf)
    return (zG.double() @ a).to(zG.dtype), (zH.double() @ b).to(zH.dtype)

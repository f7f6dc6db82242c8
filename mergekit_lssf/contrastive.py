"""The contrastive closed form (beyond the paper; the data-aware repair), in torch.

For a linear weight ``W`` (``d_out x d_in``) with input Grams ``C_H`` (harmful
prompts with the aligned model's refusals) and ``C_T`` (the fine-tune's task rows),
both ``d_in x d_in`` and trace-normalised, the minimiser of

    ||(W - W_aligned) X_H||^2 + lam (||(W - W_ft) X_T||^2 + eps ||W - W_ft||^2)

is ``W' = W_ft + (W_aligned - W_ft) C_H (C_H + lam B)^-1`` with ``B = C_T + eps I``
(RegMean's closed form between the two roles). With the generalized eigenvectors
``V`` of ``(C_H, B)`` (``V^T B V = I``, ``V^T C_H V = diag(mu)``, ``mu`` descending),
``C_H (C_H + lam B)^-1 = (B V) diag(mu / (mu + lam)) V^T``: the leading ``k``
eigenvectors give a low-rank, input-side restore whose weights come from ``mu``.
``lam`` -> infinity keeps the fine-tune; ``lam`` -> 0 rolls back every direction the
harmful prompts use. ``V`` and ``mu`` do not depend on ``lam``: one calibration
serves every ``lam``.

Everything is float64 (the entries of ``V`` grow like ``eps ** -0.5`` along the
directions neither set uses). No mergekit import.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class ContrastiveBasis:
    """The generalized eigenpairs of ``(C_H, C_T + eps I)`` for one input site.

    v: ``(d_in, k)``, the leading ``k`` generalized eigenvectors (``V_k^T B V_k = I``).
    bv: ``(d_in, k)``, ``B V_k``. mu: ``(k,)`` eigenvalues, descending, >= 0.
    eps: the ridge added to the trace-normalised task Gram.
    spectrum: ``(d_in,)`` every eigenvalue, descending (``mu`` is its head), which the
    entropy rule over ``mu`` and the truncation share read; None when unknown (a
    ``/1`` file that stored only the leading ``k``).
    """

    v: torch.Tensor
    bv: torch.Tensor
    mu: torch.Tensor
    eps: float
    spectrum: Optional[torch.Tensor] = None
    #: ``restore_factors`` per ``(k, lam)``: every weight that reads this site shares them
    _factors: Dict[Tuple[int, float], Tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @property
    def rank(self) -> int:
        return int(self.mu.numel())

    def restore_factors(self, k: int, lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(G, Q^T)`` with ``G Q^T = (B V_k) diag(mu_k / (mu_k + lam)) V_k^T``, float64.

        ``V_k = Q R`` (QR; ``Q`` ``(d_in, k)`` orthonormal, so a 16-bit rounding can keep
        the term's input subspace and a float32 product of the factors stays well
        conditioned although ``V``'s entries grow like ``eps ** -0.5``) and
        ``G = B V_k diag(w) R^T`` ``(d_in, k)``. They depend on the site, ``k`` and
        ``lam`` only: computed once and shared by every weight that reads the site
        (q/k/v, gate/up), so a weight's term costs one product ``(W_al - W_ft) G``.
        """
        key = (int(k), float(lam))
        with self._lock:
            if key not in self._factors:
                v = self.v[:, :k].to(torch.float64)
                q, r = torch.linalg.qr(v)
                weights = restore_weights(self.mu[:k], lam).to(v.device)
                g = (self.bv[:, :k].to(torch.float64) * weights) @ r.T
                self._factors[key] = (g, q.T)
            return self._factors[key]

    def leading(self, k: int) -> "ContrastiveBasis":
        """The first ``k`` pairs (a truncation of the restore); the spectrum is kept whole."""
        return ContrastiveBasis(self.v[:, :k], self.bv[:, :k], self.mu[:k], self.eps, self.spectrum)


def dropped_share(spectrum: torch.Tensor, k: int) -> float:
    """The share of ``sum(mu)`` that the eigenvalues after the leading ``k`` carry
    (float64; 0.0 for an all-zero spectrum): what keeping ``k`` vectors leaves out."""
    mu = spectrum.to(torch.float64).clamp(min=0)
    total = float(mu.sum())
    return float(mu[k:].sum()) / total if total > 0 else 0.0


def trace_normalised(gram: torch.Tensor) -> torch.Tensor:
    """``gram / tr(gram)`` in float64 (a zero Gram is refused: no rows reached it)."""
    gram = gram.to(torch.float64)
    trace = torch.trace(gram)
    if not trace > 0:
        raise ValueError("a Gram matrix with zero trace: no activation reached this input site")
    return gram / trace


def identity_gram(width: int, device=None) -> torch.Tensor:
    """``I / width`` in float64, ``(width, width)``: the trace-normalised Gram of inputs
    that use every direction equally, the ``C_H = I`` control of the contrastive repair
    ("roll back every direction the task does not use")."""
    return torch.eye(width, dtype=torch.float64, device=device) / width


def contrastive_basis(c_h: torch.Tensor, c_t: torch.Tensor, *, eps: float = 1e-6,
                      k: Optional[int] = None) -> ContrastiveBasis:
    """Generalized eigenpairs of ``(C_H, B)``, ``B = C_T + eps I``, leading ``k`` kept.

    ``c_h``, ``c_t``: ``(d_in, d_in)`` symmetric PSD, already trace-normalised (``eps``
    is relative to a unit trace). Solved through the Cholesky factor ``B = L L^T``:
    ``M = L^-1 C_H L^-T = Y diag(mu) Y^T`` and ``V = L^-T Y``. ``k``: None keeps all
    vectors; the ``spectrum`` (every ``mu``) is kept whatever ``k``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    c_h = c_h.to(torch.float64)
    c_t = c_t.to(torch.float64)
    d = c_h.shape[0]
    if c_h.shape != (d, d) or c_t.shape != (d, d):
        raise ValueError(f"Grams must be square and equal in shape, got {tuple(c_h.shape)} and {tuple(c_t.shape)}")
    b = 0.5 * (c_t + c_t.T) + eps * torch.eye(d, dtype=torch.float64, device=c_t.device)
    low = torch.linalg.cholesky(b)
    half = torch.linalg.solve_triangular(low, 0.5 * (c_h + c_h.T), upper=False)  # L^-1 C_H
    m = torch.linalg.solve_triangular(low, half.T, upper=False)  # L^-1 C_H L^-T (C_H symmetric)
    mu, y = torch.linalg.eigh(0.5 * (m + m.T))
    mu, y = mu.flip(0).clamp(min=0), y.flip(1)
    v = torch.linalg.solve_triangular(low.T, y, upper=True)  # L^-T Y
    keep = d if k is None else max(0, min(int(k), d))
    v = v[:, :keep]
    return ContrastiveBasis(v=v, bv=b @ v, mu=mu[:keep], eps=float(eps), spectrum=mu)


def restore_weights(mu: torch.Tensor, lam: float) -> torch.Tensor:
    """``mu / (mu + lam)``, the share of each direction rolled back (float64)."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    mu = mu.to(torch.float64)
    return mu / (mu + lam)


def contrastive_factors(w_ft: torch.Tensor, w_aligned: torch.Tensor, basis: ContrastiveBasis,
                        lam: float) -> tuple:
    """``(left, right)`` with ``left @ right = (W_al - W_ft) (B V_k) diag(mu/(mu+lam)) V_k^T``.

    left: ``(d_out, k)``, right: ``(k, d_in)``, float64 on the weights' device."""
    device = w_ft.device
    weights = restore_weights(basis.mu.to(device), lam)
    diff = w_aligned.to(torch.float64) - w_ft.to(torch.float64)
    left = diff @ (basis.bv.to(device, torch.float64) * weights)
    return left, basis.v.to(device, torch.float64).T


def contrastive_fuse(w_ft: torch.Tensor, w_aligned: torch.Tensor, basis: ContrastiveBasis, *,
                     lam: float, alpha: float = 1.0) -> torch.Tensor:
    """``W_ft + alpha (W_al - W_ft) (B V_k) diag(mu/(mu+lam)) V_k^T`` in float64."""
    left, right = contrastive_factors(w_ft, w_aligned, basis, lam)
    return w_ft.to(torch.float64) + alpha * (left @ right)

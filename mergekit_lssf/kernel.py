"""The LSSF math, in torch (no mergekit import).

Conventions (equation numbers follow the paper, see README):

* A linear weight ``W`` has shape ``(d_out, d_in)``, as ``torch.nn.Linear`` stores it.
* ``delta = W_aligned - W_unaligned`` (Eq. 1), same shape.
* Singular values are returned as float64, descending, in the weight's units.
* The fused weight is ``W_ft + alpha * P' delta`` with ``P' = U' U'^T`` and
  ``U' = U_r diag(a_i)`` (Eq. 8-13).

Everything here runs on the device of the input tensors (CPU or CUDA) and never in
less than float32, whatever the dtype of the stored weights. On the CPU the spectrum
goes through ``leading_eigh`` (LAPACK via SciPy), which computes only the eigenvectors
the rank needs; torch has no partial eigensolver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Tuple

import torch

Side = Literal["output", "input"]

#: Singular values closer than this, relative to sigma_1, count as tied (Eq. 10).
TIE_RTOL = 1e-6

#: Smallest Gram matrix that goes to ``leading_eigh`` on the CPU; smaller ones go to
#: ``torch.linalg.eigh``, whose time is negligible there.
LEADING_EIGH_MIN_SIZE = 32


@dataclass(frozen=True)
class SafetySubspace:
    """Spectrum and orthonormal basis of one weight's safety subspace.

    sigma: ``(n,)`` float64, every singular value, descending and >= 0. The entropy
        rank (Eq. 5-7) is computed over all of them, so none may be left out.
    basis: ``(d, k)`` orthonormal columns; column ``i`` belongs to ``sigma[i]``.
        ``k`` bounds the usable rank.
    side: ``"output"``: the columns are left singular vectors (``d = d_out``) and the
        fused term is ``B diag(a^2) B^T delta``. ``"input"``: right singular vectors
        (``d = d_in``) and the term is ``delta B diag(a^2) B^T``. For a data-free
        subspace both give the same matrix, the rank-r truncated SVD of ``delta``
        reweighted by ``a^2``; the fast path picks the side with the smaller Gram.
    """

    sigma: torch.Tensor
    basis: torch.Tensor
    side: Side = "output"


@dataclass(frozen=True)
class RankChoice:
    """The rank used for one weight and how much of the spectrum it keeps.

    rank: ``r`` (0 only when the spectrum is all zero).
    entropy_rank: the entropy rule's rank before ``max_rank`` (None with a fixed rank).
    capped: True when ``max_rank`` (or the basis size) lowered the rank.
    entropy_share: ``H_r / H_n`` (1.0 when ``H_n == 0`` and ``r >= 1``).
    energy_share: ``sum_{i<=r} sigma_i^2 / sum_i sigma_i^2``.
    entropy_total: ``H_n`` in nats.
    """

    rank: int
    entropy_rank: Optional[int]
    capped: bool
    entropy_share: float
    energy_share: float
    entropy_total: float


@dataclass(frozen=True)
class FusionInfo:
    """What ``lssf_fuse`` did to one weight; ``spectral_seconds`` is wall time."""

    choice: RankChoice
    sigma_1: float
    spectral_seconds: float

    @property
    def rank(self) -> int:
        return self.choice.rank


def data_free_subspace(
    delta: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float64,
    vectors: Optional[Callable[[torch.Tensor], int]] = None,
) -> SafetySubspace:
    """SVD of ``delta`` via the Gram matrix of its smaller side.

    ``delta``: ``(d_out, d_in)``. The Gram matrix is ``n = min(d_out, d_in)`` square and
    computed in ``compute_dtype`` (float64 by default: the entropy needs the small
    singular values too, and squaring them in float32 loses the tail). Eigenvalues
    below ``n * eps * lambda_max`` are round-off of a rank-deficient ``delta`` and are
    set to zero. ``vectors(sigma)``, given all ``n`` singular values, says how many
    basis vectors to return (default: all); on the CPU in float64 only those are
    computed (``leading_eigh``), elsewhere ``torch.linalg.eigh`` computes all ``n`` and
    the rest are dropped.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    d = delta.to(compute_dtype).contiguous()
    rows, cols = d.shape
    side: Side = "output" if rows <= cols else "input"
    size = min(rows, cols)
    if d.device.type == "cpu" and compute_dtype == torch.float64 and size >= LEADING_EIGH_MIN_SIZE:
        from mergekit_lssf.leading_eigh import LeadingEigh, gram_lower

        eig = LeadingEigh(gram_lower(d, side))
        del d
        sigma = _singular_values(eig.values, compute_dtype)
        basis = eig.vectors(size if vectors is None else vectors(sigma))
        return SafetySubspace(sigma=sigma, basis=basis, side=side)
    gram = d @ d.T if side == "output" else d.T @ d
    del d
    evals, evecs = torch.linalg.eigh(gram)
    del gram
    sigma = _singular_values(evals.flip(0), compute_dtype)
    basis = evecs.flip(1)
    if vectors is not None:
        basis = basis[:, : vectors(sigma)]
    return SafetySubspace(sigma=sigma, basis=basis, side=side)


def _singular_values(evals: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """``sqrt`` of descending Gram eigenvalues, round-off ones set to zero (float64)."""
    evals = evals.to(torch.float64)
    tol = evals[0].clamp(min=0) * evals.numel() * torch.finfo(compute_dtype).eps
    return torch.where(evals > tol, evals, torch.zeros_like(evals)).sqrt()


def spectral_entropy(sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cumulative entropy ``H_rho`` (Eq. 5-6) and the probabilities ``p_i``.

    ``sigma``: ``(n,)`` descending singular values. Returns ``(H, p)``, both ``(n,)``
    float64, with ``H[rho - 1] = -sum_{i<=rho} p_i log p_i`` and ``0 log 0 = 0``.
    """
    s2 = sigma.to(torch.float64).square()
    total = s2.sum()
    if total <= 0:
        zeros = torch.zeros_like(s2)
        return zeros, zeros
    p = s2 / total
    terms = torch.where(p > 0, -p * torch.log(p.clamp(min=1e-300)), torch.zeros_like(p))
    return torch.cumsum(terms, 0), p


def select_rank(
    sigma: torch.Tensor,
    *,
    eta: float,
    max_rank: Optional[int] = None,
    rank: Optional[int] = None,
) -> RankChoice:
    """The safety-critical rank ``r`` (Eq. 7).

    Entropy rule: the smallest ``rho`` with ``H_rho / H_n >= eta``, capped by
    ``max_rank``, at least 1 when any singular value is nonzero. A fixed ``rank``
    replaces the rule (and ``max_rank``), limited to the number of nonzero values.
    """
    if not 0 < eta <= 1:
        raise ValueError(f"eta must satisfy 0 < eta <= 1, got {eta}")
    cum, p = spectral_entropy(sigma)
    nonzero = int((p > 0).sum())
    entropy_total = float(cum[-1]) if cum.numel() else 0.0
    if nonzero == 0:
        return RankChoice(0, None if rank else 0, False, 0.0, 0.0, 0.0)

    if rank is not None:
        entropy_rank = None
        r = min(int(rank), nonzero)
        capped = False
    else:
        if entropy_total <= 0:
            entropy_rank = 1
        else:
            reached = torch.nonzero(cum >= eta * entropy_total)
            entropy_rank = int(reached[0]) + 1
        entropy_rank = max(entropy_rank, 1)
        r = entropy_rank
        capped = max_rank is not None and r > max_rank
        if capped:
            r = int(max_rank)

    return _choice(r, entropy_rank, capped, cum, p)


def rank_rule(
    *, eta: float, max_rank: Optional[int] = None, rank: Optional[int] = None
) -> Callable[[torch.Tensor], int]:
    """``sigma -> r`` by ``select_rank``: how many basis vectors a weight needs."""

    def rank_of(sigma: torch.Tensor) -> int:
        return select_rank(sigma, eta=eta, max_rank=max_rank, rank=rank).rank

    return rank_of


def _choice(r, entropy_rank, capped, cum, p) -> RankChoice:
    """A RankChoice for rank ``r`` from the cumulative entropy and probabilities."""
    total = float(cum[-1])
    share = float(cum[r - 1] / total) if total > 0 else 1.0
    return RankChoice(r, entropy_rank, capped, share, float(p[:r].sum()), total)


def projection_weights(sigma_r: torch.Tensor, weight_max: float) -> torch.Tensor:
    """Per-direction weights ``a_i`` of the weighted projection (Eq. 10-11).

    ``a_i = 1 + (weight_max - 1)(sigma_i - sigma_r) / (sigma_1 - sigma_r)`` for the
    ``r`` retained values ``sigma_r`` (descending); all ones when ``weight_max == 1``,
    ``r == 1`` or ``sigma_1 == sigma_r``. "Equal" means within ``TIE_RTOL * sigma_1``:
    a gap of round-off size would make every ``a_i`` round-off noise.
    Returns ``(r,)`` float64.
    """
    if weight_max < 1:
        raise ValueError(f"weight_max must be >= 1, got {weight_max}")
    s = sigma_r.to(torch.float64)
    ones = torch.ones_like(s)
    if weight_max == 1 or s.numel() <= 1 or s[0] - s[-1] <= TIE_RTOL * s[0]:
        return ones
    return ones + (weight_max - 1) * (s - s[-1]) / (s[0] - s[-1])


@dataclass(frozen=True)
class SafetyFactors:
    """The weighted projection ``P' delta`` of one weight as an exact product.

    left: ``(d_out, r)``; right: ``(r, d_in)``; ``P' delta = left @ right``. For an
    output-side basis ``left = U_r diag(a)`` and ``right = diag(a) U_r^T delta``; for an
    input-side basis ``left = delta V_r diag(a)`` and ``right = diag(a) V_r^T``.
    Both are None when the rank is 0. sigma: the full spectrum (float64).
    """

    left: Optional[torch.Tensor]
    right: Optional[torch.Tensor]
    info: FusionInfo
    sigma: torch.Tensor


def safety_factors(
    w_aligned: torch.Tensor,
    w_unaligned: torch.Tensor,
    *,
    eta: float,
    max_rank: Optional[int] = None,
    weight_max: float = 1.0,
    rank: Optional[int] = None,
    subspace: Optional[SafetySubspace] = None,
    work_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> SafetyFactors:
    """Spectrum, entropy rank and factors of ``P' (W_aligned - W_unaligned)``.

    Weights are ``(d_out, d_in)``; factors come in ``work_dtype`` (at least float32)
    on the weights' device. ``subspace`` is a calibrated basis for this weight;
    without it the data-free subspace (SVD of delta) is used.
    """
    work = torch.promote_types(work_dtype, torch.float32)
    delta = w_aligned.to(work) - w_unaligned.to(work)
    started = time.perf_counter()
    if subspace is None:
        subspace = data_free_subspace(
            delta, compute_dtype=compute_dtype, vectors=rank_rule(eta=eta, max_rank=max_rank, rank=rank)
        )
    choice = select_rank(subspace.sigma, eta=eta, max_rank=max_rank, rank=rank)
    available = subspace.basis.shape[1]
    if choice.rank > available:  # a calibrated basis may hold fewer vectors
        choice = _choice(available, choice.entropy_rank, True, *spectral_entropy(subspace.sigma))
    sigma_1 = float(subspace.sigma[0]) if subspace.sigma.numel() else 0.0
    left = right = None
    if choice.rank > 0:
        weights = projection_weights(subspace.sigma[: choice.rank], weight_max).to(work)
        basis = subspace.basis[:, : choice.rank].to(work) * weights
        if subspace.side == "output":
            left, right = basis, basis.T @ delta
        else:
            left, right = delta @ basis, basis.T
        if delta.device.type == "cuda":
            torch.cuda.synchronize(delta.device)
    info = FusionInfo(choice, sigma_1, time.perf_counter() - started)
    return SafetyFactors(left, right, info, subspace.sigma)


def balanced_factors(
    left: torch.Tensor, right: torch.Tensor, alpha: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``B (d_out, r)``, ``A (r, d_in)`` with ``B @ A = alpha * left @ right``.

    Each rank-one pair is rescaled so that ``||B[:, i]|| = ||A[i, :]||`` (balanced);
    the sign of ``alpha`` goes into ``A``. No refitting: the product is exact.
    """
    nl = left.norm(dim=0)
    nr = right.norm(dim=1)
    t = (abs(alpha) * nl * nr).sqrt()
    scale_l = torch.where(nl > 0, t / nl.clamp(min=1e-30), torch.zeros_like(t))
    scale_r = torch.where(nr > 0, t / nr.clamp(min=1e-30), torch.zeros_like(t))
    sign = -1.0 if alpha < 0 else 1.0
    return left * scale_l, right * (sign * scale_r)[:, None]


def lssf_fuse(
    w_ft: torch.Tensor,
    w_aligned: torch.Tensor,
    w_unaligned: torch.Tensor,
    *,
    alpha: float,
    eta: float,
    max_rank: Optional[int] = None,
    weight_max: float = 1.0,
    rank: Optional[int] = None,
    subspace: Optional[SafetySubspace] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, FusionInfo]:
    """Fuse one 2-D weight: ``W_ft + alpha * P' (W_aligned - W_unaligned)`` (Eq. 13).

    All three weights are ``(d_out, d_in)`` on one device. The result has ``w_ft``'s
    dtype; a zero ``delta`` returns ``w_ft`` itself. See ``safety_factors``.
    """
    factors = safety_factors(
        w_aligned, w_unaligned, eta=eta, max_rank=max_rank, weight_max=weight_max,
        rank=rank, subspace=subspace, work_dtype=w_ft.dtype, compute_dtype=compute_dtype,
    )
    return apply_factors(w_ft, factors, alpha), factors.info


def apply_factors(w_ft: torch.Tensor, factors: SafetyFactors, alpha: float) -> torch.Tensor:
    """``W_ft + alpha * left @ right`` in ``w_ft``'s dtype (Eq. 13); ``w_ft`` at rank 0.

    ``w_ft``: ``(d_out, d_in)``; the sum is formed in ``promote(w_ft.dtype, float32)``,
    the dtype of factors made by ``safety_factors(..., work_dtype=w_ft.dtype)``.
    """
    if factors.left is None:
        return w_ft
    work = torch.promote_types(w_ft.dtype, torch.float32)
    fused = torch.addmm(w_ft.to(work), factors.left.to(work), factors.right.to(work), alpha=alpha)
    return fused.to(w_ft.dtype)


def calibrated_subspace(
    weight: torch.Tensor,
    *,
    input_gram: Optional[torch.Tensor] = None,
    output_gram: Optional[torch.Tensor] = None,
    max_rank: int = 256,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``U`` and singular values of ``Z = W X_hat`` from accumulated statistics (Eq. 4).

    ``weight``: ``(d_out, d_in)`` = ``W_safe``. Exactly one statistic:
    ``input_gram`` ``(d_in, d_in)`` = ``C = sum_t x_hat_t x_hat_t^T``, or
    ``output_gram`` ``(d_out, d_out)`` = ``Z Z^T``. Returns ``U`` ``(d_out, k)``
    float32 with orthonormal columns, ``k = min(max_rank, rank Z)``, and ``S``
    ``(rank Z,)`` float64: every nonzero singular value of ``Z``, descending.
    """
    if (input_gram is None) == (output_gram is None):
        raise ValueError("pass exactly one of input_gram and output_gram")
    if output_gram is not None:
        evals, evecs = torch.linalg.eigh(output_gram.to(torch.float64))
        sigma = _singular_values(evals.flip(0), torch.float64)
        keep = int((sigma > 0).sum())
        return evecs.flip(1)[:, : min(max_rank, keep)].to(torch.float32), sigma[:keep]
    # Z Z^T = W C W^T = (W L)(W L)^T with C = L L^T, L = Q diag(sqrt(lambda)).
    evals, q = torch.linalg.eigh(input_gram.to(torch.float64))
    m = weight.to(torch.float64) @ (q * evals.clamp(min=0).sqrt())
    sub = data_free_subspace(m, vectors=lambda s: min(max_rank, int((s > 0).sum())))
    k = sub.basis.shape[1]
    if sub.side == "output":
        u = sub.basis
    else:  # right singular vectors V of M: U = M V / sigma
        u = (m @ sub.basis) / sub.sigma[:k]
    return u.to(torch.float32), sub.sigma[sub.sigma > 0]

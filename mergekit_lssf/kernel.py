"""The LSSF math, in torch (no mergekit import).

Conventions (equation numbers follow the paper, see README):

* A linear weight ``W`` has shape ``(d_out, d_in)``, as ``torch.nn.Linear`` stores it.
* ``delta = W_aligned - W_unaligned`` (Eq. 1), same shape.
* Singular values are returned as float64, descending, in the weight's units.
* The fused weight is ``W_ft + alpha * P' delta`` with ``P' = U' U'^T`` and
  ``U' = U_r diag(a_i)`` (Eq. 8-13): ``fusion="add"``, the paper's. Beyond the paper,
  ``fusion="restore"`` gives ``W_ft + alpha * P' (W_aligned - W_ft)`` with the
  output-side ``U'``: the fine-tune pulled back to the aligned weights inside the
  safety subspace only.
* The rank ``r``: the paper's entropy rule (Eq. 5-7, ``rank_rule="entropy"``) or,
  beyond the paper, the Gavish-Donoho hard threshold (``rank_rule="noise_floor"``).
  On 16-bit inputs the rounding edge (``precision.py``) is reported, and beyond the
  paper ``spectrum="signal"`` applies Eq. 5-7 to the singular values above it only.
* The written weight: in a 16-bit output, ``rounding="subspace"`` (default) keeps the
  term's component inside its subspace through the cast (``precision.subspace_round``);
  ``"nearest"`` is the plain cast.

Everything here runs on the device of the input tensors (CPU or CUDA) and never in
less than float32, whatever the dtype of the stored weights. On the CPU the spectrum
goes through ``leading_eigh`` (LAPACK via SciPy), which computes only the eigenvectors
the rank needs; torch has no partial eigensolver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from mergekit_lssf.contrastive import ContrastiveBasis
from mergekit_lssf.leading_eigh import LeadingEigh, gram_lower
from mergekit_lssf.parameters import DEFAULT_ETA, FusionSettings
from mergekit_lssf.precision import (
    SIXTEEN_BIT,
    RoundingResult,
    kept_share,
    rounding_edge,
    signal_rank,
    stored_precision,
    subspace_round,
)
from mergekit_lssf.vocabulary import FUSIONS, RANK_RULES, ROUNDINGS, SPECTRA, RankRule, Rounding, Side, Spectrum


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
    #: ``(rows, cols)`` of the matrix whose singular values ``sigma`` are (``delta``,
    #: or ``Z = W X_hat`` of a calibration), for the noise-floor rule's aspect ratio;
    #: None: square, ``len(sigma)`` on each side.
    shape: Optional[Tuple[int, int]] = None


@dataclass(frozen=True)
class RankChoice:
    """The rank used for one weight and how much of the spectrum it keeps.

    rank: ``r`` (0 when the spectrum is all zero, or under the noise-floor rule when
        no singular value rises above the threshold).
    entropy_rank: the entropy rule's rank before ``max_rank`` (None with a fixed rank).
    capped: True when ``max_rank`` (or the basis size) lowered the rank.
    rule: ``"entropy"``, ``"noise_floor"`` or ``"fixed"`` (a ``rank`` was given);
        ``"stored"``: every vector a contrastive calibration stores.
    noise_floor_rank: the noise-floor rule's rank before ``max_rank``, computed
        whatever the rule (for reports); ``tau`` its threshold in sigma's units.
    entropy_share: ``H_r / H_n`` (1.0 when ``H_n == 0`` and ``r >= 1``).
    energy_share: ``sum_{i<=r} sigma_i^2 / sum_i sigma_i^2``.
    entropy_total: ``H_n`` in nats.
    rounding_edge: the expected top singular value of the 16-bit rounding error of
        ``delta`` (``precision.rounding_edge``), None for inputs not stored in 16 bits;
        signal_rank: how many singular values lie above it.
    spectrum: ``"full"`` (Eq. 5-7 over every singular value) or ``"signal"`` (over
        the ``signal_rank`` values above the edge; the same as full without an edge).
    """

    rank: int
    entropy_rank: Optional[int]
    capped: bool
    entropy_share: float
    energy_share: float
    entropy_total: float
    rule: str = "entropy"
    noise_floor_rank: Optional[int] = None
    tau: Optional[float] = None
    rounding_edge: Optional[float] = None
    signal_rank: Optional[int] = None
    spectrum: str = "full"


@dataclass(frozen=True)
class FusionInfo:
    """What ``lssf_fuse`` did to one weight; ``spectral_seconds`` is wall time."""

    choice: RankChoice
    sigma_1: float
    spectral_seconds: float
    #: ``fusion="contrastive"`` only (``contrastive_safety_factors``), else None:
    #: ``||left @ right||_F``, the term at ``alpha`` 1, and ``||W_aligned - W_ft||_F``.
    term_norm: Optional[float] = None
    gap_norm: Optional[float] = None

    @property
    def rank(self) -> int:
        return self.choice.rank

    def term_ratio(self, alpha: float) -> Optional[float]:
        """``||alpha * term|| / ||W_aligned - W_ft||`` of a contrastive term (0.0 when the
        two models agree on this weight); None for the other fusions."""
        if self.term_norm is None or self.gap_norm is None:
            return None
        return abs(alpha) * self.term_norm / self.gap_norm if self.gap_norm > 0 else 0.0


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
        eig = LeadingEigh(gram_lower(d, side))
        del d
        sigma = _singular_values(eig.values, compute_dtype)
        basis = eig.vectors(size if vectors is None else vectors(sigma))
        return SafetySubspace(sigma=sigma, basis=basis, side=side, shape=(rows, cols))
    gram = d @ d.T if side == "output" else d.T @ d
    del d
    evals, evecs = torch.linalg.eigh(gram)
    del gram
    sigma = _singular_values(evals.flip(0), compute_dtype)
    basis = evecs.flip(1)
    if vectors is not None:
        basis = basis[:, : vectors(sigma)]
    return SafetySubspace(sigma=sigma, basis=basis, side=side, shape=(rows, cols))


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


def gavish_donoho_omega(beta: float) -> float:
    """``omega(beta) = 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43`` (Gavish and
    Donoho 2014, the optimal hard threshold for a matrix of unknown noise level,
    as a multiple of the median singular value); ``0 < beta <= 1`` is the aspect ratio."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def noise_floor(sigma: torch.Tensor, shape: Optional[Tuple[int, int]] = None) -> Tuple[int, float]:
    """The noise-floor rank and threshold ``(count of sigma_i > tau, tau)``.

    ``sigma``: descending singular values of a ``rows x cols`` matrix (``shape``; None:
    square). ``n = min(rows, cols)``; values missing from ``sigma`` (a calibration file
    keeps only the nonzero ones) count as zeros. ``beta = n / max(rows, cols)`` and
    ``tau = omega(beta) * median(sigma_1..sigma_n)`` (the mean of the two middle values
    when ``n`` is even, as numpy's median).
    """
    s = sigma.to(torch.float64).flatten()
    rows, cols = shape if shape is not None else (s.numel(), s.numel())
    n = min(rows, cols)
    if n == 0 or s.numel() == 0:
        return 0, 0.0
    if s.numel() < n:
        s = torch.cat([s, s.new_zeros(n - s.numel())])
    s = s[:n]
    ordered = torch.sort(s).values
    mid = n // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    tau = gavish_donoho_omega(n / max(rows, cols)) * float(median)
    return int((s > tau).sum()), tau


def select_rank(
    sigma: torch.Tensor,
    *,
    eta: float,
    max_rank: Optional[int] = None,
    rank: Optional[int] = None,
    rule: RankRule = "entropy",
    shape: Optional[Tuple[int, int]] = None,
    edge: Optional[float] = None,
    spectrum: Spectrum = "full",
) -> RankChoice:
    """The safety-critical rank ``r``.

    ``rule="entropy"`` (the paper's Eq. 7): the smallest ``rho`` with
    ``H_rho / H_n >= eta``, capped by ``max_rank``, at least 1 when any singular value
    is nonzero. ``rule="noise_floor"`` (beyond the paper): the number of singular
    values above the Gavish-Donoho threshold (``noise_floor``; ``shape`` is the
    matrix's), capped by ``max_rank``; 0 is allowed, and ``eta`` is not used. A fixed
    ``rank`` replaces either rule (and ``max_rank``), limited to the number of nonzero
    values. Both rules' ranks are reported in the result whatever the rule.

    ``edge``: the rounding edge of 16-bit inputs (None: none); ``signal_rank`` counts
    the values above it. ``spectrum="signal"`` (beyond the paper) applies Eq. 5-7 to
    those values only, so the entropy rank is at most the signal rank, and 0 when no
    value rises above the rounding error.
    """
    if not 0 < eta <= 1:
        raise ValueError(f"eta must satisfy 0 < eta <= 1, got {eta}")
    if rule not in RANK_RULES:
        raise ValueError(f"rank_rule must be one of {', '.join(RANK_RULES)}, got {rule!r}")
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {', '.join(SPECTRA)}, got {spectrum!r}")
    cum, p = spectral_entropy(sigma)
    nonzero = int((p > 0).sum())
    used = "fixed" if rank is not None else rule
    signal = signal_rank(sigma, edge)
    precision = dict(rounding_edge=edge, signal_rank=signal, spectrum=spectrum)
    if nonzero == 0:
        return RankChoice(0, None if rank else 0, False, 0.0, 0.0, 0.0, used, 0, 0.0, **precision)
    floor_rank, tau = noise_floor(sigma, shape)
    entropy_rank = _entropy_rank(sigma if spectrum == "full" or signal is None else sigma[:signal], eta)

    if rank is not None:
        r, capped, entropy_rank = min(int(rank), nonzero), False, None
    else:
        r = entropy_rank if rule == "entropy" else floor_rank
        capped = max_rank is not None and r > max_rank
        if capped:
            r = int(max_rank)
    return _choice(r, entropy_rank, capped, cum, p, used, floor_rank, tau, **precision)


def _entropy_rank(sigma: torch.Tensor, eta: float) -> int:
    """Eq. 7 over ``sigma``: the smallest ``rho`` with ``H_rho / H_n >= eta``; 1 when
    only one value is nonzero, 0 when none is (an empty signal spectrum)."""
    cum, p = spectral_entropy(sigma)
    if not bool((p > 0).any()):
        return 0
    total = float(cum[-1])
    if total <= 0:
        return 1
    reached = torch.nonzero(cum >= eta * total)
    return max(int(reached[0]) + 1, 1)


def rank_rule(
    *, eta: float, max_rank: Optional[int] = None, rank: Optional[int] = None,
    rule: RankRule = "entropy", shape: Optional[Tuple[int, int]] = None,
    edge: Optional[float] = None, spectrum: Spectrum = "full",
) -> Callable[[torch.Tensor], int]:
    """``sigma -> r`` by ``select_rank``: how many basis vectors a weight needs."""

    def rank_of(sigma: torch.Tensor) -> int:
        return select_rank(sigma, eta=eta, max_rank=max_rank, rank=rank, rule=rule, shape=shape,
                           edge=edge, spectrum=spectrum).rank

    return rank_of


def _choice(r, entropy_rank, capped, cum, p, rule="entropy", floor_rank=None, tau=None, **precision) -> RankChoice:
    """A RankChoice for rank ``r`` from the cumulative entropy and probabilities;
    ``precision``: ``rounding_edge``, ``signal_rank`` and ``spectrum``."""
    total = float(cum[-1])
    if r == 0:
        share = 0.0
    else:
        share = float(cum[r - 1] / total) if total > 0 else 1.0
    return RankChoice(r, entropy_rank, capped, share, float(p[:r].sum()), total, rule, floor_rank, tau, **precision)


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
    """The fused term of one weight as an exact product ``left @ right``.

    ``fusion="add"``: ``left @ right = P' delta`` (Eq. 13). For an output-side basis
    ``left = U_r diag(a)`` and ``right = diag(a) U_r^T delta``; for an input-side basis
    ``left = delta V_r diag(a)`` and ``right = diag(a) V_r^T``.
    ``fusion="restore"``: ``left = U' = U_r diag(a)`` (``(d_out, r)``, output side
    always) and ``right`` is None until ``with_finetune`` supplies ``W_ft``; then
    ``right = U'^T (W_aligned - W_ft)``.
    left: ``(d_out, r)``; right: ``(r, d_in)``. Both are None when the rank is 0.
    sigma: the full spectrum (float64). aligned: ``W_aligned`` in the work dtype, kept
    only for ``restore``. side: where the term's subspace lies: ``"output"`` (the
    columns of ``left`` span it) or ``"input"`` (the rows of ``right``; ``add`` with an
    input-side basis).
    """

    left: Optional[torch.Tensor]
    right: Optional[torch.Tensor]
    info: FusionInfo
    sigma: torch.Tensor
    fusion: str = "add"
    aligned: Optional[torch.Tensor] = None
    side: Side = "output"

    def with_finetune(self, w_ft: torch.Tensor) -> "SafetyFactors":
        """The factors for this fine-tune: ``restore`` gets its ``right``; ``add`` and
        rank 0 are returned as they are (they do not depend on ``W_ft``), and so are
        ``restore`` factors already bound to a fine-tune (``aligned`` is None)."""
        if self.fusion != "restore" or self.left is None or self.aligned is None:
            return self
        work = self.left.dtype
        right = self.left.T @ (self.aligned - w_ft.to(work))
        return SafetyFactors(self.left, right, self.info, self.sigma, self.fusion, None, self.side)

    def subspace_basis(self) -> Tuple[torch.Tensor, Side]:
        """The orthonormal basis of the term's subspace, ``(d, r)``, and its side:
        ``U_r`` from ``left``'s columns or ``V_r`` from ``right``'s rows, each
        ``a_i``-scaled direction normalized back to unit length."""
        if self.side == "output":
            return self.left / self.left.norm(dim=0), "output"
        return (self.right / self.right.norm(dim=1, keepdim=True)).T, "input"


def output_basis(subspace: SafetySubspace, r: int, delta: torch.Tensor) -> torch.Tensor:
    """``U_r`` ``(d_out, r)``, the output-side basis of the first ``r`` directions.

    An input-side subspace holds ``V_r``; then ``U_r = delta V_r / sigma_r`` (all
    ``sigma_i > 0`` for ``i <= r``, since the rank never exceeds the nonzero count).
    """
    basis = subspace.basis[:, :r].to(delta.dtype)
    if subspace.side == "output":
        return basis
    return (delta @ basis) / subspace.sigma[:r].to(delta.dtype)


def safety_factors(
    w_aligned: torch.Tensor,
    w_unaligned: torch.Tensor,
    settings: FusionSettings,
    *,
    subspace: Optional[SafetySubspace] = None,
    work_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
    factors: bool = True,
) -> SafetyFactors:
    """Spectrum, rank and factors of the fused term of one weight.

    Weights are ``(d_out, d_in)``; factors come in ``work_dtype`` (at least float32)
    on the weights' device. ``subspace`` is a calibrated basis for this weight;
    without it the data-free subspace (SVD of delta) is used. With
    ``fusion="restore"`` the result still needs ``with_finetune(W_ft)``. When the
    aligned or unaligned weight holds 16-bit values (``precision.stored_precision``,
    also after an upcast) the rounding edge of ``delta`` is computed and reported,
    and ``spectrum="signal"`` ranks the spectrum above it only. ``factors=False``:
    the spectrum and rank only (no basis vectors are computed, ``left``/``right`` are
    None), which is what ``mergekit-lssf report`` reads. ``settings``: the rank rule
    (``eta``, ``max_rank``, ``rank``, ``rank_rule``, ``spectrum``), ``weight_max`` and
    ``fusion`` are read (``alpha`` and the rounding are ``write_fused``'s).
    """
    fusion, weight_max = settings.fusion, settings.weight_max
    if settings.subspace is not None and subspace is None:
        raise ValueError(f"settings.subspace names the file {settings.subspace!r}, which the mergekit glue reads: "
                         "pass its basis as `subspace=`")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if fusion == "contrastive":
        raise ValueError("contrastive factors come from a calibration: use kernel.contrastive_safety_factors")
    work = torch.promote_types(work_dtype, torch.float32)
    started = time.perf_counter()
    edge = rounding_edge(w_aligned, w_unaligned, stored_precision(w_aligned), stored_precision(w_unaligned))
    delta = w_aligned.to(work) - w_unaligned.to(work)
    rule = dict(eta=settings.eta, max_rank=settings.max_rank, rank=settings.rank, rule=settings.rank_rule,
                edge=edge, spectrum=settings.spectrum)
    available = None  # the data-free subspace has every singular vector
    if subspace is None:
        vectors = rank_rule(shape=tuple(delta.shape), **rule) if factors else (lambda _sigma: 0)
        subspace = data_free_subspace(delta, compute_dtype=compute_dtype, vectors=vectors)
    else:
        available = subspace.basis.shape[1]
    shape = subspace.shape or (subspace.basis.shape[0], subspace.sigma.numel())
    choice = select_rank(subspace.sigma, shape=shape, **rule)
    if available is not None and choice.rank > available:  # a calibrated basis may hold fewer vectors
        choice = _choice(available, choice.entropy_rank, True, *spectral_entropy(subspace.sigma),
                         choice.rule, choice.noise_floor_rank, choice.tau)
    sigma_1 = float(subspace.sigma[0]) if subspace.sigma.numel() else 0.0
    left = right = aligned = None
    side: Side = "output"
    if choice.rank > 0 and factors:
        weights = projection_weights(subspace.sigma[: choice.rank], weight_max).to(work)
        if fusion == "restore":
            left = output_basis(subspace, choice.rank, delta) * weights
            aligned = w_aligned.to(work)
        else:
            basis = subspace.basis[:, : choice.rank].to(work) * weights
            side = subspace.side
            if side == "output":
                left, right = basis, basis.T @ delta
            else:
                left, right = delta @ basis, basis.T
        if delta.device.type == "cuda":
            torch.cuda.synchronize(delta.device)
    info = FusionInfo(choice, sigma_1, time.perf_counter() - started)
    return SafetyFactors(left, right, info, subspace.sigma, fusion, aligned, side)


def contrastive_rank(basis: ContrastiveBasis, *, rank: Optional[int] = None, rank_rule: Optional[RankRule] = None,
                     eta: float = DEFAULT_ETA) -> RankChoice:
    """How many of a contrastive calibration's stored vectors a weight uses.

    ``rank``: the leading ``rank`` (``rule="fixed"``; more than stored is refused).
    ``rank_rule="entropy"``: Eq. 5-7 applied to ``mu``, with ``p_i = mu_i / sum mu``
    (``_entropy_rank`` of ``sqrt(mu)``, whose squares are ``mu``), in float64, over
    the whole spectrum (``basis.spectrum``), then capped at the stored count
    (``capped``; ``entropy_rank`` keeps what the rule wanted). ``rank`` wins over the
    rule, as it does for ``restore``. Neither: every stored vector (``rule="stored"``).
    The shares are those of the whole spectrum (``energy_share``: of ``sum(mu)``).
    """
    stored = basis.rank
    known = basis.spectrum is not None or stored == basis.v.shape[0]
    spectrum = basis.spectrum if basis.spectrum is not None else basis.mu
    sigma = spectrum.to(torch.float64).clamp(min=0).sqrt()  # sigma_i^2 = mu_i: p ∝ mu
    wanted, capped = None, False
    if rank is not None:
        if rank > stored:
            raise ValueError(f"rank {rank} is more than the {stored} vectors the calibration stores")
        k, rule = int(rank), "fixed"
    elif rank_rule == "entropy":
        if not known:
            raise ValueError(f"rank_rule: entropy reads every eigenvalue mu, and this calibration stores only the leading "
                             f"{stored} of {basis.v.shape[0]} (an older file); calibrate again")
        wanted = _entropy_rank(sigma, eta)
        k, capped, rule = min(wanted, stored), wanted > stored, "entropy"
    elif rank_rule is None:
        k, rule = stored, "stored"
    else:
        raise ValueError(f"fusion contrastive reads rank_rule entropy only, got {rank_rule!r}")
    cum, p = spectral_entropy(sigma)
    return _choice(k, wanted, capped, cum, p, rule)


def contrastive_safety_factors(w_ft: torch.Tensor, w_aligned: torch.Tensor, basis: ContrastiveBasis, *,
                               lam: float, rank: Optional[int] = None, rank_rule: Optional[RankRule] = None,
                               eta: float = DEFAULT_ETA, work_dtype: torch.dtype = torch.float32) -> SafetyFactors:
    """The term ``(W_al - W_ft) (B V_k) diag(mu_k / (mu_k + lam)) V_k^T`` of one weight
    as ``SafetyFactors`` (``fusion="contrastive"``, input side), for ``write_fused``.

    ``w_ft``, ``w_aligned``: ``(d_out, d_in)``; ``basis``: the weight's input site
    (``contrastive_file``); ``k`` by ``contrastive_rank`` (``rank``, ``rank_rule``,
    ``eta``; default every stored pair). The right factor is the orthonormal ``Q^T``
    of ``V_k = Q R`` (so that 16-bit rounding keeps the term's input subspace) and the
    left one ``(W_al - W_ft) B V_k diag(w) R^T``: the product is the term exactly.
    Factors in ``promote(work_dtype, float32)``. ``info`` carries the term's norm
    (``||left||``, since ``Q^T`` has orthonormal rows) and ``||W_al - W_ft||``, both
    float64, and ``sigma`` the whole spectrum ``mu`` where the file holds it.
    """
    started = time.perf_counter()
    choice = contrastive_rank(basis, rank=rank, rank_rule=rank_rule, eta=eta)
    spectrum = (basis.spectrum if basis.spectrum is not None else basis.mu).to(torch.float64)
    k = choice.rank
    diff = w_aligned.to(torch.float64) - w_ft.to(torch.float64)
    gap = float(torch.linalg.matrix_norm(diff))
    sigma_1 = float(spectrum[0]) if spectrum.numel() else 0.0
    if k == 0:
        info = FusionInfo(choice, sigma_1, time.perf_counter() - started, 0.0, gap)
        return SafetyFactors(None, None, info, spectrum, "contrastive", side="input")
    g, q_t = basis.restore_factors(k, lam)  # shared by the weights of one input site
    left = diff @ g.to(diff.device)  # (W_al - W_ft) B V_k diag(w) R^T, with right = Q^T: the term exactly
    work = torch.promote_types(work_dtype, torch.float32)
    info = FusionInfo(choice, sigma_1, time.perf_counter() - started, float(torch.linalg.matrix_norm(left)), gap)
    return SafetyFactors(left.to(work), q_t.to(diff.device, work), info, spectrum, "contrastive", side="input")


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
    settings: FusionSettings,
    *,
    subspace: Optional[SafetySubspace] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, FusionInfo]:
    """Fuse one 2-D weight: ``W_ft + alpha * P' (W_aligned - W_unaligned)`` (Eq. 13,
    ``fusion="add"``) or ``W_ft + alpha * P' (W_aligned - W_ft)`` (``"restore"``).

    All three weights are ``(d_out, d_in)`` on one device. ``settings`` holds every
    parameter (``FusionSettings``; its ``fusion`` has no default: a recipe's default is
    ``restore`` and the paper's is ``add``, so a caller says which). The result has
    the dtype ``settings.round_to`` names (default ``w_ft``'s), written with
    ``settings.rounding`` (see ``write_fused``). Rank 0 (a zero ``delta``, or nothing
    above the noise floor) returns ``w_ft`` itself. ``subspace``: a calibrated basis
    (None: the SVD of delta). See ``safety_factors``.
    """
    factors = safety_factors(w_aligned, w_unaligned, settings, subspace=subspace, work_dtype=w_ft.dtype,
                             compute_dtype=compute_dtype)
    out_dtype = getattr(torch, settings.round_to) if settings.round_to else None
    fused, _written = write_fused(w_ft, factors, settings.alpha, out_dtype=out_dtype, rounding=settings.rounding)
    return fused, factors.info


@dataclass(frozen=True)
class Written:
    """How the fused weight was written: ``kept`` is the share of the intended term
    left along its direction in the written dtype (``precision.kept_share``; 1.0 when
    the output is not narrower than float32); ``rounding`` the subspace-preserving
    rounding's record (None for a plain cast or a wide output); ``plain_kept`` the
    plain cast's share, when subspace rounding was asked for and it alone was within
    ``PLAIN_CAST_TOLERANCE`` of 1 (then the plain cast is written)."""

    kept: float = 1.0
    rounding: Optional[RoundingResult] = None
    plain_kept: Optional[float] = None


#: ``rounding="subspace"`` writes the plain cast when it keeps the term within this
#: (``|kept - 1|``): a term many ulps wide survives round-to-nearest, and the
#: feedback would cost time for nothing.
PLAIN_CAST_TOLERANCE = 0.01


def write_fused(
    w_ft: torch.Tensor,
    factors: SafetyFactors,
    alpha: float,
    *,
    out_dtype: Optional[torch.dtype] = None,
    rounding: Rounding = "subspace",
) -> Tuple[torch.Tensor, Written]:
    """``W_ft + alpha * left @ right`` in ``out_dtype`` (default ``w_ft``'s dtype), and
    how much of the term survived; ``w_ft`` itself (cast) at rank 0.

    ``w_ft``: ``(d_out, d_in)``; the sum is formed in ``promote(w_ft.dtype, float32)``.
    ``restore`` factors get their ``right`` from this ``w_ft`` (``with_finetune``).
    A 16-bit ``out_dtype`` is written with ``rounding="subspace"``
    (``precision.subspace_round`` on the term's basis, unless the plain cast already
    keeps the term within ``PLAIN_CAST_TOLERANCE``) or ``"nearest"`` (plain cast).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    out_dtype = out_dtype or w_ft.dtype
    if factors.left is None:
        return w_ft.to(out_dtype), Written()
    factors = factors.with_finetune(w_ft)
    work = torch.promote_types(w_ft.dtype, torch.float32)
    left, right = factors.left.to(work), factors.right.to(work)
    fused = torch.addmm(w_ft.to(work), left, right, alpha=alpha)
    if out_dtype not in SIXTEEN_BIT:
        return fused.to(out_dtype), Written()
    plain = fused.to(out_dtype)
    plain_kept = kept_share(plain, w_ft, left, right, alpha)
    if rounding == "nearest":
        return plain, Written(plain_kept)
    if abs(plain_kept - 1.0) <= PLAIN_CAST_TOLERANCE:
        return plain, Written(plain_kept, None, plain_kept)
    del plain
    basis, side = factors.subspace_basis()
    written, record = subspace_round(fused, basis.to(work), side, out_dtype)
    del fused
    return written, Written(kept_share(written, w_ft, left, right, alpha), record)


def apply_factors(w_ft: torch.Tensor, factors: SafetyFactors, alpha: float) -> torch.Tensor:
    """``W_ft + alpha * left @ right`` in ``w_ft``'s dtype (``write_fused`` with its
    defaults); ``w_ft`` itself at rank 0."""
    return write_fused(w_ft, factors, alpha)[0]


def gram_root(gram: torch.Tensor) -> torch.Tensor:
    """``L`` ``(d, d)`` float64 with ``L L^T = gram`` for a symmetric PSD ``gram``
    (``Q diag(sqrt(max(lambda, 0)))``, one eigendecomposition). Weights that read the
    same input (q/k/v, gate/up) share one root."""
    evals, q = torch.linalg.eigh(gram.to(torch.float64))
    return q * evals.clamp(min=0).sqrt()


def calibrated_subspace(
    weight: torch.Tensor,
    *,
    input_gram: Optional[torch.Tensor] = None,
    output_gram: Optional[torch.Tensor] = None,
    input_root: Optional[torch.Tensor] = None,
    max_rank: int = 256,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``U`` and singular values of ``Z = W X_hat`` from accumulated statistics (Eq. 4).

    ``weight``: ``(d_out, d_in)`` = ``W_safe``. Exactly one statistic:
    ``input_gram`` ``(d_in, d_in)`` = ``C = sum_t x_hat_t x_hat_t^T``, its root
    ``input_root`` = ``gram_root(C)`` (computed once for weights sharing an input),
    or ``output_gram`` ``(d_out, d_out)`` = ``Z Z^T``. Returns ``U`` ``(d_out, k)``
    float32 with orthonormal columns, ``k = min(max_rank, rank Z)``, and ``S``
    ``(rank Z,)`` float64: every nonzero singular value of ``Z``, descending.
    """
    if sum(x is not None for x in (input_gram, output_gram, input_root)) != 1:
        raise ValueError("pass exactly one of input_gram, input_root and output_gram")
    if output_gram is not None:
        evals, evecs = torch.linalg.eigh(output_gram.to(torch.float64))
        sigma = _singular_values(evals.flip(0), torch.float64)
        keep = int((sigma > 0).sum())
        return evecs.flip(1)[:, : min(max_rank, keep)].to(torch.float32), sigma[:keep]
    # Z Z^T = W C W^T = (W L)(W L)^T with C = L L^T
    root = gram_root(input_gram) if input_root is None else input_root
    m = weight.to(torch.float64) @ root.to(torch.float64)
    sub = data_free_subspace(m, vectors=lambda s: min(max_rank, int((s > 0).sum())))
    k = sub.basis.shape[1]
    if sub.side == "output":
        u = sub.basis
    else:  # right singular vectors V of M: U = M V / sigma
        u = (m @ sub.basis) / sub.sigma[:k]
    return u.to(torch.float32), sub.sigma[sub.sigma > 0]

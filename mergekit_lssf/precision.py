"""16-bit storage: the rounding edge of a safety vector, and rounding that keeps a term.

Pure torch, no mergekit import (the math layer, beside ``kernel.py``).

Shapes: weights are ``(d_out, d_in)``; a basis is ``(d, k)`` with orthonormal
columns, ``d = d_out`` on the output side and ``d = d_in`` on the input side.
Singular values and edges are in the weights' units.

**Rounding edge** (beyond the paper; a **decision**, see the README, "Decisions"). A weight
stored in a 16-bit format carries a rounding error of at most half a unit in the
last place (ulp) of each entry. Modelled as independent and uniform, the error of
``delta = W_aligned - W_unaligned`` has entry variances
``v_ij = (ulp(A_ij)^2 + ulp(B_ij)^2) / 12``. For an ``m x n`` matrix of independent
entries with one variance ``v`` the largest singular value tends to
``sqrt(v) (sqrt(m) + sqrt(n))`` (the Marchenko-Pastur / Bai-Yin edge). With a
variance profile the leading term of the Latala / Bandeira-van Handel bound is

    edge = sqrt(max_i sum_j v_ij) + sqrt(max_j sum_i v_ij),

which equals the Marchenko-Pastur edge when the variances are equal and is never
below the largest column or row norm of the error. Singular values of ``delta``
above it are signal; their count is the *signal rank*.

**Subspace-preserving rounding** (beyond the paper). Round-to-nearest of
``W' = W_ft + T`` into bfloat16, when ``W_ft`` itself is bfloat16 and ``T`` is
smaller than half an ulp, returns ``W_ft``: the term is lost, not blurred.
``subspace_round`` feeds the rounding error's component inside the term's
subspace back before casting again (error feedback):

    Z_0 = W',  Y_k = cast(Z_k),  E_k = Y_k - W',  Z_{k+1} = Z_k - P E_k,

with ``P`` the orthogonal projector on the subspace (``U U^T .`` or ``. V V^T``).
``Z_k - W'`` stays inside the subspace, so each entry of ``Y_k`` stays within
about one ulp of ``W'`` and the error outside the subspace stays at rounding
level, while the integrator drives ``P E_k`` towards zero. See ``subspace_round``
for the step count and gains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

#: Significand bits (implicit bit included) and smallest normal exponent of frexp
#: (``|x| = m 2^e`` with ``m`` in [0.5, 1)) of the 16-bit formats.
_FORMATS = {torch.bfloat16: (8, -125), torch.float16: (11, -13)}
SIXTEEN_BIT = tuple(_FORMATS)

#: Rows per block when a whole-tensor pass would need a full-size temporary.
_BLOCK_ELEMENTS = 1 << 24

#: ``subspace_round``'s schedule: ``ROUNDING_LEVELS`` levels of ``ROUNDING_STEPS`` casts,
#: the gain halving from one level to the next, from ``first_gain(k, d)``. It stops
#: early once the in-subspace error is below ``ROUNDING_TOLERANCE`` times the plain
#: cast's, or when a level lowers it by less than ``ROUNDING_MIN_GAIN``.
ROUNDING_LEVELS = 4
ROUNDING_STEPS = 3
ROUNDING_TOLERANCE = 1e-3
ROUNDING_MIN_GAIN = 0.02
#: A step's flips put back about ``2.8 g sqrt(k / d)`` of the in-subspace error energy
#: (see ``subspace_round``); the first gain keeps that share at or below this.
ROUNDING_NOISE_SHARE = 0.5


def _row_blocks(t: torch.Tensor):
    rows = max(1, _BLOCK_ELEMENTS // max(1, t.shape[-1])) if t.ndim == 2 else t.shape[0]
    for start in range(0, t.shape[0], rows):
        yield t[start:start + rows]


def stored_precision(t: torch.Tensor) -> Optional[torch.dtype]:
    """The 16-bit format whose grid holds every value of ``t``, or None.

    A bfloat16 or float16 tensor is its own format. A float32 tensor whose every
    value is exactly representable in bfloat16 (then in float16) was stored in that
    format and upcast, e.g. by mergekit's recipe ``dtype: float32``. Anything else
    (float32 training output, float64) is None: no rounding edge.
    """
    if t.dtype in _FORMATS:
        return t.dtype
    if t.dtype != torch.float32 or t.numel() == 0:
        return None
    # bfloat16 is float32 with the low 16 significand bits cut: a bit test, one pass
    bits = [b.contiguous().view(torch.int32) for b in _row_blocks(t)]
    if not any(bool((b & 0xFFFF).any()) for b in bits):
        return torch.bfloat16
    # float16 keeps 10 significand bits (13 cut); its range is checked by a round trip
    if not any(bool((b & 0x1FFF).any()) for b in bits) and all(
            torch.equal(b, b.to(torch.float16).to(torch.float32)) for b in _row_blocks(t)):
        return torch.float16
    return None


def ulp(t: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """Spacing of ``fmt``'s grid at each value of ``t`` (float32, same shape).

    ``2^(e - p)`` for ``|x| = m 2^e`` (frexp, ``m`` in [0.5, 1)) with ``p`` the
    significand bits; subnormals and zero get the smallest spacing ``2^(e_min - p)``.
    """
    bits, e_min = _FORMATS[fmt]
    x = t.to(torch.float32)
    _m, e = torch.frexp(x)
    e = torch.where(x == 0, torch.full_like(e, e_min), e.clamp(min=e_min))
    return torch.ldexp(torch.ones_like(x), e - bits)


def _variance_table(stored: torch.dtype, fmt: torch.dtype) -> Tuple[torch.Tensor, int, int]:
    """``ulp^2 / 12`` of ``fmt`` indexed by the biased exponent field of a ``stored``
    value (bfloat16 or float32 share float32's 8-bit field; float16 has 5 bits), and
    the shift and mask that extract that field from the value's bits."""
    if stored == torch.float16:
        field, shift, mask = torch.arange(32), 10, 0x1F
        exponent = torch.where(field == 0, torch.tensor(-14), field - 15)  # value's floor(log2|x|)
    else:
        field, shift, mask = torch.arange(256), 7 if stored == torch.bfloat16 else 23, 0xFF
        exponent = torch.where(field == 0, torch.tensor(-126), field - 127)
    # a value 2^exponent x 1.m has frexp exponent exponent + 1: the same spacing as ulp()
    gap = ulp(torch.ldexp(torch.ones(field.shape), exponent), fmt).to(torch.float64)
    return (gap.square() / 12.0).to(torch.float32), shift, mask


def _entry_variances(block: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """``ulp(x)^2 / 12`` of every value of ``block`` (float32; spacings below 2^-75
    square to zero there, far below any weight's), from its exponent bits."""
    stored = block.dtype if block.dtype in _FORMATS else torch.float32
    table, shift, mask = _variance_table(stored, fmt)
    x = block.contiguous() if stored != torch.float32 or block.dtype == torch.float32 else block.float()
    if x.dtype != stored:
        x = x.to(stored)
    bits = x.view(torch.int16 if stored in _FORMATS else torch.int32).to(torch.int32)
    return table.to(block.device)[((bits >> shift) & mask).long()]


def rounding_edge(
    a: torch.Tensor, b: torch.Tensor, fmt_a: Optional[torch.dtype], fmt_b: Optional[torch.dtype]
) -> Optional[float]:
    """The largest singular value expected of the rounding error of ``a - b``.

    ``a``, ``b``: ``(m, n)``, stored in ``fmt_a`` / ``fmt_b`` (``stored_precision``;
    None: not rounded, no share of the error). Returns the edge in the weights'
    units (see the module docstring for the model and the formula), or None when
    neither input is 16-bit.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"rounding_edge needs two matrices of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    if fmt_a is None and fmt_b is None:
        return None
    row_sums = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)  # float32 sums of < 2^24 terms each
    col_sums = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
    start = 0
    for block_a, block_b in zip(_row_blocks(a), _row_blocks(b)):
        v = None
        for block, fmt in ((block_a, fmt_a), (block_b, fmt_b)):
            if fmt is not None:
                part = _entry_variances(block, fmt)
                v = part if v is None else v + part
        row_sums[start:start + v.shape[0]] = v.sum(dim=1).to(torch.float64)
        col_sums += v.sum(dim=0).to(torch.float64)
        start += v.shape[0]
    return math.sqrt(float(row_sums.max())) + math.sqrt(float(col_sums.max()))


def signal_rank(sigma: torch.Tensor, edge: Optional[float]) -> Optional[int]:
    """How many singular values lie above the rounding edge (None without an edge)."""
    if edge is None:
        return None
    return int((sigma.to(torch.float64) > edge).sum())


@dataclass(frozen=True)
class RoundingResult:
    """What ``subspace_round`` did.

    iterations: the feedback step whose cast was kept (0: the plain cast).
    in_subspace_plain / in_subspace: ``||P (Y - W')||_F`` of the plain cast and of
        the result; outside_plain / outside: ``||(I - P)(Y - W')||_F`` of each.
    """

    iterations: int
    in_subspace_plain: float
    in_subspace: float
    outside_plain: float
    outside: float


def _projector(basis: torch.Tensor, side: str):
    if side == "output":
        return lambda e: basis @ (basis.T @ e)
    return lambda e: (e @ basis) @ basis.T


def first_gain(k: int, d: int) -> float:
    """The first level's gain: 1, or less where ``k / d`` is large enough that a step at
    gain 1 would put back more error than it removes (``ROUNDING_NOISE_SHARE``)."""
    return min(1.0, ROUNDING_NOISE_SHARE / (2.8 * math.sqrt(k / d))) if k and d else 1.0


def subspace_round(
    target: torch.Tensor,
    basis: torch.Tensor,
    side: str,
    fmt: torch.dtype,
    *,
    tolerance: float = ROUNDING_TOLERANCE,
) -> Tuple[torch.Tensor, RoundingResult]:
    """``target`` (``(d_out, d_in)``, float32 or wider) cast to ``fmt`` so that its
    component inside the subspace of ``basis`` (orthonormal ``(d, k)``, ``side``
    "output" or "input") keeps the target's: ``P cast(W') ~ P W'``.

    The iteration ``Z_{k+1} = Z_k - g_k P E_k`` integrates the in-subspace error.
    Why a few steps, and why the gain falls:

    * Dead zone. With ``W_ft`` on the grid and a term of ``t < 1/2`` ulp per entry,
      the plain cast returns ``W_ft``; each step at gain 1 adds the lost term again,
      so entries start to move after about ``1 / (2 t)`` steps (2-3 for the terms
      seen on real models, ``t`` of 0.2-0.5).
    * Noise floor. Once entries move, a step's correction ``c`` (about
      ``ulp sqrt(k / d) / sqrt(12)`` per entry) flips an entry with probability
      ``|c| / ulp``: the flips act like stochastic rounding of ``c``, whose noise puts
      a share of about ``g * 2.8 sqrt(k / d)`` of the previous in-subspace error
      energy back into the subspace. So the first gain is
      ``min(1, 0.5 / (2.8 sqrt(k / d)))`` (``first_gain``): 1 for the small ranks where
      the dead zone matters most, less for a basis that spans much of the space, where
      a step at gain 1 puts back more than it removes. Each level stalls at a floor
      set by its gain; halving the gain every three steps lowers it.

    Up to four levels of three steps leave 0.02-0.4 of the plain cast's in-subspace
    error on bf16 test matrices at small ``k / d`` and 0.5-0.9 near ``k / d = 1/2``
    (benchmarks/RESULTS.md); a level that gains under 2% ends the loop. The best iterate is kept,
    so the result is never worse than the plain cast inside the subspace; with a
    full-rank basis the plain cast is optimal and is returned unchanged. Returns the
    ``fmt`` tensor and a ``RoundingResult``.
    """
    work = torch.promote_types(target.dtype, torch.float32)
    target = target.to(work)
    project = _projector(basis.to(work), side)
    best = target.to(fmt)
    error = best.to(work) - target
    inside = project(error)
    plain_in = float(inside.norm())
    plain_out = float((error - inside).norm())
    best_in, best_out, used = plain_in, plain_out, 0
    z, gain, step = target, first_gain(basis.shape[1], basis.shape[0]), 0
    for _level in range(ROUNDING_LEVELS):
        level_start = best_in
        for _ in range(ROUNDING_STEPS):
            if best_in <= tolerance * plain_in:
                break
            step += 1
            z = z - gain * inside
            y = z.to(fmt)
            error = y.to(work) - target
            inside = project(error)
            now = float(inside.norm())
            if now < best_in:
                best, best_in, best_out, used = y, now, float((error - inside).norm()), step
        if best_in <= tolerance * plain_in or best_in > (1 - ROUNDING_MIN_GAIN) * level_start:
            break
        gain /= 2
    return best, RoundingResult(used, plain_in, best_in, plain_out, best_out)


def kept_share(
    written: torch.Tensor, w_ft: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float
) -> float:
    """Share of the intended term ``T = alpha * left @ right`` that ``written`` keeps
    along ``T``'s direction: ``<written - W_ft, T> / ||T||^2`` (1.0: all of it;
    0.0: the written weight is the fine-tune's). ``left`` ``(d_out, r)``, ``right``
    ``(r, d_in)``; sums in float64 through the factors, no full-size product.
    """
    if left is None or alpha == 0:
        return 1.0
    l64, r64 = left.to(torch.float64), right.to(torch.float64)
    norm2 = float(torch.sum((l64.T @ l64) * (r64 @ r64.T))) * alpha * alpha
    if norm2 == 0.0:
        return 1.0
    change = written.to(torch.float32) - w_ft.to(torch.float32)
    inner = float(torch.sum((left.to(torch.float32).T @ change).to(torch.float64) * r64)) * alpha
    return inner / norm2

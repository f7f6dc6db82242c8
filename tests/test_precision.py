"""16-bit inputs and outputs: ulp, the rounding edge, the signal spectrum and
subspace-preserving rounding, each against an independent float64 computation."""

import math

import numpy as np
import pytest
import torch

from reference import reference_rank
from mergekit_lssf.kernel import lssf_fuse, safety_factors, select_rank, write_fused
from mergekit_lssf.precision import (
    kept_share,
    rounding_edge,
    signal_rank,
    stored_precision,
    subspace_round,
    ulp,
)
from mergekit_lssf.parameters import FusionSettings

BF16 = torch.bfloat16


def _neighbour_gap(x, fmt):
    """Spacing above each positive value of ``x`` in ``fmt``, by stepping its bit pattern."""
    y = x.abs().to(fmt)
    bits = y.view(torch.int16).to(torch.int32)
    up = (bits + 1).to(torch.int16).view(fmt)
    return up.double() - y.double()


@pytest.mark.parametrize("fmt", [torch.bfloat16, torch.float16])
def test_ulp_is_the_gap_to_the_next_representable_value(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-6, 3, (4000,), generator=g),
                   torch.tensor([1.0, 0.5, 2.0 ** -20, 3.0])])
    x = x.to(fmt).float()  # on the grid, so both sides agree on the binade
    x = x[(x != 0) & (x.abs() < 6e4)]
    assert torch.equal(ulp(x, fmt).double(), _neighbour_gap(x, fmt))
    assert float(ulp(torch.zeros(1), fmt)) == float(_neighbour_gap(torch.zeros(1), fmt))


def test_stored_precision_sees_through_an_upcast():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 200, generator=g) * 0.02
    assert stored_precision(w) is None
    assert stored_precision(w.to(BF16)) is BF16
    assert stored_precision(w.to(BF16).float()) is BF16
    assert stored_precision(w.half().float()) is torch.float16
    assert stored_precision(w.double()) is None
    nearly = w.to(BF16).float()
    nearly[17, 3] += 1e-7  # one value off the grid
    assert stored_precision(nearly) is None


def _rounded_pair(m, n, row_scale=None, seed=0, delta_scale=2e-3):
    """Two float32 'trained' weights, each rounded to bfloat16 on its own, the exact
    float64 rounding error of their difference, and the true (rank-6) difference."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.02 if row_scale is None else 0.02 * row_scale[:, None]
    true_u = torch.randn(m, n, generator=g) * scale
    true_d = (torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g)) * delta_scale / math.sqrt(6)
    true_a = true_u + true_d
    a, u = true_a.to(BF16).float(), true_u.to(BF16).float()
    error = (a.double() - u.double()) - (true_a.double() - true_u.double())
    return a, u, error.numpy(), true_d


@pytest.mark.parametrize("shape", [(256, 256), (192, 640), (640, 192)])
def test_rounding_edge_is_the_marchenko_pastur_edge_of_the_exact_error(shape):
    m, n = shape
    a, u, error, _ = _rounded_pair(m, n)
    edge = rounding_edge(a, u, BF16, BF16)
    # the formula, written out: per-entry variance from the bit gaps, then the MP edge
    gap_a, gap_u = (_neighbour_gap(x, BF16).numpy() for x in (a, u))
    v = (gap_a**2 + gap_u**2) / 12.0
    written = math.sqrt(v.sum(axis=1).max()) + math.sqrt(v.sum(axis=0).max())
    assert edge == pytest.approx(written, rel=0.02)  # the gap above, not the spacing at, a power of two
    top = np.linalg.svd(error, compute_uv=False)[0]
    assert 1.0 <= edge / top <= 1.2


def test_rounding_edge_bounds_the_error_of_uneven_rows():
    m, n = 300, 500
    row_scale = torch.logspace(-1, 1, m)[torch.randperm(m, generator=torch.Generator().manual_seed(3))]
    a, u, error, _ = _rounded_pair(m, n, row_scale=row_scale, seed=2)
    edge = rounding_edge(a, u, BF16, BF16)
    top = np.linalg.svd(error, compute_uv=False)[0]
    assert 1.0 <= edge / top <= 1.6
    assert rounding_edge(a, u, None, None) is None
    assert rounding_edge(a, u, BF16, None) < edge


def test_signal_rank_counts_the_planted_directions():
    a, u, _error, true_d = _rounded_pair(384, 512, seed=4)
    sigma = torch.linalg.svdvals((a - u).double())
    edge = rounding_edge(a, u, BF16, BF16)
    true_sigma = np.linalg.svd(true_d.double().numpy(), compute_uv=False)
    assert true_sigma[5] > 2 * edge  # all six planted directions stand above the rounding
    assert signal_rank(sigma, edge) == 6
    assert signal_rank(sigma, None) is None


def test_signal_spectrum_applies_eq7_above_the_edge_only():
    a, u, _error, _ = _rounded_pair(384, 512, seed=4, delta_scale=5e-5)  # a few times the edge
    delta = (a - u).double().numpy()
    s = np.linalg.svd(delta, compute_uv=False)
    edge = rounding_edge(a, u, BF16, BF16)
    above = s[s > edge]
    full = select_rank(torch.from_numpy(s), eta=0.9, edge=edge, max_rank=256)
    signal = select_rank(torch.from_numpy(s), eta=0.9, edge=edge, max_rank=256, spectrum="signal")
    assert full.rank == reference_rank(s, 0.9, 256)[0] > 50  # the full spectrum measures rounding noise
    assert signal.rank == reference_rank(above, 0.9)[0] <= 6
    assert signal.signal_rank == full.signal_rank == 6 and signal.rounding_edge == edge
    nothing = select_rank(torch.from_numpy(s), eta=0.9, edge=float(s[0]) * 2, spectrum="signal")
    assert nothing.rank == 0 and nothing.signal_rank == 0
    # float32 inputs: no edge, and "signal" is the paper's rule
    same = select_rank(torch.from_numpy(s), eta=0.9, spectrum="signal")
    assert same.rank == full.rank and same.rounding_edge is None


def _bf16_triplet(m, n, term_ulps, seed=0):
    """bf16 fine-tune / aligned / unaligned where the restore term is about
    ``term_ulps`` of the fine-tune's ulp per entry (the dead zone of round-to-nearest)."""
    g = torch.Generator().manual_seed(seed)
    un = (torch.randn(m, n, generator=g) * 0.02).to(BF16).float()
    safety = (torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) / math.sqrt(8) * 0.02 * 0.05
    al = (un + safety).to(BF16).float()
    ft = (al - 0.8 * safety + (torch.randn(m, 16, generator=g) @ torch.randn(16, n, generator=g)) / 4 * 2e-4).to(BF16).float()
    scale = term_ulps * float(ulp(ft, BF16).mean()) / float((al - ft).abs().mean())
    return ft, ft + scale * (al - ft), un


def _reference_errors(written, target, basis, side):
    """||P E||, ||(I - P) E|| of E = written - target in float64 numpy."""
    e = written.double().numpy() - target.double().numpy()
    b = basis.double().numpy()
    inside = b @ (b.T @ e) if side == "output" else (e @ b) @ b.T
    return np.linalg.norm(inside), np.linalg.norm(e - inside)


@pytest.mark.parametrize("term_ulps", [0.15, 0.4, 1.5])
def test_subspace_rounding_keeps_the_term_that_round_to_nearest_drops(term_ulps):
    ft, al, un = _bf16_triplet(256, 768, term_ulps)
    factors = safety_factors(al, un, FusionSettings(eta=0.9, rank=16, fusion="restore")).with_finetune(ft)
    target = ft.double() + factors.left.double() @ factors.right.double()
    plain, _ = write_fused(ft, factors, 1.0, out_dtype=BF16, rounding="nearest")
    kept, written = write_fused(ft, factors, 1.0, out_dtype=BF16)
    assert kept.dtype == plain.dtype == BF16
    if term_ulps > 1:  # a wide term survives round to nearest: the plain cast is written
        assert torch.equal(kept, plain) and written.rounding is None
        assert abs(written.plain_kept - 1) <= 0.01 and written.kept == written.plain_kept
        return
    assert written.rounding is not None and written.plain_kept is None
    basis, side = factors.subspace_basis()
    in_plain, out_plain = _reference_errors(plain, target, basis, side)
    in_kept, out_kept = _reference_errors(kept, target, basis, side)
    assert in_kept < 0.5 * in_plain  # the in-subspace error falls
    spacing = ulp(target.float(), BF16).double()
    k, d = basis.shape[1], basis.shape[0]
    ordinary = math.sqrt(float((spacing**2).sum()) / 12 * (1 - k / d))  # uniform rounding, outside P
    assert out_kept < 1.2 * ordinary  # the rest stays at rounding level
    assert float((kept.double() - target).abs().max()) <= 1.5 * float(spacing.max())
    # share kept along the term, float64 by hand
    term = (target - ft.double()).numpy()
    share = lambda y: float(((y.double() - ft.double()).numpy() * term).sum() / (term * term).sum())  # noqa: E731
    assert written.kept == pytest.approx(share(kept), abs=1e-4)
    assert kept_share(plain, ft, factors.left, factors.right, 1.0) == pytest.approx(share(plain), abs=1e-4)
    assert abs(share(kept) - 1) < 0.1
    if term_ulps < 0.5:
        assert share(plain) < 0.9  # round to nearest drops part of a sub-ulp term
    if term_ulps < 0.2:
        assert share(plain) < 0.6


def test_subspace_rounding_on_the_input_side():
    ft, al, un = _bf16_triplet(512, 192, 0.3, seed=5)
    factors = safety_factors(al, un, FusionSettings(eta=0.9, rank=8, fusion="add"))
    assert factors.side == "input"
    basis, side = factors.subspace_basis()
    assert side == "input" and basis.shape == (192, 8)
    np.testing.assert_allclose(basis.T @ basis, np.eye(8), atol=1e-5)
    target = ft.double() + 0.1 * factors.left.double() @ factors.right.double()  # alpha 0.1: 0.15 ulp
    plain, _ = write_fused(ft, factors, 0.1, out_dtype=BF16, rounding="nearest")
    kept, written = write_fused(ft, factors, 0.1, out_dtype=BF16)
    assert written.rounding is not None
    assert _reference_errors(kept, target, basis, side)[0] < 0.5 * _reference_errors(plain, target, basis, side)[0]


def test_full_rank_subspace_rounding_is_round_to_nearest():
    """eta = 1: the projector is the identity, and nothing beats round to nearest."""
    ft, al, un = _bf16_triplet(96, 160, 0.4, seed=6)
    out, info = lssf_fuse(ft, al, un, FusionSettings(alpha=0.7, eta=1.0, fusion="add", round_to='bfloat16'))
    assert info.rank == 96
    expected = (ft.double() + 0.7 * (al.double() - un.double())).to(BF16)  # task arithmetic, cast once
    plain = (ft + 0.7 * (al - un)).to(BF16)
    assert torch.equal(out, plain)
    assert (out.double() - expected.double()).abs().max() <= ulp(expected.float(), BF16).max()


def test_bf16_identities_zero_delta_and_sign_invariance():
    ft, al, un = _bf16_triplet(128, 200, 0.4, seed=7)
    out, info = lssf_fuse(ft.to(BF16), al.to(BF16), al.to(BF16), FusionSettings(fusion="add", alpha=1.0, eta=0.9))
    assert info.rank == 0 and torch.equal(out, ft.to(BF16))
    sub = safety_factors(al, un, FusionSettings(eta=0.9, rank=8, fusion="restore")).with_finetune(ft)
    flipped = type(sub)(-sub.left, -sub.right, sub.info, sub.sigma, sub.fusion, None, sub.side)
    a, _ = write_fused(ft, sub, 1.0, out_dtype=BF16)
    b, _ = write_fused(ft, flipped, 1.0, out_dtype=BF16)
    assert torch.equal(a, b)  # U and -U give the same projector, the same rounding


def test_subspace_round_keeps_the_plain_cast_when_it_cannot_help():
    target = torch.randn(64, 64, generator=torch.Generator().manual_seed(8))
    basis = torch.eye(64)
    written, record = subspace_round(target, basis, "output", BF16)
    assert torch.equal(written, target.to(BF16)) and record.iterations == 0
    assert record.in_subspace == record.in_subspace_plain


def test_merge_warnings_name_ranks_set_by_rounding_noise_and_lost_terms():
    from mergekit_lssf.stats import MergeStats, TensorRecord

    stats = MergeStats()
    stats.reset(output_dtype=BF16)
    for i in range(3):  # 2 of 3 capped at 256 with a signal rank of 12: more than half
        stats.add(TensorRecord(f"w{i}", 256 if i < 2 else 20, i < 2, 0.9, 0.1, rounding_edge=1e-3, signal_rank=12,
                               kept=0.95 if i else 0.55))
    warnings = stats.warnings()
    assert len(warnings) == 2
    assert "2 of 3 fused weights are capped by max_rank" in warnings[0] and "`spectrum: signal`" in warnings[0]
    assert "1 written weights keep less than 0.8" in warnings[1] and "w0 (0.55)" in warnings[1] and "w1" not in warnings[1]
    summary = stats.summary()
    assert "signal rank (singular values above the rounding edge) min 12 / mean 12.0 / max 12" in summary
    assert "keep min 0.550 / mean 0.817" in summary
    stats.reset()
    stats.add(TensorRecord("w", 256, True, 0.9, 0.1, rounding_edge=1e-3, signal_rank=200))  # capped, but signal is high
    stats.add(TensorRecord("v", 8, False, 0.9, 0.1))  # float32 inputs: no edge
    assert stats.warnings() == [] and stats.kept_words() is None


def test_first_gain_follows_the_flip_noise_bound():
    from mergekit_lssf.precision import ROUNDING_NOISE_SHARE, first_gain

    assert first_gain(16, 576) == 1.0  # small k / d: full steps through the dead zone
    assert first_gain(256, 576) == pytest.approx(ROUNDING_NOISE_SHARE / (2.8 * math.sqrt(256 / 576)))
    assert first_gain(256, 576) < first_gain(64, 576) <= 1.0


@pytest.mark.parametrize("fmt", [torch.bfloat16, torch.float16])
def test_rounding_edge_reads_16_bit_and_upcast_inputs_alike(fmt):
    g = torch.Generator().manual_seed(9)
    a, u = ((torch.randn(128, 192, generator=g) * 0.02).to(fmt) for _ in range(2))
    assert stored_precision(a.float()) is fmt
    assert rounding_edge(a, u, fmt, fmt) == rounding_edge(a.float(), u.float(), fmt, fmt)
    v = (ulp(a.float(), fmt).double() ** 2 + ulp(u.float(), fmt).double() ** 2) / 12  # ulp(), tested above
    expected = math.sqrt(float(v.sum(1).max())) + math.sqrt(float(v.sum(0).max()))
    assert rounding_edge(a, u, fmt, fmt) == pytest.approx(expected, rel=1e-5)

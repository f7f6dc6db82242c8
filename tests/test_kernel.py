"""The math of mergekit_lssf.kernel against the independent float64 reference."""

import numpy as np
import pytest
import torch

from mergekit_lssf.kernel import (
    SafetySubspace,
    data_free_subspace,
    lssf_fuse,
    projection_weights,
    select_rank,
    spectral_entropy,
)
from reference import make_delta, reference_alphas, reference_lssf, reference_rank, spectra
from mergekit_lssf.parameters import FusionSettings

SHAPES = [(48, 48), (32, 96), (96, 32), (160, 96), (96, 160), (300, 12), (12, 300), (1, 40), (40, 1)]
ETAS = [0.3, 0.5, 0.8, 0.9, 0.99]


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def _weights(shape, spectrum, seed=0):
    rng = np.random.default_rng(seed + 100)
    unaligned = rng.standard_normal(shape)
    aligned = unaligned + make_delta(*shape, spectrum, seed=seed)
    ft = aligned + 0.05 * rng.standard_normal(shape)
    return ft, aligned, unaligned


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["planted_plus_noise", "heavy_tailed", "rank_deficient"])
def test_fast_path_matches_float64_svd(shape, name):
    spectrum = spectra(min(shape), seed=1)[name]
    ft, al, un = _weights(shape, spectrum)
    for eta in ETAS:
        for weight_max in (1.0, 2.5):
            ref, r_ref = reference_lssf(ft, al, un, alpha=0.8, eta=eta, weight_max=weight_max)
            for dtype in (torch.float32, torch.float64):
                out, info = lssf_fuse(*(torch.tensor(x, dtype=dtype) for x in (ft, al, un)), FusionSettings(fusion="add", alpha=0.8, eta=eta, weight_max=weight_max))
                assert info.rank == r_ref, (name, shape, eta, dtype)
                assert out.dtype == dtype
                assert _rel(out, ref) < 1e-4, (name, shape, eta, dtype)


@pytest.mark.parametrize("shape", [(64, 64), (40, 200), (200, 40)])
def test_spectrum_and_entropy_share_match_reference(shape):
    spectrum = spectra(min(shape), seed=2)["planted_plus_noise"]
    delta = make_delta(*shape, spectrum, seed=3)
    s_ref = np.linalg.svd(delta, compute_uv=False)
    sub = data_free_subspace(torch.tensor(delta))
    np.testing.assert_allclose(sub.sigma.numpy(), s_ref, rtol=1e-6, atol=1e-10)
    for eta in ETAS:
        choice = select_rank(sub.sigma, eta=eta)
        r_ref, share_ref = reference_rank(s_ref, eta)
        assert choice.rank == r_ref
        assert choice.entropy_share == pytest.approx(share_ref, rel=1e-9)
        assert choice.energy_share == pytest.approx((s_ref[:r_ref] ** 2).sum() / (s_ref**2).sum(), rel=1e-9)


def test_entropy_definition():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    cum, p = spectral_entropy(sigma)
    expected_p = np.array([9, 4, 1, 0]) / 14
    np.testing.assert_allclose(p.numpy(), expected_p)
    terms = [-q * np.log(q) if q > 0 else 0.0 for q in expected_p]
    np.testing.assert_allclose(cum.numpy(), np.cumsum(terms))


def test_select_rank_rules():
    sigma = torch.tensor(1.0 / np.arange(1, 101), dtype=torch.float64)
    r_ref, _ = reference_rank(sigma.numpy(), 0.9)
    assert select_rank(sigma, eta=0.9).rank == r_ref
    capped = select_rank(sigma, eta=0.9, max_rank=5)
    assert (capped.rank, capped.capped, capped.entropy_rank) == (5, True, r_ref)
    fixed = select_rank(sigma, eta=0.9, rank=10, max_rank=5)
    assert (fixed.rank, fixed.capped, fixed.entropy_rank) == (10, False, None)
    # a fixed rank is limited by the number of nonzero singular values
    assert select_rank(torch.tensor([2.0, 1.0, 0.0, 0.0]), eta=0.5, rank=10).rank == 2
    # one nonzero value: H_n = 0, rank 1
    assert select_rank(torch.tensor([5.0, 0.0, 0.0]), eta=0.9).rank == 1
    # eta = 1 keeps every nonzero direction
    assert select_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), eta=1.0).rank == 3
    with pytest.raises(ValueError, match="eta"):
        select_rank(sigma, eta=0.0)


def test_projection_weights_eq_10():
    s = torch.tensor([4.0, 3.0, 2.5, 1.0], dtype=torch.float64)
    for weight_max in (1.0, 1.5, 3.0):
        np.testing.assert_allclose(
            projection_weights(s, weight_max).numpy(), reference_alphas(s.numpy(), weight_max)
        )
    a = projection_weights(s, 3.0)
    assert a[0] == 3.0 and a[-1] == 1.0 and bool((a[:-1] >= a[1:]).all())
    assert projection_weights(torch.tensor([2.0]), 3.0).tolist() == [1.0]
    assert projection_weights(torch.tensor([2.0, 2.0]), 3.0).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="weight_max"):
        projection_weights(s, 0.5)


def test_weighted_projection_is_u_prime_u_prime_t():
    """P' = U' U'^T with U' = U_r diag(a): direction i carries a_i squared."""
    ft, al, un = _weights((30, 50), spectra(30)["heavy_tailed"])
    delta = al - un
    u, s, _ = np.linalg.svd(delta, full_matrices=False)
    r = 6
    a = reference_alphas(s[:r], 2.0)
    expected = ft + 0.5 * sum(a[i] ** 2 * np.outer(u[:, i], u[:, i]) for i in range(r)) @ delta
    out, info = lssf_fuse(*(torch.tensor(x) for x in (ft, al, un)), FusionSettings(fusion="add", alpha=0.5, eta=0.9, rank=r, weight_max=2.0))
    assert info.rank == r
    assert _rel(out, expected) < 1e-10


def test_eta_one_equals_mergekit_task_arithmetic():
    """eta = 1, weight_max = 1: task_arithmetic on base ft with weights [+a, -a]."""
    from mergekit.merge_methods import merge_tensors

    rng = np.random.default_rng(5)
    for shape in [(40, 40), (24, 64), (64, 24)]:
        ft, al, un = (torch.tensor(rng.standard_normal(shape)) for _ in range(3))
        expected = merge_tensors(
            [ft, al, un], "task_arithmetic", base_index=0, parameters={"weight": [0.7, -0.7]}
        )
        out, info = lssf_fuse(ft, al, un, FusionSettings(fusion="add", alpha=0.7, eta=1.0, max_rank=None))
        assert info.rank == min(shape)
        assert _rel(out, expected) < 1e-10


def test_zero_delta_returns_finetuned_unchanged():
    ft = torch.randn(16, 24)
    same = torch.randn(16, 24)
    out, info = lssf_fuse(ft, same, same.clone(), FusionSettings(fusion="add", alpha=1.0, eta=0.9))
    assert info.rank == 0 and info.choice.entropy_share == 0.0
    assert torch.equal(out, ft) and not torch.isnan(out).any()


def test_tied_singular_values():
    """A tie fully inside the kept rank: the result is basis independent."""
    k = 40
    spectrum = np.array([2.0] * 4 + [0.5] * (k - 4))
    ft, al, un = _weights((k, 60), spectrum, seed=7)
    for weight_max in (1.0, 2.0):
        ref, r_ref = reference_lssf(ft, al, un, alpha=1.0, eta=0.4, weight_max=weight_max)
        out, info = lssf_fuse(*(torch.tensor(x) for x in (ft, al, un)), FusionSettings(fusion="add", alpha=1.0, eta=0.4, weight_max=weight_max))
        assert r_ref == 4 and info.rank == 4
        assert _rel(out, ref) < 1e-8


def test_sign_and_rotation_of_basis_do_not_matter():
    """Flipping singular-vector signs, or rotating inside a tie, changes nothing."""
    spectrum = np.array([3.0, 3.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    ft, al, un = _weights((8, 20), spectrum, seed=9)
    delta = torch.tensor(al - un)
    u, s, vt = torch.linalg.svd(delta, full_matrices=False)
    rng = np.random.default_rng(0)
    signs = torch.tensor(rng.choice([-1.0, 1.0], size=8))
    q, _ = torch.linalg.qr(torch.tensor(rng.standard_normal((3, 3))))
    rotated = u.clone()
    rotated[:, :3] = u[:, :3] @ q
    args = [torch.tensor(x) for x in (ft, al, un)]
    kwargs = dict(alpha=1.0, eta=0.9, weight_max=2.0, fusion="add")
    base, info = lssf_fuse(*args, FusionSettings(**kwargs), subspace=SafetySubspace(s, u, "output"))
    assert info.rank >= 3
    for basis, side in ((u * signs, "output"), (rotated, "output"), (vt.T * signs, "input")):
        out, _ = lssf_fuse(*args, FusionSettings(**kwargs), subspace=SafetySubspace(s, basis, side))
        assert _rel(out, base) < 1e-10
    data_free, _ = lssf_fuse(*args, FusionSettings(**kwargs))
    assert _rel(data_free, base) < 1e-10


def test_bfloat16_inputs_are_computed_in_float32():
    stored = [torch.tensor(x).to(torch.bfloat16) for x in _weights((64, 128), spectra(64)["planted_plus_noise"], seed=11)]
    ref, r_ref = reference_lssf(*(t.double().numpy() for t in stored), alpha=1.0, eta=0.9)
    out, info = lssf_fuse(*stored, FusionSettings(fusion="add", alpha=1.0, eta=0.9))
    assert out.dtype == torch.bfloat16 and info.rank == r_ref
    assert _rel(out.double(), ref) < 4e-3  # only the final rounding to bf16


def test_subspace_basis_smaller_than_rank_is_capped():
    ft, al, un = (torch.randn(20, 30, dtype=torch.float64) for _ in range(3))
    full = data_free_subspace(al - un)
    small = SafetySubspace(full.sigma, full.basis[:, :3], full.side)
    _, info = lssf_fuse(ft, al, un, FusionSettings(fusion="add", alpha=1.0, eta=0.99), subspace=small)
    assert info.rank == 3 and info.choice.capped


@pytest.mark.parametrize("shape", [(48, 48), (96, 160), (300, 12), (1, 40)])
@pytest.mark.parametrize("settings", [dict(fusion="restore"), dict(fusion="add", rank_rule="noise_floor"),
                                      dict(fusion="restore", max_rank=5), dict(fusion="add", rank=7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spectrum_only_gives_the_same_rank_and_spectrum(shape, settings, dtype):
    """``safety_factors(factors=False)`` (what `report` runs) chooses the rank from the
    same spectrum as the merge, and computes no factors."""
    from mergekit_lssf.kernel import safety_factors

    _, al, un = (torch.from_numpy(w).to(dtype) for w in _weights(shape, spectra(min(shape))["planted_plus_noise"]))
    settings = {"eta": 0.9, "max_rank": 256, "fusion": "add", **settings}
    full = safety_factors(al, un, FusionSettings(**settings))
    ranks_only = safety_factors(al, un, FusionSettings(**settings), factors=False)
    assert ranks_only.left is None and ranks_only.right is None
    assert ranks_only.info.choice == full.info.choice and ranks_only.info.sigma_1 == full.info.sigma_1
    assert torch.equal(ranks_only.sigma, full.sigma)
    assert (full.left is not None) == (full.info.rank > 0)


def test_the_kernel_has_no_default_fusion():
    """A recipe defaults to ``restore`` and the paper to ``add``: an in-memory caller must
    say which, so that nobody gets ``add`` where a recipe would have given ``restore``."""
    w = torch.eye(3)
    with pytest.raises(TypeError, match="fusion"):
        lssf_fuse(w, w, torch.zeros(3, 3), FusionSettings(alpha=1.0, eta=0.9))

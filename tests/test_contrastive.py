"""The contrastive closed form (``mergekit_lssf/contrastive.py``) against independent
float64 computations: numpy's dense solve, SciPy's generalized eigensolver, and the
gradient of the objective it minimises."""

import numpy as np
import pytest
import scipy.linalg
import torch

from mergekit_lssf.contrastive import contrastive_basis, contrastive_fuse, trace_normalised


def _gram(rng, d, n, rank=None):
    """A trace-normalised input Gram of ``n`` activations in ``d`` dims (of ``rank``)."""
    x = rng.standard_normal((d, rank or d)) @ rng.standard_normal((rank or d, n))
    g = x @ x.T
    return g / np.trace(g)


def _case(seed=0, d_out=12, d_in=10, rank_h=None, rank_t=None):
    rng = np.random.default_rng(seed)
    w_ft = rng.standard_normal((d_out, d_in))
    w_al = w_ft + 0.3 * rng.standard_normal((d_out, d_in))
    return w_ft, w_al, _gram(rng, d_in, 40, rank_h), _gram(rng, d_in, 40, rank_t)


def _direct(w_ft, w_al, c_h, c_t, lam, eps):
    """``W_ft + (W_al - W_ft) C_H (C_H + lam B)^-1`` by numpy's dense solve."""
    b = c_t + eps * np.eye(len(c_t))
    right = np.linalg.solve((c_h + lam * b).T, c_h.T).T  # C_H (C_H + lam B)^-1
    return w_ft + (w_al - w_ft) @ right


def _t(x):
    return torch.from_numpy(x)


@pytest.mark.parametrize("lam", [0.3, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("ranks", [(None, None), (4, 6), (3, None)])
def test_full_rank_equals_the_closed_form(lam, ranks):
    w_ft, w_al, c_h, c_t = _case(rank_h=ranks[0], rank_t=ranks[1])
    basis = contrastive_basis(_t(c_h), _t(c_t), eps=1e-6)
    got = contrastive_fuse(_t(w_ft), _t(w_al), basis, lam=lam).numpy()
    want = _direct(w_ft, w_al, c_h, c_t, lam, 1e-6)
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want - w_ft) + 1e-12


def test_the_basis_is_the_generalized_eigenbasis():
    _, _, c_h, c_t = _case(seed=1)
    basis = contrastive_basis(_t(c_h), _t(c_t), eps=1e-4)
    b = c_t + 1e-4 * np.eye(len(c_t))
    v, mu = basis.v.numpy(), basis.mu.numpy()
    assert np.allclose(v.T @ b @ v, np.eye(len(mu)), atol=1e-8)
    assert np.allclose(v.T @ c_h @ v, np.diag(mu), atol=1e-8 * mu.max())
    assert np.allclose(basis.bv.numpy(), b @ v)
    reference = scipy.linalg.eigh(c_h, b, eigvals_only=True)[::-1]
    assert np.allclose(mu, reference, rtol=1e-8, atol=1e-12)
    assert np.all(np.diff(mu) <= 1e-12)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_truncation_equals_the_leading_generalized_eigenvectors(k):
    w_ft, w_al, c_h, c_t = _case(seed=2, rank_h=5)
    lam, eps = 2.0, 1e-5
    basis = contrastive_basis(_t(c_h), _t(c_t), eps=eps, k=k)
    b = c_t + eps * np.eye(len(c_t))
    mu, v = scipy.linalg.eigh(c_h, b)  # ascending, V^T B V = I
    v_k, mu_k = v[:, ::-1][:, :k], mu[::-1][:k]
    want = w_ft + (w_al - w_ft) @ (b @ v_k) @ np.diag(mu_k / (mu_k + lam)) @ v_k.T
    got = contrastive_fuse(_t(w_ft), _t(w_al), basis, lam=lam).numpy()
    assert np.linalg.norm(got - want) <= 1e-8 * np.linalg.norm(want - w_ft)


def test_the_closed_form_minimises_the_objective():
    """The gradient of ||(W - W_al) X_H||^2 + lam(||(W - W_ft) X_T||^2 + eps ||W - W_ft||^2)
    vanishes at the merge, i.e. (W - W_al) C_H + lam (W - W_ft) B = 0."""
    w_ft, w_al, c_h, c_t = _case(seed=3, rank_h=4, rank_t=5)
    lam, eps = 3.0, 1e-3
    w = contrastive_fuse(_t(w_ft), _t(w_al), contrastive_basis(_t(c_h), _t(c_t), eps=eps), lam=lam).numpy()
    gradient = (w - w_al) @ c_h + lam * (w - w_ft) @ (c_t + eps * np.eye(len(c_t)))
    assert np.linalg.norm(gradient) <= 1e-9 * np.linalg.norm((w_al - w_ft) @ c_h)


def test_same_rows_give_interpolation_on_their_span():
    """C_H = C_T: the merge is linear interpolation at 1/(1+lam) toward the aligned
    weights on the rows' span (up to eps); outside it the fine-tune is kept."""
    rng = np.random.default_rng(4)
    d_in, lam = 10, 1.0
    w_ft, w_al, _, _ = _case(seed=4, d_in=d_in)
    c = _gram(rng, d_in, 40, rank=6)
    for eps, bound in ((1e-6, 1e-4), (1e-4, 1e-2)):
        w = contrastive_fuse(_t(w_ft), _t(w_al), contrastive_basis(_t(c), _t(c), eps=eps), lam=lam).numpy()
        w_lin = w_ft + (w_al - w_ft) / (1 + lam)
        root = scipy.linalg.sqrtm(c).real
        assert np.linalg.norm((w - w_lin) @ root) <= bound * np.linalg.norm((w_lin - w_ft) @ root)
        outside = scipy.linalg.null_space(c)
        assert np.linalg.norm((w - w_ft) @ outside) <= 1e-3 * np.linalg.norm(w_al - w_ft)


def test_a_large_lam_keeps_the_fine_tune():
    w_ft, w_al, c_h, c_t = _case(seed=5)
    basis = contrastive_basis(_t(c_h), _t(c_t), eps=1e-6)
    moved = [np.linalg.norm(contrastive_fuse(_t(w_ft), _t(w_al), basis, lam=lam).numpy() - w_ft)
             for lam in (1.0, 1e2, 1e4, 1e6)]
    assert all(a > b for a, b in zip(moved, moved[1:]))
    assert moved[-1] <= 0.02 * moved[-2]  # the term falls like 1/lam


def test_bad_inputs_are_refused():
    c = _t(np.eye(3) / 3)
    with pytest.raises(ValueError, match="eps must be > 0"):
        contrastive_basis(c, c, eps=0)
    with pytest.raises(ValueError, match="lam must be > 0"):
        contrastive_fuse(_t(np.eye(3)), _t(np.eye(3)), contrastive_basis(c, c), lam=0)
    with pytest.raises(ValueError, match="zero trace"):
        trace_normalised(torch.zeros(3, 3))


# ---- rank_rule: entropy over mu (Eq. 5-7 with p ∝ mu), the file's layouts, the term's norm ----

def _numpy_entropy_k(mu, eta):
    """Eq. 5-7 on mu, independently in numpy float64: p_i = mu_i / sum(mu),
    H_rho = -sum_{i<=rho} p_i log p_i, k = the smallest rho with H_rho >= eta H_n
    (1 when a single mu is nonzero, 0 when none is)."""
    mu = np.clip(np.asarray(mu, dtype=np.float64), 0, None)
    if not (mu > 0).any():
        return 0
    p = mu / mu.sum()
    h = np.cumsum(np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0))
    if h[-1] <= 0:
        return 1
    return int(np.argmax(h >= eta * h[-1])) + 1


@pytest.mark.parametrize("seed, rank_h, eta", [(0, None, 0.9), (1, 4, 0.9), (2, 7, 0.5), (3, None, 0.99), (4, 2, 0.95)])
def test_the_entropy_rule_over_mu_is_eq_5_to_7_with_p_proportional_to_mu(seed, rank_h, eta):
    from mergekit_lssf.kernel import contrastive_rank, contrastive_safety_factors

    w_ft, w_al, c_h, c_t = _case(seed=seed, d_in=24, rank_h=rank_h, rank_t=12)
    lam, eps = 2.0, 1e-6
    full = contrastive_basis(_t(c_h), _t(c_t), eps=eps)
    mu_all = scipy.linalg.eigh(c_h, c_t + eps * np.eye(24), eigvals_only=True)[::-1]  # independent of the package
    want = _numpy_entropy_k(mu_all, eta)
    assert 1 <= want <= 24
    choice = contrastive_rank(full, rank_rule="entropy", eta=eta)
    assert (choice.rank, choice.entropy_rank, choice.capped, choice.rule) == (want, want, False, "entropy")
    # the merge with that k is the direct formula with the k leading generalized eigenvectors
    b = c_t + eps * np.eye(24)
    mu, v = scipy.linalg.eigh(c_h, b)
    v_k, mu_k = v[:, ::-1][:, :want], mu[::-1][:want]
    direct = (w_al - w_ft) @ (b @ v_k) @ np.diag(mu_k / (mu_k + lam)) @ v_k.T
    factors = contrastive_safety_factors(_t(w_ft), _t(w_al), full, lam=lam, rank_rule="entropy", eta=eta,
                                         work_dtype=torch.float64)
    term = (factors.left @ factors.right).numpy()
    assert np.linalg.norm(term - direct) <= 1e-8 * np.linalg.norm(direct)
    # a truncated basis keeps the whole spectrum: the rule reads it all, then the stored count caps it
    stored = max(1, want - 1)
    short = contrastive_basis(_t(c_h), _t(c_t), eps=eps, k=stored)
    capped = contrastive_rank(short, rank_rule="entropy", eta=eta)
    assert (capped.rank, capped.entropy_rank, capped.capped) == (min(want, stored), want, want > stored)


def test_rank_wins_over_the_rule_and_the_default_is_every_stored_vector():
    from mergekit_lssf.kernel import contrastive_rank

    _, _, c_h, c_t = _case(seed=6)
    basis = contrastive_basis(_t(c_h), _t(c_t), eps=1e-6, k=7)
    assert (contrastive_rank(basis).rank, contrastive_rank(basis).rule) == (7, "stored")
    assert (contrastive_rank(basis, rank=3, rank_rule="entropy").rank, contrastive_rank(basis, rank=3).rule) == (3, "fixed")
    with pytest.raises(ValueError, match="rank 8 is more than the 7 vectors"):
        contrastive_rank(basis, rank=8)
    with pytest.raises(ValueError, match="reads rank_rule entropy only"):
        contrastive_rank(basis, rank_rule="noise_floor")
    # shares are those of the whole spectrum: energy_share is the share of sum(mu) kept
    mu = basis.spectrum.numpy()
    assert contrastive_rank(basis).energy_share == pytest.approx(mu[:7].sum() / mu.sum(), rel=1e-12)


def test_the_rule_parameters_of_a_contrastive_recipe():
    from mergekit_lssf.parameters import LSSFConfigError, settings_from

    base = {"fusion": "contrastive", "calibration": "c.safetensors"}
    assert settings_from(base).rank_rule is None  # every stored vector
    assert settings_from({**base, "rank_rule": "entropy", "eta": 0.5}).eta == 0.5
    assert settings_from({"fusion": "restore"}).rank_rule == "entropy"  # unset: the paper's rule, as before
    assert settings_from({"fusion": "add", "rank_rule": "noise_floor"}).rank_rule == "noise_floor"
    for extra, word in (({"rank_rule": "noise_floor"}, "rank_rule: noise_floor"), ({"eta": 0.5}, "eta: 0.5"),
                        ({"max_rank": 8}, "max_rank: 8")):
        with pytest.raises(LSSFConfigError, match=f"`{word}` is not read by `fusion: contrastive`"):
            settings_from({**base, **extra})


def test_the_term_norm_is_measured_against_w_aligned_minus_w_ft():
    from mergekit_lssf.kernel import contrastive_safety_factors

    w_ft, w_al, c_h, c_t = _case(seed=7, rank_h=5)
    basis = contrastive_basis(_t(c_h), _t(c_t), eps=1e-6, k=6)
    factors = contrastive_safety_factors(_t(w_ft), _t(w_al), basis, lam=1.0, work_dtype=torch.float64)
    term = np.linalg.norm((factors.left @ factors.right).numpy())
    assert factors.info.term_norm == pytest.approx(term, rel=1e-10)
    assert factors.info.gap_norm == pytest.approx(np.linalg.norm(w_al - w_ft), rel=1e-12)
    assert factors.info.term_ratio(0.5) == pytest.approx(0.5 * term / np.linalg.norm(w_al - w_ft), rel=1e-10)


def test_dropped_share_is_the_tail_of_sum_mu():
    from mergekit_lssf.contrastive import dropped_share

    mu = torch.tensor([5.0, 3.0, 1.5, 0.5, 0.0], dtype=torch.float64)
    assert [dropped_share(mu, k) for k in (5, 3, 1, 0)] == pytest.approx([0.0, 0.5 / 10, 5 / 10, 1.0])
    assert dropped_share(torch.zeros(3, dtype=torch.float64), 1) == 0.0


def _write_calibration(path, fmt, sites, tensors, eps=1e-6):
    import json

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": fmt, "sites": json.dumps(sites), "eps": repr(eps)})
    return str(path)


def test_format_2_stores_every_mu_and_format_1_files_are_still_read(tmp_path):
    """/2: V and BV keep the leading k, mu every eigenvalue; stored_rank counts V's
    columns. A /1 file (mu of length k) merges as before; `rank_rule: entropy` is
    refused on a truncated one (its spectrum is not all there), read on a full one.
    Another version's format is refused in one line."""
    from mergekit_lssf.contrastive_file import FORMAT, FORMAT_1, ContrastiveFile
    from mergekit_lssf.kernel import contrastive_safety_factors
    from mergekit_lssf.parameters import LSSFConfigError

    w_ft, w_al, c_h, c_t = _case(seed=8)
    basis = contrastive_basis(_t(c_h), _t(c_t), eps=1e-6, k=4)
    name = "model.layers.0.mlp.up_proj.weight"
    sites = {name: name, "model.layers.0.mlp.gate_proj.weight": name}
    new = ContrastiveFile(_write_calibration(tmp_path / "v2.safetensors", FORMAT, sites, {
        f"{name}.V": basis.v, f"{name}.BV": basis.bv, f"{name}.mu": basis.spectrum}))
    old = ContrastiveFile(_write_calibration(tmp_path / "v1.safetensors", FORMAT_1, sites, {
        f"{name}.V": basis.v, f"{name}.BV": basis.bv, f"{name}.mu": basis.mu}))
    assert new.stored_rank() == old.stored_rank() == 4
    assert new.site("model.layers.0.mlp.gate_proj.weight") == name
    read_new, read_old = new.basis(name, 10), old.basis(name, 10)
    assert torch.equal(read_new.mu, read_old.mu) and read_new.spectrum.shape == (10,) and read_old.spectrum is None
    a = contrastive_safety_factors(_t(w_ft), _t(w_al), read_new, lam=3.0, work_dtype=torch.float64)
    b = contrastive_safety_factors(_t(w_ft), _t(w_al), read_old, lam=3.0, work_dtype=torch.float64)
    assert torch.equal(a.left @ a.right, b.left @ b.right)
    contrastive_safety_factors(_t(w_ft), _t(w_al), read_new, lam=3.0, rank_rule="entropy")
    with pytest.raises(ValueError, match="stores only the leading 4 of 10 .* calibrate again"):
        contrastive_safety_factors(_t(w_ft), _t(w_al), read_old, lam=3.0, rank_rule="entropy")
    full = contrastive_basis(_t(c_h), _t(c_t), eps=1e-6)
    old_full = ContrastiveFile(_write_calibration(tmp_path / "v1-full.safetensors", FORMAT_1, sites, {
        f"{name}.V": full.v, f"{name}.BV": full.bv, f"{name}.mu": full.mu}))
    assert torch.equal(old_full.basis(name, 10).spectrum, full.mu)  # a full /1 file holds the whole spectrum
    future = _write_calibration(tmp_path / "v3.safetensors", "mergekit-lssf-contrastive/3", sites, {
        f"{name}.V": basis.v, f"{name}.BV": basis.bv, f"{name}.mu": basis.spectrum})
    with pytest.raises(LSSFConfigError, match="does not read .*upgrade mergekit-lssf"):
        ContrastiveFile(future)
    broken = ContrastiveFile(_write_calibration(tmp_path / "bad.safetensors", FORMAT, sites, {
        f"{name}.V": basis.v, f"{name}.BV": basis.bv, f"{name}.mu": basis.mu}))  # /2 with a short mu
    with pytest.raises(LSSFConfigError, match="do not fit together"):
        broken.basis(name, 10)


def test_the_summary_and_the_card_words_show_k_and_the_term_ratio():
    from mergekit_lssf.stats import MergeStats, TensorRecord

    stats = MergeStats()
    for i, (k, ratio, wanted, capped) in enumerate([(4, 0.5, None, False), (6, 2.0, 9, True), (5, 1.0, 5, False)]):
        stats.add(TensorRecord(f"model.layers.{i}.mlp.down_proj.weight", k, capped, 1.0, 0.0, fusion="contrastive",
                               term_ratio=ratio, wanted_rank=wanted, site=f"model.layers.{i}.mlp.down_proj.weight"))
    summary = stats.summary()
    assert "lssf: contrastive: 3 weights; k min 4 / median 5 / max 6" in summary
    assert "||term|| / ||W_aligned - W_ft|| min 0.5 / median 1 / max 2 (model.layers.1.mlp.down_proj.weight)" in summary
    assert "0 capped by max_rank" in summary
    warnings = stats.warnings()
    assert len(warnings) == 1 and "model.layers.1.mlp.down_proj.weight wants 9, stores 6" in warnings[0]

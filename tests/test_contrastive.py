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

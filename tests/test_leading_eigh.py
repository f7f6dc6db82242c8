"""The CPU partial eigensolver (LAPACK building blocks) against numpy's float64 eigh."""

import numpy as np
import pytest
import torch

from mergekit_lssf.leading_eigh import LeadingEigh, gram_lower


def _spd(n, spectrum, seed=0):
    """n x n symmetric matrix with the given eigenvalues, as a Fortran array."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return np.asfortranarray((q * spectrum) @ q.T)


def _check_vectors(g, values, vecs, k):
    """Orthonormal columns that are eigenvectors of g for the k largest values."""
    assert vecs.shape == (g.shape[0], k) and vecs.dtype == torch.float64
    v = vecs.numpy()
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-10)
    scale = max(abs(values[0]), 1e-300)
    residual = g @ v - v * values[:k]
    assert np.abs(residual).max(initial=0.0) <= 1e-10 * scale


@pytest.mark.parametrize("n", [32, 33, 100, 257])
def test_values_and_leading_vectors_match_numpy(n):
    rng = np.random.default_rng(n)
    spectrum = np.sort(rng.random(n) ** 3)[::-1]
    g = _spd(n, spectrum, seed=n)
    ref_values, ref_vectors = np.linalg.eigh(g)
    ref_values, ref_vectors = ref_values[::-1], ref_vectors[:, ::-1]
    eig = LeadingEigh(g.copy(order="F"))
    values = eig.values.numpy()
    assert values.dtype == np.float64 and np.all(np.diff(values) <= 0)
    np.testing.assert_allclose(values, ref_values, atol=1e-12 * ref_values[0])
    for k in (0, 1, 7, n // 2, n):
        vecs = eig.vectors(k)
        _check_vectors(g, values, vecs, k)
        # simple, well-separated eigenvalues: the same vectors up to sign
        overlap = np.abs((vecs.numpy() * ref_vectors[:, :k]).sum(0))
        np.testing.assert_allclose(overlap, np.ones(k), atol=1e-8)


def test_tied_and_zero_eigenvalues():
    n = 64
    spectrum = np.array([5.0] * 6 + [2.0] * 10 + [0.0] * (n - 16))
    g = _spd(n, spectrum, seed=3)
    eig = LeadingEigh(g.copy(order="F"))
    np.testing.assert_allclose(eig.values.numpy(), spectrum, atol=1e-12 * 5)
    for k in (6, 16):  # whole tie groups: the subspace is unique
        vecs = eig.vectors(k).numpy()
        _check_vectors(g, eig.values.numpy(), torch.from_numpy(vecs), k)
        q, _ = np.linalg.qr(g @ vecs)
        np.testing.assert_allclose(vecs @ vecs.T, q @ q.T, atol=1e-10)


def test_zero_matrix():
    n = 40
    g = np.zeros((n, n), order="F")
    eig = LeadingEigh(g)
    assert torch.equal(eig.values, torch.zeros(n, dtype=torch.float64))
    v = eig.vectors(5).numpy()
    np.testing.assert_allclose(v.T @ v, np.eye(5), atol=1e-12)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (50, 50)])
def test_gram_lower_triangle(shape):
    d = torch.tensor(np.random.default_rng(1).standard_normal(shape))
    side = "output" if shape[0] <= shape[1] else "input"
    expected = (d @ d.T if side == "output" else d.T @ d).numpy()
    lower = gram_lower(d, side)
    assert lower.flags.f_contiguous and lower.shape == expected.shape
    np.testing.assert_allclose(np.tril(lower), np.tril(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_smallest_sizes(n):
    spectrum = np.arange(n, 0, -1, dtype=np.float64)
    g = _spd(n, spectrum, seed=n)
    eig = LeadingEigh(g.copy(order="F"))
    np.testing.assert_allclose(eig.values.numpy(), spectrum, atol=1e-13 * n)
    for k in range(n + 1):
        _check_vectors(g, eig.values.numpy(), eig.vectors(k), k)


def test_threads_get_the_same_answers_as_one_thread():
    """Concurrent calls (mergekit's executor may use threads) must not disturb each other."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    mats = [torch.tensor(rng.standard_normal((70 + 9 * i, 60))) for i in range(6)]

    def spectrum(d):
        eig = LeadingEigh(gram_lower(d, "input"))
        return eig.values, eig.vectors(5)

    alone = [spectrum(d) for d in mats]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(spectrum, mats * 3))
    for i, (values, vectors) in enumerate(together):
        assert torch.equal(values, alone[i % 6][0]) and torch.equal(vectors, alone[i % 6][1])

"""All eigenvalues, but only the leading eigenvectors, of a Gram matrix on the CPU.

LSSF needs every singular value of ``delta`` (the entropy rank, Eq. 5-7, sums over all
of them) but only the ``r`` leading singular vectors, and ``r`` is usually far below
the Gram matrix's size ``n``. ``torch.linalg.eigh`` has no way to ask for fewer
vectors, and on the CPU computing and back-transforming all ``n`` of them is more than
half of its time. This module calls LAPACK's building blocks (through SciPy, a
mergekit dependency) in the order LAPACK's own ``dsyevr`` would, but decides ``k``
between the steps:

1. ``dsyrk``: the Gram matrix, lower triangle only (half the flops of ``d.T @ d``).
2. ``dsytrd``: Householder reduction to tridiagonal form ``G = Q T Q^T``, the
   ``O(n^3)`` step that values and vectors share.
3. ``dsterf``: every eigenvalue of ``T`` (= of ``G``), ``O(n^2)``.
4. ``dstemr`` (MRRR): the ``k`` wanted eigenvectors of ``T``, ``O(n k)``.
5. ``dormqr``: multiply them by ``Q``, ``O(n^2 k)``. For ``uplo = 'L'`` the reflectors
   of ``Q`` sit below the subdiagonal exactly as a QR factorization of
   ``G[1:, :-1]`` would store them, which is how LAPACK's ``dormtr`` applies them.

Everything is float64; accuracy is that of ``dsyevr`` (tested against numpy's float64
``eigh`` in ``tests/test_leading_eigh.py`` and, through the kernel, against its float64
SVD in ``tests/test_kernel.py``). The routines are SciPy's own wrappers
(``scipy.linalg.blas`` / ``scipy.linalg.lapack``). CUDA tensors never come here
(``torch.linalg.eigh`` on the GPU is fast).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg.blas as blas
import scipy.linalg.lapack as lapack
import torch


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise RuntimeError(f"LAPACK {routine} failed with info={info}")


def gram_lower(d: torch.Tensor, side: str) -> np.ndarray:
    """Lower triangle of ``d @ d.T`` (side ``"output"``) or ``d.T @ d`` (``"input"``).

    ``d``: ``(rows, cols)`` float64, CPU, C-contiguous. Returns a Fortran-ordered
    ``(n, n)`` float64 array; only its lower triangle is meaningful.
    """
    x = d.numpy().T  # Fortran view of shape (cols, rows): x = d^T, no copy
    # output: x^T x = d d^T (trans=1); input: x x^T = d^T d (trans=0)
    return blas.dsyrk(1.0, x, trans=1 if side == "output" else 0, lower=1)


class LeadingEigh:
    """Eigen-decomposition of a symmetric float64 matrix, vectors on demand.

    ``lower``: ``(n, n)`` Fortran-ordered float64, only the lower triangle read and
    overwritten. ``values``: ``(n,)`` float64 torch tensor, descending.
    ``vectors(k)``: ``(n, k)`` float64 torch tensor, orthonormal columns belonging to
    ``values[:k]``.
    """

    def __init__(self, lower: np.ndarray):
        self.n = n = lower.shape[0]
        if n == 1:  # SciPy's wrappers want a non-empty off-diagonal
            self.values = torch.from_numpy(np.array([lower[0, 0]], dtype=np.float64))
            return
        work, info = lapack.dsytrd_lwork(n, lower=1)
        _check(info, "dsytrd")
        self._reflectors, self._d, self._e, self._tau, info = lapack.dsytrd(
            lower, lower=1, lwork=max(int(work), 1), overwrite_a=1)
        _check(info, "dsytrd")
        ascending, info = lapack.dsterf(self._d, self._e)
        _check(info, "dsterf")
        self.values = torch.from_numpy(ascending[::-1].copy())

    def vectors(self, k: int) -> torch.Tensor:
        n = self.n
        if k <= 0:
            return torch.zeros((n, 0), dtype=torch.float64)
        k = min(k, n)
        if n == 1:
            return torch.ones((1, 1), dtype=torch.float64)
        e = np.zeros(n)
        e[: n - 1] = self._e
        # range 2 ("I"): eigenvalues il..iu (1-based, ascending), the k largest
        work, iwork, info = lapack.dstemr_lwork(self._d, e, 2, 0.0, 0.0, n - k + 1, n)
        _check(info, "dstemr")
        found, _w, z, info = lapack.dstemr(self._d, e, 2, 0.0, 0.0, n - k + 1, n,
                                           lwork=int(work), liwork=int(iwork))
        _check(info, "dstemr")
        if found != k:
            raise RuntimeError(f"LAPACK dstemr returned {found} of {k} eigenvectors")
        z = np.asfortranarray(z[:, :k])
        # for uplo = "L" the reflectors sit below the subdiagonal exactly as a QR
        # factorization of G[1:, :-1] would store them (how LAPACK's dormtr applies them)
        reflectors = np.asfortranarray(self._reflectors[1:, :-1])
        work, info = lapack.dormqr("L", "N", reflectors, self._tau, z[1:], -1)[1:]
        _check(info, "dormqr")
        rotated, _work, info = lapack.dormqr("L", "N", reflectors, self._tau, z[1:], max(int(work[0]), 1),
                                             overwrite_c=1)
        _check(info, "dormqr")
        z[1:] = rotated
        return torch.from_numpy(z[:, ::-1].copy(order="C"))

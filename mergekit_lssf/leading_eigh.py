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
SVD in ``tests/test_kernel.py``). The routines are called through ``lapack``, which
releases the GIL, so spectra of different tensors can be computed on parallel threads
(``read_ahead``). CUDA tensors never come here (``torch.linalg.eigh`` on the GPU is fast).
"""

from __future__ import annotations

import numpy as np
import torch

from mergekit_lssf import lapack


def gram_lower(d: torch.Tensor, side: str) -> np.ndarray:
    """Lower triangle of ``d @ d.T`` (side ``"output"``) or ``d.T @ d`` (``"input"``).

    ``d``: ``(rows, cols)`` float64, CPU, C-contiguous. Returns a Fortran-ordered
    ``(n, n)`` float64 array, zero above the diagonal.
    """
    x = d.numpy().T  # Fortran view of shape (cols, rows): x = d^T, no copy
    # output: x^T x = d d^T; input: x x^T = d^T d
    return lapack.syrk_lower(x, trans=side == "output")


class LeadingEigh:
    """Eigen-decomposition of a symmetric float64 matrix, vectors on demand.

    ``lower``: ``(n, n)`` Fortran-ordered float64, only the lower triangle read and
    overwritten. ``values``: ``(n,)`` float64 torch tensor, descending.
    ``vectors(k)``: ``(n, k)`` float64 torch tensor, orthonormal columns belonging to
    ``values[:k]``.
    """

    def __init__(self, lower: np.ndarray):
        self.n = lower.shape[0]
        self._reflectors = lower
        self._d, self._e, self._tau = lapack.sytrd_lower(lower)
        ascending = lapack.sterf(self._d, self._e)
        self.values = torch.from_numpy(ascending[::-1].copy())

    def vectors(self, k: int) -> torch.Tensor:
        n = self.n
        if k <= 0:
            return torch.zeros((n, 0), dtype=torch.float64)
        k = min(k, n)
        z = lapack.stemr_top(self._d, self._e, k)
        lapack.ormqr_left(self._reflectors, self._tau, z)
        return torch.from_numpy(z[:, ::-1].copy(order="C"))

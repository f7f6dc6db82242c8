"""The five LAPACK/BLAS routines ``leading_eigh`` needs, callable without the GIL.

SciPy's ``scipy.linalg.lapack`` wrappers hold Python's global interpreter lock for
the whole call, so two threads computing two spectra run one after the other. SciPy
also publishes every routine of the LAPACK it ships as a C function pointer, for
Cython users (``scipy.linalg.cython_lapack`` / ``cython_blas``). This module calls
those pointers through ``ctypes``, which releases the GIL for the duration of the
call: the same library and code, but two threads (``read_ahead``) really run at once.

Arguments follow LAPACK's Fortran convention: every scalar by reference, matrices
column-major (Fortran order) float64 with an explicit leading dimension. The wrappers
below take numpy arrays and check ``info``.
"""

from __future__ import annotations

import ctypes
from typing import Tuple

import numpy as np
import scipy.linalg.cython_blas as _cython_blas
import scipy.linalg.cython_lapack as _cython_lapack

_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _routine(module, name: str, n_args: int):
    """SciPy's C entry point ``name`` as a ctypes function (GIL released when called)."""
    capsule = module.__pyx_capi__[name]
    address = _capsule_pointer(capsule, _capsule_name(capsule))
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * n_args))(address)


_dsyrk = _routine(_cython_blas, "dsyrk", 10)
_dsytrd = _routine(_cython_lapack, "dsytrd", 10)
_dsterf = _routine(_cython_lapack, "dsterf", 4)
_dstemr = _routine(_cython_lapack, "dstemr", 21)
_dormqr = _routine(_cython_lapack, "dormqr", 13)


def _int(value: int):
    return ctypes.byref(ctypes.c_int(value))


def _double(value: float):
    return ctypes.byref(ctypes.c_double(value))


def _ptr(array: np.ndarray, row: int = 0, col: int = 0) -> int:
    """Address of ``array[row, col]`` (or ``array[row]`` for 1-D), float64 or int32.

    A bare address keeps nothing alive: ``array`` must stay referenced by the caller
    until the LAPACK call returns.
    """
    return array.ctypes.data + row * array.strides[0] + (col * array.strides[1] if col else 0)


def _check(info: ctypes.c_int, routine: str) -> None:
    if info.value != 0:
        raise RuntimeError(f"LAPACK {routine} failed with info={info.value}")


def _fortran(array: np.ndarray) -> None:
    if array.dtype != np.float64 or not array.flags.f_contiguous:
        raise ValueError("expected a Fortran-ordered float64 array")


def syrk_lower(a: np.ndarray, trans: bool) -> np.ndarray:
    """Lower triangle of ``a^T a`` (``trans``) or ``a a^T``; ``a`` Fortran float64.

    Returns a Fortran ``(n, n)`` array, zero above the diagonal.
    """
    _fortran(a)
    rows, cols = a.shape
    n, k = (cols, rows) if trans else (rows, cols)
    c = np.zeros((n, n), order="F")
    _dsyrk(b"L", b"T" if trans else b"N", _int(n), _int(k), _double(1.0),
           _ptr(a), _int(max(rows, 1)), _double(0.0), _ptr(c), _int(max(n, 1)))
    return c


def sytrd_lower(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Householder tridiagonalization ``A = Q T Q^T`` of the lower triangle, in place.

    ``a``: ``(n, n)`` Fortran float64; afterwards its strict lower part holds the
    reflectors of ``Q``. Returns ``(d, e, tau)``: diagonal ``(n,)``, subdiagonal
    ``(n-1,)`` of ``T`` and the reflectors' scalars ``(n-1,)``.
    """
    _fortran(a)
    n = a.shape[0]
    d, e, tau = np.empty(n), np.empty(max(n - 1, 1)), np.empty(max(n - 1, 1))
    info, query = ctypes.c_int(0), np.empty(1)
    args = (b"L", _int(n), _ptr(a), _int(max(n, 1)), _ptr(d), _ptr(e), _ptr(tau))
    _dsytrd(*args, _ptr(query), _int(-1), ctypes.byref(info))
    _check(info, "dsytrd")
    lwork = max(int(query[0]), 1)
    work = np.empty(lwork)
    _dsytrd(*args, _ptr(work), _int(lwork), ctypes.byref(info))
    _check(info, "dsytrd")
    return d, e[: n - 1], tau[: n - 1]


def sterf(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """All eigenvalues of the symmetric tridiagonal ``(d, e)``, ascending (``(n,)``)."""
    values, off = np.array(d, dtype=np.float64), np.array(e, dtype=np.float64)
    info = ctypes.c_int(0)
    _dsterf(_int(values.shape[0]), _ptr(values), _ptr(off) if off.size else _ptr(values),
            ctypes.byref(info))
    _check(info, "dsterf")
    return values


def stemr_top(d: np.ndarray, e: np.ndarray, k: int) -> np.ndarray:
    """Eigenvectors of the ``k`` largest eigenvalues of tridiagonal ``(d, e)`` (MRRR).

    Returns a Fortran ``(n, k)`` array, columns in ascending eigenvalue order.
    """
    n = d.shape[0]
    dd = np.array(d, dtype=np.float64)
    ee = np.zeros(n)
    ee[: n - 1] = e
    w, z = np.empty(n), np.empty((n, k), order="F")
    isuppz = np.empty(2 * max(k, 1), dtype=np.int32)
    found, tryrac, info = ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(0)
    work_query, iwork_query = np.empty(1), np.empty(1, dtype=np.int32)

    def call(work, lwork, iwork, liwork):
        _dstemr(b"V", b"I", _int(n), _ptr(dd), _ptr(ee), _double(0.0), _double(0.0),
                _int(n - k + 1), _int(n), ctypes.byref(found), _ptr(w), _ptr(z),
                _int(n), _int(k), _ptr(isuppz), ctypes.byref(tryrac),
                _ptr(work), _int(lwork), _ptr(iwork), _int(liwork), ctypes.byref(info))
        _check(info, "dstemr")

    call(work_query, -1, iwork_query, -1)
    lwork, liwork = int(work_query[0]), int(iwork_query[0])
    call(np.empty(lwork), lwork, np.empty(liwork, dtype=np.int32), liwork)
    if found.value != k:
        raise RuntimeError(f"LAPACK dstemr returned {found.value} of {k} eigenvectors")
    return z


def ormqr_left(reflectors: np.ndarray, tau: np.ndarray, c: np.ndarray) -> None:
    """``c[1:] <- Q c[1:]`` for the reflectors ``sytrd_lower`` left in ``reflectors``.

    For ``uplo = 'L'`` they sit below the subdiagonal exactly as a QR factorization
    of ``A[1:, :-1]`` would store them, which is how LAPACK's ``dormtr`` applies them.
    ``reflectors``: ``(n, n)`` Fortran; ``c``: ``(n, k)`` Fortran, updated in place.
    """
    _fortran(reflectors)
    _fortran(c)
    n, k = c.shape
    m = n - 1
    if m == 0 or k == 0:
        return
    info, query = ctypes.c_int(0), np.empty(1)
    args = (b"L", b"N", _int(m), _int(k), _int(m), _ptr(reflectors, 1, 0), _int(n),
            _ptr(tau), _ptr(c, 1, 0), _int(n))
    _dormqr(*args, _ptr(query), _int(-1), ctypes.byref(info))
    _check(info, "dormqr")
    lwork = max(int(query[0]), 1)
    work = np.empty(lwork)  # a named array: a temporary would be freed before the call
    _dormqr(*args, _ptr(work), _int(lwork), ctypes.byref(info))
    _check(info, "dormqr")

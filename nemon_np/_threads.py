"""Splitting a product over threads: BLAS calls that release the GIL, and a map over row ranges.

Training caps OpenBLAS at one thread (its own threads made these long, thin products slower on the
2-core machines measured, docs/benchmarks.md). A conv batch is still large enough to share: its
rows are independent, so ``n_jobs`` Python threads can each run one-thread BLAS on a contiguous
share of them. That needs a gemm that releases the GIL, which scipy's ``blas.sgemm`` (an f2py
wrapper) does not; :func:`gemm_into` calls the same OpenBLAS routine through
``scipy.linalg.cython_blas`` by ctypes, which releases it for the call.
"""
import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from numba.extending import get_cython_function_address

__all__ = ["check_n_jobs", "gemm_into", "map_ranges", "split_ranges", "ONE_THREAD_ENV"]

# The environment of a process that should compute on one thread: BLAS (OpenBLAS, MKL, OpenMP) and numba.
ONE_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}

_INT = ctypes.POINTER(ctypes.c_int)


def _fortran_gemm(name, scalar):
    # Fortran calling convention: every argument by reference.
    address = get_cython_function_address("scipy.linalg.cython_blas", name)
    signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, _INT, _INT, _INT, ctypes.POINTER(scalar),
                                 ctypes.c_void_p, _INT, ctypes.c_void_p, _INT, ctypes.POINTER(scalar),
                                 ctypes.c_void_p, _INT)
    return signature(address), scalar


_GEMM = {np.dtype(np.float32): _fortran_gemm("sgemm", ctypes.c_float),
         np.dtype(np.float64): _fortran_gemm("dgemm", ctypes.c_double)}


def gemm_into(Y, A, X, beta):
    """Y <- A @ X + beta Y in place, for C-contiguous 2-D float32 or float64 row blocks, without the GIL:
    Y (r, n) = X (r, q) @ A (q, n) read as the column-major product Y^T = A^T X^T (each C-ordered
    array is its transpose in Fortran order), so no copies. ``Y`` and ``X`` may be views into
    larger C-ordered arrays as long as their rows are contiguous (row stride = row length).
    """
    gemm, scalar = _GEMM[Y.dtype]
    (r, n), q = Y.shape, A.shape[0]
    for M in (Y, A, X):
        # A dimension of length 1 may carry any stride (numpy's relaxed strides); it is never stepped.
        rows_ok = M.shape[0] <= 1 or M.strides[0] == M.shape[1] * M.itemsize
        if M.dtype != Y.dtype or not rows_ok or (M.shape[1] > 1 and M.strides[1] != M.itemsize):
            raise ValueError("gemm_into needs C-contiguous rows of one float dtype")
    if A.shape[1] != n or X.shape != (r, q):
        raise ValueError(f"shapes do not match: Y {Y.shape} = X {X.shape} @ A {A.shape}")
    if r == 0:
        return Y
    nb, rb, qb = ctypes.c_int(n), ctypes.c_int(r), ctypes.c_int(q)
    gemm(b"N", b"N", ctypes.byref(nb), ctypes.byref(rb), ctypes.byref(qb), ctypes.byref(scalar(1.0)),
         A.ctypes.data, ctypes.byref(nb), X.ctypes.data, ctypes.byref(qb), ctypes.byref(scalar(beta)),
         Y.ctypes.data, ctypes.byref(nb))
    return Y


def check_n_jobs(n_jobs, name="n_jobs"):
    """``n_jobs`` as a positive int (ValueError naming ``name`` otherwise)."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise ValueError(f"{name} must be a positive whole number, got {n_jobs!r}")
    return int(n_jobs)


def split_ranges(n, parts):
    """``parts`` contiguous (start, stop) ranges covering range(n), sizes differing by at most one
    (empty ranges dropped)."""
    bounds = np.linspace(0, n, min(max(int(parts), 1), max(n, 1)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@lru_cache(maxsize=None)
def _pool(n_jobs):
    return ThreadPoolExecutor(n_jobs, thread_name_prefix="nemon_np")


def map_ranges(func, n, n_jobs):
    """[func(start, stop) for each of :func:`split_ranges` (n, n_jobs)], the ranges run on ``n_jobs``
    threads (in the calling thread when there is one range). ``func`` should spend its time in code
    that releases the GIL (:func:`gemm_into`, numpy's matmul, ``nogil`` numba kernels)."""
    ranges = split_ranges(n, n_jobs)
    if len(ranges) <= 1:
        return [func(a, b) for a, b in ranges]
    return list(_pool(len(ranges)).map(lambda ab: func(*ab), ranges))

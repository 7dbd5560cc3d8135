"""Matrix measures (one-sided Lipschitz constants) and the induced l_inf norm.

Formulas (DESIGN.md; Jafarpour et al., NeurIPS 2021, Sec. 2):

* ``mu_inf(A) = max_i ( a_ii + sum_{j != i} |a_ij| )``
* weighted by eta > 0: ``mu_inf,eta(A) = mu_inf(diag(eta)^-1 A diag(eta))``,
  i.e. row i reads ``a_ii + sum_{j != i} (eta_j / eta_i) |a_ij|``
* ``mu_1(A) = mu_inf(A^T)``
* ``mu_2(A) = lambda_max((A + A^T) / 2)``
* ``||A||_inf = max_i sum_j |a_ij|`` (and ``mu_inf(A) <= ||A||_inf``)

If mu_inf(A) < 1 the implicit layer x = relu(Ax + Bu + b) has a unique fixed
point for every input (well-posedness).
"""
import numpy as np
from numba import njit

from ._validation import all_finite, as_square_matrix, as_weights

__all__ = ["mu_inf", "mu_1", "mu_2", "norm_inf", "row_measures", "best_weights"]


def _similarity_abs_offdiag(A, eta):
    """|a_ij| * eta_j / eta_i off the diagonal, 0 on it (float64)."""
    off = np.abs(A.astype(np.float64, copy=True))
    np.fill_diagonal(off, 0.0)
    if eta is not None:
        off *= eta[None, :] / eta[:, None]
    return off


def row_measures_reference(A, weights=None):
    """NumPy reference of :func:`row_measures` (the same rows, summed pairwise instead of in order)."""
    A = as_square_matrix(A)
    eta = as_weights(weights, A.shape[0])
    return np.diag(A).astype(np.float64) + _similarity_abs_offdiag(A, eta).sum(axis=1)


@njit(cache=True)
def _row_measures(A, eta):
    """Row i: a_ii + sum_{j != i} |a_ij| (eta_j / eta_i), in float64, summed in column order (no
    fastmath: the order is fixed, as in the projection's own row test); eta of length 0: unweighted."""
    n = A.shape[0]
    out = np.empty(n)
    weighted = eta.shape[0] > 0
    for i in range(n):
        s = 0.0
        for j in range(n):
            if j != i:
                v = abs(np.float64(A[i, j]))
                s += v * (eta[j] / eta[i]) if weighted else v
        out[i] = np.float64(A[i, i]) + s
    return out


def row_measures(A, weights=None):
    """Per-row l_inf measures ``a_ii + sum_{j != i} (eta_j/eta_i) |a_ij|``, shape (n,), float64.

    ``mu_inf(A, weights) == row_measures(A, weights).max()``. One pass of a numba kernel: the solvers
    check the measure of every matrix they iterate with, the embedded network's (2n x 2n) included.
    """
    A = as_square_matrix(A)
    return checked_row_measures(A, as_weights(weights, A.shape[0]))


def checked_row_measures(A, eta):
    """:func:`row_measures` of a square float matrix A and float64 weights eta (or None) that the caller
    has already checked (:func:`nemon_np._validation.as_square_matrix`, ``as_weights``): the solvers
    take the measure at every call, and checking A again would cost as much as the kernel."""
    return _row_measures(np.ascontiguousarray(A), np.empty(0) if eta is None else eta)


def mu_inf(A, weights=None):
    """l_inf matrix measure ``max_i (a_ii + sum_{j!=i} |a_ij|)`` of a square matrix.

    Parameters
    ----------
    A : (n, n) array_like of real numbers
    weights : (n,) array_like of positive numbers, optional
        Diagonal weights eta: returns ``mu_inf(diag(eta)^-1 A diag(eta))``, the
        measure of the weighted norm ``||x||_{inf,eta} = max_i |x_i| / eta_i``.

    Returns
    -------
    float
    """
    return float(row_measures(A, weights).max())


def mu_1(A):
    """l_1 matrix measure ``mu_1(A) = mu_inf(A^T) = max_j (a_jj + sum_{i!=j} |a_ij|)``."""
    return mu_inf(as_square_matrix(A).T)


def mu_2(A):
    """l_2 matrix measure ``lambda_max((A + A^T) / 2)`` (monDEQ's condition is mu_2(A) <= 1 - m)."""
    A = as_square_matrix(A).astype(np.float64)
    return float(np.linalg.eigvalsh(0.5 * (A + A.T))[-1])


def norm_inf(A):
    """Induced l_inf norm ``max_i sum_j |a_ij|`` (maximum absolute row sum) of any 2-D matrix."""
    arr = np.asarray(A)
    if arr.ndim != 2:
        raise ValueError(f"A must be a 2-D matrix, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("A must not be empty")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == bool:
        raise ValueError(f"A must hold real numbers (integer or floating), got dtype {arr.dtype}")
    if not all_finite(arr):
        raise ValueError("A has non-finite entries (NaN or inf)")
    return float(np.abs(arr.astype(np.float64)).sum(axis=1).max())


def best_weights(A):
    """Diagonal weights minimizing the weighted measure, and that minimum.

    ``min_{eta > 0} mu_inf(diag(eta)^-1 A diag(eta)) = alpha(M)``, the spectral
    abscissa of the Metzler majorant ``M = diag(a_ii) + |A - diag(a_ii)|``,
    attained at the Perron eigenvector of M (DESIGN.md, "Best weights, exactly").
    For a reducible M the eigenvector may have zero entries; they are floored at
    a tiny positive value, so the returned measure is then approached, not attained.

    Returns
    -------
    eta : (n,) ndarray, positive, normalized to max 1
    value : float, alpha(M)
    """
    A = as_square_matrix(A).astype(np.float64)
    M = np.abs(A)
    np.fill_diagonal(M, np.diag(A))
    vals, vecs = np.linalg.eig(M)
    k = int(np.argmax(vals.real))
    eta = np.abs(vecs[:, k].real)
    eta = np.maximum(eta / eta.max(), 1e-12)
    return eta, float(vals[k].real)

"""Keeping mu_inf(A) <= gamma: exact Euclidean projection and a surjective parametrization.

Projection (DESIGN.md, "Keeping mu_inf(A) <= gamma", 1 and 3)
---------------------------------------------------------------
P(gamma) = {A : a_ii + sum_{j!=i} w_ij |a_ij| <= gamma for every row i}, with
w_ij = eta_j / eta_i (w = 1 unweighted), is a polytope whose Frobenius
projection splits into rows. For a row with diagonal d and off-diagonals o that
violates its constraint:

    d' = d - lam,   o'_j = sign(o_j) max(|o_j| - lam w_ij, 0),

lam > 0 the root of the decreasing piecewise-linear function

    f(lam) = (d - lam) + sum_j w_ij max(|o_j| - lam w_ij, 0) - gamma,

the same root as DESIGN.md's scan of the sorted breakpoints |o_j| / w_ij (as in
l_1-ball projection; :func:`project_mu_inf_reference` does exactly that). The numba
kernel finds it without sorting, by Michelot's filtering (exact, a few O(n) passes
per row): at n = 100 sorting every row cost 4/5 of the time. Rows already inside
are returned unchanged.

With a floor m on the diagonal (``min_diagonal``; it keeps the average iteration's
step alpha* = 1 / (1 - min(min_i a_ii, 0)) >= 1 / (1 - m)): a row whose projection
above has d' < m gets d' = m and o' the projection of o onto the weighted l_1 ball
sum_j w_ij |o_j| <= gamma - m. (The floor is active there: were it not, the
projection would be the one without it, which lies below m.)

Parametrization (DESIGN.md, 2)
------------------------------
A = gamma I + T - diag(|T| 1) maps any T onto P(gamma) (surjectively: take
t_ij = a_ij off the diagonal and t_ii = (a_ii - gamma + sum_{j!=i} |a_ij|) / 2 <= 0),
with gradient dL/dT_ij = G_ij - G_ii sign(T_ij) for G = dL/dA.

Weighted parametrization (DESIGN.md, 3; the paper's code)
---------------------------------------------------------
A = gamma I + D^-1 T D - diag(|T| 1), D = diag(exp(s)), for free T and log-scales s:
then D A D^-1 = gamma I + T - diag(|T| 1), so mu_inf,eta(A) <= gamma with weights
eta = exp(-s) (the measure of diag(eta)^-1 A diag(eta)). Off the diagonal
a_ij = t_ij exp(s_j - s_i), hence with G = dL/dA and H = G * A off the diagonal

    dL/dT_ij = G_ij exp(s_j - s_i) - G_ii sign(T_ij),
    dL/ds_k  = sum_i H_ik - sum_j H_kj.
"""
import numpy as np
from numba import njit

from ._validation import as_square_matrix, as_weights

__all__ = ["project_mu_inf", "diagonal_floor", "project_norm_inf", "project_mondeq", "project_mu_inf_reference",
           "parametrize_mu_inf", "parametrize_mu_inf_grad", "parametrize_mu_inf_inverse",
           "parametrize_weighted_mu_inf", "parametrize_weighted_mu_inf_grad", "parametrize_mondeq",
           "parametrize_mondeq_grad"]


@njit(cache=True, fastmath=True)
def _row_measure(R, i, d, W, signed_diagonal):
    """r_id + sum_{j != d} W_ij |r_ij| (or sum_j W_ij |r_ij| if not signed_diagonal) for row i,
    d the column of the row's diagonal entry."""
    total = 0.0
    for j in range(d):
        total += W[i, j] * abs(R[i, j])
    for j in range(d + 1, R.shape[1]):
        total += W[i, j] * abs(R[i, j])
    return total + (R[i, d] if signed_diagonal else W[i, d] * abs(R[i, d]))


@njit(cache=True)
def _shrink_row(A, out, i, d, W, lam, signed_diagonal, diag_value):
    for j in range(A.shape[1]):
        shrunk = abs(A[i, j]) - lam * W[i, j]
        out[i, j] = np.sign(A[i, j]) * shrunk if shrunk > 0.0 else 0.0
    if signed_diagonal:
        out[i, d] = diag_value


@njit(cache=True)
def _shrinkage_root(A, i, d, W, skip_diagonal, num0, den0, active):
    """The root lam of num0 - lam den0 + sum_j W_ij max(|a_ij| - lam W_ij, 0) = 0 over the
    entries j of row i (all but column d if ``skip_diagonal``), by Michelot's filtering."""
    k = 0
    for j in range(A.shape[1]):
        if j != d or not skip_diagonal:
            active[k] = j
            k += 1
    # With a set holding every truly active entry, the candidate root (that set forced
    # active) is a lower bound of the root, so entries with breakpoint |a_ij| / W_ij
    # below it are zero for sure. Dropping them and repeating stops, in a few passes,
    # at the exact root.
    while True:
        num, den = num0, den0
        for r in range(k):
            j = active[r]
            num += W[i, j] * abs(A[i, j])
            den += W[i, j] * W[i, j]
        lam = num / den
        kept = 0
        for r in range(k):
            j = active[r]
            if abs(A[i, j]) > lam * W[i, j]:
                active[kept] = j
                kept += 1
        if kept == k:
            return lam
        k = kept


@njit(cache=True)
def _project_rows(A, diag, gamma, W, signed_diagonal, floor):
    """Row-wise projection of float64 A (m, L) onto {row measure <= gamma} (see _row_measure),
    and, with a signed diagonal, diagonal entries >= floor (-inf: no floor); row i's diagonal
    entry is column diag[i] (i for a square matrix, the centre tap of a convolution)."""
    m, L = A.shape
    out = A.copy()
    active = np.empty(L, np.int64)
    for i in range(m):
        d = diag[i]
        measure = _row_measure(A, i, d, W, signed_diagonal)
        if measure <= gamma and not (signed_diagonal and A[i, d] < floor):
            continue
        lam = 0.0
        if measure > gamma:
            lam = _shrinkage_root(A, i, d, W, signed_diagonal, (A[i, d] - gamma) if signed_diagonal else -gamma,
                                  1.0 if signed_diagonal else 0.0, active)
        floored = signed_diagonal and A[i, d] - lam < floor
        if floored:
            # The projection without the floor lies below it, so the floor is active at the
            # projection: the diagonal is the floor and the off-diagonals go to the weighted
            # l_1 ball of radius gamma - floor.
            lam = 0.0
            if measure - A[i, d] > gamma - floor:
                lam = _shrinkage_root(A, i, d, W, True, floor - gamma, 0.0, active)
        _shrink_row(A, out, i, d, W, lam, signed_diagonal, floor if floored else A[i, d] - lam)
        # Rounding may leave the row an ulp outside; nudge lam until the same test
        # that decides membership passes, so that projecting again changes nothing.
        while _row_measure(out, i, d, W, signed_diagonal) > gamma:
            lam += 4e-16 * max(abs(lam), abs(gamma), 1e-300)
            _shrink_row(A, out, i, d, W, lam, signed_diagonal, floor if floored else A[i, d] - lam)
    return out


def _ratio_weights(eta, n):
    if eta is None:
        return np.ones((n, n))
    return eta[None, :] / eta[:, None]


def _round_inside(P64, dtype, diag, signed_diagonal=True):
    """Cast a projected float64 matrix to ``dtype`` without leaving the set.

    Rounding to nearest could push a row sum above gamma by an ulp: entries are rounded
    toward zero instead, and a signed diagonal entry (column diag[i] of row i) downward.
    """
    if dtype == np.float64:
        return P64
    P = P64.astype(dtype)
    _round_toward_set(P64, P, diag, signed_diagonal)
    return P


@njit(cache=True)
def _round_toward_set(P64, P, diag, signed_diagonal):
    """In place: P = P64 rounded to nearest in P's dtype becomes P64 rounded toward zero, and, with a
    signed diagonal, column diag[i] of row i rounded downward (:func:`_round_inside`); P float32.

    The next float32 toward zero from x != 0 has x's bit pattern, read as an integer, minus one (IEEE 754
    orders the magnitudes of each sign as their bit patterns): one vectorized pass, where a ``nextafter`` call
    an entry took 7x as long (27 against 4 us a 100 x 100 matrix). The diagonal is set after it by its rule."""
    bits = P.view(np.int32)   # float32: the only dtype rounded into (float64 is kept as it is)
    one = np.int32(1)
    n_rows = P.shape[0]
    nearest = np.empty(n_rows if signed_diagonal else 0, P.dtype)   # the diagonal as rounded to nearest
    for i in range(nearest.size):
        nearest[i] = P[i, diag[i]]
    for i in range(n_rows):
        for j in range(P.shape[1]):
            if abs(np.float64(P[i, j])) > abs(P64[i, j]):   # |P| > 0 here, so one step keeps the sign
                bits[i, j] -= one
    if signed_diagonal:
        for i in range(n_rows):
            j = diag[i]
            P[i, j] = nearest[i]
            if np.float64(P[i, j]) > P64[i, j]:
                P[i, j] = np.nextafter(P[i, j], P.dtype.type(-np.inf))


def round_inside_reference(P64, dtype, diag, signed_diagonal=True):
    """NumPy reference of :func:`_round_inside` (same contract)."""
    if dtype == np.float64:
        return P64
    P = P64.astype(dtype)
    rows = np.arange(len(P))
    up = np.abs(P.astype(np.float64)) > np.abs(P64)
    if signed_diagonal:
        up[rows, diag] = False   # rounded below, by its own rule
    P[up] = np.nextafter(P[up], dtype(0))
    if signed_diagonal:
        d = P[rows, diag]
        high = d.astype(np.float64) > P64[rows, diag]
        P[rows[high], diag[high]] = np.nextafter(d[high], dtype(-np.inf))
    return P


def diagonal_floor(min_diagonal, gamma):
    """The floor on the diagonal as the kernels take it: -inf for None, else a float in
    [-inf, min(gamma, 0)] (a one-line ``ValueError`` otherwise).

    A floor m <= 0 on every a_ii bounds the average iteration's step from below,
    alpha* = 1 / (1 - min(min_i a_ii, 0)) >= 1 / (1 - m), and so its contraction factor from
    above, rho(alpha*) <= 1 - (1 - max(gamma, 0)) / (1 - m), whatever training does to A."""
    if min_diagonal is None:
        return -np.inf
    m = float(min_diagonal)
    if not (m <= 0 and m <= gamma):
        raise ValueError(f"min_diagonal must be <= 0 and <= gamma = {gamma:g}, got {min_diagonal!r}")
    return m


def project_mu_inf(A, gamma, weights=None, min_diagonal=None):
    """Euclidean (Frobenius) projection of A onto {A : mu_inf,eta(A) <= gamma}, and a_ii >= min_diagonal
    when given.

    Parameters
    ----------
    A : (n, n) array_like, float32 or float64 (integers are taken as float64)
    gamma : float
        The bound on the (weighted) l_inf measure.
    weights : (n,) array_like, optional
        Diagonal weights eta > 0: projects onto mu_inf(diag(eta)^-1 A diag(eta)) <= gamma,
        the row constraints a_ii + sum_{j!=i} (eta_j/eta_i) |a_ij| <= gamma.
    min_diagonal : float <= min(gamma, 0), optional
        A floor m on the diagonal (see :func:`diagonal_floor`: it keeps alpha* >= 1 / (1 - m)). A row
        whose projection without it has a_ii < m gets a_ii = m and its off-diagonals projected onto
        the weighted l_1 ball of radius gamma - m (the floor is then active at the projection).

    Returns
    -------
    (n, n) ndarray of A's dtype, a new array (A is never modified) with
    ``mu_inf(result, weights) <= gamma`` up to float64 rounding of the row sums, and diagonal
    entries >= min_diagonal up to one rounding to A's dtype (rounded downward, to stay in the set).
    Rows already satisfying their constraints are copied unchanged.
    """
    A = as_square_matrix(A)
    gamma = float(gamma)
    if not np.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    floor = diagonal_floor(min_diagonal, gamma)
    eta = as_weights(weights, A.shape[0])
    diag = np.arange(A.shape[0])
    P64 = _project_rows(np.ascontiguousarray(A, dtype=np.float64), diag, gamma, _ratio_weights(eta, A.shape[0]), True,
                        floor)
    return _round_inside(P64, A.dtype.type, diag)


def project_norm_inf(A, gamma):
    """Frobenius projection onto the norm ball {A : ||A||_inf <= gamma}, gamma >= 0.

    Row-wise l_1-ball projection: a'_ij = sign(a_ij) max(|a_ij| - lam_i, 0) with lam_i >= 0
    the root of sum_j max(|a_ij| - lam, 0) = gamma (the same kernel as
    :func:`project_mu_inf`, with the diagonal entry taken in absolute value).
    """
    A = as_square_matrix(A)
    gamma = float(gamma)
    if not (np.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0 for the norm ball, got {gamma!r}")
    diag = np.arange(A.shape[0])
    P64 = _project_rows(np.ascontiguousarray(A, dtype=np.float64), diag, gamma, np.ones(A.shape), False, -np.inf)
    return _round_inside(P64, A.dtype.type, diag, signed_diagonal=False)


def project_mondeq(A, m):
    """Frobenius projection onto monDEQ's set {A : (A + A^T)/2 <= (1 - m) I} (DESIGN.md).

    Keeps the skew part (A - A^T)/2 and clips the eigenvalues of the symmetric part at
    1 - m: S = V diag(lambda) V^T -> V diag(min(lambda, 1 - m)) V^T. Exact (the
    constraint restricts the symmetric part only, and the two parts are orthogonal).
    """
    A = as_square_matrix(A)
    m = float(m)
    if not np.isfinite(m):
        raise ValueError(f"m must be finite, got {m!r}")
    A64 = A.astype(np.float64)
    sym, skew = 0.5 * (A64 + A64.T), 0.5 * (A64 - A64.T)
    lam, V = np.linalg.eigh(sym)
    if lam[-1] <= 1 - m:
        return A.copy()
    return ((V * np.minimum(lam, 1 - m)) @ V.T + skew).astype(A.dtype)


def project_mu_inf_reference(A, gamma, weights=None):
    """Plain NumPy version of :func:`project_mu_inf` (vectorized bisection-free
    breakpoint search per row); the independent reference the kernel is tested against."""
    A = as_square_matrix(A).astype(np.float64)
    n = A.shape[0]
    W = _ratio_weights(as_weights(weights, n), n)
    out = A.copy()
    for i in range(n):
        mask = np.arange(n) != i
        d, o, w = A[i, i], A[i, mask], W[i, mask]
        if d + np.sum(w * np.abs(o)) <= gamma:
            continue
        # Evaluate f at every breakpoint, then interpolate linearly on the segment holding the root.
        bp = np.concatenate(([0.0], np.sort(np.abs(o) / w)))
        f = (d - bp) + np.sum(w * np.maximum(np.abs(o)[None, :] - bp[:, None] * w, 0.0), axis=1) - gamma
        neg = np.nonzero(f <= 0)[0]
        if neg.size == 0:  # root beyond every breakpoint: f(lam) = d - lam - gamma there
            lam = d - gamma
        else:
            k = neg[0]
            lam = bp[k - 1] + f[k - 1] * (bp[k] - bp[k - 1]) / (f[k - 1] - f[k])
        out[i, i] = d - lam
        out[i, mask] = np.sign(o) * np.maximum(np.abs(o) - lam * w, 0.0)
    return out


def parametrize_rows(T, diag, gamma):
    """Rows (r, p) with signed diagonal entry in column diag[i] of row i: ``a_ij = t_ij`` off it,
    ``a_i,diag[i] = gamma + t_i,diag[i] - sum_j |t_ij|``, so every row measure is
    ``gamma + t_ii - |t_ii| <= gamma``. For a square matrix diag = 0..n-1; for a convolution,
    each output channel's taps with the centre tap on the diagonal. Returns a new array."""
    rows = np.arange(len(T))
    A = np.array(T, dtype=np.result_type(T, np.float32))
    A[rows, diag] += gamma - np.abs(T).sum(axis=1)
    return A


def parametrize_rows_grad(T, diag, G):
    """Chain rule through :func:`parametrize_rows`: ``dL/dt_ij = G_ij - G_i,diag[i] sign(t_ij)``."""
    return G - G[np.arange(len(T)), diag][:, None] * np.sign(T)


def parametrize_rows_inverse(A, diag, gamma):
    """A right inverse of :func:`parametrize_rows` for rows of measure <= gamma: off the diagonal
    t_ij = a_ij, on it t_ii = (a_ii - gamma + sum_{j != i} |a_ij|) / 2 <= 0.
    Raises ``ValueError`` if a row measure exceeds gamma (no T exists)."""
    rows = np.arange(len(A))
    # In float64 whatever A's dtype: a float32 A that the projection left inside is inside in exact
    # arithmetic, but float32 sums of its rows can exceed gamma by an ulp of the row sum.
    A64 = np.asarray(A, np.float64)
    d = A64[rows, diag]
    off = np.abs(A64)
    off[rows, diag] = 0.0
    excess = d + off.sum(axis=1) - gamma
    if np.any(excess > 1e-12 * max(1.0, abs(gamma))):
        raise ValueError(f"A is outside P(gamma): mu_inf(A) - gamma = {excess.max():.3g} > 0")
    T = np.array(A)
    T[rows, diag] = np.minimum(excess, 0.0) / 2
    return T


def parametrize_mu_inf(T, gamma):
    """``A = gamma I + T - diag(|T| 1)``: any T gives mu_inf(A) <= gamma.

    Row i has measure gamma + t_ii - |t_ii| <= gamma. Returns a new (n, n) array.
    """
    T = as_square_matrix(T, "T")
    return parametrize_rows(T, np.arange(len(T)), gamma)


def parametrize_mu_inf_grad(T, G):
    """Chain rule through :func:`parametrize_mu_inf`: ``dL/dT_ij = G_ij - G_ii sign(T_ij)``."""
    T = as_square_matrix(T, "T")
    G = np.asarray(G)
    if G.shape != T.shape:
        raise ValueError(f"G must have the shape of T {T.shape}, got {G.shape}")
    return parametrize_rows_grad(T, np.arange(len(T)), G)


def parametrize_mu_inf_inverse(A, gamma):
    """A T with ``parametrize_mu_inf(T, gamma) == A`` for A in P(gamma) (a right inverse).

    Off-diagonal t_ij = a_ij; diagonal t_ii = (a_ii - gamma + sum_{j!=i} |a_ij|) / 2 <= 0.
    Raises ``ValueError`` if mu_inf(A) > gamma (no T exists).
    """
    A = as_square_matrix(A)
    return parametrize_rows_inverse(A, np.arange(len(A)), gamma)


def _log_scale(s, n):
    s = np.asarray(s, dtype=np.float64)
    if s.shape != (n,) or not np.all(np.isfinite(s)):
        raise ValueError(f"log_scale must be {n} finite numbers, got shape {s.shape}")
    return s


def parametrize_weighted_mu_inf(T, log_scale, gamma):
    """``A = gamma I + D^-1 T D - diag(|T| 1)``, D = diag(exp(log_scale)); returns (A, eta).

    ``mu_inf(A, weights=eta) <= gamma`` for every T and log_scale, with eta = exp(-log_scale).
    """
    T = as_square_matrix(T, "T")
    s = _log_scale(log_scale, T.shape[0])
    A = (T * np.exp(s[None, :] - s[:, None])).astype(T.dtype)
    np.fill_diagonal(A, gamma + np.diag(T) - np.abs(T).sum(axis=1))
    return A, np.exp(-s)


def parametrize_weighted_mu_inf_grad(T, log_scale, G):
    """Chain rule through :func:`parametrize_weighted_mu_inf`: returns (dL/dT, dL/dlog_scale)."""
    T = as_square_matrix(T, "T")
    s = _log_scale(log_scale, T.shape[0])
    G = np.asarray(G)
    if G.shape != T.shape:
        raise ValueError(f"G must have the shape of T {T.shape}, got {G.shape}")
    E = np.exp(s[None, :] - s[:, None]).astype(T.dtype)
    dT = G * E - np.diag(G)[:, None] * np.sign(T)
    np.fill_diagonal(dT, np.diag(G) * (1 - np.sign(np.diag(T))))
    H = G * T * E
    np.fill_diagonal(H, 0.0)
    return dT, (H.sum(axis=0) - H.sum(axis=1)).astype(T.dtype)


def parametrize_mondeq(W, S, m):
    """monDEQ's parametrization (Winston & Kolter 2020): ``A = (1 - m) I - W^T W + S - S^T``.

    Then (A + A^T)/2 = (1 - m) I - W^T W <= (1 - m) I: I - A is m-strongly monotone for every
    W, S, and every such A is reached. Returns a new (n, n) array.
    """
    W, S = as_square_matrix(W, "W"), as_square_matrix(S, "S")
    if W.shape != S.shape:
        raise ValueError(f"W and S must have one shape, got {W.shape} and {S.shape}")
    A = S - S.T - W.T @ W
    A[np.diag_indices_from(A)] += 1.0 - m
    return A


def parametrize_mondeq_grad(W, S, G):
    """Chain rule through :func:`parametrize_mondeq`: ``dL/dW = -W (G + G^T)``, ``dL/dS = G - G^T``."""
    W = as_square_matrix(W, "W")
    G = np.asarray(G)
    return -W @ (G + G.T), G - G.T

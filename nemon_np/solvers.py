"""Fixed-point and adjoint solvers for the implicit layer x = relu(A x + q).

Average iteration (DESIGN.md, "Average iteration"; Jafarpour et al. 2021, Thm. 2)
    x_{k+1} = (1 - alpha) x_k + alpha relu(A x_k + q)
is an l_inf contraction with factor rho(alpha) = 1 - alpha (1 - max(mu_inf(A), 0))
for 0 < alpha <= alpha* = 1 / (1 - min(min_i a_ii, 0)); Picard is alpha = 1.

Adjoint (DESIGN.md, "Implicit gradient")
    w = g + A^T D w,     D = diag(1[z > 0]) at the fixed point,
with the averaged iteration w <- (1 - alpha) w + alpha (g + A^T D w), an l_1
contraction with the same rho(alpha), or a direct solve of (I - D A)^T w = g.

monDEQ's splittings (Winston & Kolter 2020) are certified instead by strong monotonicity,
I - A >= m I with m = 1 - mu_2(A) > 0: forward-backward
    x_{k+1} = relu((1 - alpha) x_k + alpha (A x_k + q)),  0 < alpha < 2 m / L^2, L = ||I - A||_2,
(an l_2 contraction with factor sqrt(1 - 2 alpha m + alpha^2 L^2)) and Peaceman-Rachford
with the resolvent (I + alpha (I - A))^-1, convergent for every alpha > 0.

All run over a batch stored row-wise (sample i is row i), stop each sample on its
own residual and stop spending work on it once converged. The forward residual is
``||relu(A x_k + q) - x_k||_inf`` (then ``||x_k - x*||_inf <= residual / (1 - max(mu_inf(A), 0))``);
the adjoint residual is ``||g + A^T D w_k - w_k||_1``.
"""
import warnings

import numpy as np
from numba import njit
from scipy.optimize import OptimizeResult

from ._validation import all_finite, as_square_matrix, as_weights
from .interval import embed, sum_and_difference
from .measures import checked_row_measures, mu_inf

__all__ = ["solve_equilibrium", "solve_adjoint", "averaged_fixed_point_reference", "anderson_fixed_point_reference",
           "contraction_alpha", "contraction_factor", "WellPosednessError", "ConvergenceWarning"]

NEMON_METHODS = ("average", "picard", "adaptive", "anderson")
MONDEQ_METHODS = ("forward-backward", "peaceman-rachford")
FORWARD_METHODS = NEMON_METHODS + MONDEQ_METHODS
ADJOINT_METHODS = ("iterative", "adaptive", "anderson", "direct", "jfb")
ANDERSON_DEPTH, ANDERSON_REG = 5, 1e-10  # depth: see docs/benchmarks.md, fixed-point solvers


class WellPosednessError(ValueError):
    """The contraction guarantee does not hold (mu_inf(A) >= 1 or alpha > alpha*)."""


class WellPosednessWarning(UserWarning):
    """Like :class:`WellPosednessError`, issued when the caller opted into warnings."""


class ConvergenceWarning(UserWarning):
    """Some samples reached max_iter before their residual fell below tol."""


@njit(cache=True, fastmath=True)
def _product(X, S, M, n_act, masked, Y, M2=None):
    """(X * S) M over the first n_act (still active) rows, or X M without a mask; Y (at least
    n_act rows) is scratch for X * S, so that no temporary is made at each step.

    With ``M2``, M and M2 are (h, h) and the rows [x_lo, x_hi] (2h wide) meet the embedded matrix whose
    row form is [[M_M, M_N], [M_N, M_M]] with M = M_M + M_N and M2 = M_M - M_N (the sum-difference
    form of interval propagation): with s = x_lo + x_hi and d = x_hi - x_lo, the product is
    [(s M - d M2) / 2, (s M + d M2) / 2], two (h, h) products where the embedded one costs four.
    """
    if masked:
        n = X.shape[1]
        for r in range(n_act):
            for j in range(n):
                Y[r, j] = X[r, j] * S[r, j]
        Xm = Y
    else:
        Xm = X
    if M2 is None:
        return np.dot(Xm[:n_act], M)
    h = M.shape[0]
    half = Xm.dtype.type(0.5)
    sd = np.empty((2, n_act, h), Xm.dtype)
    for r in range(n_act):
        for j in range(h):
            lo, hi = Xm[r, j], Xm[r, h + j]
            sd[0, r, j] = lo + hi
            sd[1, r, j] = hi - lo
    a, b = np.dot(sd[0], M), np.dot(sd[1], M2)
    P = np.empty((n_act, 2 * h), Xm.dtype)
    for r in range(n_act):
        for j in range(h):
            P[r, j] = half * (a[r, j] - b[r, j])
            P[r, h + j] = half * (a[r, j] + b[r, j])
    return P


@njit(cache=True, fastmath=True)
def _max_magnitude(v):
    """max_j v_j of a row of entries >= 0 (or NaN), overwriting v[0]: the largest IEEE 754 bit pattern,
    read as an integer (which orders non-negative floats as their values, and puts a NaN above every
    one). numba's floating max does not vectorize in a reduction, an integer one does: about 3x
    faster a row of 100."""
    if v.itemsize == 4:
        return _max_by_bits(v, v.view(np.int32))
    return _max_by_bits(v, v.view(np.int64))


@njit(cache=True, fastmath=True)
def _max_by_bits(v, bits):
    top = bits[0] - bits[0]   # 0, the pattern of +0.0, in the integer type of the view
    for j in range(v.shape[0]):
        top = max(top, bits[j])
    bits[0] = top
    return v[0]


@njit(cache=True, fastmath=True, error_model="numpy")
def _evaluate_row(P, r, Q, i, X, relu, l1, zero, relative, T):
    """P[r] += Q[i]; return ||phi(P[r]) - X[r]|| (l_1 or l_inf), in the batch dtype (``zero``); with
    ``relative``, ||phi(P[r]) - X[r]|| / max(1, ||phi(P[r])||) in the same norm (see
    :func:`solve_equilibrium`). phi = relu or identity. T (2, n) is scratch.

    One pass, with phi recomputed rather than stored, rows indexed in place rather than passed as
    views, and branches hoisted out of the loops: each loop vectorizes (this made the kernel about
    20% faster than a stored phi(P[r]) and row views). The l_inf norms store |phi(P) - x| and
    |phi(P)| in T and take their maxima by :func:`_max_magnitude`, since a floating max does not
    vectorize.
    """
    n = P.shape[1]
    res = zero
    size = zero
    for j in range(n):
        P[r, j] += Q[i, j]
    if relu and l1:
        for j in range(n):
            f = max(P[r, j], zero)
            res += abs(f - X[r, j])
            size += f
    elif l1:
        for j in range(n):
            res += abs(P[r, j] - X[r, j])
            size += abs(P[r, j])
    elif relu:
        for j in range(n):
            f = max(P[r, j], zero)
            T[0, j] = abs(f - X[r, j])
            T[1, j] = f
    else:
        for j in range(n):
            T[0, j] = abs(P[r, j] - X[r, j])
            T[1, j] = abs(P[r, j])
    if not l1:
        res = _max_magnitude(T[0])
        if relative:
            size = _max_magnitude(T[1])
    if relative:
        res = res / max(zero + 1, size)
    return res


@njit(cache=True, fastmath=True)
def _activate_row(P, r, F, relu, zero):
    """F = phi(P[r]), phi = relu or identity."""
    if relu:
        for j in range(P.shape[1]):
            F[j] = max(P[r, j], zero)
    else:
        for j in range(P.shape[1]):
            F[j] = P[r, j]


@njit(cache=True)
def _working_set(Q, S, X0):
    """The state both kernels start from: outputs (X_out, P_out, iterations, residual) to fill per
    sample, the working rows X (a copy of X0) and their masks Sa, and ``active`` (row r of the
    working set is sample active[r]; rows only move down as samples finish)."""
    m = Q.shape[0]
    return (np.empty_like(Q), np.empty_like(Q), np.zeros(m, np.int64), np.empty(m, Q.dtype), X0.copy(), S.copy(),
            np.arange(m))


@njit(cache=True)
def _move_row(Sa, active, r, w, masked):
    """Row r of the working set becomes row w (w <= r): its mask and sample index follow it."""
    if w != r:
        if masked:
            Sa[w] = Sa[r]
        active[w] = active[r]


@njit(cache=True)
def _all_zero(X):
    """Whether every entry of X is zero (stopping at the first that is not)."""
    for i in range(X.shape[0]):
        for j in range(X.shape[1]):
            if X[i, j] != 0:
                return False
    return True


@njit(cache=True, fastmath=True, error_model="numpy")
def _averaged_fixed_point(M, Q, S, X0, alpha, tol, max_iter, relu, l1, forward_backward=False,
                          adaptive=False, record=None, relative=False, M2=None):
    """Row-wise x <- (1 - alpha) x + alpha phi((x * s) M + q), phi = relu or identity.

    With ``forward_backward`` the average is taken before the activation instead
    (monDEQ's forward-backward splitting): x <- phi((1 - alpha) x + alpha ((x * s) M + q)).
    With ``adaptive`` each row's alpha is divided by 1.5 whenever its residual fails to
    drop below 0.85 of the previous one (the heuristic of the paper's code).
    ``record`` (m, max_iter + 1), if given, receives each row's residual at every step.

    M (n, n); Q, S, X0 (m, n) C-contiguous of one dtype; S has 0 rows to mean "no mask". With M2,
    M and M2 are (n/2, n/2) and the product is the embedded one of :func:`_product`.
    Returns, for each row, the last iterate x_k, its pre-activation (x_k * s) M + q,
    k and its residual ||phi(.) - x_k|| (l_1 if l1 else l_inf). Converged rows are
    compacted out of the working set so that they cost no further matmul.
    """
    m, n = Q.shape
    masked = S.shape[0] > 0
    X_out, P_out, iterations, residual, X, Sa, active = _working_set(Q, S, X0)
    zero = tol - tol   # the batch dtype's zero, so that float32 loops stay in float32
    Y = np.empty_like(Q) if masked else Q[:0]
    alphas = np.full(m, alpha)
    previous = np.full(m, np.inf)
    T = np.empty((2, n), Q.dtype)
    n_act = m
    for k in range(max_iter + 1):
        if k == 0 and _all_zero(X):
            P = np.zeros_like(Q)   # the zero start's product, not taken: one product a sample fewer
        else:
            P = _product(X, Sa, M, n_act, masked, Y, M2)
        n_keep = 0
        for r in range(n_act):
            res = _evaluate_row(P, r, Q, active[r], X, relu, l1, zero, relative, T)
            if record is not None:
                record[active[r], k] = res
            if res <= tol or k == max_iter:
                i = active[r]
                for j in range(n):   # a loop: measured faster than numba's row assignment
                    X_out[i, j] = X[r, j]
                    P_out[i, j] = P[r, j]
                iterations[i] = k
                residual[i] = res
                continue
            if adaptive:
                if res > 0.85 * previous[r]:
                    alphas[r] /= 1.5   # through the array, so that the step stays in the batch dtype
                previous[n_keep] = res
            a = alphas[r]
            alphas[n_keep] = a
            if forward_backward:
                for j in range(n):
                    v = X[r, j] + a * (P[r, j] - X[r, j])
                    X[n_keep, j] = max(v, zero) if relu else v
            elif relu:
                for j in range(n):
                    X[n_keep, j] = X[r, j] + a * (max(P[r, j], zero) - X[r, j])
            else:
                for j in range(n):
                    X[n_keep, j] = X[r, j] + a * (P[r, j] - X[r, j])
            _move_row(Sa, active, r, n_keep, masked)
            n_keep += 1
        n_act = n_keep
        if n_act == 0:
            break
    return X_out, P_out, iterations, residual


@njit(cache=True)
def _solve_small(H, b):
    """Solve the small SPD system H y = b in place by Gaussian elimination with pivoting."""
    k = b.shape[0]
    for c in range(k):
        p = c
        for r in range(c + 1, k):
            if abs(H[r, c]) > abs(H[p, c]):
                p = r
        if p != c:
            for j in range(k):
                H[c, j], H[p, j] = H[p, j], H[c, j]
            b[c], b[p] = b[p], b[c]
        for r in range(c + 1, k):
            f = H[r, c] / H[c, c]
            for j in range(c, k):
                H[r, j] -= f * H[c, j]
            b[r] -= f * b[c]
    for c in range(k - 1, -1, -1):
        acc = b[c]
        for j in range(c + 1, k):
            acc -= H[c, j] * b[j]
        b[c] = acc / H[c, c]
    return b


@njit(cache=True)
def _anderson_state(Q, depth):
    """Anderson's per-sample state for a batch Q (m, n), indexed by the sample (not compacted: no
    history copies): the last accepted point, its g and pre-activation; ring buffers of differences
    dX, dG and their Gram matrix; counts of accepted points and of stored differences; the accepted
    residual and whether the current point is an extrapolated candidate; scratch F, H, rhs."""
    m, n = Q.shape
    # The points and the histories are written before they are read (a sample's first accepted point,
    # then one difference a slot), so they are not zeroed: a conv batch's are hundreds of MB, and
    # zeroing them cost a sixth of a test evaluation.
    return (np.empty((m, n), Q.dtype), np.empty((m, n), Q.dtype), np.empty((m, n), Q.dtype),
            np.empty((m, depth, n), Q.dtype), np.empty((m, depth, n), Q.dtype), np.zeros((m, depth, depth)),
            np.zeros(m, np.int64), np.zeros(m, np.int64), np.full(m, np.inf), np.zeros(m, np.bool_),
            np.empty(n, Q.dtype), np.empty((depth, depth)), np.empty(depth))


@njit(cache=True, fastmath=True)
def _anderson_sweep(P, Q, X, Sa, active, n_act, k, alpha, tol, max_iter, relu, l1, reg, rho, masked, relative,
                    state, X_out, P_out, iterations, residual, record):
    """One Anderson step for the n_act working rows, given their products P (n_act, n) = (x s) M
    (before q): evaluate, accept or reject (the safeguard), finish converged rows into the outputs,
    write the next candidate of every other row into X, compacting rows downwards. Returns the
    number of rows still working. The state is :func:`_anderson_state`'s."""
    X_acc, G_acc, P_acc, dXh, dGh, gram, n_acc, n_diff, accepted, candidate, F, H, rhs = state
    n = Q.shape[1]
    depth = dXh.shape[1]
    T = np.empty((2, n), Q.dtype)
    n_keep = 0
    for r in range(n_act):
        i = active[r]
        res = _evaluate_row(P, r, Q, i, X, relu, l1, tol - tol, relative, T)
        _activate_row(P, r, F, relu, tol - tol)
        if record is not None:
            record[i, k] = res
        rejected = candidate[i] and res > rho * accepted[i]
        if res <= tol or k == max_iter:
            iterations[i] = k
            if rejected and res > accepted[i]:   # out of budget on a worse candidate
                X_out[i] = X_acc[i]
                P_out[i] = P_acc[i]
                residual[i] = accepted[i]
            else:
                X_out[i] = X[r]
                P_out[i] = P[r]
                residual[i] = res
            continue
        w = n_keep   # rows only move down: row r is read before row w is overwritten
        if rejected:
            for j in range(n):
                X[w, j] = X_acc[i, j] + G_acc[i, j]
            n_diff[i] = 0
            candidate[i] = False
        else:
            nd = n_diff[i]
            slot = nd % depth
            if n_acc[i] > 0:
                for j in range(n):
                    dXh[i, slot, j] = X[r, j] - X_acc[i, j]
                    dGh[i, slot, j] = alpha * (F[j] - X[r, j]) - G_acc[i, j]
                nd += 1
            mk = min(nd, depth)
            for j in range(n):
                G_acc[i, j] = alpha * (F[j] - X[r, j])
                X_acc[i, j] = X[r, j]
                P_acc[i, j] = P[r, j]
            for j in range(n):
                X[w, j] = X_acc[i, j] + G_acc[i, j]
            if mk > 0:
                # One pass over the history: the Gram row of the new difference and the rhs.
                for q in range(mk):
                    gq = 0.0
                    rq = 0.0
                    for j in range(n):
                        gq += dGh[i, slot, j] * dGh[i, q, j]
                        rq += dGh[i, q, j] * G_acc[i, j]
                    gram[i, slot, q] = gq
                    gram[i, q, slot] = gq
                    rhs[q] = rq
                trace = 0.0
                for q in range(mk):
                    trace += gram[i, q, q]
                    for p in range(mk):
                        H[q, p] = gram[i, q, p]
                for q in range(mk):
                    H[q, q] += reg * trace + 1e-300
                coef = _solve_small(H[:mk, :mk], rhs[:mk])
                for q in range(mk):
                    c = coef[q]
                    for j in range(n):
                        X[w, j] -= (dXh[i, q, j] + dGh[i, q, j]) * c
            n_diff[i] = nd
            n_acc[i] += 1
            accepted[i] = res
            candidate[i] = mk > 0
        _move_row(Sa, active, r, w, masked)
        n_keep += 1
    return n_keep


@njit(cache=True, fastmath=True)
def _anderson_fixed_point(M, Q, S, X0, alpha, tol, max_iter, relu, l1, depth, reg, rho, record=None,
                          relative=False, M2=None):
    """Anderson acceleration (type II, depth ``depth``) of the averaged iteration, row-wise.

    With T(x) = x + alpha (phi((x * s) M + q) - x) and g_i = T(x_i) - x_i over the accepted
    iterates, the candidate is x_k + g_k - (dX + dG) c with c = argmin ||g_k - dG c||^2 +
    reg ||dG||_F^2 ||c||^2, dX and dG the last ``depth`` consecutive differences (kept in a
    ring buffer, with their Gram matrix updated one row per step). Safeguard: a candidate
    whose residual exceeds ``rho`` times that of the last accepted point is replaced by the
    plain step T(x_acc) and the history is cleared, so that every accepted point contracts at
    least as the bound rho says: convergence is never lost. Outputs as :func:`_averaged_fixed_point`.
    The step of each row is :func:`_anderson_sweep`, which the convolutional solver shares.
    """
    m = Q.shape[0]
    masked = S.shape[0] > 0
    X_out, P_out, iterations, residual, X, Sa, active = _working_set(Q, S, X0)
    state = _anderson_state(Q, depth)
    Y = np.empty_like(Q) if masked else Q[:0]
    n_act = m
    for k in range(max_iter + 1):
        P = _product(X, Sa, M, n_act, masked, Y, M2)
        n_act = _anderson_sweep(P, Q, X, Sa, active, n_act, k, alpha, tol, max_iter, relu, l1, reg, rho, masked,
                                relative, state, X_out, P_out, iterations, residual, record)
        if n_act == 0:
            break
    return X_out, P_out, iterations, residual


def anderson_fixed_point_reference(M, Q, S, X0, alpha, tol, max_iter, relu, l1, depth, reg, rho):
    """NumPy reference of :func:`_anderson_fixed_point` (same contract, one sample at a time)."""
    m, n = Q.shape
    X_out, P_out = np.empty_like(Q), np.empty_like(Q)
    iterations, residual = np.zeros(m, np.int64), np.empty(m, Q.dtype)
    for i in range(m):
        x = X0[i].astype(Q.dtype, copy=True)
        s = S[i] if S.shape[0] else 1
        x_acc = g_acc = p_acc = None
        dX, dG = [], []
        accepted, candidate = np.inf, False
        for k in range(max_iter + 1):
            p = (x * s) @ M + Q[i]
            f = np.maximum(p, 0) if relu else p
            res = np.abs(f - x).sum() if l1 else np.abs(f - x).max()
            rejected = candidate and res > rho * accepted
            if res <= tol or k == max_iter:
                out = (x_acc, p_acc, accepted) if rejected and res > accepted else (x, p, res)
                X_out[i], P_out[i], residual[i] = out
                iterations[i] = k
                break
            if rejected:
                x = (x_acc + g_acc).astype(Q.dtype)
                dX, dG, candidate = [], [], False
                continue
            g = (alpha * (f - x)).astype(Q.dtype)
            if x_acc is not None:
                dX, dG = (dX + [x - x_acc])[-depth:], (dG + [g - g_acc])[-depth:]
            x_acc, g_acc, p_acc = x, g, p
            x_new = x + g
            if dG:
                DG, DX = np.array(dG, np.float64), np.array(dX, np.float64)
                H = DG @ DG.T
                H += (reg * np.trace(H) + 1e-300) * np.eye(len(dG))
                x_new = x_new - (DX + DG).T @ np.linalg.solve(H, DG @ g)
            x, accepted, candidate = x_new.astype(Q.dtype), res, bool(dG)
    return X_out, P_out, iterations, residual


def averaged_fixed_point_reference(M, Q, S, X0, alpha, tol, max_iter, relu, l1, forward_backward=False):
    """NumPy reference of the numba kernel (same contract, one sample at a time)."""
    m, n = Q.shape
    X_out, P_out = np.empty_like(Q), np.empty_like(Q)
    iterations, residual = np.zeros(m, np.int64), np.empty(m, Q.dtype)
    for i in range(m):
        x = X0[i].astype(Q.dtype, copy=True)
        s = S[i] if S.shape[0] else 1
        for k in range(max_iter + 1):
            p = (x * s) @ M + Q[i]
            f = np.maximum(p, 0) if relu else p
            diff = np.abs(f - x)
            res = diff.sum() if l1 else diff.max()
            if res <= tol or k == max_iter:
                break
            if forward_backward:
                v = x + alpha * (p - x)
                x = (np.maximum(v, 0) if relu else v).astype(Q.dtype)
            else:
                x = (x + alpha * (f - x)).astype(Q.dtype)
        X_out[i], P_out[i], iterations[i], residual[i] = x, p, k, res
    return X_out, P_out, iterations, residual


@njit(cache=True, fastmath=True)
def _peaceman_rachford(VT, Q, alpha, tol, max_iter):
    """monDEQ's Peaceman-Rachford splitting for x = relu(A x + q), row-wise.

    With V = (I + alpha (I - A))^-1 (factored once by the caller), from u = x = 0:
        u_half = 2 x - u,  z = V (u_half + alpha q),  u = 2 z - u_half,  x = relu(u).
    A row stops when ||x_{k+1} - x_k||_inf <= tol. Returns X, iterations, that step norm.
    """
    m, n = Q.shape
    X_out = np.empty_like(Q)
    iterations = np.zeros(m, np.int64)
    step = np.empty(m, Q.dtype)
    active = np.arange(m)
    X = np.zeros_like(Q)
    Uh = np.zeros_like(Q)           # holds u, then u_half + alpha q
    n_act = m
    for k in range(1, max_iter + 1):
        for r in range(n_act):
            i = active[r]
            for j in range(n):
                Uh[r, j] = 2 * X[r, j] - Uh[r, j] + alpha * Q[i, j]
        Z = np.dot(Uh[:n_act], VT)
        n_keep = 0
        for r in range(n_act):
            i = active[r]
            res = tol - tol
            for j in range(n):
                u = 2 * Z[r, j] - (Uh[r, j] - alpha * Q[i, j])
                x = max(u, 0.0)
                res = max(res, abs(x - X[r, j]))
                X[r, j] = x
                Uh[r, j] = u
            if res <= tol or k == max_iter:
                X_out[i] = X[r]
                iterations[i] = k
                step[i] = res
                continue
            if n_keep != r:
                X[n_keep] = X[r]
                Uh[n_keep] = Uh[r]
                active[n_keep] = i
            n_keep += 1
        n_act = n_keep
        if n_act == 0:
            break
    return X_out, iterations, step


def contraction_alpha(A):
    """alpha* = 1 / (1 - min(min_i a_ii, 0)), the step minimizing rho(alpha)."""
    return _alpha_star(as_square_matrix(A))


def _alpha_star(A):
    """:func:`contraction_alpha` of a checked square matrix."""
    return 1.0 / (1.0 - min(float(np.diag(A).min()), 0.0))


def contraction_factor(A, alpha=None, weights=None):
    """rho(alpha) = 1 - alpha (1 - max(mu_inf(A), 0)), valid for 0 < alpha <= alpha*."""
    alpha = contraction_alpha(A) if alpha is None else float(alpha)
    return _contraction_rate(alpha, mu_inf(A, weights))


def _contraction_rate(alpha, mu):
    """rho = 1 - alpha (1 - max(mu, 0)): the l_inf contraction factor of the average iteration with
    step alpha <= alpha* for a matrix (or convolution) of measure mu."""
    return 1.0 - alpha * (1.0 - max(mu, 0.0))


def _anderson_rho(rho):
    """The factor Anderson's safeguard enforces: rho kept in [0, 1) so that a step is always possible."""
    return min(max(rho, 0.0), 1.0 - 1e-12)


def _check_contraction(A, method, alpha, weights, on_violation):
    """Validate the step of an averaged iteration; return alpha and mu_inf(A). A and weights as
    :func:`solve_equilibrium` has checked them."""
    if on_violation not in ("raise", "warn"):
        raise ValueError(f"on_violation must be 'raise' or 'warn', got {on_violation!r}")
    alpha_star = _alpha_star(A)
    mu = float(checked_row_measures(A, weights).max())
    if method == "adaptive" and alpha is None:
        # The paper's heuristic starts at Picard's step and shrinks it; no a-priori guarantee.
        return 1.0, mu
    if method == "picard":
        if alpha not in (None, 1, 1.0):
            raise ValueError("picard iteration uses alpha = 1; pass method='average' for another step")
        alpha = 1.0
    elif alpha is None:
        alpha = alpha_star
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}")
    problems = []
    if mu >= 1.0:
        problems.append(f"mu_inf(A) = {mu:.6g} >= 1: the fixed point may not exist or be unique")
    if alpha > alpha_star * (1 + 1e-12):
        problems.append(f"alpha = {alpha:.6g} > alpha* = {alpha_star:.6g}: the iteration may not contract")
    if problems:
        msg = "; ".join(problems)
        if on_violation == "raise":
            raise WellPosednessError(msg + " (pass on_violation='warn' to run anyway)")
        warnings.warn(msg, WellPosednessWarning, stacklevel=3)
    return alpha, mu


def _check_monotone(A, method, alpha, on_violation):
    """Validate a monDEQ splitting: return alpha, mu_2(A), the strong-monotonicity margin m, L."""
    if on_violation not in ("raise", "warn"):
        raise ValueError(f"on_violation must be 'raise' or 'warn', got {on_violation!r}")
    A64 = A.astype(np.float64)
    I_A = np.eye(len(A)) - A64
    margin = float(np.linalg.eigvalsh(0.5 * (I_A + I_A.T))[0])
    # Only forward-backward's step bound needs L = ||I - A||_2 (an SVD: the costly part).
    L = float(np.linalg.norm(I_A, 2)) if method == "forward-backward" else None
    fb_limit = 2.0 * margin / L ** 2 if (L is not None and margin > 0) else 0.0
    if alpha is None:
        # Half of forward-backward's limit; without a certificate there is no limit to halve.
        alpha = (0.5 * fb_limit if fb_limit > 0 else 0.5) if method == "forward-backward" else 1.0
    alpha = float(alpha)
    problems = []
    if margin <= 0:
        problems.append(f"mu_2(A) = {1 - margin:.6g} >= 1: I - A is not strongly monotone, "
                        f"{method} is not guaranteed to converge")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if method == "forward-backward" and margin > 0 and alpha >= fb_limit:
        problems.append(f"alpha = {alpha:.6g} >= 2 m / L^2 = {fb_limit:.6g}: forward-backward may not converge")
    if problems:
        msg = "; ".join(problems)
        if on_violation == "raise":
            raise WellPosednessError(msg + " (pass on_violation='warn' to run anyway)")
        warnings.warn(msg, WellPosednessWarning, stacklevel=3)
    return alpha, 1.0 - margin, margin, L


def _check_batch(Q, n, name):
    Q = np.asarray(Q)
    if Q.ndim != 2 or Q.shape[1] != n:
        raise ValueError(f"{name} must have shape (batch, {n}), got {Q.shape}")
    if not all_finite(Q):
        raise ValueError(f"{name} has non-finite entries (NaN or inf)")
    return Q


def _check_budget(tol, max_iter):
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"max_iter must be a whole number >= 0, got {max_iter!r}")
    return float(tol), int(max_iter)


def _warn_unconverged(info, tol, what):
    n_bad = int(np.count_nonzero(~info.converged))
    if n_bad:
        warnings.warn(f"{what}: {n_bad} of {info.converged.size} samples stopped at max_iter with "
                      f"residual up to {info.residual.max():.3g} > tol = {tol:.3g}",
                      ConvergenceWarning, stacklevel=3)


def _iterate(method, M, Q, S, X0, alpha, tol, max_iter, relu, l1, rho, record, relative=False, M2=None):
    """Run the numba kernel of an averaged-family ``method`` on batch arrays of one dtype."""
    dt = Q.dtype.type
    if method == "anderson":
        return _anderson_fixed_point(M, Q, S, X0, dt(alpha), dt(tol), max_iter, relu, l1, ANDERSON_DEPTH,
                                     ANDERSON_REG, _anderson_rho(rho), record, relative, M2)
    return _averaged_fixed_point(M, Q, S, X0, dt(alpha), dt(tol), max_iter, relu, l1,
                                 method == "forward-backward", method == "adaptive", record, relative, M2)


def _embedded_factors(P, transpose):
    """(M, M2) of :func:`_product` for the embedded matrix of P: :func:`nemon_np.interval.sum_and_difference`,
    transposed for the forward (row) form."""
    S, D = sum_and_difference(P)
    if transpose:
        S, D = S.T, D.T
    return np.ascontiguousarray(S), np.ascontiguousarray(D)


TOL_MODES = ("absolute", "relative")


def _check_tol_mode(tol_mode):
    if tol_mode not in TOL_MODES:
        raise ValueError(f"tol_mode must be one of {', '.join(TOL_MODES)}, got {tol_mode!r}")
    return tol_mode == "relative"


def solve_equilibrium(A, Q, *, method="average", alpha=None, tol=1e-6, max_iter=500,
                      X0=None, weights=None, on_violation="raise", record=None, tol_mode="absolute",
                      embedded=False):
    """Solve ``x = relu(A x + q)`` for every row q of Q.

    With ``embedded``, solve instead the embedded network of A (n, n) (DESIGN.md, "Interval
    certificates"; :func:`nemon_np.interval.embed`), ``x = relu(E x + q)`` with E = [[A_M, A_N],
    [A_N, A_M]] and Q, X0, X of width 2n, without forming E: each product is taken in the
    sum-difference form, two n x n products instead of one 2n x 2n (:func:`_product`). E has the
    measure of A, mu_inf,[eta, eta](E) = mu_inf,eta(A), and its diagonal, so the same alpha* and
    certificate; ``weights`` are A's (n,). Only for the averaged methods.

    Parameters
    ----------
    A : (n, n) array, float32 or float64
    Q : (m, n) array, the input injection ``U B^T + b`` per sample (cast to A's dtype)
    method : {"average", "picard", "adaptive", "anderson", "forward-backward", "peaceman-rachford"}
        Average iteration with step ``alpha`` (default alpha*), Picard (alpha = 1), the
        paper code's adaptive step (from alpha = 1, divided by 1.5 whenever the residual fails
        to drop below 0.85 of the last; guaranteed only once alpha <= alpha*), or the average
        iteration with safeguarded Anderson acceleration (depth 5), all certified by
        mu_inf(A) < 1; or monDEQ's splittings, certified by mu_2(A) < 1
        (forward-backward: default alpha = m / L^2, half its limit; Peaceman-Rachford:
        default alpha = 1, any alpha > 0).
    tol : float
        Stop a sample when ``||relu(A x_k + q) - x_k||_inf <= tol`` (Peaceman-Rachford:
        when its step ``||x_{k+1} - x_k||_inf <= tol``; the fixed-point residual is reported).
    max_iter : int
        At most this many updates per sample.
    X0 : (m, n) array, optional
        Warm start (default zeros).
    weights : (n,) array, optional
        Diagonal weights eta; the well-posedness check uses mu_inf,eta(A).
    on_violation : {"raise", "warn"}
        What to do when the method's certificate fails (mu_inf(A) >= 1 or alpha > alpha*;
        for the splittings mu_2(A) >= 1 or a too large forward-backward step).
    record : (m, max_iter + 1) float array, optional
        Receives each sample's residual at every iteration (for convergence studies; not
        for Peaceman-Rachford).
    tol_mode : {"absolute", "relative"}
        "relative" stops a sample when ``||F(x_k) - x_k||_inf <= tol max(1, ||F(x_k)||_inf)``,
        F(x) = relu(A x + q), and reports that relative residual: the tolerance follows the
        state's scale (which grows with the Lipschitz bound in training) instead of asking for
        ever more digits. The error bound then reads ||x_k - x*||_inf <= residual
        max(1, ||F(x_k)||_inf) / (1 - max(mu_inf(A), 0)). Not for Peaceman-Rachford.

    Returns
    -------
    X : (m, n) ndarray, the last iterate of each sample
    info : scipy.optimize.OptimizeResult with per-sample ``iterations``, ``residual``,
        ``converged`` and the run's ``alpha``, ``mu_inf`` (or ``mu_2``), ``rho``
        (contraction factor, None where no rate is known) and ``preactivation``
        Z = X A^T + Q (whose sign pattern the backward pass needs).
    """
    A = as_square_matrix(A)
    eta = as_weights(weights, A.shape[0])
    n = 2 * A.shape[0] if embedded else A.shape[0]
    tol, max_iter = _check_budget(tol, max_iter)
    if method not in FORWARD_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(FORWARD_METHODS)}")
    if embedded and method not in NEMON_METHODS:
        raise ValueError(f"embedded networks are solved by {', '.join(NEMON_METHODS)}, got {method!r}")
    dtype = A.dtype
    Q = np.ascontiguousarray(_check_batch(Q, n, "Q"), dtype=dtype)
    if X0 is not None:
        X0 = np.ascontiguousarray(_check_batch(X0, n, "X0"), dtype=dtype)
        if X0.shape != Q.shape:
            raise ValueError(f"X0 must have the shape of Q {Q.shape}, got {X0.shape}")
    if method in NEMON_METHODS:
        alpha, mu = _check_contraction(A, method, alpha, eta, on_violation)
        certificate = dict(mu_inf=mu, rho=_contraction_rate(alpha, mu))
    else:
        alpha, mu2, margin, L = _check_monotone(A, method, alpha, on_violation)
        certificate = dict(mu_2=mu2, rho=(float(np.sqrt(max(1 - 2 * alpha * margin + alpha ** 2 * L ** 2, 0.0)))
                                          if method == "forward-backward" and margin > 0 else None))
    if record is not None and (not isinstance(record, np.ndarray) or record.shape != (len(Q), max_iter + 1)
                               or record.dtype != dtype):
        raise ValueError(f"record must be a {dtype.name} array of shape ({len(Q)}, {max_iter + 1})")
    relative = _check_tol_mode(tol_mode)
    if method == "peaceman-rachford":
        if relative:
            raise ValueError("peaceman-rachford stops on its own step; tol_mode='relative' is not supported")
        if X0 is not None or record is not None:
            raise ValueError("peaceman-rachford starts from zero and records no history; "
                             "X0 and record are not supported")
        V = np.linalg.inv(np.eye(n) + alpha * (np.eye(n) - A.astype(np.float64)))
        X, iterations, step = _peaceman_rachford(np.ascontiguousarray(V.T, dtype=dtype), Q, dtype.type(alpha),
                                                 dtype.type(tol), max_iter)
        # Stopped on its own step norm; the reported residual is the fixed-point one, as for the others.
        Z = X @ A.T + Q
        residual = np.abs(np.maximum(Z, 0) - X).max(axis=1).astype(np.float64)
        converged = step <= dtype.type(tol)
    else:
        X0 = np.zeros_like(Q) if X0 is None else X0
        M, M2 = _embedded_factors(A, transpose=True) if embedded else (np.ascontiguousarray(A.T), None)
        X, Z, iterations, residual = _iterate(method, M, Q, np.empty((0, n), dtype), X0, alpha, tol, max_iter, True,
                                              False, certificate["rho"] or 1.0, record, relative, M2)
        converged = residual <= dtype.type(tol)
        residual = residual.astype(np.float64)
    info = OptimizeResult(iterations=iterations, residual=residual, converged=converged, alpha=alpha,
                          method=method, preactivation=Z, tol_mode=tol_mode, **certificate)
    _warn_unconverged(info, tol, "forward fixed point")
    return X, info


def solve_adjoint(A, mask, G, *, method="iterative", alpha=None, tol=1e-8, max_iter=500,
                  weights=None, on_violation="raise", certificate="mu_inf", embedded=False):
    """Solve the adjoint equation ``w = g + A^T D w`` for every row g of G.

    With ``embedded``, that of the embedded network of A (n, n) instead, ``w = g + E^T D w`` with mask, G
    and W of width 2n, E never formed (as in :func:`solve_equilibrium`); ``weights`` are A's.

    Parameters
    ----------
    A : (n, n) array
    mask : (m, n) array of {0, 1} (or bool), the diagonal of D = 1[z > 0] per sample
    G : (m, n) array, dL/dx* per sample
    method : {"iterative", "adaptive", "anderson", "direct", "jfb"}
        Averaged adjoint iteration (l_1 contraction, residual ``||g + A^T D w - w||_1 <= tol``),
        the same with the adaptive step or with Anderson acceleration (as for the forward
        solve), an exact LU solve of ``(I - D A)^T w = g`` per sample, or "jfb": w = g, the
        Jacobian-free backpropagation of Fung et al. 2022 ("JFB: Jacobian-free backpropagation for
        implicit networks", AAAI), which replaces (I - A^T D)^{-1} by I, i.e. differentiates one
        application of the layer at the fixed point held fixed. Not the gradient: an approximation
        (a descent direction under their conditions) at no cost: no iteration, and no residual
        (NaN: computing ``||A^T D g||_1`` would cost what an iteration does).
    certificate : {"mu_inf", "mu_2"}
        What makes ``I - D A`` invertible: mu_inf(A) < 1 (NEMON, both methods) or
        mu_2(A) < 1 (monDEQ: the direct solve only, the iteration is not certified then).

    Returns
    -------
    W : (m, n) ndarray; the gradient pieces use ``delta = D w``
    info : OptimizeResult with per-sample ``iterations`` and ``residual`` (zero
        iterations and the exact residual for the direct solve).
    """
    A = as_square_matrix(A)
    eta = as_weights(weights, A.shape[0])
    if embedded and method == "direct":
        # a dense solve per sample: E is formed (the measure and weights are those of A's)
        A, eta, embedded = embed(A), None if eta is None else np.concatenate([eta, eta]), False
    n = 2 * A.shape[0] if embedded else A.shape[0]
    tol, max_iter = _check_budget(tol, max_iter)
    dtype = A.dtype
    G = np.ascontiguousarray(_check_batch(G, n, "G"), dtype=dtype)
    S = np.ascontiguousarray(_check_batch(mask, n, "mask"), dtype=dtype)
    if S.shape != G.shape:
        raise ValueError(f"mask must have the shape of G {G.shape}, got {S.shape}")
    if method not in ADJOINT_METHODS:
        raise ValueError(f"unknown adjoint method {method!r}; choose one of {', '.join(ADJOINT_METHODS)}")
    if certificate == "mu_2":
        if method != "direct":
            raise ValueError("a monDEQ-certified model (mu_2(A) < 1) needs adjoint='direct': "
                             "the averaged adjoint iteration is certified by mu_inf(A) < 1 only")
        _, mu, _, _ = _check_monotone(A, "peaceman-rachford", None, on_violation)
    elif certificate == "mu_inf":
        # Both variants rest on the same contraction: the direct solve needs I - D A invertible.
        alpha, mu = _check_contraction(A, method if method == "adaptive" else "average",
                                       None if method == "direct" else alpha, eta, on_violation)
    else:
        raise ValueError(f"certificate must be 'mu_inf' or 'mu_2', got {certificate!r}")
    if method == "direct":
        # (I - D A)^T = I - A^T D: column j of A^T scaled by d_j.
        M = np.eye(n)[None] - A.T.astype(np.float64)[None] * S.astype(np.float64)[:, None, :]
        W = np.linalg.solve(M, G.astype(np.float64)[..., None])[..., 0].astype(dtype)
        residual = np.abs(G + (W * S) @ A - W).sum(axis=1).astype(np.float64)
        info = OptimizeResult(iterations=np.zeros(len(G), np.int64), residual=residual,
                              converged=np.ones(len(G), bool), alpha=None, method=method,
                              **{certificate: mu})
        return W, info
    if method == "jfb":
        W, info = jacobian_free_adjoint(G)
        info.update(alpha=None, mu_inf=mu)
        return W, info
    rho = _contraction_rate(alpha, mu)
    M, M2 = _embedded_factors(A, transpose=False) if embedded else (np.ascontiguousarray(A), None)
    W, _, iterations, residual = _iterate("average" if method == "iterative" else method, M, G, S, G.copy(), alpha,
                                          tol, max_iter, False, True, rho, None, False, M2)
    info = OptimizeResult(iterations=iterations, residual=residual.astype(np.float64),
                          converged=residual <= dtype.type(tol), alpha=alpha, mu_inf=mu, rho=rho, method=method)
    _warn_unconverged(info, tol, "adjoint")
    return W, info


def jacobian_free_adjoint(G):
    """The "jfb" adjoint of Fung et al. 2022 for every implicit layer kind: w = g for each row g of G
    (``(I - A^T D)^{-1}`` replaced by I), as (W, info) with no iteration and no residual (NaN)."""
    return G.copy(), OptimizeResult(iterations=np.zeros(len(G), np.int64), residual=np.full(len(G), np.nan),
                                    converged=np.ones(len(G), bool), method="jfb")


def averaged_fixed_point_operator(apply, Q, alpha, tol, max_iter, relu=True, l1=False, S=None, X0=None):
    """The averaged iteration of :func:`_averaged_fixed_point` for a linear map given as a function.

    x <- x + alpha (phi(apply(x * s) + q) - x) row-wise, for maps such as a convolution that are
    not stored as matrices; ``apply`` maps an (r, n) batch to (r, n). Rows stop on their own
    residual (l_1 or l_inf) and leave the working set. Returns X, pre-activations, iterations,
    residuals, as the numba kernel does (whose NumPy counterpart this is).
    """
    m, n = Q.shape
    X = np.zeros_like(Q) if X0 is None else np.array(X0, dtype=Q.dtype)
    P_out = np.empty_like(Q)
    iterations = np.zeros(m, np.int64)
    residual = np.empty(m)
    active = np.arange(m)
    for k in range(max_iter + 1):
        Xa = X[active]
        P = apply(Xa if S is None else Xa * S[active]) + Q[active]
        F = np.maximum(P, 0) if relu else P
        diff = np.abs(F - Xa)
        res = diff.sum(axis=1) if l1 else diff.max(axis=1)
        done = (res <= tol) | (k == max_iter)
        idx = active[done]
        P_out[idx], iterations[idx], residual[idx] = P[done], k, res[done]
        keep = ~done
        X[active[keep]] = Xa[keep] + alpha * (F[keep] - Xa[keep])
        active = active[keep]
        if active.size == 0:
            break
    return X, P_out, iterations, residual

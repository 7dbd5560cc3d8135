"""Interval bounds of an implicit layer: the embedded network, margins, the certified loss.

DESIGN.md, "Interval certificates: the embedded network" (Jafarpour, Abate, Davydov, Bullo, Coogan,
L4DC 2022). Split the implicit matrix into its Metzler part (diagonal kept whole) and the rest,

    A_M = diag(A) + max(offdiag(A), 0),    A_N = min(offdiag(A), 0).

For every input u in the box [u_lo, u_hi] the fixed point x(u) of x = relu(A x + B u + b) lies in
[x_lo, x_hi], the fixed point of the *embedded network* of size 2n

    [x_lo; x_hi] = relu(E [x_lo; x_hi] + [q_lo; q_hi]),   E = [[A_M, A_N], [A_N, A_M]],
    q_lo = B u_c - |B| u_r + b,   q_hi = B u_c + |B| u_r + b,

(u_c, u_r the centre and radius of the box: the same as B+ u_lo + B- u_hi + b and its mirror).
E has the diagonal of A and the same row sums of |off-diagonal| entries, so mu_inf(E) = mu_inf(A)
(weighted too, with weights [eta; eta]): a well-posed NEMON has a well-posed embedding, solved by
the same average iteration at the same alpha*. For a convolution the split is per tap, the centre
tap of a channel onto itself being the diagonal; the block layout is on the kernel's first two
(output, input channel) axes, so the same functions serve both.

With d = C_k - C_j, the margin y_k - y_j over the whole box is at least (the relative classifier)

    d . x_c - |d| . x_r + c_k - c_j  =  d+ x_lo + d- x_hi + c_k - c_j,

the IBP-style loss (Gowal et al. 2018) is kappa CE(y) + (1 - kappa) CE(-m_lo), m_lo the vector
of those lower bounds (0 at the true class); its gradient reaches the parameters through
:func:`margin_lower_bounds_grad`, the embedded adjoint and :func:`fold_embedded_grad`.

Soundness in floating point: every function that feeds a certificate returns a bound that holds
in exact arithmetic for the computed numbers, with a rounding allowance of (terms + 4) u per
product sum (u = 2^-53, the unit roundoff of the float64 they are computed in; the standard
bound |fl(x . y) - x . y| <= gamma_n |x| . |y|, Higham 2002, eq. (3.5)).
"""
import numpy as np
from numba import njit


__all__ = ["UNIT_ROUNDOFF", "narrow_preactivation_box", "relu_box", "relu_box_grad", "affine_enclosure",
           "metzler_split", "embed", "fold_embedded_grad", "center_radius", "enclosing_center_radius",
           "margin_lower_bounds", "margin_rounding", "margin_lower_bounds_grad", "enclosure_radius", "diagonal_mask"]

UNIT_ROUNDOFF = 2.0 ** -53


def diagonal_mask(P):
    """Boolean mask of the diagonal entries of an implicit matrix (n, n) or kernel (C, C, k, k): a_ii,
    or the centre tap K[c, c, p, p] of each channel onto itself."""
    mask = np.zeros(np.shape(P), bool)
    n = mask.shape[0]
    if mask.ndim == 2:
        mask[np.arange(n), np.arange(n)] = True
    else:
        p = mask.shape[2] // 2
        mask[np.arange(n), np.arange(n), p, p] = True
    return mask


def metzler_split(P):
    """(P_M, P_N): the Metzler part (diagonal whole, off-diagonal entries clipped at 0 from below)
    and the rest (off-diagonal entries clipped at 0 from above), P = P_M + P_N; same shapes as P."""
    diag = diagonal_mask(P)
    zero = np.zeros((), np.asarray(P).dtype)
    return np.where(diag, P, np.maximum(P, zero)), np.where(diag, zero, np.minimum(P, zero))


def sum_and_difference(P):
    """(P_M + P_N, P_M - P_N) = (P, P_M - P_N) of :func:`metzler_split`: the two factors of the embedded
    matrix's products in sum-difference form (for a matrix, P_M - P_N is |P| off the diagonal and P on it),
    which the solvers use instead of :func:`embed`."""
    PM, PN = metzler_split(P)
    return P, PM - PN


def embed(P):
    """The embedded matrix [[P_M, P_N], [P_N, P_M]] of :func:`metzler_split`: (2n, 2n) for a matrix,
    (2C, 2C, k, k) for a kernel (acting on the state [x_lo, x_hi] stacked along the last axis)."""
    PM, PN = metzler_split(P)
    return np.ascontiguousarray(np.concatenate([np.concatenate([PM, PN], axis=1),
                                                np.concatenate([PN, PM], axis=1)], axis=0))


def fold_embedded_grad(G, P):
    """dL/dP from dL/dE = G through :func:`embed`: dL/dP_M = G11 + G22 goes to the diagonal and the
    entries >= 0, dL/dP_N = G12 + G21 to the negative ones."""
    n = np.shape(P)[0]
    GM, GN = G[:n, :n] + G[n:, n:], G[:n, n:] + G[n:, :n]
    return np.where(diagonal_mask(P) | (np.asarray(P) >= 0), GM, GN)


def center_radius(lo, hi):
    """(centre, radius) = ((lo + hi) / 2, (hi - lo) / 2), in the arrays' dtype (for training)."""
    return (lo + hi) / 2, (hi - lo) / 2


def enclosing_center_radius(lo, hi):
    """float64 (centre, radius) with [c - r, c + r] containing [lo, hi] in exact arithmetic, rounding
    included: r is (hi - lo) / 2 enlarged by the rounding errors of c and r."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    c = (lo + hi) / 2
    r = (hi - lo) / 2 * (1 + 4 * UNIT_ROUNDOFF) + 2 * UNIT_ROUNDOFF * np.abs(c) + np.finfo(np.float64).tiny
    return c, r


def margin_lower_bounds(C, c, X_c, X_r, labels):
    """Lower bounds of y_k - y_j over the box [X_c - X_r, X_c + X_r] of features, k = labels, shape
    (m, n_out), 0 at j = k: ``(C_k - C_j) x_c - |C_k - C_j| x_r + c_k - c_j``.

    C (n_out, n), c (n_out,), X_c and X_r (m, n), labels (m,) integers.
    """
    rows = np.arange(len(labels))
    n_out = len(C)
    Y = X_c @ C.T + c
    pair = np.abs(C[:, None, :] - C[None, :, :]).reshape(n_out * n_out, -1)   # row k n_out + j: |C_k - C_j|
    spread = (X_r @ pair.T).reshape(-1, n_out, n_out)[rows, labels]
    M = Y[rows, labels][:, None] - Y - spread
    M[rows, labels] = 0.0
    return M


def margin_rounding(C, c, X_c, X_r, labels):
    """An upper bound of the rounding error of :func:`margin_lower_bounds` computed in float64:
    (n + 4) u ((|C_k| + |C_j|) . (|x_c| + x_r) + |c_k| + |c_j|), shape (m, n_out)."""
    C, c = np.abs(np.asarray(C, np.float64)), np.abs(np.asarray(c, np.float64))
    S = (np.abs(X_c) + X_r) @ C.T + c
    rows = np.arange(len(labels))
    return (C.shape[1] + 4) * UNIT_ROUNDOFF * (S[rows, labels][:, None] + S)


def margin_lower_bounds_grad(C, X_c, X_r, labels, dM):
    """Gradients of sum(dM * margin_lower_bounds(C, c, X_c, X_r, labels)): (dX_c, dX_r, dC, dc).

    With d_j = C_k - C_j: dX_c = sum_j dM_j d_j, dX_r = -sum_j dM_j |d_j|, and for every j
    dC_k += dM_j (x_c - sign(d_j) x_r), dC_j -= the same; dc_k += dM_j, dc_j -= dM_j.

    Taken one label k at a time, over the samples of that label, as products with the (n_out, n) tables
    d, |d| and sign(d) of class k: no (m, n_out, n) array is formed.
    """
    m, n_out = dM.shape
    rows = np.arange(m)
    dM = dM.copy()
    dM[rows, labels] = 0.0
    dX_c = dM.sum(axis=1, keepdims=True) * C[labels] - dM @ C
    dX_r = np.empty_like(dX_c)
    dC = np.zeros(C.shape, np.result_type(dM, X_c))
    for k in np.unique(labels):
        at = labels == k
        D = C[k] - C                                   # (n_out, n): d_j for label k
        w = dM[at]                                     # (m_k, n_out)
        dX_r[at] = -(w @ np.abs(D))
        T_c, T_r = w.T @ X_c[at], w.T @ X_r[at]        # (n_out, n): sum over the samples of dM_j x
        V = T_c - np.sign(D) * T_r                     # row j: sum of dM_j (x_c - sign(d_j) x_r)
        dC[k] += V.sum(axis=0)
        dC -= V
    dc = np.bincount(labels, weights=dM.sum(axis=1), minlength=n_out) - dM.sum(axis=0)
    return dX_c, dX_r, dC.astype(C.dtype), dc.astype(C.dtype)


def enclosure_radius(residual, slack, mu, weights=None):
    """Per-sample radius w with ``|x_i - x*_i| <= w eta_i`` for every unit i, from the fixed-point
    residual r = relu(E x + q) - x of an iterate x (DESIGN.md, "Average iteration"):

        ||x - x*||_{inf,eta} <= max_i (|r_i| + s_i) / eta_i / (1 - max(mu, 0)),

    s the rounding allowance of r. residual, slack: (m, ...) arrays; weights eta broadcast against a
    sample's units (None: unweighted); mu < 1 the measure (an upper bound of it) of E.
    """
    if not mu < 1:
        raise ValueError(f"mu_inf = {mu:.6g} >= 1: no contraction, no enclosure")
    m = len(residual)
    err = np.abs(residual) + slack
    if weights is not None:
        err = err / weights
    # The quotients round to nearest: 8 u relative covers the two divisions (and the product by eta
    # that the caller forms).
    return err.reshape(m, -1).max(axis=1) / (1.0 - max(mu, 0.0)) * (1 + 8 * UNIT_ROUNDOFF)


def narrow_preactivation_box(z_lo, z_hi, x_lo, x_hi):
    """The box [z_lo, z_hi] of a pre-activation z narrowed by the box [x_lo, x_hi] of x = relu(z):
    z <= x_hi always, and z = x >= x_lo where x_lo > 0. Returns (lo, hi, raised, cut), the masks
    where x's box replaced z's bound (for gradients through the narrowing)."""
    raised, cut = (x_lo > 0) & (x_lo > z_lo), z_hi > x_hi
    return np.where(raised, x_lo, z_lo), np.where(cut, x_hi, z_hi), raised, cut


def relu_box(lo, hi):
    """(centre, radius) of the box [relu(lo), relu(hi)] of relu over [lo, hi] (relu is monotone), in the
    arrays' dtype (for training): ((relu(lo) + relu(hi)) / 2, (relu(hi) - relu(lo)) / 2), in one pass
    (:func:`relu_box_reference` is the NumPy form, equal bit for bit)."""
    same = _same_layout(lo, hi)
    if same[0] is None:
        return relu_box_reference(lo, hi)
    lo, hi = same
    G_c, G_r = np.empty_like(lo), np.empty_like(lo)
    _relu_box(lo.ravel(), hi.ravel(), G_c.ravel(), G_r.ravel())
    return G_c, G_r


def relu_box_grad(dG_c, dG_r, lo, hi):
    """(dL/dc, dL/dr) of the input box [c - r, c + r] = [lo, hi] from the gradients of
    :func:`relu_box`'s centre and radius: d_lo = (dG_c - dG_r) / 2 [lo > 0], d_hi = (dG_c + dG_r) / 2
    [hi > 0], (d_lo + d_hi, d_hi - d_lo), in one pass (:func:`relu_box_grad_reference`, bit for bit)."""
    arrays = _same_layout(dG_c, dG_r, lo, hi)
    if arrays[0] is None:
        return relu_box_grad_reference(dG_c, dG_r, lo, hi)
    dG_c, dG_r, lo, hi = arrays
    d_c, d_r = np.empty_like(lo), np.empty_like(lo)
    _relu_box_grad(dG_c.ravel(), dG_r.ravel(), lo.ravel(), hi.ravel(), d_c.ravel(), d_r.ravel())
    return d_c, d_r


def _same_layout(*arrays):
    """The arrays as C-contiguous ones of one shape and float dtype, or Nones where they differ (the
    NumPy forms then broadcast and promote)."""
    first = arrays[0]
    if (not isinstance(first, np.ndarray) or first.dtype.kind != "f"
            or any(not isinstance(a, np.ndarray) or a.shape != first.shape or a.dtype != first.dtype for a in arrays)):
        return (None,) * len(arrays)
    return tuple(np.ascontiguousarray(a) for a in arrays)


# Constants in the arrays' dtype, so that float32 stays float32 (x / 2 and x * 0.5 round alike).
@njit(cache=True)
def _relu_box(lo, hi, G_c, G_r):
    zero, half = lo.dtype.type(0), lo.dtype.type(0.5)
    for i in range(lo.size):
        g_lo, g_hi = max(lo[i], zero), max(hi[i], zero)
        G_c[i] = (g_lo + g_hi) * half
        G_r[i] = (g_hi - g_lo) * half


@njit(cache=True)
def _relu_box_grad(dG_c, dG_r, lo, hi, d_c, d_r):
    zero, half = lo.dtype.type(0), lo.dtype.type(0.5)
    for i in range(lo.size):
        d_lo = (dG_c[i] - dG_r[i]) * half if lo[i] > 0 else zero
        d_hi = (dG_c[i] + dG_r[i]) * half if hi[i] > 0 else zero
        d_c[i] = d_lo + d_hi
        d_r[i] = d_hi - d_lo


def relu_box_reference(lo, hi):
    """:func:`relu_box` in NumPy."""
    G_lo, G_hi = np.maximum(lo, 0), np.maximum(hi, 0)
    return (G_lo + G_hi) / 2, (G_hi - G_lo) / 2


def relu_box_grad_reference(dG_c, dG_r, lo, hi):
    """:func:`relu_box_grad` in NumPy."""
    d_lo = (dG_c - dG_r) / 2 * (lo > 0)
    d_hi = (dG_c + dG_r) / 2 * (hi > 0)
    return d_lo + d_hi, d_hi - d_lo


def affine_enclosure(apply, W, b, x_c, x_r, terms):
    """(y_c, y_r) with [y_c - y_r, y_c + y_r] containing W x + b for every x in [x_c - x_r, x_c + x_r]
    in exact arithmetic, up to the rounding of y_c - y_r and y_c + y_r themselves (one ulp outward
    covers it): y_c = apply(W, x_c) + b, y_r = apply(|W|, x_r) + (terms + 4) u (apply(|W|, |x_c| + x_r)
    + |b|), float64 arrays, ``apply`` the linear map (a matrix product or a convolution) with at most
    ``terms`` products summed per output (Higham 2002, eq. (3.5))."""
    absW = np.abs(W)
    y_c, y_r = apply(W, x_c) + b, apply(absW, x_r)
    return y_c, y_r + (terms + 4) * UNIT_ROUNDOFF * (apply(absW, np.abs(x_c) + x_r) + np.abs(b))

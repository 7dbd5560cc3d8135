"""Convolutional A: a C-channel k x k convolution as the implicit layer's linear map.

DESIGN.md, "Convolutional A". For a kernel K of shape (C, C, k, k), k odd, p = (k - 1) / 2,
acting on images x of shape (C, H, W) (cross-correlation, as deep-learning libraries define it):

    (A x)[c, i, j] = sum_{c', a, e} K[c, c', a, e] x[c', i + a - p, j + e - p],

with circular indices ("circular" padding) or zeros outside the image ("zero"). Row (c, i, j)
of A holds the centre tap K[c, c, p, p] on its diagonal and the other taps of output channel
c off it, so for images at least k x k

    mu_inf(A) = max_c ( K[c, c, p, p] + sum_{(c', a, e) != (c, p, p)} |K[c, c', a, e]| ),

exactly for circular padding; with zero padding border rows only lose taps, so the formula is
an upper bound that interior rows attain. Keeping it <= gamma is the core's row projection
applied to the C k^2 taps of each output channel (:func:`project_conv_mu_inf`). (The paper's
code shifts the diagonal by C max|K| only, which does not bound mu_inf for k > 1.)
"""
import numpy as np

from .projection import _project_rows, _round_inside

__all__ = ["PADDINGS", "conv_apply", "conv_transpose", "conv_weight_grad", "conv_matrix", "mu_inf_conv",
           "project_conv_mu_inf"]

PADDINGS = ("circular", "zero")


def _check_kernel(K, square=True):
    K = np.asarray(K)
    if (K.ndim != 4 or (square and K.shape[0] != K.shape[1]) or K.shape[2] != K.shape[3]
            or K.shape[2] % 2 == 0):
        shape = "(C, C, k, k)" if square else "(C_out, C_in, k, k)"
        raise ValueError(f"K must have shape {shape} with k odd, got {K.shape}")
    if not np.issubdtype(K.dtype, np.floating) or not np.all(np.isfinite(K)):
        raise ValueError("K must hold finite floating-point numbers")
    return K


def _check_images(X, C, name):
    X = np.asarray(X)
    if X.ndim != 4 or X.shape[1] != C:
        raise ValueError(f"{name} must have shape (batch, {C}, H, W), got {X.shape}")
    return X


def _padded_rows(X, k, padding):
    """The batch X (m, C, H, W) padded by p = k // 2 (circularly or with zeros), channel-last and
    flattened to rows (m (H + 2p) (W + 2p), C), with the padded width Wp.

    In this layout the input of tap (a, e) for output pixel (i, j) is the row a Wp + e after
    that pixel's own row, for every image at once: each tap is one contiguous slice.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    p = k // 2
    m, C, H, W = X.shape
    if padding == "circular" and (H < k or W < k):
        raise ValueError(f"circular padding needs images at least {k} x {k}, got {H} x {W}")
    Xp = np.pad(X.transpose(0, 2, 3, 1), ((0, 0), (p, p), (p, p), (0, 0)),
                mode="wrap" if padding == "circular" else "constant")
    return Xp.reshape(-1, C), W + 2 * p


def _correlate(K, X, padding):
    """Same-size cross-correlation of a batch X (m, C_in, H, W) with K (C_out, C_in, k, k).

    Shift and multiply: sum over the k^2 taps of (contiguous slice of the padded rows) @ K[:, :, a, e]^T,
    k^2 BLAS products and no patch matrix (building im2col patches cost 4-5x the product).
    """
    C_out, k = K.shape[0], K.shape[2]
    m, _, H, W = X.shape
    rows, Wp = _padded_rows(X, k, padding)
    span = len(rows) - (k - 1) * (Wp + 1)
    Y = np.zeros((len(rows), C_out), X.dtype)
    tap = np.empty((span, C_out), X.dtype)
    for a in range(k):
        for e in range(k):
            off = a * Wp + e
            np.matmul(rows[off:off + span], K[:, :, a, e].T, out=tap)
            Y[:span] += tap
    Hp = len(rows) // (m * Wp)
    return np.ascontiguousarray(Y.reshape(m, Hp, Wp, C_out)[:, :H, :W, :].transpose(0, 3, 1, 2))


def conv_apply(K, X, padding="circular"):
    """A x for a batch of images X (m, C_in, H, W): the same-size cross-correlation with
    K (C_out, C_in, k, k); (m, C_out, H, W)."""
    K = _check_kernel(K, square=False)
    return _correlate(K, _check_images(X, K.shape[1], "X"), padding)


def conv_transpose(K, Y, padding="circular"):
    """A^T y for a batch Y (m, C_out, H, W): correlation with the flipped kernel, channels swapped
    (exact for both paddings: the transpose of a same-size correlation with odd k); (m, C_in, H, W)."""
    K = _check_kernel(K, square=False)
    K_T = np.ascontiguousarray(K.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    return _correlate(K_T, _check_images(Y, K.shape[0], "Y"), padding)


def conv_weight_grad(delta, X, k, padding="circular"):
    """d/dK of sum(delta * conv_apply(K, X)): (C_out, C_in, k, k), summed over the batch.

    Tap (a, e) is (delta on the padded grid)^T @ (the padded rows shifted by a Wp + e).
    """
    m, C_out, H, W = delta.shape
    rows, Wp = _padded_rows(X, k, padding)
    Hp = len(rows) // (m * Wp)
    D = np.zeros((m, Hp, Wp, C_out), delta.dtype)
    D[:, :H, :W, :] = delta.transpose(0, 2, 3, 1)
    D = D.reshape(-1, C_out)
    span = len(rows) - (k - 1) * (Wp + 1)
    G = np.empty((C_out, X.shape[1], k, k), np.result_type(delta, X))
    for a in range(k):
        for e in range(k):
            off = a * Wp + e
            G[:, :, a, e] = D[:span].T @ rows[off:off + span]
    return G


def conv_matrix(K, H, W, padding="circular"):
    """The dense (C_out H W, C_in H W) matrix of the convolution, built entry by entry from the
    definition (for tests)."""
    K = _check_kernel(K, square=False)
    C, C_in, k = K.shape[0], K.shape[1], K.shape[2]
    p = k // 2
    A = np.zeros((C * H * W, C_in * H * W), K.dtype)
    idx = lambda c, i, j: (c * H + i) * W + j  # noqa: E731
    for c in range(C):
        for i in range(H):
            for j in range(W):
                for c2 in range(C_in):
                    for a in range(k):
                        for e in range(k):
                            u, v = i + a - p, j + e - p
                            if padding == "circular":
                                u, v = u % H, v % W
                            elif not (0 <= u < H and 0 <= v < W):
                                continue
                            A[idx(c, i, j), idx(c2, u, v)] += K[c, c2, a, e]
    return A


def _channel_rows(K):
    """Rows (C, C k^2) of every output channel's taps and the column of each one's centre tap."""
    C, k = K.shape[0], K.shape[2]
    centre = (k // 2) * k + k // 2
    return K.reshape(C, C * k * k), np.arange(C) * k * k + centre


def mu_inf_conv(K):
    """Exact mu_inf of the circular convolution (an upper bound with zero padding), see the module doc."""
    R, diag = _channel_rows(_check_kernel(K).astype(np.float64))
    rows = np.arange(len(R))
    return float((np.abs(R).sum(axis=1) - np.abs(R[rows, diag]) + R[rows, diag]).max())


def project_conv_mu_inf(K, gamma):
    """Frobenius projection of the kernel onto {mu_inf_conv(K) <= gamma}: the exact row projection
    of :func:`nemon_np.project_mu_inf` applied to each output channel's C k^2 taps, centre tap as
    the signed diagonal. Returns a new kernel of K's dtype."""
    K = _check_kernel(K)
    gamma = float(gamma)
    if not np.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    R, diag = _channel_rows(np.ascontiguousarray(K, dtype=np.float64))
    P64 = _project_rows(np.ascontiguousarray(R), diag, gamma, np.ones(R.shape), True)
    return _round_inside(P64, K.dtype.type, diag).reshape(K.shape)

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
import scipy.fft
from numba import njit

from ._threads import gemm_into, map_ranges
from .projection import (_project_rows, _round_inside, diagonal_floor, parametrize_rows, parametrize_rows_grad,
                         parametrize_rows_inverse)

__all__ = ["PADDINGS", "average_pool", "average_pool_transpose", "conv_apply", "conv_transpose", "conv_weight_grad",
           "conv_matrix", "mu_inf_conv",
           "project_conv_mu_inf", "conv_apply_channel_last", "pad_channel_last", "conv_taps", "correlate_padded",
           "correlate_embedded_padded", "transpose_kernel", "weight_grad_channel_last", "weight_grad_circular_fft",
           "parametrize_conv_mu_inf", "parametrize_conv_mu_inf_grad",
           "parametrize_conv_mu_inf_inverse", "conv_input_norm", "conv_row_measures", "kernel_spectrum",
           "correlate_circular_fft", "fft_workspace"]

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


def _check_padding(padding, k, H, W):
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    if padding == "circular" and (H < k or W < k):
        raise ValueError(f"circular padding needs images at least {k} x {k}, got {H} x {W}")


def pad_channel_last(X, k, padding):
    """A channel-last batch X (m, H, W, C) padded by p = k // 2 on both image axes, circularly
    or with zeros: (m, H + 2p, W + 2p, C), C-contiguous.

    Flattened to rows (m (H + 2p) (W + 2p), C), the input of tap (a, e) for output pixel (i, j)
    is the row a Wp + e after row (i, j), for every image at once: each tap is one contiguous slice.
    The interior is copied and the circular border filled from it by :func:`fill_circular_border`:
    numpy's pad (:func:`pad_channel_last_reference`, which tests compare with) cost as much as a
    step of the conv solver.
    """
    X = np.asarray(X)
    m, H, W, C = X.shape
    _check_padding(padding, k, H, W)
    p = k // 2
    circular = padding == "circular"
    Xp = (np.empty if circular else np.zeros)((m, H + 2 * p, W + 2 * p, C), X.dtype)
    Xp[:, p:p + H, p:p + W] = X
    if circular and p > 0:
        _fill_circular_borders(Xp, p, H, W)
    return Xp


def pad_channel_last_reference(X, k, padding):
    """:func:`pad_channel_last` by numpy's pad."""
    _check_padding(padding, k, X.shape[1], X.shape[2])
    p = k // 2
    return np.pad(X, ((0, 0), (p, p), (p, p), (0, 0)), mode="wrap" if padding == "circular" else "constant")


@njit(cache=True, nogil=True)
def fill_circular_border(Xp, n, p, H, W):
    """Circular padding of sample n of Xp (m, H + 2p, W + 2p, C) from its interior."""
    Hp, Wp = H + 2 * p, W + 2 * p
    for i in range(Hp):
        si = p + (i - p) % H
        border_row = i < p or i >= H + p
        for j in range(Wp):
            if border_row or j < p or j >= W + p:
                Xp[n, i, j, :] = Xp[n, si, p + (j - p) % W, :]


@njit(cache=True, nogil=True)
def _fill_circular_borders(Xp, p, H, W):
    for n in range(Xp.shape[0]):
        fill_circular_border(Xp, n, p, H, W)


def conv_taps(K):
    """The kernel K (C_out, C_in, k, k) as per-tap matrices (k, k, C_in, C_out), the layout of
    :func:`correlate_padded`."""
    return np.ascontiguousarray(np.asarray(K).transpose(2, 3, 1, 0))


def correlate_padded(taps, Xp, out=None, n_jobs=1):
    """Same-size cross-correlation of a padded channel-last batch Xp (m, Hp, Wp, C_in) with the
    taps (k, k, C_in, C_out) of :func:`conv_taps`, on the padded grid: returns Y (m, Hp, Wp, C_out)
    whose entries Y[:, i, j] for i < H, j < W are the output pixels (the rest is not meaningful).

    Shift and multiply: the sum over the k^2 taps of (a contiguous slice of the padded rows)
    @ taps[a, e]; k^2 BLAS products and no patch matrix (building im2col patches cost 4-5x the
    products). Each product accumulates into Y inside BLAS (gemm with beta = 1): a separate add of
    each tap's product cost 1.2-1.3x the time (docs/benchmarks.md). ``n_jobs`` threads each take a
    contiguous share of the output rows (one-thread BLAS calls that release the GIL,
    :func:`nemon_np._threads.gemm_into`); the result is the same up to rounding. ``out`` (m, Hp, Wp,
    C_out), C-contiguous, may be passed to avoid allocation.
    """
    k, C_out = taps.shape[0], taps.shape[3]
    m, Hp, Wp, C_in = Xp.shape
    taps, rows = np.ascontiguousarray(taps), np.ascontiguousarray(Xp).reshape(-1, C_in)   # no-ops as called here
    span = len(rows) - (k - 1) * (Wp + 1)
    Y = np.empty((len(rows), C_out), Xp.dtype) if out is None else out.reshape(-1, C_out)
    Y[span:] = 0
    offsets = [(a, e, a * Wp + e) for a in range(k) for e in range(k)]
    if Xp.dtype not in (np.float32, np.float64) or taps.dtype != Xp.dtype:
        for a, e, off in offsets:
            product = rows[off:off + span] @ taps[a, e]
            Y[:span] = product if off == 0 else Y[:span] + product
        return Y.reshape(m, Hp, Wp, C_out)

    def rows_between(start, stop):
        for a, e, off in offsets:
            gemm_into(Y[start:stop], taps[a, e], rows[start + off:stop + off], 0.0 if off == 0 else 1.0)

    map_ranges(rows_between, span, n_jobs)
    return Y.reshape(m, Hp, Wp, C_out)


def kernel_spectrum(K, H, W):
    """The circular same-size cross-correlation with K (C_out, C_in, k, k) on H x W images, in the
    frequency domain: S (H (W // 2 + 1), C_in, C_out), complex in K's precision, such that

        rfft2(y)[f] = rfft2(x)[f] @ S[f]    for every frequency f (channel-last, flattened (i, j)),

    by the convolution theorem: the correlation is a circular convolution with the kernel g whose tap
    g[(p - a) mod H, (p - e) mod W] is K[:, :, a, e], p = k // 2 (taps that wrap onto one place add)."""
    K = np.asarray(K)
    C_out, C_in, k, _ = K.shape
    p = k // 2
    g = np.zeros((H, W, C_in, C_out), K.dtype)
    for a in range(k):
        for e in range(k):
            g[(p - a) % H, (p - e) % W] += K[:, :, a, e].T
    return np.ascontiguousarray(scipy.fft.rfft2(g, axes=(0, 1)).reshape(-1, C_in, C_out))


def fft_workspace(spectrum, m):
    """The two 1-D arrays :func:`correlate_circular_fft` takes as ``workspace`` for up to m images: each
    m F max(C_in, C_out) entries of the spectrum's dtype, for its (F, C_in, C_out) ``spectrum``."""
    F, C_in, C_out = spectrum.shape
    return tuple(np.empty(m * F * max(C_in, C_out), spectrum.dtype) for _ in range(2))


def correlate_circular_fft(spectrum, X, out=None, n_jobs=1, workspace=None):
    """The circular same-size cross-correlation of a channel-last batch X (m, H, W, C_in) (a view is
    fine) with the kernel whose :func:`kernel_spectrum` is ``spectrum``: (m, H, W, C_out), written
    into ``out`` if given. Two real FFTs of the batch and one complex product per frequency:
    about H W C_in C_out / 2 complex multiply-adds, against k^2 H W C_in C_out for the taps of
    :func:`correlate_padded` (k = 5: measured 2.3x less CPU on MNIST-size batches of 32 channels,
    docs/benchmarks.md). Equal to it up to rounding: a few units in the last place of the
    largest entry, from the transforms. ``n_jobs`` threads share the transforms. ``workspace``: the
    frequency-major copies' arrays, :func:`fft_workspace` of m or more images (else allocated here)."""
    m, H, W, C_in = X.shape
    F, C_out = spectrum.shape[0], spectrum.shape[2]
    if workspace is None:
        workspace = fft_workspace(spectrum, m)
    X_hat = scipy.fft.rfft2(X, axes=(1, 2), workers=n_jobs).reshape(m, F, C_in)
    # One product per frequency needs the frequency outermost: (F, m, C_in) @ (F, C_in, C_out).
    by_frequency = workspace[0][:F * m * C_in].reshape(F, m, C_in)
    np.copyto(by_frequency, X_hat.transpose(1, 0, 2))
    Y_by_frequency = np.matmul(by_frequency, spectrum, out=workspace[1][:F * m * C_out].reshape(F, m, C_out))
    Y_hat = workspace[0][:m * F * C_out].reshape(m, F, C_out)
    np.copyto(Y_hat, Y_by_frequency.transpose(1, 0, 2))
    Y = scipy.fft.irfft2(Y_hat.reshape(m, H, F // H, C_out), s=(H, W), axes=(1, 2), workers=n_jobs)
    if out is None:
        return Y
    out[...] = Y
    return out


def correlate_embedded_padded(taps_sum, taps_diff, Xp, out=None, n_jobs=1):
    """The embedded network's linear map on a padded state Xp (m, Hp, Wp, 2C) = [x_lo, x_hi] by its
    centre/radius form (DESIGN.md, "Interval certificates"): for E = [[K_M, K_N], [K_N, K_M]],

        E [x_lo; x_hi] = [(P - R) / 2; (P + R) / 2],  P = (K_M + K_N) * (x_lo + x_hi),
                                                      R = (K_M - K_N) * (x_hi - x_lo),

    two correlations of C channels (``taps_sum`` of K_M + K_N = K, ``taps_diff`` of K_M - K_N, as
    :func:`conv_taps`) instead of one of 2C: half the products. E^T is the same form with the
    transposed kernels. Returns Y (m, Hp, Wp, 2C) on the padded grid, as :func:`correlate_padded`.
    ``n_jobs`` threads each take a contiguous share of the images (numpy's ufuncs and
    :func:`nemon_np._threads.gemm_into` release the GIL), so the sums and differences run in
    parallel too."""
    C = taps_sum.shape[2]
    Y = np.empty(Xp.shape[:3] + (2 * C,), Xp.dtype) if out is None else out

    def images_between(start, stop):
        lo, hi = Xp[start:stop, ..., :C], Xp[start:stop, ..., C:]
        P = correlate_padded(taps_sum, lo + hi)
        R = correlate_padded(taps_diff, hi - lo)
        np.subtract(P, R, out=Y[start:stop, ..., :C])
        np.add(P, R, out=Y[start:stop, ..., C:])
        Y[start:stop] *= Xp.dtype.type(0.5)

    map_ranges(images_between, len(Xp), n_jobs)
    return Y


def conv_apply_channel_last(K, X, padding="circular", n_jobs=1):
    """The same-size cross-correlation of a channel-last batch X (m, H, W, C_in) with
    K (C_out, C_in, k, k): (m, H, W, C_out), the layout the model keeps its state in (``n_jobs`` as
    :func:`correlate_padded`)."""
    m, H, W, _ = X.shape
    Y = correlate_padded(conv_taps(K), np.ascontiguousarray(pad_channel_last(X, K.shape[2], padding)), n_jobs=n_jobs)
    return np.ascontiguousarray(Y[:, :H, :W, :])


def _correlate(K, X, padding):
    """conv_apply_channel_last for a batch X (m, C_in, H, W) in channel-first layout."""
    return np.ascontiguousarray(conv_apply_channel_last(K, X.transpose(0, 2, 3, 1), padding).transpose(0, 3, 1, 2))


def conv_apply(K, X, padding="circular"):
    """A x for a batch of images X (m, C_in, H, W): the same-size cross-correlation with
    K (C_out, C_in, k, k); (m, C_out, H, W)."""
    K = _check_kernel(K, square=False)
    return _correlate(K, _check_images(X, K.shape[1], "X"), padding)


def transpose_kernel(K):
    """The kernel of A^T: K with input and output channels swapped and the taps flipped
    (exact for both paddings: the transpose of a same-size correlation with odd k)."""
    return np.ascontiguousarray(np.asarray(K).transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def conv_transpose(K, Y, padding="circular"):
    """A^T y for a batch Y (m, C_out, H, W), a correlation with :func:`transpose_kernel`; (m, C_in, H, W)."""
    K = _check_kernel(K, square=False)
    return _correlate(transpose_kernel(K), _check_images(Y, K.shape[0], "Y"), padding)


def weight_grad_channel_last(delta, X, k, padding, n_jobs=1):
    """d/dK of sum(delta * A_K x) for channel-last delta (m, H, W, C_out) and X (m, H, W, C_in):
    (C_out, C_in, k, k), summed over the batch. Tap (a, e) is (delta on the padded grid)^T @
    (the padded rows of X shifted by a Wp + e); with ``n_jobs`` threads, each sums these over a
    contiguous share of the rows (numpy's matmul releases the GIL) and the shares are added."""
    m, H, W, C_out = delta.shape
    Xp = pad_channel_last(X, k, padding)
    _, Hp, Wp, C_in = Xp.shape
    rows = Xp.reshape(-1, C_in)
    D = np.zeros((m, Hp, Wp, C_out), delta.dtype)
    D[:, :H, :W, :] = delta
    D = D.reshape(-1, C_out)
    span = len(rows) - (k - 1) * (Wp + 1)

    def rows_between(start, stop):
        G = np.empty((C_out, C_in, k, k), np.result_type(delta, X))
        for a in range(k):
            for e in range(k):
                off = a * Wp + e
                G[:, :, a, e] = D[start:stop].T @ rows[start + off:stop + off]
        return G

    return sum(map_ranges(rows_between, span, n_jobs))


def weight_grad_circular_fft(delta, X, k, n_jobs=1):
    """:func:`weight_grad_channel_last` for circular padding, by FFT: the gradient is the circular
    cross-correlation of the batch X with delta, read at the kernel's k^2 shifts,

        G[o, i, a, e] = sum_{m, y, x} delta[m, y, x, o] X[m, (y + a - p) mod H, (x + e - p) mod W, i]
                      = c[(a - p) mod H, (e - p) mod W, o, i],  c = irfft2( sum_m conj(D_m)^T X_m ),

    D_m, X_m the real 2-D transforms of image m (channels as columns). One (C_out, m) @ (m, C_in) complex
    product per frequency: about H W m C_in C_out / 2 complex multiply-adds against the taps'
    k^2 H W m C_in C_out. Equal to it up to rounding (the transforms'); ``n_jobs`` threads share them."""
    m, H, W, C_out = delta.shape
    p = k // 2
    D_hat = scipy.fft.rfft2(delta, axes=(1, 2), workers=n_jobs)
    X_hat = scipy.fft.rfft2(X, axes=(1, 2), workers=n_jobs)
    # Frequencies outermost, the batch summed by the product: (H, F, C_out, m) @ (H, F, m, C_in).
    S = np.matmul(np.ascontiguousarray(np.conj(D_hat).transpose(1, 2, 3, 0)),
                  np.ascontiguousarray(X_hat.transpose(1, 2, 0, 3)))
    c = scipy.fft.irfft2(S, s=(H, W), axes=(0, 1), workers=n_jobs, overwrite_x=True)
    shifts_y, shifts_x = (np.arange(k) - p) % H, (np.arange(k) - p) % W
    G = c[shifts_y[:, None], shifts_x[None, :]]   # (k, k, C_out, C_in)
    return np.ascontiguousarray(G.transpose(2, 3, 0, 1), dtype=np.result_type(delta, X))


def conv_weight_grad(delta, X, k, padding="circular"):
    """d/dK of sum(delta * conv_apply(K, X)) for delta (m, C_out, H, W), X (m, C_in, H, W):
    (C_out, C_in, k, k), summed over the batch."""
    return weight_grad_channel_last(delta.transpose(0, 2, 3, 1), X.transpose(0, 2, 3, 1), k, padding)


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


def conv_row_measures(K):
    """Per-output-channel measures ``K[c,c,p,p] + sum of |K[c]|'s other taps``, shape (C,)."""
    R, diag = _channel_rows(_check_kernel(K).astype(np.float64))
    rows = np.arange(len(R))
    return np.abs(R).sum(axis=1) - np.abs(R[rows, diag]) + R[rows, diag]


def mu_inf_conv(K):
    """Exact mu_inf of the circular convolution (an upper bound with zero padding), see the module doc:
    the largest of :func:`conv_row_measures`."""
    return float(conv_row_measures(K).max())


def project_conv_mu_inf(K, gamma, min_diagonal=None):
    """Frobenius projection of the kernel onto {mu_inf_conv(K) <= gamma}: the exact row projection
    of :func:`nemon_np.project_mu_inf` applied to each output channel's C k^2 taps, centre tap as
    the signed diagonal (with ``min_diagonal``, centre taps K[c, c, centre] >= min_diagonal too).
    Returns a new kernel of K's dtype."""
    K = _check_kernel(K)
    gamma = float(gamma)
    if not np.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    floor = diagonal_floor(min_diagonal, gamma)
    R, diag = _channel_rows(np.ascontiguousarray(K, dtype=np.float64))
    P64 = _project_rows(np.ascontiguousarray(R), diag, gamma, np.ones(R.shape), True, floor)
    return _round_inside(P64, K.dtype.type, diag).reshape(K.shape)


def parametrize_conv_mu_inf(T, gamma):
    """The parametrization of :func:`nemon_np.parametrize_mu_inf` per output channel: off-centre
    taps K = T, centre tap K[c, c, p, p] = gamma + T[c, c, p, p] - sum |T[c]|, so any T
    (C, C, k, k) gives mu_inf_conv(K) <= gamma."""
    R, diag = _channel_rows(_check_kernel(T))
    return parametrize_rows(R, diag, gamma).reshape(T.shape)


def parametrize_conv_mu_inf_grad(T, G):
    """dL/dT from dL/dK = G through :func:`parametrize_conv_mu_inf`."""
    R, diag = _channel_rows(T)
    return parametrize_rows_grad(R, diag, np.asarray(G).reshape(R.shape)).reshape(T.shape)


def parametrize_conv_mu_inf_inverse(K, gamma):
    """A T with ``parametrize_conv_mu_inf(T, gamma) == K`` for mu_inf_conv(K) <= gamma."""
    R, diag = _channel_rows(_check_kernel(K))
    return parametrize_rows_inverse(R, diag, gamma).reshape(K.shape)


def conv_input_norm(B):
    """||A_B||_inf of the convolution with B (C_out, C_in, k, k): the largest l_1 norm of an output
    channel's taps (exact for circular padding, an upper bound for zero)."""
    B = _check_kernel(B, square=False)
    return float(np.abs(B.astype(np.float64)).reshape(B.shape[0], -1).sum(axis=1).max())


def average_pool(X, s):
    """s x s average pooling of channel-last images X (m, H, W, C), s dividing H and W: (m, H/s, W/s, C)."""
    m, H, W, C = X.shape
    return X.reshape(m, H // s, s, W // s, s, C).mean(axis=(2, 4))


def average_pool_transpose(G, s, size):
    """The transpose of :func:`average_pool`: G (m, H/s, W/s, C), in any layout of that many entries,
    spread over each s x s window with weight 1 / s^2, (m, H, W, C) for ``size`` = (H, W)."""
    H, W = size
    m = len(G)
    C = G.size // m * s * s // (H * W)
    G = G.reshape(m, H // s, 1, W // s, 1, C) / (s * s)
    return np.ascontiguousarray(np.broadcast_to(G, (m, H // s, s, W // s, s, C)).reshape(m, H, W, C))

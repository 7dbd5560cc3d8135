"""The average iteration when A is a convolution: channel-last state, fused numba update.

Same iteration as :func:`nemon_np.solvers.averaged_fixed_point_operator` (DESIGN.md, "Average
iteration"; the adjoint with ``relu=False, l1=True`` and a mask S):

    x <- x + alpha (phi(K * (x s) + q) - x),   stopped per sample at ||phi(.) - x|| <= tol,

with the state kept channel-last and padded between iterations, so that each step is the k^2
BLAS products of :func:`nemon_np.conv.correlate_padded` and one fused pass over memory
(:func:`_average_step`): pre-activation, residual, update and re-padding together. With circular
padding and k >= 5 the product is taken by FFT instead (:func:`nemon_np.conv.correlate_circular_fft`,
``product``), which reads the padded state's interior. The generic operator version, with NCHW
transposes and a pad per step, is the reference tests compare with.
"""
import numpy as np
from numba import njit

from ._threads import check_n_jobs, map_ranges
from .conv import (_check_padding, conv_taps, correlate_circular_fft, correlate_embedded_padded, correlate_padded,
                   fft_workspace, fill_circular_border, kernel_spectrum, pad_channel_last, weight_grad_channel_last,
                   weight_grad_circular_fft)
from .solvers import ANDERSON_DEPTH, ANDERSON_REG, _anderson_rho, _anderson_state, _anderson_sweep, _working_set

__all__ = ["conv_fixed_point", "CONV_PRODUCTS", "ConvProduct", "DirectProduct", "FFTProduct", "get_conv_product"]

# The ways of taking K * x, one class each under its name; "auto" chooses among them (get_conv_product).
CONV_PRODUCTS = {}

# The smallest kernel for which "auto" takes the FFT: at k = 5 it cost 2.3x less CPU than the taps
# on MNIST-size batches of 32 channels; at k = 3 the two were within the noise of a shared machine
# (docs/benchmarks.md), and the taps need no transform.
FFT_MIN_KERNEL = 5


def _register_product(cls):
    CONV_PRODUCTS[cls.name] = cls
    return cls


class ConvProduct:
    """One way of taking the linear map of a conv solver's step: built once a solve from the kernel
    (``K``, (C, C, k, k); with ``K_diff`` the embedded network's map on 2C channels, as
    :func:`nemon_np.conv.correlate_embedded_padded` takes it), then called as ``product(Xp, out)``:
    out[:, :H, :W] = K * x for the padded channel-last states Xp (m, H + 2p, W + 2p, C'), x their
    interior. :meth:`fits` says whether the way applies to a padding, kernel size and map."""
    name = None

    @staticmethod
    def fits(padding, k, embedded):
        return True

    def __call__(self, Xp, out):
        """K * x of the padded states Xp: returns an array whose [:, :H, :W] holds it (``out`` where
        the product writes there; a product may return an array of its own instead)."""
        raise NotImplementedError

    @staticmethod
    def weight_grad(delta, X, k, padding, n_jobs):
        """d/dK of sum(delta * K x) for channel-last delta (m, H, W, C_out) and X (m, H, W, C_in) of a plain
        map: (C_out, C_in, k, k), summed over the batch."""
        raise NotImplementedError


@_register_product
class DirectProduct(ConvProduct):
    """The k^2 tap products of :func:`nemon_np.conv.correlate_padded` (BLAS, one per tap): any padding,
    the embedded map too."""
    name = "direct"

    def __init__(self, K, K_diff, H, W, dtype, n_jobs):
        self.taps = conv_taps(np.asarray(K, dtype))
        self.taps_diff = None if K_diff is None else conv_taps(np.asarray(K_diff, dtype))
        self.n_jobs = n_jobs

    def __call__(self, Xp, out):
        if self.taps_diff is None:
            return correlate_padded(self.taps, Xp, out=out, n_jobs=self.n_jobs)
        return correlate_embedded_padded(self.taps, self.taps_diff, Xp, out=out, n_jobs=self.n_jobs)

    @staticmethod
    def weight_grad(delta, X, k, padding, n_jobs):
        return weight_grad_channel_last(delta, X, k, padding, n_jobs=n_jobs)


@_register_product
class FFTProduct(ConvProduct):
    """The product in the 2-D Fourier basis, where a circular convolution is diagonal
    (:func:`nemon_np.conv.correlate_circular_fft`): about H W C^2 / 2 complex multiply-adds against the
    taps' k^2 H W C^2. Circular padding and the plain map only; reads the padded states' interior.
    Its weight gradient is the batch's circular cross-correlation, by FFT too
    (:func:`nemon_np.conv.weight_grad_circular_fft`)."""
    name = "fft"

    @staticmethod
    def fits(padding, k, embedded):
        return padding == "circular" and not embedded

    def __init__(self, K, K_diff, H, W, dtype, n_jobs):
        self.spectrum = kernel_spectrum(np.asarray(K, dtype), H, W)
        self.p, self.H, self.W, self.n_jobs = np.shape(K)[2] // 2, H, W, n_jobs
        self.workspace, self.workspace_images = None, 0

    def __call__(self, Xp, out):   # the interior in, the interior out: the padded border is not read
        p, H, W = self.p, self.H, self.W
        if len(Xp) > self.workspace_images:
            # Sized by the first (largest) working set and reused as it shrinks: fresh arrays of this
            # size cost page faults at every step (docs/benchmarks.md).
            self.workspace, self.workspace_images = fft_workspace(self.spectrum, len(Xp)), len(Xp)
        # ``out`` is not written: the step reads the returned interior (m, H, W, C_out), one copy fewer.
        return correlate_circular_fft(self.spectrum, Xp[:, p:p + H, p:p + W], n_jobs=self.n_jobs,
                                      workspace=self.workspace)

    @staticmethod
    def weight_grad(delta, X, k, padding, n_jobs):
        return weight_grad_circular_fft(delta, X, k, n_jobs=n_jobs)


def get_conv_product(name, padding, k, embedded):
    """The :class:`ConvProduct` class registered as ``name``, or for "auto" the FFT where it fits and
    k >= :data:`FFT_MIN_KERNEL`, else the taps; an unknown name or one that does not fit is a
    one-line ``ValueError``."""
    if name == "auto":
        fft = CONV_PRODUCTS["fft"]
        return fft if fft.fits(padding, k, embedded) and k >= FFT_MIN_KERNEL else CONV_PRODUCTS["direct"]
    if name not in CONV_PRODUCTS:
        raise ValueError(f"product must be one of auto, {', '.join(CONV_PRODUCTS)}, got {name!r}")
    cls = CONV_PRODUCTS[name]
    if not cls.fits(padding, k, embedded):
        raise ValueError(f"product {name!r} does not apply to {padding} padding"
                         f"{' and the embedded network' if embedded else ''} (k = {k})")
    return cls


# A step takes the product and the update of at most this many samples at a time, so that the
# product's transforms and output are still in cache when the next pass reads them: for a batch of
# 100 MNIST images of 32 channels they are some 30 MB, and 16 at a time made a 5 x 5 model's training
# epoch 1.25x cheaper in CPU (docs/benchmarks.md).
PRODUCT_CHUNK = 16

# Converged samples leave the working set once they are this fraction of it: compaction copies
# every working array, so it is batched rather than done at every step.
COMPACT_FRACTION = 0.2


@njit(cache=True, fastmath=True, nogil=True)
def _average_step(Y, Q, X, S, Xp, P, done, iterations, residual, k, alpha, tol, max_iter, relu, l1, masked,
                  circular, relative=False, skip_linear=False):
    """One averaged step for every working sample not yet done.

    Y (r, Hp, Wp, C): K * (x s) on the padded grid; Q, X, S, P (r, H, W, C); Xp (r, Hp, Wp, C)
    the padded x s that Y came from. For each sample: P = Y + Q, residual ||phi(P) - x|| (l_1
    or l_inf; with ``relative`` divided by max(1, ||phi(P)||) in the same norm); done (recording k
    and the residual) if it is <= tol or k == max_iter, else x is updated and written, times s,
    into the interior (and circular border) of Xp.
    ``skip_linear``: Y is not read (taken as zero: the linear map of the zero start).
    Returns the number of samples that finished at this step.
    """
    r, H, W, C = X.shape
    p = (Xp.shape[1] - H) // 2
    zero = tol - tol
    finished = 0
    for n in range(r):
        if done[n]:
            continue
        res = zero
        size = zero
        for i in range(H):
            for j in range(W):
                for c in range(C):
                    v = Q[n, i, j, c] if skip_linear else Y[n, i, j, c] + Q[n, i, j, c]
                    P[n, i, j, c] = v
                    f = max(v, zero) if relu else v
                    d = abs(f - X[n, i, j, c])
                    res = res + d if l1 else max(res, d)
                    if relative:
                        size = size + abs(f) if l1 else max(size, abs(f))
        if relative:
            res = res / max(size, zero + 1)
        if res <= tol or k == max_iter:
            done[n] = True
            iterations[n] = k
            residual[n] = res
            finished += 1
            continue
        for i in range(H):
            for j in range(W):
                for c in range(C):
                    v = P[n, i, j, c]
                    f = max(v, zero) if relu else v
                    x = X[n, i, j, c] + alpha * (f - X[n, i, j, c])
                    X[n, i, j, c] = x
                    Xp[n, i + p, j + p, c] = x * S[n, i, j, c] if masked else x
        if circular:
            fill_circular_border(Xp, n, p, H, W)
    return finished


def _chunk_step(apply, c, d, Y, Q, X, S, Xp, P, done, its, res, k, alpha, tol, max_iter, relu, l1, masked,
                circular, relative, skip_linear, n_jobs):
    """The product and the averaged step of working samples c:d, the step's ``n_jobs`` threads each
    taking a share of them; returns the number that finished."""
    Yc = Y[c:d] if skip_linear else apply(Xp[c:d], Y[c:d])
    return sum(map_ranges(
        lambda a, b: _average_step(Yc[a:b], Q[c + a:c + b], X[c + a:c + b], S[c + a:c + b] if masked else S,
                                   Xp[c + a:c + b], P[c + a:c + b], done[c + a:c + b], its[c + a:c + b],
                                   res[c + a:c + b], k, alpha, tol, max_iter, relu, l1, masked, circular, relative,
                                   skip_linear), d - c, n_jobs))


def conv_fixed_point(K, Q, alpha, tol, max_iter, padding="circular", relu=True, l1=False, S=None, X0=None,
                     K_diff=None, relative=False, method="average", rho=None, n_jobs=1, product="auto"):
    """Solve x = phi(K * (x s) + q) by the average iteration, for a batch of channel-last images.

    Parameters
    ----------
    K : (C, C, k, k) kernel of the linear map (cross-correlation, :mod:`nemon_np.conv`); with
        ``K_diff`` the linear map is the embedded network's on 2C channels [x_lo, x_hi], by
        :func:`nemon_np.conv.correlate_embedded_padded` with K = K_M + K_N and K_diff = K_M - K_N
    Q : (m, H, W, C) injections q, channel-last
    alpha, tol, max_iter : step, per-sample tolerance, iteration cap
    padding : "circular" or "zero"
    relu, l1 : phi = relu (forward) or identity (adjoint); l_1 instead of l_inf residual
    S : (m, H, W, C) mask s, optional (the adjoint's D); X0 : (m, H, W, C) start, default 0
    relative : stop on (and report) the residual divided by max(1, ||phi(.)||) (see
        :func:`nemon_np.solve_equilibrium`'s ``tol_mode``)
    method : "average" (the fused loop) or "anderson": safeguarded Anderson acceleration of the same
        iteration, each sample's step by the dense solver's :func:`nemon_np.solvers._anderson_sweep` on
        the flattened state; ``rho`` (required) is the contraction factor the safeguard enforces,
        1 - alpha (1 - max(mu_inf(K), 0))
    n_jobs : threads sharing each convolution's rows and each step's samples
        (:mod:`nemon_np._threads`); the iterates the same up to rounding
    product : how K * x is taken, a name of :data:`CONV_PRODUCTS` (:class:`DirectProduct`, the k^2 tap
        products; :class:`FFTProduct`, circular padding and not the embedded map) or "auto": "fft" where
        it applies and k >= :data:`FFT_MIN_KERNEL`, else "direct" (:func:`get_conv_product`). All give
        the same iterates up to rounding.

    Returns
    -------
    X, P : (m, H, W, C) last iterates and their pre-activations K * (x s) + q
    iterations : (m,) int; residual : (m,) of the last step, as
    :func:`nemon_np.solvers.averaged_fixed_point_operator`.
    """
    Q = np.ascontiguousarray(Q)
    state = Q.shape[3] // 2 if K_diff is not None else Q.shape[3]
    if (Q.ndim != 4 or np.shape(K) != (state, state) + np.shape(K)[2:]
            or (K_diff is not None and np.shape(K_diff) != np.shape(K))):
        raise ValueError(f"Q must be channel-last (m, H, W, C) for a (C, C, k, k) kernel (2C channels with K_diff), "
                         f"got Q {np.shape(Q)}, K {np.shape(K)}")
    for name, A in (("S", S), ("X0", X0)):
        if A is not None and np.shape(A) != Q.shape:
            raise ValueError(f"{name} must have Q's shape {Q.shape}, got {np.shape(A)}")
    m, H, W, C = Q.shape
    dtype = Q.dtype
    n_jobs = check_n_jobs(n_jobs)
    ksize = np.shape(K)[2]
    p = ksize // 2
    # Checked here because the zero start builds its padded state without pad_channel_last.
    _check_padding(padding, ksize, H, W)
    apply = get_conv_product(product, padding, ksize, K_diff is not None)(K, K_diff, H, W, dtype, n_jobs)
    if method == "anderson":
        return _anderson(apply, ksize, Q, alpha, tol, max_iter, padding, relu, l1, S, X0, relative, rho)
    if method != "average":
        raise ValueError(f"method must be 'average' or 'anderson', got {method!r}")
    masked = S is not None
    zero_start = X0 is None
    S = np.ascontiguousarray(S, dtype=dtype) if masked else np.empty((m, 0, 0, 0), dtype)
    if zero_start:
        # Zeros (calloc'd, so the pages are written first by the parallel steps) and no padding pass.
        X = np.zeros_like(Q)
        Xp = np.zeros((m, H + 2 * p, W + 2 * p, C), dtype)
    else:
        X = np.array(X0, dtype=dtype)
        Xp = pad_channel_last(X * S if masked else X, ksize, padding)
    # The first working arrays are the outputs: a sample that finishes there stays where it is, and
    # compaction copies only the samples still working (at gamma 0.5 most finish at one step).
    X_out, P_out = X, np.empty_like(Q)
    P = P_out
    iterations, residual = np.zeros(m, np.int64), np.zeros(m, dtype)
    Y = np.empty_like(Xp, shape=Xp.shape[:3] + (C,))
    active = np.arange(m)
    done = np.zeros(m, bool)
    its, res = iterations, residual
    n_done = 0
    tol = dtype.type(tol)
    for k in range(max_iter + 1):
        r = len(active)
        # From the zero start the linear map gives zero: step 0 needs no convolution of the batch, one
        # of the 4-6 a trained model's forward solve makes at gamma 0.5.
        skip_linear = k == 0 and zero_start
        size = -(-r // -(-r // PRODUCT_CHUNK))   # even chunks of at most PRODUCT_CHUNK
        for c in range(0, r, size):
            n_done += _chunk_step(apply, c, min(c + size, r), Y, Q, X, S, Xp, P, done, its, res, k, alpha,
                                  tol, max_iter, relu, l1, masked, padding == "circular", relative, skip_linear,
                                  n_jobs)
        if n_done == r or n_done >= COMPACT_FRACTION * r:
            if X is not X_out:   # a later working set: its finished samples go back to their places
                idx = active[done]
                X_out[idx], P_out[idx], iterations[idx], residual[idx] = X[done], P[done], its[done], res[done]
            if n_done == r:
                break
            keep = ~done
            count = np.count_nonzero(keep)
            # P is rewritten for every working sample before it is read: a shorter view of a working
            # set's own P, but never of the output.
            P = np.empty((count,) + P.shape[1:], dtype) if P is P_out else P[:count]
            active, Q, X, Xp = active[keep], Q[keep], X[keep], Xp[keep]
            S = S[keep] if masked else S
            done, its, res, n_done = done[keep], its[keep], res[keep], 0
    return X_out, P_out, iterations, residual


def _anderson(apply, k, Q, alpha, tol, max_iter, padding, relu, l1, S, X0, relative, rho):
    """:func:`conv_fixed_point` with method="anderson": the convolution of the working rows by
    ``apply`` on their padded state, then one :func:`nemon_np.solvers._anderson_sweep` over the
    flattened rows (m, H W C), which evaluates, safeguards, extrapolates and compacts them."""
    if rho is None or not 0 <= rho < 1:
        raise ValueError(f"anderson needs the contraction factor rho in [0, 1), got {rho!r}")
    m, H, W, C = Q.shape
    dtype = Q.dtype
    n = H * W * C
    Qf = Q.reshape(m, n)
    masked = S is not None
    Sf = np.ascontiguousarray(S, dtype=dtype).reshape(m, n) if masked else np.empty((0, n), dtype)
    X0f = np.zeros_like(Qf) if X0 is None else np.ascontiguousarray(X0, dtype=dtype).reshape(m, n)
    X_out, P_out, iterations, residual, X, Sa, active = _working_set(Qf, Sf, X0f)
    state = _anderson_state(Qf, ANDERSON_DEPTH)
    dt = dtype.type
    n_act = m
    for it in range(max_iter + 1):
        if it == 0 and X0 is None:   # K * 0 = 0: the zero start needs no convolution (as the average loop)
            P = np.zeros((n_act, n), dtype)
        else:
            Xs = X[:n_act] * Sa[:n_act] if masked else X[:n_act]
            Xp = pad_channel_last(Xs.reshape(n_act, H, W, C), k, padding)
            P = np.ascontiguousarray(apply(Xp, None)[:, :H, :W, :]).reshape(n_act, n)
        n_act = _anderson_sweep(P, Qf, X, Sa, active, n_act, it, dt(alpha), dt(tol), max_iter, relu, l1,
                                ANDERSON_REG, _anderson_rho(rho), masked, relative, state, X_out, P_out,
                                iterations, residual, None)
        if n_act == 0:
            break
    return X_out.reshape(Q.shape), P_out.reshape(Q.shape), iterations, residual

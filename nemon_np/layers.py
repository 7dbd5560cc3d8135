"""The layers of a stacked classifier (:mod:`nemon_np.stack`): one class a layer kind, one interface.

A stack is explicit layers before and after (at most) one implicit layer, then the logits. Every
layer maps a batch of states to a batch of states, flat (m, n) or spatial channel-last (m, H, W, C),
and has

* ``build(in_shape, rng, dtype, gamma)`` -> out_shape: its parameters, drawn from ``rng``;
* ``forward(X, options)`` -> (Y, cache) and ``backward(dY, cache, options)`` -> (dX, grads): the
  layer and the gradients of its input and parameters (the mean loss's);
* ``box(X_c, X_r, options)`` -> (Y_c, Y_r, cache) and ``box_backward(dY_c, dY_r, cache, options)``
  -> (dX_c, dX_r, grads): the interval box (centre, radius) in the model's dtype and its gradient,
  for certified training (interval bound propagation, Gowal et al. 2018);
* ``enclosing_box(X_lo, X_hi, options)`` -> (Y_lo, Y_hi): float64 boxes that contain the layer's
  output for every input of the box in exact arithmetic for the stored parameters, float64 rounding
  allowed for (|fl(x . y) - x . y| <= gamma_n |x| . |y|, Higham 2002, eq. (3.5));
* ``relax_back(Lam, beta, allowance, box_in, box_out, steps)`` -> (Lam', beta', allowance'): the
  linear relaxation (CROWN, Zhang et al. 2018) back through the layer: from rows of a bound
  m_r >= Lam_r . y + beta_r - allowance_r on the layer's output y (Lam (m, r, *out)), a bound of the
  same form on its input x, valid over the float64 boxes of x and y that ``enclosing_box`` gave and
  in exact arithmetic (the allowance grows by the rounding of the step);
* ``relax(Lam, box_in, box_out, options)`` -> (Lam', beta, cache) and ``relax_backward(dLam', dbeta,
  cache, options)`` -> (dLam, d_box_in, d_box_out, grads): the same relaxation for training (the
  CROWN-IBP loss, Zhang et al. 2020): in the model's dtype, over the training boxes (centre, radius)
  that ``box`` gave, without rounding allowances; ``beta`` (m, r) is what the step adds to the rows'
  constants, and its gradient: d_box_in and d_box_out are (d centre, d radius) of the boxes the step
  read, or None;
* ``milp(expr, box_in, box_out, relaxed)`` -> (expr', constraints, binaries), dense layer kinds only:
  the layer as mixed-integer linear constraints in cvxpy (:mod:`nemon_np.milp`) between the
  expression of its input and that of its output, over the float64 boxes of one image (:mod:`nemon_np.exact`);
* ``lipschitz_rows()``: a matrix whose ||.||_inf (largest absolute row sum) bounds the layer's
  l_inf -> l_inf gain, None for a gain of at most 1;
* ``token``: the layer in the architecture string (:func:`nemon_np.stack.parse_architecture`).

``options`` is a dict of the fixed-point solver settings (tol, max_iter, method, alpha, tol_mode,
on_violation, adjoint, adjoint_tol) and ``train`` (batch statistics); in certified training each
layer's ``box`` and ``relax`` also find ``clean``, its own forward cache from the batch's clean pass,
and a gradient they send back to that pass comes in ``grads[CLEAN_INPUT]`` (batch normalization's
statistics, :class:`BatchNorm`). Other layers ignore both.

Interval arithmetic of an affine map y = W x + b over the box [x_c - x_r, x_c + x_r]: y_c = W x_c + b,
y_r = |W| x_r, exact for the box's image's enclosing box; its gradient dL/dx_c = W^T dL/dy_c,
dL/dx_r = |W|^T dL/dy_r, dL/dW = dL/dy_c x_c^T + sign(W) (dL/dy_r x_r^T). Relu is monotone:
[relu(x_lo), relu(x_hi)]. The implicit layer's box is its embedded network's
(:class:`nemon_np.base.EmbeddedNetwork`).
"""
import numpy as np
from numba import njit
from numpy.lib.stride_tricks import as_strided

from ._threads import map_ranges, split_ranges
from .base import EmbeddedNetwork
from .interval import (UNIT_ROUNDOFF, affine_enclosure, enclosing_center_radius, narrow_preactivation_box, relu_box,
                       relu_box_grad)
from .conv import PADDINGS, average_pool, average_pool_transpose
from .conv_model import ConvImplicitMap
from .milp import affine_box, relu_constraints
from .models import DenseImplicitMap
from .relaxation import (batched_dot, concretize, crown_multipliers, relu_offsets, relu_relaxation,
                         relu_relaxation_grad, unrolled_bounds)

__all__ = ["Layer", "CLEAN_INPUT", "Dense", "Conv2d", "ReLU", "Flatten", "AvgPool2d", "BatchNorm", "ImplicitDense",
           "ImplicitConv", "LAYERS"]

LAYERS = {}

# The key under which a training box's or relaxation's gradients (``box_backward``, ``relax_backward``)
# carry a gradient on the layer's input in the batch's clean pass: batch normalization's box reads the
# clean pass's statistics.
CLEAN_INPUT = "clean_input"


def _register(cls):
    LAYERS[cls.kind] = cls
    return cls


def _rho(*sizes):
    """2 (N + 10) u for sums of at most N terms: the rounding factor of the relaxation's allowances."""
    return 2 * (max(int(np.prod(v)) for v in sizes) + 10) * UNIT_ROUNDOFF


def box_magnitude(box):
    """|x_c| + x_r >= |x| over a float64 box (lo, hi), from its enclosing centre and radius."""
    c, r = enclosing_center_radius(*box)
    return np.abs(c) + r


def _rows(Lam):
    """Rows (m, r, *shape) as (m r, *shape) states, for a layer's maps."""
    return Lam.reshape((-1,) + Lam.shape[2:])


def _row_constants(Lam, b):
    """sum over positions of Lam . b, per row: Lam (m, r, *positions, C) against a bias b (C,); (m, r)."""
    m, r = Lam.shape[:2]
    return Lam.reshape(m, r, -1, Lam.shape[-1]).sum(axis=2) @ b


def _per_row(dbeta, like):
    """dbeta (m, r) broadcast against rows ``like`` (m, r, ...)."""
    return dbeta.reshape(dbeta.shape + (1,) * (like.ndim - 2))


def _outward(lo, hi):
    """One ulp outward each side: lo - r and hi + r round to nearest."""
    return np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf)


class Layer:
    """One layer kind (module docstring). Subclasses set ``kind`` and define the methods; layers with
    no parameters keep the defaults of :meth:`params` and :meth:`lipschitz_rows`."""
    kind = None
    spatial_input = False   # whether the layer reads (m, H, W, C) states: True, False or None (any shape)
    implicit = None         # the name of an implicit layer's implicit matrix
    input_weight = None     # the name of the weight that reads the layer's input (None: no parameters)
    n_jobs = 1              # threads that the layer's products may share (convolutions; others ignore it)

    @property
    def fan_in(self):
        """The entries of the input that each output reads through :attr:`input_weight`."""
        return self._terms

    def params(self):
        """The parameters as a dict of the arrays themselves (the optimizer updates them in place)."""
        return {}

    def buffers(self):
        """State saved with the model that training does not optimize (none by default)."""
        return {}

    def lipschitz_rows(self):
        return None

    def relaxation_reads(self, box_in, box_out):
        """(mask_in, mask_out): (m, features) bool masks of the input and output coordinates whose boxes
        bound this layer's ``relax_back`` beyond rounding (the tighter the box there, the tighter the
        relaxation), or None for a side read for rounding only. None, None by default: an affine map's
        relaxation is exact whatever the boxes."""
        return None, None

    @property
    def token(self):
        return self.kind

    def __repr__(self):
        return self.token


class _Affine(Layer):
    """An affine map y = W x + b written over three primitives of the subclass: ``_map(W, X)`` (W x),
    ``_weight_grad(dY, X)`` and ``_transpose(W, dY)`` (W^T dY in X's layout), with ``_terms`` the
    products summed per output."""

    input_weight = "W"

    def params(self):
        return {"W": self.W, "b": self.b}

    def _bias_grad(self, dY):
        return dY.reshape(-1, dY.shape[-1]).sum(axis=0)

    def forward(self, X, options):
        return self._map(self.W, X) + self.b, X

    def backward(self, dY, X, options):
        return self._transpose(self.W, dY), {"W": self._weight_grad(dY, X), "b": self._bias_grad(dY)}

    def box(self, X_c, X_r, options):
        return self._map(self.W, X_c) + self.b, self._map(np.abs(self.W), X_r), (X_c, X_r)

    def box_backward(self, dY_c, dY_r, cache, options):
        X_c, X_r = cache
        grads = {"W": self._weight_grad(dY_c, X_c) + np.sign(self.W) * self._weight_grad(dY_r, X_r),
                 "b": self._bias_grad(dY_c)}
        return self._transpose(self.W, dY_c), self._transpose(np.abs(self.W), dY_r), grads

    def relax(self, Lam, box_in, box_out, options):
        # Lam . (W x + b) = (W^T Lam) . x + Lam . b
        m, r = Lam.shape[:2]
        Lam_in = self._transpose(self.W, _rows(Lam))
        return Lam_in.reshape((m, r) + Lam_in.shape[1:]), _row_constants(Lam, self.b), Lam

    def relax_backward(self, dLam_in, dbeta, Lam, options):
        X = _rows(dLam_in)
        dLam = self._map(self.W, X).reshape(Lam.shape) + _per_row(dbeta, Lam) * self.b
        grads = {"W": self._weight_grad(_rows(Lam), X), "b": self._bias_grad(_per_row(dbeta, Lam) * Lam)}
        return dLam, None, None, grads

    def relax_back(self, Lam, beta, allowance, box_in, box_out, steps):
        # Lam . (W x + b) = (W^T Lam) . x + Lam . b in exact arithmetic; the computed W^T Lam is within
        # gamma_n |W|^T |Lam| of it, whose product with x is within |Lam| . (|W| |x|).
        m, r = beta.shape
        W, b = self.W.astype(np.float64), self.b.astype(np.float64)
        s_in = box_magnitude(box_in)
        absW_s = self._map(np.abs(W), s_in)[:, None]
        beta = beta + Lam.reshape(m, r, -1, Lam.shape[-1]).sum(axis=2) @ b
        rho = _rho(box_in[0].shape[1:], box_out[0].shape[1:], (self._terms,))
        allowance = allowance + rho * (np.abs(beta) + batched_dot(np.abs(Lam), absW_s + np.abs(b)))
        Lam_in = self._transpose(W, _rows(Lam))
        return Lam_in.reshape((m, r) + Lam_in.shape[1:]), beta, allowance

    def enclosing_box(self, X_lo, X_hi, options):
        c, r = enclosing_center_radius(X_lo, X_hi)
        W, b = self.W.astype(np.float64), self.b.astype(np.float64)
        Y_c, Y_r = affine_enclosure(self._map, W, b, c, r, self._terms)
        return _outward(Y_c - Y_r, Y_c + Y_r)


@_register
class Dense(_Affine):
    """y = W x + b on flat states, W (units, n_in): PyTorch Linear's uniform(-1, 1) / sqrt(n_in)
    initialization, zero bias (as the models' B and C)."""
    kind = "dense"

    def __init__(self, units):
        self.units = int(units)

    @property
    def token(self):
        return f"dense{self.units}"

    def build(self, in_shape, rng, dtype, gamma=None):
        if len(in_shape) != 1:
            raise ValueError(f"a dense layer reads flat states, got shape {in_shape}")
        n_in = in_shape[0]
        self.W = (rng.uniform(-1, 1, size=(self.units, n_in)) / np.sqrt(n_in)).astype(dtype)
        self.b = np.zeros(self.units, dtype)
        self._terms = n_in
        return (self.units,)

    # The dense products are the dense implicit map's input map and its weight gradient.
    _map = staticmethod(DenseImplicitMap._inject)
    _weight_grad = staticmethod(DenseImplicitMap._inject_grad)

    @staticmethod
    def _transpose(W, dY):
        return dY @ W

    def lipschitz_rows(self):
        return np.asarray(self.W, np.float64)

    def milp(self, expr, box_in, box_out, relaxed):
        return np.asarray(self.W, np.float64) @ expr + np.asarray(self.b, np.float64), [], 0


def conv_output_size(size, kernel, stride, padding):
    """(size + 2 padding - kernel) // stride + 1: the output length of a strided convolution."""
    return (size + 2 * padding - kernel) // stride + 1


def patches(X, kernel, stride, padding):
    """The k x k patches of a channel-last batch X (m, H, W, C) with zero padding and stride, as rows
    (m Ho Wo, k k C) in (tap row, tap column, channel) order (im2col)."""
    m, H, W, C = X.shape
    if padding:
        X = np.pad(X, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    X = np.ascontiguousarray(X)
    Ho, Wo = conv_output_size(H, kernel, stride, padding), conv_output_size(W, kernel, stride, padding)
    sm, sh, sw, sc = X.strides
    view = as_strided(X, (m, Ho, Wo, kernel, kernel, C), (sm, sh * stride, sw * stride, sh, sw, sc), writeable=False)
    return view.reshape(m * Ho * Wo, kernel * kernel * C)


def patches_transpose(D, shape, kernel, stride, padding):
    """The transpose of :func:`patches`: rows D (m Ho Wo, k k C) added back onto their pixels, (m, H, W, C)
    (col2im: out[i, s p + a - pad, s q + e - pad, c] += D[(i, p, q), (a, e, c)]; the reference is
    :func:`patches_transpose_reference`)."""
    out = _padded_zeros(shape, padding, D.dtype)
    _add_rows(D, out, kernel, stride)
    return _unpad(out, shape, padding)


def _padded_zeros(shape, padding, dtype):
    m, H, W, C = shape
    return np.zeros((m, H + 2 * padding, W + 2 * padding, C), dtype)


def _unpad(out, shape, padding):
    return out[:, padding:padding + shape[1], padding:padding + shape[2], :]


def _add_rows(D, out, kernel, stride):
    """Adds patch rows D (m Ho Wo, k k C) onto the padded images ``out`` (m, H + 2 pad, W + 2 pad, C)."""
    m, Hp, Wp, C = out.shape
    Ho, Wo = conv_output_size(Hp, kernel, stride, 0), conv_output_size(Wp, kernel, stride, 0)
    _add_patches(np.ascontiguousarray(D).reshape(m, Ho, Wo, kernel, kernel, C), out, stride)


# The patch rows of this many bytes at a time: a convolution's products build the patches of a block of
# images, use them and drop them while they are still in cache, instead of writing and reading back the
# whole batch's (k^2 times the images: 40 MB for a batch of 100 in the medium stack's second layer, hundreds
# of MB in CNN-7's). 1-3 MB blocks were the fastest here (docs/benchmarks.md, "Convolutions by blocks").
PATCH_BLOCK_BYTES = 2 ** 21


def _image_blocks(m, per_image_bytes):
    """Slices of the m images in even blocks of at most :data:`PATCH_BLOCK_BYTES` of patch rows (at least one
    image a block)."""
    per_block = max(1, int(PATCH_BLOCK_BYTES // max(per_image_bytes, 1)))
    return [slice(a, b) for a, b in split_ranges(m, -(-m // per_block))]


@njit(cache=True, nogil=True)
def _add_patches(D, out, stride):
    """out[i, s p + a, s q + e, :] += D[i, p, q, a, e, :] for every patch (p, q) and tap (a, e): each
    image's rows are read once, in order, into its padded image (which stays in cache), where NumPy's
    k^2 strided slice additions sweep the whole batch k^2 times."""
    m, Ho, Wo, k, _, C = D.shape
    for i in range(m):
        for p in range(Ho):
            for q in range(Wo):
                for a in range(k):
                    for e in range(k):
                        row, col = stride * p + a, stride * q + e
                        for c in range(C):
                            out[i, row, col, c] += D[i, p, q, a, e, c]


def patches_transpose_reference(D, shape, kernel, stride, padding):
    """:func:`patches_transpose` as the transpose of the explicit matrix of :func:`patches`."""
    m, H, W, C = shape
    n = H * W * C
    eye = np.eye(n).reshape(n, H, W, C)
    P = patches(eye, kernel, stride, padding).reshape(n, -1)   # row j: column j of the patch map, per sample
    return (D.reshape(m, -1) @ P.T).reshape(m, H, W, C)


@_register
class Conv2d(_Affine):
    """A strided convolution with zero padding on channel-last states: y[p] = sum over the k x k taps
    and input channels of W[a, e, c_in, c_out] x[s p + (a, e) - pad] + b[c_out]; W (k, k, C_in, C_out),
    initialized uniform(-1, 1) / sqrt(k k C_in) (PyTorch Conv2d's scale), zero bias."""
    kind = "conv"
    spatial_input = True

    def __init__(self, channels, kernel=3, stride=1, padding=None):
        self.channels, self.kernel, self.stride = int(channels), int(kernel), int(stride)
        self.padding = self.kernel // 2 if padding is None else int(padding)
        if min(self.channels, self.kernel, self.stride) < 1 or self.padding < 0:
            raise ValueError(f"a conv layer needs channels, kernel and stride >= 1 and padding >= 0, got "
                             f"{self.channels}, {self.kernel}, {self.stride} and {self.padding}")

    @property
    def token(self):
        return f"conv{self.channels}k{self.kernel}s{self.stride}p{self.padding}"

    def build(self, in_shape, rng, dtype, gamma=None):
        if len(in_shape) != 3:
            raise ValueError(f"a conv layer reads images (H, W, C), got shape {in_shape}")
        H, W, C = in_shape
        Ho, Wo = (conv_output_size(v, self.kernel, self.stride, self.padding) for v in (H, W))
        if min(Ho, Wo) < 1:
            raise ValueError(f"{self.token} does not fit a {H} x {W} input")
        fan_in = self.kernel * self.kernel * C
        self.W = (rng.uniform(-1, 1, size=(self.kernel, self.kernel, C, self.channels)) / np.sqrt(fan_in)).astype(dtype)
        self.b = np.zeros(self.channels, dtype)
        self._terms, self._in_shape = fan_in, (H, W, C)
        return (Ho, Wo, self.channels)

    def _out(self, shape):
        m, H, W, _ = shape
        return (m, conv_output_size(H, self.kernel, self.stride, self.padding),
                conv_output_size(W, self.kernel, self.stride, self.padding), self.channels)

    def _blocks(self, X_shape, itemsize):
        _, Ho, Wo, _ = self._out(X_shape)
        return _image_blocks(X_shape[0], Ho * Wo * self.kernel ** 2 * X_shape[3] * itemsize)

    def _patches(self, X):
        return patches(X, self.kernel, self.stride, self.padding)

    def _by_threads(self, blocks, func):
        """[func(list of blocks) for each thread's share of ``blocks``], the shares (contiguous, as even
        as the blocks allow) run on :attr:`n_jobs` threads: the products release the GIL (numpy's
        matmul, ``nogil`` kernels), and each block's rows are its own."""
        return map_ranges(lambda a, b: func(blocks[a:b]), len(blocks), self.n_jobs)

    def _map(self, W, X):
        W = W.reshape(-1, self.channels)
        out = np.empty(self._out(X.shape), np.result_type(X, W))

        def share(blocks):
            for block in blocks:
                np.matmul(self._patches(X[block]), W, out=out[block].reshape(-1, self.channels))
        self._by_threads(self._blocks(X.shape, out.itemsize), share)
        return out

    def _weight_grad(self, dY, X):
        dtype = np.result_type(X, dY)

        def share(blocks):
            G = np.zeros((self._terms, self.channels), dtype)
            for block in blocks:
                G += self._patches(X[block]).T @ dY[block].reshape(-1, self.channels)
            return G
        # Each thread sums its own blocks; one thread sums them all in the same order (none: no images).
        shares = self._by_threads(self._blocks(X.shape, dtype.itemsize), share)
        return sum(shares, np.zeros((self._terms, self.channels), dtype)).reshape(self.W.shape)

    def _transpose(self, W, dY):
        W = W.reshape(-1, self.channels)
        shape = (len(dY),) + self._in_shape
        out = _padded_zeros(shape, self.padding, np.result_type(W, dY))

        def share(blocks):
            for block in blocks:
                _add_rows(dY[block].reshape(-1, self.channels) @ W.T, out[block], self.kernel, self.stride)
        self._by_threads(self._blocks(shape, out.itemsize), share)
        return _unpad(out, shape, self.padding)

    def lipschitz_rows(self):
        # Output channel c's row: all its taps and input channels (border pixels, zero padded, have fewer).
        return np.asarray(self.W, np.float64).reshape(-1, self.channels).T

    def sparse_matrix(self):
        """The convolution without its bias as a float64 sparse matrix M (Ho Wo C_out, H W C_in) on flat
        channel-last states: M[(p, q, c_out), (s p + a - pad, s q + e - pad, c_in)] = W[a, e, c_in, c_out],
        taps that fall on the zero padding left out (k k C_in entries a row at most)."""
        from scipy.sparse import csr_matrix
        H, W, C = self._in_shape
        # Each input entry's index + 1 through the patches: 0 marks a tap on the padding.
        index = np.arange(1, H * W * C + 1, dtype=np.float64).reshape(1, H, W, C)
        taps = patches(index, self.kernel, self.stride, self.padding).astype(np.int64) - 1
        weights = np.asarray(self.W, np.float64).reshape(-1, self.channels)
        position, tap, out = np.nonzero(np.broadcast_to((taps >= 0)[:, :, None], taps.shape + (self.channels,)))
        return csr_matrix((weights[tap, out], (position * self.channels + out, taps[position, tap])),
                          shape=(len(taps) * self.channels, H * W * C))

    def milp(self, expr, box_in, box_out, relaxed):
        positions = len(box_out[0]) // self.channels
        return self.sparse_matrix() @ expr + np.tile(np.asarray(self.b, np.float64), positions), [], 0


@_register
class ReLU(Layer):
    """relu(x) = max(x, 0), entrywise; monotone, so a box maps to [relu(x_lo), relu(x_hi)]."""
    kind = "relu"
    spatial_input = None

    def build(self, in_shape, rng, dtype, gamma=None):
        return in_shape

    def forward(self, X, options):
        return np.maximum(X, 0), X

    def backward(self, dY, X, options):
        return dY * (X > 0), {}

    def box(self, X_c, X_r, options):
        lo, hi = X_c - X_r, X_c + X_r
        return relu_box(lo, hi) + ((lo, hi),)

    def box_backward(self, dY_c, dY_r, cache, options):
        return relu_box_grad(dY_c, dY_r, *cache) + ({},)

    def enclosing_box(self, X_lo, X_hi, options):
        return np.maximum(X_lo, 0.0), np.maximum(X_hi, 0.0)

    def relaxation_reads(self, box_in, box_out):
        # Only a relu whose input can change sign is relaxed; the others are linear on their box.
        lo, hi = (v.reshape(len(v), -1) for v in box_in)
        return (lo < 0) & (hi > 0), None

    def relax_back(self, Lam, beta, allowance, box_in, box_out, steps):
        # Lam . relu(x) >= lam . x + sum kappa for any lam (nemon_np.relaxation); kappa's rounding is
        # within u (|Lam| + |lam|) (|lo| + |hi|) entrywise.
        m, r = beta.shape
        lo, hi = box_in[0][:, None], box_in[1][:, None]
        lam = crown_multipliers(Lam, lo, hi)
        kappa = relu_offsets(Lam, lam, lo, hi)
        beta = beta + kappa.reshape(m, r, -1).sum(axis=2)
        allowance = allowance + _rho(lo.shape[2:]) * (np.abs(beta) + batched_dot(np.abs(Lam) + np.abs(lam),
                                                                                 np.abs(lo) + np.abs(hi)))
        return lam, beta, allowance

    def relax(self, Lam, box_in, box_out, options):
        m, r = Lam.shape[:2]
        lo, hi = (box_in[0] - box_in[1])[:, None], (box_in[0] + box_in[1])[:, None]
        lam, kappa = relu_relaxation(Lam, lo, hi)
        return lam, kappa.reshape(m, r, -1).sum(axis=2), (Lam, lo, hi)

    def relax_backward(self, dLam_in, dbeta, cache, options):
        Lam, lo, hi = cache
        dLam, dlo, dhi = relu_relaxation_grad(Lam, lo, hi, dLam_in, _per_row(dbeta, Lam))
        dlo, dhi = dlo[:, 0], dhi[:, 0]
        return dLam, (dlo + dhi, dhi - dlo), None, {}

    def milp(self, expr, box_in, box_out, relaxed):
        import cvxpy as cp
        out = cp.Variable(len(box_in[0]))
        cons, binaries = relu_constraints(out, expr, box_in[0], box_in[1], relaxed)
        return out, cons + [out >= box_out[0], out <= box_out[1]], binaries


@_register
class Flatten(Layer):
    """(m, H, W, C) -> (m, H W C), in (row, column, channel) order."""
    kind = "flatten"
    spatial_input = True

    def build(self, in_shape, rng, dtype, gamma=None):
        self._in_shape = tuple(in_shape)
        return (int(np.prod(in_shape)),)

    def forward(self, X, options):
        return X.reshape(len(X), -1), None

    def backward(self, dY, cache, options):
        return dY.reshape((len(dY),) + self._in_shape), {}

    def box(self, X_c, X_r, options):
        return X_c.reshape(len(X_c), -1), X_r.reshape(len(X_r), -1), None

    def box_backward(self, dY_c, dY_r, cache, options):
        return self.backward(dY_c, None, options)[0], self.backward(dY_r, None, options)[0], {}

    def enclosing_box(self, X_lo, X_hi, options):
        return X_lo.reshape(len(X_lo), -1), X_hi.reshape(len(X_hi), -1)

    def relax_back(self, Lam, beta, allowance, box_in, box_out, steps):
        return Lam.reshape(Lam.shape[:2] + self._in_shape), beta, allowance

    def relax(self, Lam, box_in, box_out, options):
        return Lam.reshape(Lam.shape[:2] + self._in_shape), np.zeros(Lam.shape[:2], Lam.dtype), Lam.shape

    def relax_backward(self, dLam_in, dbeta, shape, options):
        return dLam_in.reshape(shape), None, None, {}

    def milp(self, expr, box_in, box_out, relaxed):
        # The programs' states are flat already, channel-last: the order this layer's output keeps.
        return expr, [], 0


@_register
class AvgPool2d(Layer):
    """s x s average pooling of channel-last states (s divides H and W): a linear map with
    non-negative weights 1 / s^2 and l_inf norm 1."""
    kind = "pool"
    spatial_input = True

    def __init__(self, size):
        self.size = int(size)
        if self.size < 1:
            raise ValueError(f"a pooling layer needs a size >= 1, got {size!r}")

    @property
    def token(self):
        return f"pool{self.size}"

    def build(self, in_shape, rng, dtype, gamma=None):
        if len(in_shape) != 3 or in_shape[0] % self.size or in_shape[1] % self.size:
            raise ValueError(f"{self.token} needs an image whose sides it divides, got shape {in_shape}")
        H, W, C = in_shape
        self._in_shape = tuple(in_shape)
        return (H // self.size, W // self.size, C)

    def _pool(self, X):
        return average_pool(X, self.size)

    def _pool_transpose(self, G):
        return average_pool_transpose(G, self.size, self._in_shape[:2])

    def forward(self, X, options):
        return self._pool(X), None

    def backward(self, dY, cache, options):
        return self._pool_transpose(dY), {}

    def box(self, X_c, X_r, options):
        return self._pool(X_c), self._pool(X_r), None

    def box_backward(self, dY_c, dY_r, cache, options):
        return self._pool_transpose(dY_c), self._pool_transpose(dY_r), {}

    def enclosing_box(self, X_lo, X_hi, options):
        # Averages with non-negative weights are monotone; their rounding is within (s^2 + 2) u of |x|'s.
        t = (self.size ** 2 + 2) * UNIT_ROUNDOFF
        X_lo, X_hi = np.asarray(X_lo, np.float64), np.asarray(X_hi, np.float64)
        return _outward(self._pool(X_lo) - t * self._pool(np.abs(X_lo)),
                        self._pool(X_hi) + t * self._pool(np.abs(X_hi)))

    def relax_back(self, Lam, beta, allowance, box_in, box_out, steps):
        # The transpose divides by s^2: within u of exact, entrywise.
        m, r = beta.shape
        Lam_in = self._pool_transpose(_rows(Lam)).reshape((m, r) + self._in_shape)
        s_in = box_magnitude(box_in)[:, None]
        allowance = allowance + _rho(self._in_shape) * batched_dot(np.abs(Lam_in), s_in)
        return Lam_in, beta, allowance

    def relax(self, Lam, box_in, box_out, options):
        m, r = Lam.shape[:2]
        return (self._pool_transpose(_rows(Lam)).reshape((m, r) + self._in_shape), np.zeros((m, r), Lam.dtype),
                Lam.shape)

    def relax_backward(self, dLam_in, dbeta, shape, options):
        return self._pool(_rows(dLam_in)).reshape(shape), None, None, {}


@_register
class BatchNorm(Layer):
    """Batch normalization per channel (the last axis; Ioffe & Szegedy 2015), which Shi et al. 2021
    find crucial for certified training: y = gamma (x - mu) / sqrt(var + eps) + beta.

    In training (``options["train"]``) mu and var are the batch's, over every axis but the channel,
    and the running statistics move towards them (momentum 0.1, the unbiased variance, as PyTorch).
    The training box and relaxation are the affine map of the same statistics, those of the batch's
    clean pass (``options["clean"]``, this layer's forward cache; auto_LiRPA's default "forward" mode,
    which Shi et al. 2021 train with), and are differentiated through them: their gradient with
    respect to the clean pass's input comes back in ``grads[CLEAN_INPUT]``. The running statistics
    estimate these same statistics, so the box that training tightens is the one certificates
    evaluate. (Statistics of the box centres instead let training shrink its boxes by spreading the
    centres, which the clean statistics at evaluation undo: boxes a thousand times wider.) At
    evaluation (logits, attacks, certificates) the layer is the affine map y = a x + c of the
    running statistics, a = gamma / sqrt(running_var + eps), c = beta - a running_mean, which the
    boxes, the relaxation and the Lipschitz factor (max |a|) pass as such."""
    kind = "bn"
    spatial_input = None
    input_weight = None
    eps, momentum = 1e-5, 0.1

    def build(self, in_shape, rng, dtype, gamma=None):
        C = in_shape[-1]
        self.weight, self.bias = np.ones(C, dtype), np.zeros(C, dtype)
        self.running_mean, self.running_var = np.zeros(C), np.ones(C)
        return in_shape

    def params(self):
        return {"weight": self.weight, "bias": self.bias}

    def buffers(self):
        """State saved with the model but not trained: the running statistics."""
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def _affine(self):
        """(a, c) of the evaluation map y = a x + c, float64."""
        a = np.asarray(self.weight, np.float64) / np.sqrt(self.running_var + self.eps)
        return a, np.asarray(self.bias, np.float64) - a * self.running_mean

    @staticmethod
    def _stats(X):
        axes = tuple(range(X.ndim - 1))
        mu = X.mean(axis=axes)
        return mu, ((X - mu) ** 2).mean(axis=axes), axes

    @staticmethod
    def _clean_stats(options):
        """(mu, s, X_hat, axes) of the batch's clean pass, for the training box and relaxation."""
        clean = options.get("clean")
        if clean is None:
            raise ValueError("batch normalization's training box needs its clean pass's forward cache in "
                             "options['clean'] (StackedClassifier.certified_loss_and_grad passes it)")
        X_hat, s, axes, mu = clean
        return mu, s, X_hat, axes

    def _clean_input_grad(self, dmu, ds, X_hat):
        """The gradient on the clean pass's input x from those on its mu and s = sqrt(var + eps):
        dmu/dx = 1 / n, ds/dx = (x - mu) / (n s) = x_hat / n, n the entries per channel."""
        return (dmu + ds * X_hat) / (X_hat.size // X_hat.shape[-1])

    def forward(self, X, options):
        if not options.get("train"):
            a, c = self._affine()
            return (X * a.astype(X.dtype) + c.astype(X.dtype)), None
        mu, var, axes = self._stats(X)
        n = X.size // X.shape[-1]
        self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mu
        self.running_var = (1 - self.momentum) * self.running_var + self.momentum * var * n / max(n - 1, 1)
        s = np.sqrt(var + X.dtype.type(self.eps))
        X_hat = (X - mu) / s
        return self.weight * X_hat + self.bias, (X_hat, s, axes, mu)

    def backward(self, dY, cache, options):
        if cache is None:
            a, _ = self._affine()
            return dY * a.astype(dY.dtype), {"weight": np.zeros_like(self.weight), "bias": np.zeros_like(self.bias)}
        X_hat, s, axes, _ = cache
        grads = {"weight": (dY * X_hat).sum(axis=axes), "bias": dY.sum(axis=axes)}
        dX_hat = dY * self.weight
        dX = (dX_hat - dX_hat.mean(axis=axes) - X_hat * (dX_hat * X_hat).mean(axis=axes)) / s
        return dX, grads

    def box(self, X_c, X_r, options):
        if not options.get("train"):
            a, _ = self._affine()
            return self.forward(X_c, options)[0], X_r * np.abs(a).astype(X_r.dtype), None
        mu, s, _, _ = self._clean_stats(options)
        a = self.weight / s
        return a * (X_c - mu) + self.bias, X_r * np.abs(a), (X_c, X_r)

    def box_backward(self, dY_c, dY_r, cache, options):
        if cache is None:
            a, _ = self._affine()
            dX_c, grads = self.backward(dY_c, None, options)
            return dX_c, dY_r * np.abs(a).astype(dY_r.dtype), grads
        X_c, X_r = cache
        mu, s, X_hat, axes = self._clean_stats(options)
        g = self.weight
        # y_c = g (x_c - mu) / s + beta, y_r = |g| x_r / s, with mu and s the clean pass's.
        dY_c_X = (dY_c * (X_c - mu)).sum(axis=axes)
        dY_r_X = (dY_r * X_r).sum(axis=axes)
        dY_c_sum = dY_c.sum(axis=axes)
        grads = {"weight": (dY_c_X + np.sign(g) * dY_r_X) / s, "bias": dY_c_sum,
                 CLEAN_INPUT: self._clean_input_grad(-g / s * dY_c_sum, -(g * dY_c_X + np.abs(g) * dY_r_X) / (s * s),
                                                     X_hat)}
        return dY_c * (g / s), dY_r * (np.abs(g) / s), grads

    def enclosing_box(self, X_lo, X_hi, options):
        c, r = enclosing_center_radius(X_lo, X_hi)
        a, shift = self._affine()
        Y_c, Y_r = a * c + shift, np.abs(a) * r
        # Each product and sum rounds once; the affine map's own rounding (of a and c) is within 8 u.
        Y_r = Y_r + 8 * UNIT_ROUNDOFF * (np.abs(a) * (np.abs(c) + r) + np.abs(shift))
        return _outward(Y_c - Y_r, Y_c + Y_r)

    def relax_back(self, Lam, beta, allowance, box_in, box_out, steps):
        m, r = beta.shape
        a, shift = self._affine()
        beta = beta + Lam.reshape(m, r, -1, Lam.shape[-1]).sum(axis=2) @ shift
        rho = _rho(box_in[0].shape[1:])
        s_in = box_magnitude(box_in)[:, None]
        allowance = allowance + rho * (np.abs(beta) + batched_dot(np.abs(Lam), np.abs(a) * s_in + np.abs(shift)))
        return Lam * a, beta, allowance

    def relax(self, Lam, box_in, box_out, options):
        # y = a x + shift: in training (as ``box``) a = gamma / s and shift = beta - a mu of the clean
        # pass's statistics, differentiated through them; the running statistics' otherwise.
        if options.get("train"):
            mu, s, X_hat, _ = self._clean_stats(options)
            a = self.weight / s
            shift, stats = self.bias - a * mu, (mu, s, X_hat)
        else:
            (a, shift), stats = (v.astype(Lam.dtype) for v in self._affine()), None
        return Lam * a, _row_constants(Lam, shift), (Lam, a, shift, stats)

    def relax_backward(self, dLam_in, dbeta, cache, options):
        Lam, a, shift, stats = cache
        dLam = dLam_in * a + _per_row(dbeta, Lam) * shift
        if stats is None:
            return dLam, None, None, {"weight": np.zeros_like(self.weight), "bias": np.zeros_like(self.bias)}
        mu, s, X_hat = stats
        C = Lam.shape[-1]
        da = (dLam_in * Lam).reshape(-1, C).sum(axis=0)
        dshift = (_per_row(dbeta, Lam) * Lam).reshape(-1, C).sum(axis=0)
        # a = gamma / s, shift = beta - gamma mu / s.
        grads = {"weight": (da - dshift * mu) / s, "bias": dshift,
                 CLEAN_INPUT: self._clean_input_grad(-dshift * a, (-da + dshift * mu) * self.weight / (s * s), X_hat)}
        return dLam, None, None, grads

    def milp(self, expr, box_in, box_out, relaxed):
        import cvxpy as cp
        a, shift = self._affine()   # evaluation: the affine map of the running statistics
        n = len(box_in[0])
        return cp.multiply(np.resize(a, n), expr) + np.resize(shift, n), [], 0

    def lipschitz_rows(self):
        a, _ = self._affine()
        return np.array([[np.abs(a).max()]])


def _solver(options):
    return {k: options[k] for k in ("tol", "max_iter", "method", "alpha", "tol_mode", "on_violation") if k in options}


class _ImplicitLayer(EmbeddedNetwork, Layer):
    """What an implicit layer x* = relu(P x* + B u + b) does as a layer, written once over the hooks
    of its map (:class:`nemon_np.models.DenseImplicitMap`, :class:`nemon_np.conv_model.ConvImplicitMap`)
    and of :class:`nemon_np.base.EmbeddedNetwork`, plus ``_state_equilibrium(X, options)``. Its
    output is the fixed point x* >= 0; its box is the embedded network's; its relaxation is the
    unrolled one of the crown certificate; its gain is ||B||_inf / (1 - max(mu_inf, 0)) in the
    layer's (weighted) norm."""
    input_weight = "B"

    def params(self):
        return {self.implicit: getattr(self, self.implicit), "B": self.B, "b": self.b}

    def forward(self, X, options):
        X_star, info = self._state_equilibrium(X, _solver(options))
        return X_star, {"input": X, "state": X_star, "forward": info}

    def backward(self, dY, cache, options):
        delta, cache["backward"] = self._state_adjoint(
            cache["forward"], len(dY) * dY, options.get("tol", 1e-6), options.get("max_iter", 500),
            options.get("method", "average"), options.get("alpha"), options.get("adjoint", "iterative"),
            options.get("adjoint_tol"), options.get("on_violation", "raise"))
        n = delta.shape[-1]
        grads = {self.implicit: self._implicit_grad(delta, cache["state"]),
                 "B": self._inject_grad(delta, cache["input"]), "b": delta.reshape(-1, n).sum(axis=0)}
        return self._input_vjp(delta), grads

    def box(self, X_c, X_r, options):
        o = _solver(options)
        X, info = self.embedded_box(X_c, X_r, o.get("tol", 1e-6), o.get("max_iter", 500), o.get("method", "average"),
                                    o.get("alpha"), o.get("tol_mode", "absolute"))
        n = X.shape[-1] // 2
        lo, hi = X[..., :n], X[..., n:]
        return (lo + hi) / 2, (hi - lo) / 2, {"embedded": X, "forward": info, "center": X_c, "radius": X_r}

    def box_backward(self, dY_c, dY_r, cache, options):
        G = np.concatenate([(dY_c - dY_r) / 2, (dY_c + dY_r) / 2], axis=-1)
        grads, cache["backward"], dX_c, dX_r = self.embedded_box_backward(
            G, cache["embedded"], cache["forward"], cache["center"], cache["radius"], options.get("tol", 1e-6),
            options.get("max_iter", 500), options.get("adjoint", "iterative"), options.get("adjoint_tol"),
            with_input=True)
        return dX_c, dX_r, grads

    def enclosing_box(self, X_lo, X_hi, options):
        X_lo, X_hi, _ = self.interval_bounds(X_lo, X_hi, tol=options.get("tol"),
                                             max_iter=options.get("max_iter", 1000))
        return X_lo, X_hi

    def relaxation_reads(self, box_in, box_out):
        # The relaxation anchors on the box of x* (every coordinate not fixed by it) and of the z* it gives.
        lo, hi = (v.reshape(len(v), -1) for v in box_out)
        return None, hi > lo

    def relax_back(self, Lam, beta, allowance, box_in, box_out, steps):
        """Through ``steps`` copies of the fixed-point map (:func:`nemon_np.relaxation.unrolled_bounds`),
        anchored on the embedded network's box of x* (``box_out``); the x* part of the bound of each row
        is bounded over that box and its input part carried on. Of the steps, each row keeps the one
        whose bound over the input box ``box_in`` is largest (any step is sound)."""
        m, r = beta.shape
        x_c, x_r = enclosing_center_radius(*box_out)
        u_c, u_r = enclosing_center_radius(*box_in)
        P64, B64, b64 = (np.asarray(p, np.float64) for p in (getattr(self, self.implicit), self.B, self.b))
        # The box of z* = P x* + B u + b (the models' one linear-map hook, rounding allowed for),
        # narrowed by x* = relu(z*): z* <= x*_hi, and z* = x* where x*_lo > 0.
        PX = self._embedded_injection(x_c, x_r, P64, 0.0, rounding=True)
        Q = self._embedded_injection(u_c, u_r, B64, b64, rounding=True)
        n = PX.shape[-1] // 2
        Z_lo, Z_hi = _outward(PX[..., :n] + Q[..., :n], PX[..., n:] + Q[..., n:])
        Z_lo, Z_hi = narrow_preactivation_box(Z_lo, Z_hi, *box_out)[:2]
        box = dict(x_c=x_c, x_r=x_r, u_c=u_c, u_r=u_r, z_lo=Z_lo, z_hi=Z_hi, b=b64,
                   K_s=self._apply_implicit(np.abs(P64), np.abs(x_c) + x_r),
                   B_s=self._inject(np.abs(B64), np.abs(u_c) + u_r))
        rho = _rho(box_out[0].shape[1:], box_in[0].shape[1:])
        PT, BT = self._transposed(P64), self._transposed(B64)
        best = None
        for t, nu, g, beta_t, alw in unrolled_bounds(Lam, beta, box, lambda V: self._apply_implicit(PT, V),
                                                     lambda V: self._inject(BT, V), steps):
            if g is None:
                continue
            # The x* part over its box goes into beta; g . u is carried on to the layer's input.
            rest = concretize(nu, beta_t, x_c[:, None], x_r[:, None], rho) - alw
            score = rest + batched_dot(g, u_c[:, None]) - batched_dot(np.abs(g), u_r[:, None])
            if best is None:
                best = [score, g, rest]
            else:
                better = score > best[0]
                best[0] = np.where(better, score, best[0])
                best[1] = np.where(better.reshape(better.shape + (1,) * (g.ndim - 2)), g, best[1])
                best[2] = np.where(better, rest, best[2])
        if best is None:   # no step: the whole bound over x*'s box, nothing carried on
            rest = concretize(Lam, beta, x_c[:, None], x_r[:, None], rho)
            return np.zeros((m, r) + box_in[0].shape[1:]), rest, allowance
        return best[1], best[2], allowance

    def relax(self, Lam, box_in, box_out, options):
        """The training twin of :meth:`relax_back`: :attr:`crown_steps` copies of the fixed-point map over
        the box of z* = P x* + B u + b that the training boxes of x* (``box_out``, the embedded
        network's) and of u (``box_in``) give, narrowed by x* = relu(z*) as there; the last step's bound
        (not the best step's, which keeps the gradient smooth), its x* part over x*'s box."""
        m, r = Lam.shape[:2]
        (u_c, u_r), (x_c, x_r) = box_in, box_out
        P = getattr(self, self.implicit)
        Z_c = self._apply_implicit(P, x_c) + self._inject(self.B, u_c) + self.b
        Z_r = self._apply_implicit(np.abs(P), x_r) + self._inject(np.abs(self.B), u_r)
        lo, hi, raise_lo, cut_hi = narrow_preactivation_box(Z_c - Z_r, Z_c + Z_r, x_c - x_r, x_c + x_r)
        lo, hi = lo[:, None], hi[:, None]
        PT = self._transposed(P)
        nu, lam_sum, beta, steps = Lam, np.zeros_like(Lam), np.zeros((m, r), Lam.dtype), []
        for _ in range(self.crown_steps):
            lam, kappa = relu_relaxation(nu, lo, hi)
            beta = beta + kappa.reshape(m, r, -1).sum(axis=2) + _row_constants(lam, self.b)
            steps.append((nu, lam))
            lam_sum = lam_sum + lam
            nu = self._apply_implicit(PT, _rows(lam)).reshape(lam.shape)
        g = self._input_vjp(_rows(lam_sum))
        beta = beta + batched_dot(nu, x_c[:, None]) - batched_dot(np.abs(nu), x_r[:, None])
        cache = dict(steps=steps, nu=nu, lam_sum=lam_sum, lo=lo, hi=hi, raise_lo=raise_lo, cut_hi=cut_hi,
                     box_in=box_in, box_out=box_out)
        return g.reshape((m, r) + g.shape[1:]), beta, cache

    def relax_backward(self, dg, dbeta, cache, options):
        (u_c, u_r), (x_c, x_r) = cache["box_in"], cache["box_out"]
        P, lo, hi, nu = getattr(self, self.implicit), cache["lo"], cache["hi"], cache["nu"]
        m, r = dbeta.shape
        dbeta_rows = _per_row(dbeta, nu)
        dx_c, dx_r = (dbeta_rows * nu).sum(axis=1), -(dbeta_rows * np.abs(nu)).sum(axis=1)
        d_nu = dbeta_rows * (x_c[:, None] - np.sign(nu) * x_r[:, None])
        dlam_sum = self._inject(self.B, _rows(dg)).reshape(nu.shape)
        dP = np.zeros_like(P)
        dB = self._inject_grad(_rows(cache["lam_sum"]), _rows(dg))
        db = np.zeros_like(self.b)
        dlo = dhi = 0
        for nu_in, lam in reversed(cache["steps"]):
            # nu_out = P^T lam; beta += sum kappa + lam . b; lam_sum += lam
            dP = dP + self._implicit_grad(_rows(lam), _rows(d_nu))
            dlam = self._apply_implicit(P, _rows(d_nu)).reshape(lam.shape) + dlam_sum + dbeta_rows * self.b
            db = db + (dbeta_rows * lam).reshape(-1, lam.shape[-1]).sum(axis=0)
            d_nu, dlo_t, dhi_t = relu_relaxation_grad(nu_in, lo, hi, dlam, dbeta_rows)
            dlo, dhi = dlo + dlo_t[:, 0], dhi + dhi_t[:, 0]
        if not cache["steps"]:
            return d_nu, None, (dx_c, dx_r), {self.implicit: dP, "B": dB, "b": db}
        # The narrowed box: lo = max(lo_z, x_lo) where x_lo > 0, hi = min(hi_z, x_hi).
        raise_lo, cut_hi = cache["raise_lo"], cache["cut_hi"]
        dlo_z, dhi_z = np.where(raise_lo, 0, dlo), np.where(cut_hi, 0, dhi)
        dX_lo, dX_hi = dlo - dlo_z, dhi - dhi_z
        dx_c, dx_r = dx_c + dX_lo + dX_hi, dx_r + dX_hi - dX_lo
        dZ_c, dZ_r = dlo_z + dhi_z, dhi_z - dlo_z
        # Z_c = P x_c + B u_c + b, Z_r = |P| x_r + |B| u_r
        dP = dP + self._implicit_grad(dZ_c, x_c) + np.sign(P) * self._implicit_grad(dZ_r, x_r)
        dB = dB + self._inject_grad(dZ_c, u_c) + np.sign(self.B) * self._inject_grad(dZ_r, u_r)
        db = db + dZ_c.reshape(-1, dZ_c.shape[-1]).sum(axis=0)
        dx_c = dx_c + self._apply_implicit(self._transposed(P), dZ_c)
        dx_r = dx_r + self._apply_implicit(self._transposed(np.abs(P)), dZ_r)
        du_c = self._input_vjp(dZ_c)
        du_r = self._inject(self._transposed(np.abs(self.B)), dZ_r)
        return d_nu, (du_c, du_r), (dx_c, dx_r), {self.implicit: dP, "B": dB, "b": db}

    def lipschitz_rows(self):
        B = np.asarray(self.B, np.float64).reshape(len(self.B), -1)
        return B if self.weights is None else B / self.weights[:, None]


@_register
class ImplicitDense(DenseImplicitMap, _ImplicitLayer):
    """The dense NEMON layer x* = relu(A x* + B u + b) (DESIGN.md; Jafarpour et al. 2021) on flat
    states, mu_inf(A) <= gamma (weighted: in the norm of ``weights``), initialized as
    :class:`nemon_np.NEMON` initializes A, B and b; its constraint modes are the dense model's."""
    kind = "nemon"
    constraint_kind = "nemon"
    crown_steps = 8

    def __init__(self, units):
        self.units = int(units)
        if self.units < 1:
            raise ValueError(f"an implicit layer needs units >= 1, got {units!r}")
        self.weights = None

    @property
    def token(self):
        return f"nemon{self.units}"

    def build(self, in_shape, rng, dtype, gamma=0.5):
        if len(in_shape) != 1:
            raise ValueError(f"a dense implicit layer reads flat states, got shape {in_shape}")
        n, n_in = self.units, in_shape[0]
        self.gamma, self.dtype = float(gamma), dtype
        self._init_map(rng, n, n_in)
        self._terms = n_in
        return (n,)

    def _state_equilibrium(self, X, options):
        return self.equilibrium(X, **options)

    def milp(self, expr, box_in, box_out, relaxed):
        """x* = relu(z), z = A x* + B u + b, by the big-M encoding over the box of z that the boxes of x*
        (``box_out``, the embedded network's) and of u give, narrowed by x* = relu(z) (:mod:`nemon_np.exact`)."""
        import cvxpy as cp
        A, B, b = (np.asarray(p, np.float64) for p in (self.A, self.B, self.b))
        (u_lo, u_hi), (x_lo, x_hi) = box_in, box_out
        x = cp.Variable(len(x_lo))
        z_lo, z_hi = affine_box(np.hstack([A, B]), b, np.concatenate([x_lo + x_hi, u_lo + u_hi]) / 2,
                                np.concatenate([x_hi - x_lo, u_hi - u_lo]) / 2)
        z_lo, z_hi = narrow_preactivation_box(z_lo, z_hi, x_lo, x_hi)[:2]
        cons, binaries = relu_constraints(x, A @ x + B @ expr + b, z_lo, z_hi, relaxed)
        return x, cons + [x >= x_lo, x <= x_hi], binaries


@_register
class ImplicitConv(ConvImplicitMap, _ImplicitLayer):
    """The conv NEMON layer x* = relu(K * x* + B * u + b) (:class:`nemon_np.ConvNEMON`'s implicit
    layer) on channel-last images, C channels, k x k kernels, circular padding (the paper's; exact
    mu_inf) or zero padding (an upper bound), mu_inf(K) <= gamma per output channel, initialized as
    ConvNEMON initializes K, B and b; its constraint modes are the conv model's. The output has the
    input's size and C channels."""
    kind = "cnemon"
    spatial_input = True
    constraint_kind = "conv"
    crown_steps = 2

    def __init__(self, channels, kernel=3, padding="circular"):
        self._channels, self.kernel, self.padding = int(channels), int(kernel), padding
        if self._channels < 1 or self.kernel < 1 or self.kernel % 2 == 0 or padding not in PADDINGS:
            raise ValueError(f"a conv implicit layer needs channels >= 1, an odd kernel and padding "
                             f"{' or '.join(PADDINGS)}, got {channels!r}, {kernel!r}, {padding!r}")

    @property
    def token(self):
        return f"cnemon{self._channels}k{self.kernel}" + ("z" if self.padding == "zero" else "")

    def build(self, in_shape, rng, dtype, gamma=0.5):
        if len(in_shape) != 3:
            raise ValueError(f"a conv implicit layer reads images (H, W, C), got shape {in_shape}")
        H, W, C_in = in_shape
        C, k = self._channels, self.kernel
        self.gamma, self.dtype, self.image_size, self.in_channels = float(gamma), dtype, (H, W), C_in
        self._init_map(rng, C, C_in)
        self._terms = C_in * k * k
        return (H, W, C)

    def _state_inputs(self, X, dtype):
        X = np.asarray(X)
        if X.ndim != 4 or X.shape[1:] != self.image_size + (self.in_channels,):
            raise ValueError(f"a conv implicit layer reads (batch, {self.image_size[0]}, {self.image_size[1]}, "
                             f"{self.in_channels}) states, got {X.shape}")
        return np.ascontiguousarray(X, dtype=dtype)

    def _state_equilibrium(self, X, options):
        return self._equilibrium(X, options.get("tol", 1e-6), options.get("max_iter", 500),
                                 options.get("method", "average"), options.get("alpha"), None,
                                 options.get("on_violation", "raise"), options.get("tol_mode", "absolute"))

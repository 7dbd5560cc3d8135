"""Convolutional NEMON: x = relu(K * x + B * u + b) on C channels, average pooling, a read-out.

The implicit layer's A is the convolution with K (see :mod:`nemon_np.conv`), well-posed when
mu_inf_conv(K) < 1; B * u is a convolution of the input image with a (C, C_in, k, k) kernel,
b a per-channel bias. Logits y = W pool_s(x) + c, pool_s the s x s average pooling (or, with a hidden
read-out layer, y = W relu(H pool_s(x) + h) + c: :mod:`nemon_np.readout`).

Implicit gradients as for the dense model (DESIGN.md): with z the pre-activation at the fixed
point, D = 1[z > 0] and g = dL/dx*, solve w = g + K^T * (D w) and put delta = D w; then
dL/dK = sum delta (x) x* (a correlation of delta with x*), dL/dB likewise with u,
dL/db = sum over pixels of delta, dL/du = B^T * delta.

The state is kept channel-last, (m, H, W, C), which is what the fast convolution works in;
inputs are given as the data loaders give them, (m, C_in, H, W) or flattened from it.
"""
import warnings

import numpy as np
from scipy.optimize import OptimizeResult

from ._threads import check_n_jobs
from ._validation import all_finite, as_float_dtype, check_gamma, check_readout_hidden
from .conv import (PADDINGS, average_pool, average_pool_transpose, conv_apply_channel_last, mu_inf_conv,
                   project_conv_mu_inf, transpose_kernel, weight_grad_channel_last)
from .conv_solvers import conv_fixed_point, get_conv_product
from .interval import sum_and_difference
from .base import ImplicitClassifier, check_labels, read_model_file, write_model_file
from .losses import softmax_cross_entropy
from .readout import init_hidden_layer
from .solvers import (WellPosednessError, WellPosednessWarning, _check_tol_mode, _contraction_rate, _warn_unconverged,
                      contraction_alpha, jacobian_free_adjoint)

__all__ = ["ConvNEMON", "ConvImplicitMap", "CONV_METHODS", "CONV_ADJOINTS", "check_conv_solver"]

# The solvers a conv model has: the fused average iteration, or it with safeguarded Anderson
# acceleration (the dense solver's step on the flattened state).
CONV_METHODS = ("average", "anderson")
CONV_ADJOINTS = ("iterative", "anderson", "jfb")


def check_conv_solver(method, adjoint="iterative"):
    """ValueError unless ``method`` is one of CONV_METHODS and ``adjoint`` one of CONV_ADJOINTS."""
    if method not in CONV_METHODS or adjoint not in CONV_ADJOINTS:
        raise ValueError(f"a conv model solves with solver {' or '.join(CONV_METHODS)} and adjoint "
                         f"{' or '.join(CONV_ADJOINTS)}, got solver {method!r} and adjoint {adjoint!r}")


FORMAT_NAME = "nemon_np.ConvNEMON"
FORMAT_VERSION = 2   # the newest version read; 2 adds the optional hidden read-out layer
PARAMETERS = ("K", "B", "b", "C", "c")


class ConvImplicitMap:
    """The conv implicit map x* = relu(K * x* + B * u + b) on channel-last states (m, H, W, C) of
    channel-last inputs (m, H, W, C_in): mu_inf(K), the forward solve, the adjoint for a given
    dL/dx*, and the hooks of :class:`nemon_np.base.EmbeddedNetwork`. Mixed into :class:`ConvNEMON`
    and into the conv implicit layer of a stack (:class:`nemon_np.layers.ImplicitConv`); it needs the
    attributes K, B, b, kernel, padding, image_size, n_jobs and dtype.
    """

    weights = None   # the certificate is the unweighted mu_inf of the convolution
    n_jobs = 1       # models read from files start with one thread
    # How the solvers take K * x (nemon_np.conv_solvers.CONV_PRODUCTS): "auto" is the FFT for
    # circular padding and k >= 5, the taps otherwise; the same iterates up to rounding.
    conv_product = "auto"
    implicit = "K"

    @property
    def channels(self):
        return self.K.shape[0]

    @property
    def n_hidden(self):
        return self.channels * self.image_size[0] * self.image_size[1]

    def mu_inf(self):
        """mu_inf of the convolution K (exact for circular padding, an upper bound for zero)."""
        return mu_inf_conv(self.K)

    def alpha_star(self):
        """alpha* = 1 / (1 - min(min_c K[c, c, centre], 0)): the average iteration's certified step, the
        centre taps being the operator's diagonal (DESIGN.md)."""
        p = self.kernel // 2
        return contraction_alpha(self.K[:, :, p, p])

    # -- the hooks of the interval methods (nemon_np.base.EmbeddedNetwork) ----------------
    def _inject(self, B, U):
        return conv_apply_channel_last(B, U, self.padding, n_jobs=self.n_jobs)

    def _inject_grad(self, delta, U):
        return weight_grad_channel_last(delta, U, self.kernel, self.padding, n_jobs=self.n_jobs)

    _apply_implicit = _inject

    def _implicit_grad(self, delta, X):
        # The product's own weight gradient: by FFT where the solver takes the FFT (circular, k >= 5).
        product = get_conv_product(self.conv_product, self.padding, self.kernel, False)
        return product.weight_grad(delta, X, self.kernel, self.padding, self.n_jobs)

    @staticmethod
    def _transposed(K):
        return transpose_kernel(K)

    def _state_weights(self):
        return None

    @staticmethod
    def _adjoint_tolerance(tol, units):
        # The adjoint residual is an l_1 norm over all units: the same residual per unit as a
        # dense model of 100 units at tol.
        return tol * units / 100

    def _solve_embedded(self, K, Q, tol, max_iter, method, alpha=None, tol_mode="absolute", X0=None):
        check_conv_solver(method)
        alpha, mu = self._alpha(alpha, "raise")   # the embedded kernel has K's centre taps: the same alpha*
        K_sum, K_diff = sum_and_difference(K)
        X, Z, its, res = conv_fixed_point(K_sum, Q, alpha, tol, max_iter, self.padding, X0=X0, K_diff=K_diff,
                                          relative=_check_tol_mode(tol_mode),
                                          **self._solver(method, alpha, mu, embedded=True))
        info = OptimizeResult(iterations=its, residual=res.astype(np.float64), converged=res <= Q.dtype.type(tol),
                              preactivation=Z, alpha=alpha, mu_inf=mu, method=method)
        _warn_unconverged(info, tol, "embedded forward")
        return X, info

    def _adjoint_embedded(self, K, mask, G, alpha, tol, max_iter, method):
        check_conv_solver("average", method)
        if method == "jfb":
            return jacobian_free_adjoint(G)
        K_sum, K_diff = sum_and_difference(K)
        W, _, its, res = conv_fixed_point(transpose_kernel(K_sum), G, alpha, tol, max_iter, self.padding, relu=False,
                                          l1=True, S=mask, X0=G, K_diff=transpose_kernel(K_diff),
                                          **self._solver(method, alpha, self.mu_inf(), embedded=True))
        return W, OptimizeResult(iterations=its, residual=res.astype(np.float64), converged=res <= G.dtype.type(tol))

    def _alpha(self, alpha, on_violation):
        mu = self.mu_inf()
        if mu >= 1:
            msg = f"mu_inf(K) = {mu:.6g} >= 1: the fixed point may not exist or be unique"
            if on_violation == "raise":
                raise WellPosednessError(msg)
            warnings.warn(msg, WellPosednessWarning, stacklevel=3)
        alpha_star = self.alpha_star()
        alpha = alpha_star if alpha is None else float(alpha)
        if not 0 < alpha <= alpha_star * (1 + 1e-12):
            raise WellPosednessError(f"alpha = {alpha:.6g} outside (0, alpha* = {alpha_star:.6g}]")
        return alpha, mu

    def _solver(self, method, alpha, mu, embedded=False):
        """conv_fixed_point's method, the contraction factor rho = 1 - alpha (1 - max(mu, 0)) that
        Anderson's safeguard enforces, the threads and the product (``conv_product``; the embedded
        network's sum-difference form has the taps only)."""
        return dict(method="anderson" if method == "anderson" else "average", rho=_contraction_rate(alpha, mu),
                    n_jobs=self.n_jobs, product="direct" if embedded else self.conv_product)

    def _equilibrium(self, Ucl, tol, max_iter, method, alpha, X0, on_violation, tol_mode="absolute"):
        """:meth:`equilibrium` of a channel-last batch already checked by :meth:`_images`."""
        return self._solve_injected(self._inject(self.B, Ucl) + self.b, tol, max_iter, method, alpha, X0,
                                    on_violation, tol_mode)

    def _solve_injected(self, Q, tol, max_iter, method, alpha, X0, on_violation, tol_mode="absolute"):
        """:meth:`_equilibrium` from the injection Q = B * u + b (m, H, W, C) instead of the inputs."""
        check_conv_solver(method)
        alpha, mu = self._alpha(alpha, on_violation)
        X, Z, its, res = conv_fixed_point(self.K, Q, alpha, tol, max_iter, self.padding, X0=X0,
                                          relative=_check_tol_mode(tol_mode), **self._solver(method, alpha, mu))
        info = OptimizeResult(iterations=its, residual=res.astype(np.float64), converged=res <= self.dtype(tol),
                              preactivation=Z, alpha=alpha, mu_inf=mu, method=method)
        _warn_unconverged(info, tol, "forward fixed point")
        return X, info

    def _init_map(self, rng, C, C_in):
        """K, B, b of C channels on C_in input channels from ``rng``, in the attributes kernel, gamma
        and dtype: K normal with scale 0.1 / sqrt(C k^2), projected per output channel onto
        mu_inf(K) <= gamma; B uniform(-1, 1) / sqrt(C_in k^2) (PyTorch Conv2d's scale); b zero."""
        k = self.kernel
        K0 = rng.normal(scale=0.1 / np.sqrt(C * k * k), size=(C, C, k, k)).astype(self.dtype)
        self.K = project_conv_mu_inf(K0, self.gamma)
        self.B = (rng.uniform(-1, 1, size=(C, C_in, k, k)) / np.sqrt(C_in * k * k)).astype(self.dtype)
        self.b = np.zeros(C, self.dtype)

    def _state_adjoint(self, finfo, G, tol, max_iter, method, alpha, adjoint, adjoint_tol, on_violation):
        """(delta, binfo): delta = D w / m from the adjoint w = G + K^T * (D w) at the forward solve
        ``finfo`` (D = 1[z > 0]), G = m dL/dx* (the per-sample scale, so that tol means the same at any
        batch size). The adjoint residual is an l_1 norm over all C H W units: by default the same
        residual per unit as a dense model of 100 units at tol."""
        check_conv_solver(method, adjoint)
        mask = (finfo.preactivation > 0).astype(self.dtype)
        m = len(G)
        if adjoint == "jfb":
            Wadj, binfo = jacobian_free_adjoint(G)
            return mask * Wadj / m, binfo
        adjoint_tol = tol * self.n_hidden / 100 if adjoint_tol is None else adjoint_tol
        Wadj, _, bits, bres = conv_fixed_point(transpose_kernel(self.K), G, finfo.alpha, adjoint_tol, max_iter,
                                               self.padding, relu=False, l1=True, S=mask, X0=G,
                                               **self._solver(adjoint, finfo.alpha, finfo.mu_inf))
        binfo = OptimizeResult(iterations=bits, residual=bres.astype(np.float64),
                               converged=bres <= self.dtype(adjoint_tol))
        return mask * Wadj / m, binfo

    def _input_vjp(self, delta):
        """B^T * delta: (m, H, W, C_in), channel-last."""
        return self._inject(transpose_kernel(self.B), delta)


class ConvNEMON(ConvImplicitMap, ImplicitClassifier):
    """Convolutional NEMON classifier.

    Parameters
    ----------
    in_channels : int; image_size : (H, W)
    channels : int, C; kernel : odd int, k; n_out : int; pool : int, s (divides H and W)
    gamma : float < 1, mu_inf_conv(K) <= gamma at initialization; padding : "circular" or "zero"
    seed : int; dtype : float32 or float64
    n_jobs : int, threads for the convolutions, weight gradients and solver steps (a run-time
        setting, not saved; results the same up to rounding; 2 on an otherwise idle 2-core machine)
    readout_hidden : int, width p of an explicit hidden ReLU layer between the pooled features and
        the logits, ``y = C relu(H pool(x) + h) + c`` (:mod:`nemon_np.readout`); 0 (the default): linear

    Attributes
    ----------
    K (C, C, k, k), B (C, in_channels, k, k), b (C,), c (n_out,)
    C (n_out, (H / s) (W / s) C): the head, on pooled features in (row, column, channel) order
        (with a hidden read-out layer: H (p, (H / s) (W / s) C), h (p,) and C (n_out, p))
    metadata : dict saved with the model (dataset, normalization, ...)
    """

    crown_steps = 2  # the crown certificate's default (nemon_np.certificates.CrownCertificate)

    def __init__(self, in_channels, image_size, channels=32, kernel=3, n_out=10, pool=4, gamma=0.95,
                 padding="circular", seed=0, dtype=np.float64, n_jobs=1, readout_hidden=0):
        H, W = (int(v) for v in image_size)
        for name, v in (("in_channels", in_channels), ("channels", channels), ("n_out", n_out), ("pool", pool)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive whole number, got {v!r}")
        if H % pool or W % pool:
            raise ValueError(f"pool = {pool} must divide the image size {H} x {W}")
        if int(kernel) != kernel or kernel % 2 == 0 or kernel < 1:
            raise ValueError(f"kernel must be a positive odd size, got {kernel!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.gamma, self.dtype, self.padding = check_gamma(gamma), as_float_dtype(dtype), padding
        self.in_channels, self.image_size, self.pool, self.kernel = int(in_channels), (H, W), int(pool), int(kernel)
        self.seed, self.n_jobs = int(seed), check_n_jobs(n_jobs)
        readout_hidden = check_readout_hidden(readout_hidden)
        self.metadata = {}
        rng = np.random.default_rng(self.seed)
        C = int(channels)
        self._init_map(rng, C, int(in_channels))
        n_pooled = C * (H // pool) * (W // pool)
        if readout_hidden:
            self.H, self.h, self.C = init_hidden_layer(rng, readout_hidden, n_pooled, n_out, self.dtype)
        else:
            self.C = (rng.uniform(-1, 1, size=(n_out, n_pooled)) / np.sqrt(n_pooled)).astype(self.dtype)
        self.c = np.zeros(n_out, self.dtype)

    # -- shapes -----------------------------------------------------------
    @property
    def n_in(self):
        return self.in_channels * self.image_size[0] * self.image_size[1]

    def _images(self, U, dtype=None):
        """U as a channel-last batch (m, H, W, C_in) of ``dtype`` (default the model's)."""
        U = np.asarray(U)
        H, W = self.image_size
        if U.ndim == 1:
            U = U[None, :]
        if U.ndim == 2 and U.shape[1] == self.n_in:
            U = U.reshape(len(U), self.in_channels, H, W)
        if U.ndim != 4 or U.shape[1:] != (self.in_channels, H, W):
            raise ValueError(f"U must have shape (batch, {self.in_channels}, {H}, {W}) or (batch, {self.n_in}), "
                             f"got {U.shape}")
        if not all_finite(U):
            raise ValueError("U has non-finite entries (NaN or inf)")
        return np.ascontiguousarray(U.transpose(0, 2, 3, 1), dtype=self.dtype if dtype is None else dtype)

    # -- the read-out's features (nemon_np.base.ImplicitClassifier) ----------------------
    _state_inputs = _images

    @property
    def _feature_terms(self):
        return self.pool * self.pool

    def _features(self, X):
        return self._pool(X)

    def _features_grad(self, G):
        return self._pool_transpose(G)

    # -- forward ----------------------------------------------------------
    def equilibrium(self, U, tol=1e-6, max_iter=500, method="average", alpha=None, X0=None, on_violation="raise",
                    tol_mode="absolute"):
        """Fixed points x* (m, H, W, C), channel-last, and an OptimizeResult with per-sample
        ``iterations``, ``residual`` (l_inf), ``converged`` and the ``preactivation`` z."""
        return self._equilibrium(self._images(U), tol, max_iter, method, alpha, X0, on_violation, tol_mode)

    def _pool(self, X):
        return average_pool(X, self.pool).reshape(len(X), -1)

    def _pool_transpose(self, G):
        """The transpose of :meth:`_pool`: pooled gradients G (m, (H/s)(W/s)C) spread over each s x s
        window with weight 1 / s^2, (m, H, W, C)."""
        return average_pool_transpose(G, self.pool, self.image_size)

    # -- backward ---------------------------------------------------------
    def _backward(self, U, y, tol, max_iter, method, alpha, adjoint, adjoint_tol, on_violation, dY=None,
                  tol_mode="absolute", X0=None):
        """Forward solve (from X0, default zeros), then the adjoint for dL/dY (the cross-entropy's, or
        ``dY``'s); returns the channel-last input and fixed points, loss, the read-out's gradients,
        delta and solver info."""
        check_conv_solver(method, adjoint)
        Ucl = self._images(U)
        X, finfo = self._equilibrium(Ucl, tol, max_iter, method, alpha, X0, on_violation, tol_mode)
        pooled = self._pool(X)
        finfo["logits"], G, P = self._readout_forward(pooled)
        m = len(X)
        if dY is None:
            loss, dY = softmax_cross_entropy(finfo["logits"], check_labels(y, m, self.n_out))
        else:
            loss, dY = None, np.asarray(dY, dtype=self.dtype)
            if dY.shape != (m, self.n_out):
                raise ValueError(f"dY must have shape ({m}, {self.n_out}), got {dY.shape}")
        dF, readout_grads = self._readout_backward(dY, pooled, G, P)
        # Per-sample scale (m dF), so that tol means the same at any batch size.
        g = self._pool_transpose(m * dF)
        delta, binfo = self._state_adjoint(finfo, g, tol, max_iter, method, alpha, adjoint, adjoint_tol, on_violation)
        return Ucl, X, loss, readout_grads, delta, {"forward": finfo, "backward": binfo, "state": X}

    def _input_gradient(self, U, delta):
        """B^T * delta (m, H, W, C_in), in U's layout: flat or (m, C_in, H, W)."""
        G = np.ascontiguousarray(self._input_vjp(delta).transpose(0, 3, 1, 2))
        return G.reshape(len(G), -1) if np.ndim(U) <= 2 else G

    def loss_and_grad(self, U, y, *, tol=1e-6, max_iter=500, method="average", alpha=None, adjoint="iterative",
                      adjoint_tol=None, return_info=False, on_violation="raise", with_input=False, tol_mode="absolute",
                      X0=None):
        """Mean softmax cross-entropy and its gradients {"K","B","b","C","c"} (and "U" if with_input),
        plus ``{"forward", "backward", "state"}`` solver info and fixed points if return_info (forward
        info holds the logits).

        ``adjoint_tol`` bounds the adjoint's l_1 residual; default ``tol * n_hidden / 100``. ``X0``
        (m, H, W, C) starts the forward solve (default zeros), as in :meth:`nemon_np.NEMON.loss_and_grad`."""
        Ucl, X, loss, readout_grads, delta, info = self._backward(U, y, tol, max_iter, method, alpha, adjoint,
                                                                  adjoint_tol, on_violation, tol_mode=tol_mode, X0=X0)
        grads = {"K": self._implicit_grad(delta, X), "B": self._inject_grad(delta, Ucl),
                 "b": delta.sum(axis=(0, 1, 2)), **readout_grads}
        if with_input:
            grads["U"] = self._input_gradient(U, delta)
        return (loss, grads, info) if return_info else (loss, grads)

    def input_vjp(self, U, dY, *, tol=1e-6, max_iter=500, method="average", alpha=None, adjoint="iterative",
                  adjoint_tol=None, on_violation="raise", tol_mode="absolute"):
        """``d/dU sum_{i,k} dY_ik y_ik(U)``, in U's layout (see :meth:`nemon_np.NEMON.input_vjp`)."""
        delta = self._backward(U, None, tol, max_iter, method, alpha, adjoint, adjoint_tol, on_violation, dY=dY,
                               tol_mode=tol_mode)[4]
        return self._input_gradient(U, delta)

    def input_grad(self, U, y, *, tol=1e-6, max_iter=500, method="average", alpha=None, adjoint="iterative",
                   adjoint_tol=None, on_violation="raise", tol_mode="absolute"):
        """Gradient of the mean loss with respect to U, in U's layout: ``B^T * delta``."""
        delta = self._backward(U, y, tol, max_iter, method, alpha, adjoint, adjoint_tol, on_violation,
                               tol_mode=tol_mode)[4]
        return self._input_gradient(U, delta)

    # -- persistence ------------------------------------------------------
    def save(self, path):
        """Write every parameter and setting to one ``.npz`` file (no pickled objects)."""
        write_model_file(path, FORMAT_NAME, self._file_version(), self.params(), self.metadata, gamma=self.gamma,
                         seed=self.seed, dtype=np.dtype(self.dtype).name, padding=self.padding, pool=self.pool,
                         image_size=self.image_size, in_channels=self.in_channels)

    @classmethod
    def load(cls, path):
        """Read a model written by :meth:`save`; a truncated or foreign file is a ``ValueError``."""
        data = read_model_file(path, FORMAT_NAME, FORMAT_VERSION,
                               PARAMETERS + ("gamma", "seed", "dtype", "padding", "pool", "image_size", "in_channels"))
        model = cls.__new__(cls)
        model.gamma, model.seed = float(data["gamma"]), int(data["seed"])
        model.dtype = as_float_dtype(str(data["dtype"]))
        model.padding, model.pool = str(data["padding"]), int(data["pool"])
        model.image_size, model.in_channels = tuple(int(v) for v in data["image_size"]), int(data["in_channels"])
        for k in ("K", "B", "b"):
            setattr(model, k, np.ascontiguousarray(data[k], dtype=model.dtype))
        model.kernel = model.K.shape[2]
        H, W = model.image_size
        C = model.K.shape[0]
        if (model.K.shape != (C, C, model.kernel, model.kernel)
                or model.B.shape != (C, model.in_channels) + model.K.shape[2:] or model.b.shape != (C,)):
            raise ValueError(f"{path}: parameter shapes are inconsistent (K {model.K.shape}, B {model.B.shape}, "
                             f"b {model.b.shape})")
        model._load_readout(data, C * (H // model.pool) * (W // model.pool), path)
        model.metadata = data["metadata"]
        return model

    def __repr__(self):
        H, W = self.image_size
        return (f"ConvNEMON(in_channels={self.in_channels}, image_size=({H}, {W}), channels={self.channels}, "
                f"kernel={self.kernel}, pool={self.pool}, n_out={self.n_out}, gamma={self.gamma}, "
                f"padding={self.padding!r}, dtype={np.dtype(self.dtype).name}"
                + (f", readout_hidden={self.readout_hidden})" if self.H is not None else ")"))

"""Convolutional NEMON: x = relu(K * x + B * u + b) on C channels, average pooling, linear head.

The implicit layer's A is the convolution with K (see :mod:`nemon_np.conv`), well-posed when
mu_inf_conv(K) < 1; B * u is a convolution of the input image with a (C, C_in, k, k) kernel,
b a per-channel bias. Logits y = W pool_s(x) + c, pool_s the s x s average pooling.

Implicit gradients as for the dense model (DESIGN.md): with z the pre-activation at the fixed
point, D = 1[z > 0] and g = dL/dx*, solve w = g + K^T * (D w) and put delta = D w; then
dL/dK = sum delta (x) x* (a correlation of delta with x*), dL/dB likewise with u,
dL/db = sum over pixels of delta, dL/du = B^T * delta.
"""
import numpy as np

from ._validation import as_float_dtype, check_gamma
from .conv import PADDINGS, conv_apply, conv_transpose, conv_weight_grad, mu_inf_conv, project_conv_mu_inf
from .models import softmax_cross_entropy
from .solvers import WellPosednessError, averaged_fixed_point_operator

__all__ = ["ConvNEMON"]


class ConvNEMON:
    """Convolutional NEMON classifier.

    Parameters
    ----------
    in_channels : int; image_size : (H, W)
    channels : int, C; kernel : odd int, k; n_out : int; pool : int, s (divides H and W)
    gamma : float < 1, bound on mu_inf_conv(K) at initialization; padding : "circular" or "zero"
    seed : int; dtype : float32 or float64

    Attributes
    ----------
    K (C, C, k, k), B (C, in_channels, k, k), b (C,), C (n_out, C H W / s^2), c (n_out,)
    """

    def __init__(self, in_channels, image_size, channels=32, kernel=3, n_out=10, pool=4, gamma=0.5,
                 padding="circular", seed=0, dtype=np.float64):
        H, W = image_size
        if H % pool or W % pool:
            raise ValueError(f"pool = {pool} must divide the image size {image_size}")
        if kernel % 2 == 0 or kernel < 1:
            raise ValueError(f"kernel must be a positive odd size, got {kernel}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.gamma, self.dtype, self.padding = check_gamma(gamma), as_float_dtype(dtype), padding
        self.in_channels, self.image_size, self.pool, self.kernel = in_channels, (H, W), pool, kernel
        rng = np.random.default_rng(seed)
        C, k = channels, kernel
        K0 = rng.normal(scale=0.1 / np.sqrt(C * k * k), size=(C, C, k, k)).astype(self.dtype)
        self.K = project_conv_mu_inf(K0, self.gamma)
        self.B = (rng.uniform(-1, 1, size=(C, in_channels, k, k)) / np.sqrt(in_channels * k * k)).astype(self.dtype)
        self.b = np.zeros(C, self.dtype)
        n_pooled = C * (H // pool) * (W // pool)
        self.C = (rng.uniform(-1, 1, size=(n_out, n_pooled)) / np.sqrt(n_pooled)).astype(self.dtype)
        self.c = np.zeros(n_out, self.dtype)

    @property
    def channels(self):
        return self.K.shape[0]

    def params(self):
        return {"K": self.K, "B": self.B, "b": self.b, "C": self.C, "c": self.c}

    def mu_inf(self):
        """mu_inf of the convolution K (exact for circular padding, an upper bound for zero)."""
        return mu_inf_conv(self.K)

    def _images(self, U):
        U = np.asarray(U, dtype=self.dtype)
        H, W = self.image_size
        if U.ndim == 2:
            U = U.reshape(len(U), self.in_channels, H, W)
        if U.shape[1:] != (self.in_channels, H, W):
            raise ValueError(f"U must have shape (batch, {self.in_channels}, {H}, {W}) or flat, got {U.shape}")
        return U

    def _alpha(self, alpha):
        mu = self.mu_inf()
        if mu >= 1:
            raise WellPosednessError(f"mu_inf(K) = {mu:.6g} >= 1: the fixed point may not exist or be unique")
        k = self.kernel // 2
        alpha_star = 1.0 / (1.0 - min(float(np.diag(self.K[:, :, k, k]).min()), 0.0))
        alpha = alpha_star if alpha is None else float(alpha)
        if not 0 < alpha <= alpha_star * (1 + 1e-12):
            raise WellPosednessError(f"alpha = {alpha:.6g} outside (0, alpha* = {alpha_star:.6g}]")
        return alpha

    def _flat_apply(self, K, transpose):
        shape = (self.channels,) + self.image_size
        op = conv_transpose if transpose else conv_apply
        return lambda X: op(K, X.reshape((len(X),) + shape), self.padding).reshape(len(X), -1)

    def equilibrium(self, U, tol=1e-6, max_iter=500, alpha=None):
        """Fixed points x* (m, C, H, W) and an info dict (per-sample iterations, residual, preactivation)."""
        U = self._images(U)
        alpha = self._alpha(alpha)
        Q = (conv_apply(self.B, U, self.padding) + self.b[None, :, None, None]).reshape(len(U), -1)
        X, Z, its, res = averaged_fixed_point_operator(self._flat_apply(self.K, False), Q, alpha, tol, max_iter)
        shape = (len(U), self.channels) + self.image_size
        return X.reshape(shape), {"iterations": its, "residual": res, "preactivation": Z.reshape(shape),
                                  "alpha": alpha}

    def _pool(self, X):
        m, C, H, W = X.shape
        s = self.pool
        return X.reshape(m, C, H // s, s, W // s, s).mean(axis=(3, 5)).reshape(m, -1)

    def logits(self, U, **solver_options):
        X, _ = self.equilibrium(U, **solver_options)
        return self._pool(X) @ self.C.T + self.c

    def loss_and_grad(self, U, y, tol=1e-6, max_iter=500, alpha=None, adjoint_tol=None, with_input=False):
        """Mean cross-entropy and its gradients {"K","B","b","C","c"} (and "U" if with_input)."""
        U = self._images(U)
        X, info = self.equilibrium(U, tol=tol, max_iter=max_iter, alpha=alpha)
        pooled = self._pool(X)
        loss, dY = softmax_cross_entropy(pooled @ self.C.T + self.c, np.asarray(y))
        m, C, H, W = X.shape
        s = self.pool
        g_pooled = (m * dY @ self.C).reshape(m, C, H // s, W // s) / (s * s)
        g = np.repeat(np.repeat(g_pooled, s, axis=2), s, axis=3).reshape(m, -1)
        mask = (info["preactivation"] > 0).astype(self.dtype).reshape(m, -1)
        Wadj, _, _, _ = averaged_fixed_point_operator(self._flat_apply(self.K, True), g, info["alpha"],
                                                      tol if adjoint_tol is None else adjoint_tol, max_iter,
                                                      relu=False, l1=True, S=mask, X0=g)
        delta = ((mask * Wadj) / m).reshape(X.shape)
        grads = {"K": conv_weight_grad(delta, X, self.kernel, self.padding),
                 "B": conv_weight_grad(delta, U, self.kernel, self.padding),
                 "b": delta.sum(axis=(0, 2, 3)), "C": dY.T @ pooled, "c": dY.sum(axis=0)}
        if with_input:
            grads["U"] = conv_transpose(self.B, delta, self.padding)
        return loss, grads

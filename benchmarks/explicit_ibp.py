"""Plain interval bound propagation (IBP, Gowal et al. 2018) for the explicit networks a user would
otherwise pick, trained with the same loss and schedule as certified NEMON training: the baseline
of the side-by-side in bench_certified.py. Not part of the library's API.

* dense: one hidden ReLU layer of width n, h = relu(W u + b), y = V h + c;
* conv: one k x k convolution of C channels, h = relu(B * u + b), s x s average pooling, a linear head;
* either with the hidden read-out layer of the NEMON it is the twin of (``readout_hidden`` p > 0):
  y = V relu(H f + h') + c (nemon_np.readout), f the layer's (pooled) output.

IBP through the hidden layer: with the input box's centre u_c and radius u_r, h_lo = relu(W u_c -
|W| u_r + b), h_hi = relu(W u_c + |W| u_r + b); the read-out, its margins' lower bounds and the
loss kappa CE(y) + (1 - kappa) CE(-m_lo) are the library's own (the reference model's
``_readout_forward``, ``_readout_backward`` and ``_robust_readout_loss``); the layer's gradients
are written out by hand below.

Each network is a NEMON whose implicit matrix is zero (x = relu(0 x + B u + b)); :func:`as_nemon`
builds that model, so that both kinds are certified by the same sound code (nemon_np.certify).
"""
import math
import time

import numpy as np

from nemon_np import ConvNEMON, NEMON
from nemon_np.conv import conv_apply_channel_last, weight_grad_channel_last
from nemon_np.interval import center_radius
from nemon_np.losses import softmax_cross_entropy
from nemon_np.optim import Adam, learning_rate


class ExplicitNet:
    """One hidden ReLU layer (dense, or conv with pooling when ``image_shape`` is given), initialized as
    the NEMON or ConvNEMON of the same sizes and seed initializes its B and C."""

    def __init__(self, n_in, width, n_out, seed=0, dtype=np.float32, image_shape=None, kernel=3, pool=2,
                 padding="circular", readout_hidden=0):
        self.image_shape = image_shape
        if image_shape is None:
            ref = NEMON(n_in, width, n_out, seed=seed, dtype=dtype, readout_hidden=readout_hidden)
        else:
            ref = ConvNEMON(image_shape[0], image_shape[1:], channels=width, kernel=kernel, n_out=n_out, pool=pool,
                            padding=padding, seed=seed, dtype=dtype, readout_hidden=readout_hidden)
        self.ref = ref
        # The reference model's own arrays: the optimizer updates them in place, so its read-out
        # methods see the trained values.
        self.params = {k: v for k, v in ref.params().items() if k != ref.implicit}

    # The hidden layer's pre-activation and its weight gradient, dense or conv.
    def _layer(self, W, U):
        return U @ W.T if self.image_shape is None else conv_apply_channel_last(W, U, self.ref.padding)

    def _layer_grad(self, D, U):
        return D.T @ U if self.image_shape is None else weight_grad_channel_last(D, U, self.ref.kernel,
                                                                                 self.ref.padding)

    def _features(self, H):
        return H if self.image_shape is None else self.ref._pool(H)

    def _features_grad(self, G):
        return G if self.image_shape is None else self.ref._pool_transpose(G)

    def _inputs(self, U):
        return self.ref._state_inputs(U)

    def loss_and_grad(self, U, y, U_lo=None, U_hi=None, kappa=1.0):
        """kappa CE(y(U)) + (1 - kappa) CE(-m_lo) over the boxes [U_lo, U_hi], and its gradients."""
        p = self.params
        U = self._inputs(U)
        Z = self._layer(p["B"], U) + p["b"]
        F = self._features(np.maximum(Z, 0))
        logits, G, P = self.ref._readout_forward(F)
        loss, dY = softmax_cross_entropy(logits, y)
        dF, grads = self.ref._readout_backward(dY, F, G, P)
        dZ = self._features_grad(dF) * (Z > 0)
        grads.update(B=self._layer_grad(dZ, U), b=dZ.reshape(-1, dZ.shape[-1]).sum(axis=0))
        if kappa == 1:
            return loss, grads
        U_c, U_r = center_radius(self._inputs(U_lo), self._inputs(U_hi))
        Z_c, Z_r = self._layer(p["B"], U_c) + p["b"], self._layer(np.abs(p["B"]), U_r)
        Z_lo, Z_hi = Z_c - Z_r, Z_c + Z_r
        F_c, F_r = center_radius(self._features(np.maximum(Z_lo, 0)), self._features(np.maximum(Z_hi, 0)))
        robust, _, dF_c, dF_r, robust_grads = self.ref._robust_readout_loss(F_c, F_r, y)
        dZ_lo = self._features_grad((dF_c - dF_r) / 2) * (Z_lo > 0)
        dZ_hi = self._features_grad((dF_c + dF_r) / 2) * (Z_hi > 0)
        dZ_c, dZ_r = dZ_lo + dZ_hi, dZ_hi - dZ_lo
        robust_grads.update(B=self._layer_grad(dZ_c, U_c) + np.sign(p["B"]) * self._layer_grad(dZ_r, U_r),
                            b=dZ_c.reshape(-1, dZ_c.shape[-1]).sum(axis=0))
        return (kappa * loss + (1 - kappa) * robust,
                {k: (kappa * g + (1 - kappa) * robust_grads[k]).astype(g.dtype) for k, g in grads.items()})

    def as_nemon(self):
        """The same network as a NEMON (ConvNEMON) with a zero implicit matrix, relu(0 x + B u + b): the
        reference model itself, whose arrays the training updated in place."""
        model = self.ref
        setattr(model, model.implicit, np.zeros_like(getattr(model, model.implicit)))
        return model


def train_explicit(net, X, y, config, input_ball, progress=None):
    """Minibatch Adam on ``net`` with the schedule of a :class:`nemon_np.training.TrainConfig` (epochs,
    batch size, learning rate and its schedule, seed, augmentation, and the certified eps/kappa
    ramps), the batches drawn as the library's Trainer draws them. ``input_ball(U, eps)`` gives the
    boxes. Returns the seconds per epoch."""
    from nemon_np.data import AUGMENTATIONS
    augment = AUGMENTATIONS[config.augment]
    rng = np.random.default_rng(config.seed)
    opt = Adam(lr=config.lr)
    n_batches = math.ceil(len(X) / config.batch_size)
    seconds = []
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(X))
        for k in range(n_batches):
            done = epoch + k / n_batches
            eps, kappa = config.certified_schedule(done)
            idx = order[k * config.batch_size:(k + 1) * config.batch_size]
            U = X[idx] if augment is None else augment(X[idx], net.image_shape, rng, config.augment_pad)
            boxes = input_ball(U, eps) if eps > 0 and kappa < 1 else (None, None)
            _, grads = net.loss_and_grad(U, y[idx], *boxes, kappa=kappa if eps > 0 else 1.0)
            opt.step(net.params, grads, lr=learning_rate(config.schedule, config.lr, done / config.epochs))
        seconds.append(time.perf_counter() - t0)
        if progress:
            progress(epoch + 1)
    return seconds

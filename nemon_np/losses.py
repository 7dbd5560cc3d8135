"""Losses on logits, with their gradients (no autodiff)."""
import numpy as np

__all__ = ["softmax_cross_entropy"]


def softmax_cross_entropy(Y, labels):
    """Mean cross-entropy of logits Y (m, k) against integer labels (m,), and dL/dY.

    L = -mean_i log p_i[y_i] with log p = Y - max(Y) - log sum exp(Y - max(Y)) (row-wise, float64);
    dL/dY = (p - onehot(y)) / m."""
    Z = Y.astype(np.float64)
    Z -= Z.max(axis=1, keepdims=True)
    logp = Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))
    m = Y.shape[0]
    rows = np.arange(m)
    loss = -logp[rows, labels].mean()
    dY = np.exp(logp)
    dY[rows, labels] -= 1.0
    return float(loss), (dY / m).astype(Y.dtype)

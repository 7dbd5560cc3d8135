"""The read-out's optional hidden layer: one explicit ReLU layer between an implicit layer's features
and the linear map to the logits.

A model with a hidden read-out layer of width p reads its fixed point x* through

    f = features(x*) (x*, or its average pooling),   g = relu(H f + h),   y = C g + c,

H (p, n_f), h (p,), C (n_out, p). Without the layer, g = f (p = 0). It adds a nonlinearity after the
implicit layer, as the fully connected layer before the logits of the explicit networks that
interval bound propagation certifies (Gowal et al. 2018, "On the effectiveness of interval bound
propagation"); the implicit layer, its well-posedness and its interval embedding are unchanged.

Gradients (clean): with dG = dL/dg and dP = dG * 1[P > 0], P = H f + h:
dL/dH = dP^T f, dL/dh = sum dP, dL/df = dP H.

Interval bounds (IBP): a feature box [f_c - f_r, f_c + f_r] gives P_c = H f_c + h, P_r = |H| f_r and
the box [relu(P_c - P_r), relu(P_c + P_r)] of g, since relu is monotone. Its gradient: with dG_lo,
dG_hi the gradients of g's box ends, dP_lo = dG_lo 1[P_lo > 0], dP_hi likewise, dP_c = dP_lo + dP_hi,
dP_r = dP_hi - dP_lo; then dL/dH = dP_c^T f_c + sign(H) (dP_r^T f_r), dL/dh = sum dP_c,
dL/df_c = dP_c H, dL/df_r = dP_r |H|.

:func:`enclosing_hidden_box` is the sound float64 version for certificates: the rounding allowance
(n_f + 4) u (|H| (|f_c| + f_r) + |h|) per product sum (Higham 2002, eq. (3.5)) widens P's box.

Linear relaxation of the margins (for certificates): the box of g forgets that every g_i is read
from the same f. :func:`readout_affine_lower_bounds` keeps it: for every margin row d = C_k - C_j
and CROWN's multipliers lam (:mod:`nemon_np.relaxation`) over P's box [l, u],

    y_k - y_j = d . relu(P) + c_k - c_j >= (lam^T H) f + lam . h + sum_i kappa_i + c_k - c_j,

an affine lower bound in f, valid over the whole feature box, that the caller bounds over that box
or carries back through the implicit layer.
"""
import numpy as np

from .interval import UNIT_ROUNDOFF, affine_enclosure, enclosing_center_radius, relu_box, relu_box_grad
from .relaxation import crown_multipliers, relu_offsets

__all__ = ["init_hidden_layer", "hidden_forward", "hidden_backward", "hidden_box", "hidden_box_grad",
           "enclosing_hidden_box", "readout_affine_lower_bounds"]


def init_hidden_layer(rng, width, n_features, n_out, dtype):
    """(H (width, n_features), h (width,), C (n_out, width)): uniform(-1, 1) / sqrt(fan-in) weights
    (PyTorch Linear's scale, as the models' B and C), zero bias."""
    H = (rng.uniform(-1, 1, size=(width, n_features)) / np.sqrt(n_features)).astype(dtype)
    C = (rng.uniform(-1, 1, size=(n_out, width)) / np.sqrt(width)).astype(dtype)
    return H, np.zeros(width, dtype), C


def hidden_forward(F, H, h):
    """(G, P): the hidden layer's output relu(P) and pre-activation P = F H^T + h, F (m, n_f)."""
    P = F @ H.T + h
    return np.maximum(P, 0), P


def hidden_backward(dG, F, H, P):
    """(dF, dH, dh) from dG = dL/dG through :func:`hidden_forward`."""
    dP = dG * (P > 0)
    return dP @ H, dP.T @ F, dP.sum(axis=0)


def hidden_box(F_c, F_r, H, h):
    """The box of g over the feature box [F_c - F_r, F_c + F_r], in the arrays' dtype (for
    training): (G_c, G_r, P_lo, P_hi), G's centre and radius and P's box ends."""
    P_c, P_r = F_c @ H.T + h, F_r @ np.abs(H).T
    P_lo, P_hi = P_c - P_r, P_c + P_r
    return relu_box(P_lo, P_hi) + (P_lo, P_hi)


def hidden_box_grad(dG_c, dG_r, F_c, F_r, H, P_lo, P_hi):
    """(dF_c, dF_r, dH, dh) from the gradients of :func:`hidden_box`'s G_c and G_r."""
    dP_c, dP_r = relu_box_grad(dG_c, dG_r, P_lo, P_hi)
    return dP_c @ H, dP_r @ np.abs(H), dP_c.T @ F_c + np.sign(H) * (dP_r.T @ F_r), dP_c.sum(axis=0)


def enclosing_hidden_box(F_c, F_r, H, h):
    """float64 (G_c, G_r, P_lo, P_hi), as :func:`hidden_box`'s, whose boxes contain P = H f + h and
    g = relu(P) for every f in [F_c - F_r, F_c + F_r], in exact arithmetic for the stored H and h:
    P's box is widened by the rounding allowance of its float64 evaluation and its ends moved one
    ulp outward."""
    F_c, F_r = np.asarray(F_c, np.float64), np.asarray(F_r, np.float64)
    H, h = np.asarray(H, np.float64), np.asarray(h, np.float64)
    P_c, P_r = affine_enclosure(lambda M, F: F @ M.T, H, h, F_c, F_r, H.shape[1])
    P_lo, P_hi = np.nextafter(P_c - P_r, -np.inf), np.nextafter(P_c + P_r, np.inf)
    return enclosing_center_radius(np.maximum(P_lo, 0), np.maximum(P_hi, 0)) + (P_lo, P_hi)


def readout_affine_lower_bounds(C, c, H, h, F_c, F_r, P_lo, P_hi, labels):
    """(W, beta): float64 affine lower bounds y_k - y_j >= W_j . f + beta_j, W (m, n_out, n_f) and
    beta (m, n_out), k = labels (row k is 0), for every f in the feature box [F_c - F_r, F_c + F_r]
    and in exact arithmetic for the stored parameters.

    Linear read-out (H None): W_j = C_k - C_j, beta_j = c_k - c_j. Hidden layer: the bound of the
    module docstring with CROWN's multipliers over P's box [P_lo, P_hi], which must contain H f + h
    over the feature box (:func:`enclosing_hidden_box`). beta is lowered by 2 (n_f + p + 10) u times
    the sum of the absolute values of its terms and of lam^T H's, which covers the float64 rounding of
    W and beta (Higham 2002, eq. (3.5)); bounding W . f over the box is the caller's rounding.
    """
    C, c = np.asarray(C, np.float64), np.asarray(c, np.float64)
    F_c, F_r = np.asarray(F_c, np.float64), np.asarray(F_r, np.float64)
    labels = np.asarray(labels)
    rows, s_f = np.arange(len(labels)), np.abs(F_c) + F_r
    D = C[labels][:, None, :] - C[None, :, :]
    beta = c[labels][:, None] - c[None, :]
    scale = np.abs(c)[labels][:, None] + np.abs(c)[None, :]
    if H is None:
        W, terms = D, C.shape[1] + 10
        scale = scale + np.einsum("mjf,mf->mj", np.abs(D), s_f)   # the rounding of C_k - C_j
    else:
        H, h = np.asarray(H, np.float64), np.asarray(h, np.float64)
        lo, hi = P_lo[:, None, :], P_hi[:, None, :]
        lam = crown_multipliers(D, lo, hi)
        kappa = relu_offsets(D, lam, lo, hi)
        W = (lam.reshape(-1, H.shape[0]) @ H).reshape(lam.shape[:2] + H.shape[1:])
        beta = beta + lam @ h + kappa.sum(axis=2)
        abs_lam, terms = np.abs(lam), H.shape[0] + H.shape[1] + 10
        scale = (scale + abs_lam @ np.abs(h) + ((np.abs(D) + abs_lam) * (np.abs(lo) + np.abs(hi))).sum(axis=2)
                 + np.einsum("mjp,mp->mj", abs_lam, s_f @ np.abs(H).T))
    W = W.copy()
    W[rows, labels] = 0.0
    beta = beta - 2 * terms * UNIT_ROUNDOFF * scale
    beta[rows, labels] = 0.0
    return W, beta

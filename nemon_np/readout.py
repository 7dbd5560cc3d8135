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
"""
import numpy as np

from .interval import UNIT_ROUNDOFF, enclosing_center_radius

__all__ = ["init_hidden_layer", "hidden_forward", "hidden_backward", "hidden_box", "hidden_box_grad",
           "enclosing_hidden_box"]


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
    G_lo, G_hi = np.maximum(P_lo, 0), np.maximum(P_hi, 0)
    return (G_lo + G_hi) / 2, (G_hi - G_lo) / 2, P_lo, P_hi


def hidden_box_grad(dG_c, dG_r, F_c, F_r, H, P_lo, P_hi):
    """(dF_c, dF_r, dH, dh) from the gradients of :func:`hidden_box`'s G_c and G_r."""
    dP_lo = (dG_c - dG_r) / 2 * (P_lo > 0)
    dP_hi = (dG_c + dG_r) / 2 * (P_hi > 0)
    dP_c, dP_r = dP_lo + dP_hi, dP_hi - dP_lo
    return dP_c @ H, dP_r @ np.abs(H), dP_c.T @ F_c + np.sign(H) * (dP_r.T @ F_r), dP_c.sum(axis=0)


def enclosing_hidden_box(F_c, F_r, H, h):
    """float64 (G_c, G_r) whose box contains g = relu(H f + h) for every f in [F_c - F_r, F_c + F_r],
    in exact arithmetic for the stored H and h: P's box is widened by the rounding allowance of its
    float64 evaluation and its ends moved one ulp outward."""
    F_c, F_r = np.asarray(F_c, np.float64), np.asarray(F_r, np.float64)
    H, h = np.asarray(H, np.float64), np.asarray(h, np.float64)
    absH = np.abs(H)
    P_c, P_r = F_c @ H.T + h, F_r @ absH.T
    P_r = P_r + (H.shape[1] + 4) * UNIT_ROUNDOFF * ((np.abs(F_c) + F_r) @ absH.T + np.abs(h))
    P_lo = np.nextafter(P_c - P_r, -np.inf)
    P_hi = np.nextafter(P_c + P_r, np.inf)
    return enclosing_center_radius(np.maximum(P_lo, 0), np.maximum(P_hi, 0))

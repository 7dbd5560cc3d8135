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
from the same f. With d = C_k - C_j and P's box [l, u], for *any* multipliers lam in R^p

    y_k - y_j = lam . (H f + h) + sum_i (d_i relu(P_i) - lam_i P_i) + c_k - c_j
              >= (lam^T H) f_c - |lam^T H| f_r + lam . h + sum_i kappa_i + c_k - c_j,
    kappa_i = min over t in [l_i, u_i] of d_i relu(t) - lam_i t   (at t = l_i, u_i, or 0 when l_i < 0 < u_i),

a Lagrangian lower bound: valid for every lam, so rounding of lam cannot break it, and lam = 0 is the
interval bound of the box of g. :func:`relaxed_margin_lower_bounds` takes CROWN's multipliers
(Zhang et al. 2018, "Efficient neural network robustness certification with general activation
functions"): lam_i = d_i on units active over the box, 0 on inactive ones, and on units that change
sign the chord slope d_i u_i / (u_i - l_i) where d_i < 0 (relu's upper line) and 0 where d_i >= 0
(the lower line 0; CROWN's other choice, slope 1 where u_i >= -l_i, certified fewer images of the
trained MNIST models in docs/benchmarks.md).
"""
import numpy as np

from .interval import UNIT_ROUNDOFF, enclosing_center_radius

__all__ = ["init_hidden_layer", "hidden_forward", "hidden_backward", "hidden_box", "hidden_box_grad",
           "enclosing_hidden_box", "crown_multipliers", "relaxed_margin_lower_bounds"]


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
    """float64 (G_c, G_r, P_lo, P_hi), as :func:`hidden_box`'s, whose boxes contain P = H f + h and
    g = relu(P) for every f in [F_c - F_r, F_c + F_r], in exact arithmetic for the stored H and h:
    P's box is widened by the rounding allowance of its float64 evaluation and its ends moved one
    ulp outward."""
    F_c, F_r = np.asarray(F_c, np.float64), np.asarray(F_r, np.float64)
    H, h = np.asarray(H, np.float64), np.asarray(h, np.float64)
    absH = np.abs(H)
    P_c, P_r = F_c @ H.T + h, F_r @ absH.T
    P_r = P_r + (H.shape[1] + 4) * UNIT_ROUNDOFF * ((np.abs(F_c) + F_r) @ absH.T + np.abs(h))
    P_lo, P_hi = np.nextafter(P_c - P_r, -np.inf), np.nextafter(P_c + P_r, np.inf)
    return enclosing_center_radius(np.maximum(P_lo, 0), np.maximum(P_hi, 0)) + (P_lo, P_hi)


def crown_multipliers(D, P_lo, P_hi):
    """CROWN's multipliers lam (m, n_out, p) for the margin rows D (m, n_out, p) (d = C_k - C_j) over
    the pre-activation boxes [P_lo, P_hi] (m, p): d_i where l_i >= 0, 0 where u_i <= 0, and where
    l_i < 0 < u_i the chord slope d_i u_i / (u_i - l_i) if d_i < 0, else 0 (module docstring)."""
    lo, hi = P_lo[:, None, :], P_hi[:, None, :]
    changes = (lo < 0) & (hi > 0)
    slope = np.where(changes, hi / np.where(changes, hi - lo, 1.0), (lo >= 0).astype(np.float64))
    return D * np.where(changes & (D >= 0), 0.0, slope)


def relaxed_margin_lower_bounds(C, c, H, h, F_c, F_r, P_lo, P_hi, labels, multipliers=crown_multipliers):
    """Sound float64 lower bounds (m, n_out) of y_k - y_j = (C_k - C_j) relu(H f + h) + c_k - c_j over
    the feature boxes [F_c - F_r, F_c + F_r], k = labels, 0 at j = k, by the Lagrangian bound of the
    module docstring with lam = multipliers(D, P_lo, P_hi), D (m, n_out, p) the rows C_k - C_j.

    [P_lo, P_hi] must contain H f + h over each box (:func:`enclosing_hidden_box`). The bound
    holds in exact arithmetic for the stored parameters: the computed value is lowered by
    2 (n_f + p + 10) u times the sum of the absolute values of every term (and of lam's rounded
    product with H), which covers the float64 rounding of the evaluation (Higham 2002, eq. (3.5)).
    """
    C, c, H, h = (np.asarray(a, np.float64) for a in (C, c, H, h))
    F_c, F_r, P_lo, P_hi = (np.asarray(a, np.float64) for a in (F_c, F_r, P_lo, P_hi))
    labels = np.asarray(labels)
    m, (n_out, (p, n_f)) = len(labels), (len(C), H.shape)
    M = np.empty((m, n_out))
    step = max(1, 2_000_000 // (n_out * n_f))   # bounds lam H's (step, n_out, n_f) temporary to 16 MB
    for s in range(0, m, step):
        rows = slice(s, s + step)
        M[rows] = _relaxed_margins(C, c, H, h, F_c[rows], F_r[rows], P_lo[rows], P_hi[rows], labels[rows],
                                   multipliers)
    M[np.arange(m), labels] = 0.0
    return M


def _relaxed_margins(C, c, H, h, F_c, F_r, P_lo, P_hi, labels, multipliers):
    D = C[labels][:, None, :] - C[None, :, :]
    lam = multipliers(D, P_lo, P_hi)
    lo, hi = P_lo[:, None, :], P_hi[:, None, :]
    kappa = np.minimum(D * np.maximum(lo, 0) - lam * lo, D * np.maximum(hi, 0) - lam * hi)
    kappa = np.where((lo < 0) & (hi > 0), np.minimum(kappa, 0.0), kappa)
    W = (lam.reshape(-1, H.shape[0]) @ H).reshape(lam.shape[:2] + H.shape[1:])
    c_pair = c[labels][:, None] - c[None, :]
    value = (np.einsum("mjf,mf->mj", W, F_c) - np.einsum("mjf,mf->mj", np.abs(W), F_r) + lam @ h
             + kappa.sum(axis=2) + c_pair)
    g = np.abs(F_c) + F_r
    abs_lam = np.abs(lam)
    terms = (np.einsum("mjp,mp->mj", abs_lam, g @ np.abs(H).T) + np.einsum("mjf,mf->mj", np.abs(W), g)
             + abs_lam @ np.abs(h) + ((np.abs(D) + abs_lam) * (np.abs(lo) + np.abs(hi))).sum(axis=2)
             + np.abs(c)[labels][:, None] + np.abs(c)[None, :])
    return value - 2 * (H.shape[1] + H.shape[0] + 10) * UNIT_ROUNDOFF * terms

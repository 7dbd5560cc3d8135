"""The warm-up regularizers of fast certified training (Shi, Wang, Zhang, Yi, Hsieh, "Fast certified
robust training with short warmup", NeurIPS 2021, Sec. 3.2 and their code's defaults): while eps
ramps up, two terms on the interval boxes of every relu's pre-activation keep the boxes from
exploding and the relus from dying.

For the relu layers l = 1 .. L with pre-activation boxes (centre c_l, radius r_l) over a batch, and
t_0 the mean radius of the input box:

    L_tightness = 1/L sum_l relu(tau - t_0 / mean(r_l)) / tau
    L_relu      = 1/L sum_l (relu(tau - f(a_l)) + relu(tau - f(v_l))) / tau,   f(x) = min(x, 1/x),

with a_l = mean(c 1[active]) / -mean(c 1[inactive]) (means over every entry of the batch; active:
c - r > 0, inactive: c + r < 0) and v_l = sum((c - mean(c))^2 1[active]) / sum((c - mean(c))^2
1[inactive]). The loss gains lambda (1 - eps / eps_max) (L_tightness + L_relu); their defaults are
lambda = 0.5, tau = 0.5. The active and inactive sets are held fixed in the gradient (they are
indicators); a layer with no active or no inactive entries has f = 0 there, with no gradient.
"""
import numpy as np
from numba import njit

__all__ = ["tightness_term", "relu_balance_term", "relu_balance_term_reference", "warmup_regularizer",
           "WARMUP_TOL"]

WARMUP_TOL = 0.5


def tightness_term(t0, r, tol=WARMUP_TOL):
    """(relu(tol - t0 / mean(r)) / tol, its gradient with respect to r)."""
    t = float(np.mean(r))
    if t <= 0 or tol - t0 / t <= 0:
        return 0.0, np.zeros_like(r)
    return (tol - t0 / t) / tol, np.full_like(r, t0 / (t * t) / tol / r.size)


def _ratio_term(x, tol):
    """(relu(tol - f(x)), d/dx) for f(x) = min(x, 1/x), x >= 0."""
    f, df = (x, 1.0) if x < 1 else (1.0 / x, -1.0 / (x * x))
    return (tol - f, -df) if tol - f > 0 else (0.0, 0.0)


@njit(cache=True)
def _balance_sums(c, r):
    """Over flat c, r: (entries active, inactive; sum of c over the active, the inactive, all; then with
    mu = mean(c), sum of (c - mu)^2 and of (c - mu) over the active and over the inactive), summed in
    float64: two passes where the NumPy reference makes a dozen with temporaries."""
    n_act = n_inact = 0
    s_act = s_inact = s = 0.0
    for i in range(c.size):
        s += c[i]
        if c[i] - r[i] > 0:
            n_act += 1
            s_act += c[i]
        elif c[i] + r[i] < 0:
            n_inact += 1
            s_inact += c[i]
    mu = s / c.size
    va = vb = ea = eb = 0.0
    for i in range(c.size):
        e = c[i] - mu
        if c[i] - r[i] > 0:
            va += e * e
            ea += e
        elif c[i] + r[i] < 0:
            vb += e * e
            eb += e
    return n_act, n_inact, s_act, s_inact, mu, va, vb, ea, eb


@njit(cache=True)
def _balance_grad(c, r, g_act, g_inact, h_act, h_inact, shift, mu, out):
    """out_i = g_set + h_set (c_i - mu) + shift, set the entry's (active, inactive; 0 for neither)."""
    for i in range(c.size):
        if c[i] - r[i] > 0:
            out[i] = g_act + h_act * (c[i] - mu) + shift
        elif c[i] + r[i] < 0:
            out[i] = g_inact + h_inact * (c[i] - mu) + shift
        else:
            out[i] = shift


def relu_balance_term(c, r, tol=WARMUP_TOL):
    """(the relu-balance term of one layer (module docstring), its gradient with respect to c), c and r
    of any shape; by two numba passes (:func:`relu_balance_term_reference` is the formula in NumPy).

    With n entries, a = sum_act c / n, b = sum_inact c / n, v_a = sum_act (c - mu)^2, v_b likewise and
    e_a = sum_act (c - mu), e_b likewise: d(a / -b)/dc_i = 1[act] / (n (-b)) + a 1[inact] / (n b^2), and
    dv_a/dc_i = 2 (c_i - mu) 1[act] - 2 e_a / n (mu moves with every c_i), so the gradient is
    g_set + h_set (c_i - mu) + shift per entry."""
    flat_c, flat_r = np.ravel(c), np.ravel(r)
    n = flat_c.size
    n_act, n_inact, s_act, s_inact, mu, va, vb, ea, eb = _balance_sums(flat_c, flat_r)
    if n_act == 0 or n_inact == 0:
        return 2.0, np.zeros_like(c)   # f = 0 for both ratios: (tol + tol) / tol
    a, b = s_act / n, s_inact / n
    value, g_act, g_inact, h_act, h_inact, shift = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    if a > 0 and b < 0:
        term, dterm = _ratio_term(a / -b, tol)
        value += term
        g_act, g_inact = dterm / n / -b, dterm * a / n / (b * b)
    else:
        value += tol
    if va > 0 and vb > 0:
        term, dterm = _ratio_term(va / vb, tol)
        value += term
        h_act, h_inact = 2 * dterm / vb, -2 * dterm * va / (vb * vb)
        shift = dterm * (-2.0 / n * ea / vb + va * 2.0 / n * eb / (vb * vb))
    else:
        value += tol
    grad = np.empty_like(flat_c)
    _balance_grad(flat_c, flat_r, g_act / tol, g_inact / tol, h_act / tol, h_inact / tol, shift / tol, mu, grad)
    return value / tol, grad.reshape(np.shape(c))


def relu_balance_term_reference(c, r, tol=WARMUP_TOL):
    """:func:`relu_balance_term` in NumPy, as the module docstring writes it (the reference of tests)."""
    n = c.size
    act, inact = (c - r) > 0, (c + r) < 0
    grad = np.zeros_like(c)
    if not act.any() or not inact.any():
        return 2.0, grad   # f = 0 for both ratios: (tol + tol) / tol
    a, b = float(np.sum(c[act])) / n, float(np.sum(c[inact])) / n
    mu = float(np.mean(c))
    d = (c - mu) ** 2
    va, vb = float(np.sum(d[act])), float(np.sum(d[inact]))
    value = 0.0
    if a > 0 and b < 0:
        term, dterm = _ratio_term(a / -b, tol)
        value += term
        # d(a / -b)/dc = act / n / -b + a inact / n / b^2
        grad += dterm * (act / n / -b + a * inact / n / (b * b))
    else:
        value += tol
    if va > 0 and vb > 0:
        term, dterm = _ratio_term(va / vb, tol)
        value += term
        # dv/dc_i = 2 (c_i - mu) 1[i in set] - 2 / n sum_set (c_j - mu)
        dva = 2 * (c - mu) * act - 2.0 / n * float(np.sum((c - mu)[act]))
        dvb = 2 * (c - mu) * inact - 2.0 / n * float(np.sum((c - mu)[inact]))
        grad += dterm * (dva / vb - va * dvb / (vb * vb))
    else:
        value += tol
    return value / tol, grad / tol


def warmup_regularizer(t0, boxes, tol=WARMUP_TOL):
    """(L_tightness + L_relu of the module docstring, [(dc_l, dr_l)] for each relu layer's box) from
    the input box's mean radius t0 and the relus' pre-activation boxes [(c_l, r_l)]; (0, []) without
    relu layers."""
    if not boxes:
        return 0.0, []
    value, grads = 0.0, []
    for c, r in boxes:
        t_value, dr = tightness_term(t0, r, tol)
        b_value, dc = relu_balance_term(c, r, tol)
        value += t_value + b_value
        grads.append((dc / len(boxes), dr / len(boxes)))
    return value / len(boxes), grads

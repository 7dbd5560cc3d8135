"""Linear-relaxation (CROWN) lower bounds of linear functions of relu outputs, for certificates.

The Lagrangian bound. For a vector v, pre-activations z in the box [lo, hi] and *any* multipliers lam,

    v . relu(z) = lam . z + sum_i (v_i relu(z_i) - lam_i z_i)  >=  lam . z + sum_i kappa_i,
    kappa_i = min over t in [lo_i, hi_i] of v_i relu(t) - lam_i t   (at t = lo_i, hi_i, or 0 when lo_i < 0 < hi_i).

It holds for every lam, so the rounding of lam cannot break it; lam = 0 is the interval bound.
:func:`crown_multipliers` is CROWN's choice (Zhang et al. 2018, "Efficient neural network robustness
certification with general activation functions"): lam_i = v_i on units active over the box, 0 on
inactive ones, and on units that change sign the chord slope v_i hi_i / (hi_i - lo_i) where v_i < 0
(relu's upper line) and 0 where v_i >= 0 (the lower line 0; CROWN's other choice, slope 1 where
hi_i >= -lo_i, certified fewer images of the trained MNIST models in docs/benchmarks.md).

Through the fixed point (:func:`unrolled_lower_bounds`). A margin bound m >= nu_0 . x* + beta_0 on
the fixed point x* = relu(z*), z* = K x* + B u + b, is carried back through t = 1 .. T copies of
the fixed-point map (x* is its own preimage, so every copy has the pre-activation z* and the same
box [z_lo, z_hi]): with mu_t the multipliers of nu_{t-1} over that box,

    nu_{t-1} . x*  >=  mu_t . z* + sum kappa  =  (K^T mu_t) . x* + (B^T mu_t) . u + mu_t . b + sum kappa,

so nu_t = K^T mu_t, g_t = g_{t-1} + B^T mu_t, beta_t = beta_{t-1} + mu_t . b + sum kappa, and each
t gives the lower bound over the embedded network's box of x* and the input box of u

    L_t = beta_t + nu_t . x_c - |nu_t| . x_r + g_t . u_c - |g_t| . u_r.

The input keeps its correlations across units (g_t . u is bounded as one linear function), which the
box of z forgets; the contraction shrinks nu_t, so the box of x* matters less at every step.

Soundness in floating point: every bound is lowered by 2 (N + 10) u times the sum of the absolute
values of its terms (N the longest sum, u = 2^-53), which covers the float64 rounding of the
products and sums (Higham 2002, eq. (3.5)) and of nu_t = K^T mu_t and B^T mu_t (through
|mu_t| . (|K| s_x) and |mu_t| . (|B| s_u), s_x = |x_c| + x_r >= |x*|, s_u = |u_c| + u_r >= |u|).
"""
import numpy as np

from .interval import UNIT_ROUNDOFF

__all__ = ["crown_multipliers", "relu_offsets", "relu_relaxation", "relu_relaxation_grad", "batched_dot",
           "concretize", "unrolled_bounds", "unrolled_lower_bounds"]


def crown_multipliers(V, lo, hi):
    """CROWN's multipliers lam (the shape of V) of v . relu(z) over z in [lo, hi] (broadcast against
    V): v_i where lo_i >= 0, 0 where hi_i <= 0, and where lo_i < 0 < hi_i the chord slope
    v_i hi_i / (hi_i - lo_i) if v_i < 0, else 0 (module docstring)."""
    changes = (lo < 0) & (hi > 0)
    slope = np.where(changes, hi / np.where(changes, hi - lo, 1.0), (lo >= 0).astype(np.float64))
    return V * np.where(changes & (V >= 0), 0.0, slope)


def relu_offsets(V, lam, lo, hi):
    """kappa_i = min over t in [lo_i, hi_i] of v_i relu(t) - lam_i t (the shape of V): the smallest
    of the values at lo_i, at hi_i and, where lo_i < 0 < hi_i, at 0 (where it is 0)."""
    kappa = np.minimum(V * np.maximum(lo, 0) - lam * lo, V * np.maximum(hi, 0) - lam * hi)
    return np.where((lo < 0) & (hi > 0), np.minimum(kappa, 0.0), kappa)


def _chord(V, lo, hi):
    """(slope, unstable, s, width): the multipliers' slope lam / V (s on chord units, 1 on active ones,
    else 0), and per unit lo < 0 < hi, the chord slope hi / (hi - lo) there (else 0) and hi - lo there
    (else 1)."""
    unstable = (lo < 0) & (hi > 0)
    width = np.where(unstable, hi - lo, 1).astype(lo.dtype)
    s = np.where(unstable, hi / width, 0).astype(lo.dtype)
    active = (lo >= 0).astype(V.dtype)
    return np.where(V < 0, np.where(unstable, s, active), active), unstable, s, width


def _sum_to(X, shape):
    """X summed over the axes where ``shape`` broadcast against it (size 1 there), to ``shape``."""
    axes = tuple(i for i, (a, b) in enumerate(zip(X.shape, shape)) if b == 1 and a != 1)
    return X.sum(axis=axes, keepdims=True) if axes else X


def relu_relaxation(V, lo, hi):
    """(lam, kappa) of :func:`crown_multipliers` and :func:`relu_offsets` in closed form and in V's
    dtype, for training (CROWN-IBP, Zhang et al. 2020): with s = hi / (hi - lo) on units that change
    sign, lam = V s and kappa = -V s lo where V < 0 (relu's upper chord), lam = V and kappa = 0 on
    active units, lam = kappa = 0 elsewhere. Piecewise smooth in (V, lo, hi); :func:`relu_relaxation_grad`
    is its gradient. lo, hi (broadcast against V) are per unit."""
    slope, _, s, _ = _chord(V, lo, hi)
    return V * slope, -np.minimum(V, 0) * (s * lo)


def relu_relaxation_grad(V, lo, hi, dlam, dkappa):
    """The gradient of :func:`relu_relaxation`: (dV, dlo, dhi) of sum(dlam lam + dkappa kappa), dlo
    and dhi in the shapes of lo and hi (summed over the axes they broadcast along). On the chord units,
    with w = min(V, 0): d/ds = w (dlam - lo dkappa), d/dlo directly -w s dkappa, ds/dlo = s / (hi - lo)
    and ds/dhi = (1 - s) / (hi - lo)."""
    slope, unstable, s, width = _chord(V, lo, hi)
    dV = dlam * slope - (dkappa * (s * lo)) * (V < 0)
    w = np.minimum(V, 0)
    w_dlam, w_dkappa = _sum_to(w * dlam, lo.shape), _sum_to(w * dkappa, lo.shape)
    ds = np.where(unstable, w_dlam - lo * w_dkappa, 0)
    dlo = -s * w_dkappa + ds * s / width
    return dV, dlo, ds * (1 - s) / width


def batched_dot(A, B):
    """Sum over every axis after the first two of A * B: rows A (m, r, ...) against the m samples'
    arrays B (m, 1, ...) or rows B (m, r, ...); (m, r)."""
    m, r = A.shape[:2]
    A, B = A.reshape(m, r, -1), B.reshape(m, B.shape[1], -1)
    if B.shape[1] == 1:   # a batched matrix-vector product, without an (m, r, ...) temporary
        return (A @ B[:, 0, :, None])[..., 0]
    return np.einsum("mrf,mrf->mr", A, B)


def unrolled_bounds(nu, beta, box, transpose_implicit, transpose_input, steps):
    """The affine lower bounds of the module docstring, step by step: for t = 0 .. steps, yields
    (t, nu_t, g_t, beta_t, allowance_t) with m_r >= nu_t . x* + g_t . u + beta_t - allowance_t in exact
    arithmetic for every u in the input box and its fixed point x* (g_0 = None: no input term), the
    allowance covering the float64 rounding of every step so far (not of bounding the terms over the
    boxes). Arguments as :func:`unrolled_lower_bounds`."""
    m, r = beta.shape
    state = box["x_c"].shape[1:]
    rho = _rounding_factor(box)
    lo, hi = box["z_lo"][:, None], box["z_hi"][:, None]
    mag_lo_hi = np.abs(lo) + np.abs(hi)
    b = np.broadcast_to(np.asarray(box["b"], np.float64), state)
    per_unit = (np.abs(b) + box["K_s"] + box["B_s"])[:, None]
    lam_sum, allowance, g = None, np.zeros((m, r)), None
    yield 0, nu, g, beta, allowance
    for t in range(1, steps + 1):
        lam = crown_multipliers(nu, lo, hi)
        kappa = relu_offsets(nu, lam, lo, hi)
        abs_lam = np.abs(lam)
        beta = beta + kappa.reshape(m, r, -1).sum(axis=2) + lam.reshape(m, r, -1) @ b.ravel()
        allowance = allowance + rho * (np.abs(beta) + batched_dot(np.abs(nu) + abs_lam, mag_lo_hi)
                                       + batched_dot(abs_lam, per_unit))
        lam_sum = lam if lam_sum is None else lam_sum + lam
        nu = transpose_implicit(lam.reshape((m * r,) + state)).reshape(lam.shape)
        g = transpose_input(lam_sum.reshape((m * r,) + state)).reshape((m, r) + box["u_c"].shape[1:])
        yield t, nu, g, beta, allowance


def _rounding_factor(box):
    """2 (N + 10) u, N the longest sum of the unrolled bounds (a state's or an input's entries)."""
    state, inputs = box["x_c"].shape[1:], box["u_c"].shape[1:]
    return 2 * (max(int(np.prod(state)), int(np.prod(inputs))) + 10) * UNIT_ROUNDOFF


def concretize(nu, beta, x_c, x_r, rho):
    """A lower bound of nu . x + beta over the boxes [x_c - x_r, x_c + x_r] (rows nu (m, r, ...), the
    m samples' boxes (m, 1, ...)), lowered by rho (|beta| + |nu| . (|x_c| + x_r)), which covers its
    float64 rounding for rho = 2 (N + 10) u, N the longest sum."""
    abs_nu = np.abs(nu)
    scale = np.abs(beta) + batched_dot(abs_nu, np.abs(x_c) + x_r)
    return beta + batched_dot(nu, x_c) - batched_dot(abs_nu, x_r) - rho * scale


def unrolled_lower_bounds(nu, beta, box, transpose_implicit, transpose_input, steps):
    """The best of the lower bounds L_0 .. L_steps of the module docstring, rounding allowed for.

    Parameters
    ----------
    nu : (m, r, *state) rows of a bound m_r >= nu . x* + beta over the m samples' fixed points
    beta : (m, r)
    box : mapping of the m samples' float64 boxes: ``x_c``, ``x_r`` (m, *state) of x*, ``u_c``,
        ``u_r`` (m, *inputs) of u, ``z_lo``, ``z_hi`` (m, *state) of z* = K x* + B u + b, ``b``
        (broadcast against a state), ``K_s`` = |K| (|x_c| + x_r) and ``B_s`` = |B| (|u_c| + u_r)
        (m, *state) (for the rounding allowance)
    transpose_implicit, transpose_input : callables mapping states (k, *state) to K^T states
        (k, *state) and to B^T states (k, *inputs)
    steps : T >= 0, copies of the fixed-point map to pass

    Returns (m, r) float64: each row's largest L_t, which holds in exact arithmetic.

    g_t = B^T (mu_1 + ... + mu_t) is formed from the running sum of the multipliers (one product a
    step); the sum's rounding, within t u sum_t |mu_t| entrywise, is inside the allowance of the
    |mu_t| . B_s terms.
    """
    rho = _rounding_factor(box)
    x_c, x_r, u_c, u_r = (box[k][:, None] for k in ("x_c", "x_r", "u_c", "u_r"))
    best = None
    for t, nu_t, g, beta_t, allowance in unrolled_bounds(nu, beta, box, transpose_implicit, transpose_input, steps):
        L = concretize(nu_t, beta_t, x_c, x_r, rho) - allowance
        if g is not None:
            L = L + batched_dot(g, u_c) - batched_dot(np.abs(g), u_r) - rho * batched_dot(np.abs(g), np.abs(u_c) + u_r)
        best = L if best is None else np.maximum(best, L)
    return best

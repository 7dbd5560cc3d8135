"""Mixed-integer linear constraints of relus and affine maps over boxes, in cvxpy: the encoding that
exact verification (:mod:`nemon_np.exact`) writes layer by layer (:mod:`nemon_np.layers`, ``milp``).

A relu out = relu(z) with z in [l, h], l < 0 < h, is exactly (Tjeng, Xiao & Tedrake 2019, "Evaluating
robustness of neural networks with mixed integer programming") the set of (z, out) with a binary d and

    out >= 0,  out >= z,  out <= z - l (1 - d),  out <= h d;

out = z where l >= 0 and out = 0 where h <= 0. With d relaxed to [0, 1], eliminating d leaves the
triangle relaxation out <= h (z - l) / (h - l).
"""
import numpy as np

__all__ = ["relu_constraints", "affine_box"]


def relu_constraints(out, z, lo, hi, relaxed=False):
    """(constraints, binaries): ``out = relu(z)`` for z in [lo, hi] by the big-M encoding (module
    docstring), cvxpy expressions ``out`` and ``z`` of one length, float64 bounds; ``relaxed`` makes the
    binaries continuous in [0, 1] (the triangle relaxation)."""
    import cvxpy as cp
    active, dead = lo >= 0, hi <= 0
    changes = np.flatnonzero(~active & ~dead)
    cons = [out >= 0, out >= z, out <= np.maximum(hi, 0)]
    if active.any():
        cons.append(out[np.flatnonzero(active)] == z[np.flatnonzero(active)])
    if dead.any():
        cons.append(out[np.flatnonzero(dead)] == 0)
    if len(changes):
        d = cp.Variable(len(changes), boolean=not relaxed)
        cons += [out[changes] <= z[changes] - cp.multiply(lo[changes], 1 - d),
                 out[changes] <= cp.multiply(hi[changes], d)]
        if relaxed:
            cons += [d >= 0, d <= 1]
    return cons, 0 if relaxed else len(changes)


def affine_box(W, b, c, r):
    """The box of W v + b over [c - r, c + r] in float64, widened by 1e-12 of its terms' magnitude
    (far above the rounding of the products; the encoding needs bounds that hold, not tight ones)."""
    center, radius = W @ c + b, np.abs(W) @ r
    radius = radius + 1e-12 * (np.abs(W) @ (np.abs(c) + r) + np.abs(b)) + 1e-300
    return center - radius, center + radius

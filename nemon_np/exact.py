"""Complete verification of dense NEMONs, and of stacks of dense and convolutional layers around one, by
mixed-integer linear programming (cvxpy, solved by HiGHS).

Over the input box [u_lo, u_hi] of an image's eps-ball, the fixed point x* = relu(z), z = A x* + B u + b,
is unique (mu_inf(A) < 1), so the set {(u, x*(u))} is exactly the set of (u, x) that satisfy, unit by
unit, the relu equations written with the big-M encoding of Tjeng, Xiao & Tedrake 2019 ("Evaluating
robustness of neural networks with mixed integer programming"): for z_i in [l_i, h_i] with l_i < 0 < h_i,
a binary d_i and

    x_i >= 0,  x_i >= z_i,  x_i <= z_i - l_i (1 - d_i),  x_i <= h_i d_i;

x_i = z_i where l_i >= 0 and x_i = 0 where h_i <= 0 (units that cannot change sign need no binary).
The boxes are sound: x*'s is the embedded network's (:meth:`nemon_np.base.EmbeddedNetwork.interval_bounds`),
z's its image under A x + B u + b by interval arithmetic, narrowed by z <= x*_hi and, where x*_lo > 0,
z >= x*_lo (x* = relu(z)); the same holds for a hidden read-out layer g = relu(H x* + h). Minimizing a
margin y_k - y_j = (C_k - C_j) g + c_k - c_j over these constraints is its exact minimum over the ball.
Any sound boxes give the same set; narrower ones need fewer binaries and smaller constants, so before
its programs each image's boxes are narrowed by linear relaxation (``narrow``: CROWN's own intermediate
bounds, :meth:`nemon_np.stack.StackedClassifier.relaxed_boxes`), which often proves the image by crown
over them alone. The same holds layer by layer in a stack (:func:`stack_program`): each such layer kind
has ``milp``, its constraints between the expressions of its input and output over their boxes (an affine map for
dense, convolution (its sparse matrix) and batch normalization at evaluation, the encoding above for
relu and the dense implicit layer), on flat channel-last states.

Relaxing every d_i to [0, 1] gives the ``lp`` bound: the triangle relaxation of each relu (eliminating
d_i leaves x_i <= h_i (z_i - l_i) / (h_i - l_i)), a linear program over the same boxes. CROWN's
inequalities hold on its feasible set, so it is never below crown's bound over the same boxes.

Solver tolerances. HiGHS works in floating point with feasibility tolerances of 1e-7 (primal) and
1e-6 (integrality); violations enlarge the feasible set and so lower the computed minimum. A pair
(image, class) is proved only when the solver's dual bound on the minimum (for a MILP the branch-
and-bound bound, for an LP its optimum) exceeds tau = DECISION_TOL (1 + ||C_k - C_j||_1 max|g|
+ |c_k - c_j|), which allows for the tolerances at the problem's scale. This is a numerical proof,
not a floating-point one (the interval and crown bounds are the latter). The search asks only for the
margin's sign: it stops once the dual bound is positive (a relative gap of 0.99) or an incumbent is
below -tau. A counterexample is never taken from the solver as is: its input is clipped to the ball,
mapped back to pixels and the fixed point solved again in float64; the image is falsified only when
that margin is <= 0.

An attack first (``attack_steps`` > 0: PGD with that many steps, :func:`nemon_np.attacks.attack`), as
complete verifiers do (alpha,beta-CROWN runs PGD before branch and bound): a point of the ball that the
float64 model misclassifies, checked as above, falsifies the image without a program. Where a model is
not robust this replaces the costliest solves (a program that finds no counterexample before its time
limit leaves "unknown"), and it changes no answer: the attack's points are in the ball.
"""
import time
import warnings

import numpy as np
from scipy.optimize import OptimizeResult

from .attacks import attack
from .pixels import channel_stats, input_box, to_inputs
from .models import NEMON
from .stack import StackedClassifier, as_stack

__all__ = ["DECISION_TOL", "as_milp_stack", "as_dense_stack", "stack_program", "verify_exact", "model_fingerprint",
           "image_cache_key"]

DECISION_TOL = 1e-6


def as_milp_stack(model):
    """The model as a :class:`nemon_np.stack.StackedClassifier` (a NEMON through ``from_model``, the
    same certificates), every layer of which has a mixed-integer form; a one-line error otherwise."""
    if not isinstance(model, (NEMON, StackedClassifier)):
        raise ValueError(f"exact verification handles dense NEMONs and stacks, got {type(model).__name__}")
    model = as_stack(model)
    for layer in model.layers[:-1]:
        if not hasattr(layer, "milp"):
            raise ValueError(f"exact verification handles dense, conv, relu, bn, flatten and nemon layers; "
                             f"{layer.token} has no mixed-integer form")
    return model


# The name from before convolutions had a mixed-integer form; kept so that callers of it still work.
as_dense_stack = as_milp_stack


def stack_program(stack, boxes, relaxed=False):
    """The constraints of one image (module docstring) through every layer's ``milp``: ``boxes`` the
    float64 boxes (lo, hi) of :meth:`nemon_np.stack.StackedClassifier.enclosing_boxes` for this image
    (entry 0 the input's; spatial boxes are flattened here). Returns (u, features, constraints, binaries,
    feature_bound): the input variable in the inputs' own (channel-major) order, the logits layer's input
    as an expression, the constraints, the number of binaries and max |features| over its box."""
    import cvxpy as cp
    boxes = [(np.ravel(lo), np.ravel(hi)) for lo, hi in boxes]
    order = stack.input_order()
    lo, hi = np.empty(len(order)), np.empty(len(order))
    lo[order], hi[order] = boxes[0]
    u = cp.Variable(len(lo))
    expr = u if np.array_equal(order, np.arange(len(order))) else u[order]
    cons, binaries = [u >= lo, u <= hi], 0
    for i, layer in enumerate(stack.layers[:-1]):
        expr, more, extra = layer.milp(expr, boxes[i], boxes[i + 1], relaxed)
        cons, binaries = cons + more, binaries + extra
    return u, expr, cons, binaries, float(np.max(np.abs(boxes[-1])))


def model_fingerprint(model):
    """A digest of every array and setting the model saves (parameters, weights, statistics, gamma,
    metadata): two models share it only when their files would hold the same arrays."""
    import hashlib
    import io
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    digest = hashlib.sha256()
    with np.load(buffer, allow_pickle=False) as arrays:
        for key in sorted(arrays.files):
            value = arrays[key]
            digest.update(key.encode() + str(value.dtype).encode() + str(value.shape).encode() + value.tobytes())
    return digest.hexdigest()


def image_cache_key(fingerprint, pixels, label, eps, certificate, options):
    """A file name for one image's verification: it changes with the model (its :func:`model_fingerprint`),
    the image's pixels, its label, eps, the certificate and the solver options, so that a cached answer is
    read back only for the same question."""
    import hashlib
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(np.ascontiguousarray(pixels, np.float64).tobytes())
    digest.update(repr((int(label), float(eps), certificate, sorted(options.items()))).encode())
    return digest.hexdigest()[:32]


def _verified_margins(model64, pixels, label, options):
    """The margins y_k - y_j of the float64 model at ``pixels`` (one image), its fixed point solved to 1e-12."""
    U = to_inputs(model64, pixels[None, :], np.float64)
    Y = model64.logits(U, tol=1e-12, max_iter=options.get("max_iter", 10_000))
    return Y[0, label] - Y[0]


def verify_exact(model, pixels, labels, eps, *, time_limit=60.0, relaxed=False, lower_bounds=None, progress=None,
                 attack_steps=0, narrow=True, **options):
    """Complete verification of each image's eps-ball (pixel units, clipped to [0, 1]).

    Parameters
    ----------
    model : dense NEMON (weighted or not, with or without a hidden read-out layer), or a stack of
        dense, conv, relu, bn, flatten and (dense) nemon layers, mu_inf < 1
    pixels : (m, features) in [0, 1]; labels : (m,) true classes; eps : float >= 0
    time_limit : seconds per image over all its open classes; what runs out is "unknown"
    relaxed : True solves the LP relaxation (the ``lp`` bound): an image is then "certified" or "unknown"
    lower_bounds : (m, n_out) sound margin lower bounds already known (crown's); the pairs they
        prove (> 0) skip the solver, and the others go to it smallest first
    progress : callable, called with the number of images done
    attack_steps : PGD steps tried on each image that ``lower_bounds`` leave open, before any program (0:
        none; not with ``relaxed``): a misclassified point it finds falsifies the image (module docstring)
    narrow : True narrows the boxes of each image still open by linear relaxation
        (:meth:`nemon_np.stack.StackedClassifier.relaxed_boxes`) and bounds its margins by crown over
        them before any program; the programs are written over the narrowed boxes (fewer binaries,
        smaller big-M constants). Its seconds count against ``time_limit``
    options : tol, max_iter of the interval bounds' solves

    Returns
    -------
    OptimizeResult with ``status`` (m,) of "certified", "falsified", "unknown"; ``certified`` (m,) bool;
    ``margins`` (m, n_out) float64 lower bounds (the solver's dual bound minus tau where it ran, else
    ``lower_bounds``; 0 at the label); ``counterexamples`` (m, features) pixels in the ball, NaN where
    none; ``counterexample_margins`` (m,) the re-solved margin there (<= 0), NaN where none;
    ``seconds`` (m,) solver time per image; ``binaries`` (m,) binaries per program.
    """
    import cvxpy as cp
    model = as_milp_stack(model)
    P = np.asarray(pixels, np.float64)
    labels = np.asarray(labels)
    if P.ndim != 2 or labels.shape != (len(P),):
        raise ValueError(f"pixels must be (m, features) and labels (m,), got {P.shape} and {labels.shape}")
    if not (np.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    m, n_out = len(P), model.n_out
    U_lo, U_hi = input_box(model, P, eps)
    boxes = model.enclosing_boxes(U_lo, U_hi, **options)
    model64 = model.astype(np.float64)
    C, c = (np.asarray(p, np.float64) for p in (model.layers[-1].W, model.layers[-1].b))
    mean, std = channel_stats(model, P.shape[1])
    known = np.full((m, n_out), -np.inf) if lower_bounds is None else np.array(lower_bounds, np.float64)
    status = np.full(m, "unknown", dtype=object)
    margins = known.copy()
    counterexamples = np.full(P.shape, np.nan)
    cx_margins, seconds, binaries = np.full(m, np.nan), np.zeros(m), np.zeros(m, np.int64)
    known[np.arange(m), labels] = np.inf
    attacked = np.full(P.shape, np.nan)
    tried = ~np.all(known > 0, axis=1)
    if attack_steps > 0 and not relaxed and np.any(tried):
        attacked[tried] = attack(model, P[tried], labels[tried], eps, "pgd", steps=int(attack_steps), seed=0)
    for i in range(m):
        k = int(labels[i])
        margins[i, k] = 0.0
        start = time.perf_counter()
        for point in (P[i], attacked[i]):   # the image itself (misclassified or tied?), then the attack's
            if np.all(np.isfinite(point)):
                at_point = np.delete(_verified_margins(model64, point, k, options), k)
                if np.any(at_point <= 0):
                    status[i], counterexamples[i], cx_margins[i] = "falsified", point, at_point.min()
                    break
        if status[i] == "falsified":
            seconds[i] = time.perf_counter() - start
            if progress is not None:
                progress(i + 1)
            continue
        open_j = [j for j in np.argsort(known[i]) if j != k and not known[i, j] > 0]
        image_boxes = [(lo[i], hi[i]) for lo, hi in boxes]
        if open_j and narrow:
            narrowed = model.relaxed_boxes(U_lo[i:i + 1], U_hi[i:i + 1],
                                           boxes=[(lo[i:i + 1], hi[i:i + 1]) for lo, hi in boxes], **options)
            crown, _ = model.relaxed_margins(U_lo[i:i + 1], U_hi[i:i + 1], labels[i:i + 1], boxes=narrowed, **options)
            margins[i] = np.maximum(margins[i], crown[0])
            open_j = [j for j in open_j if not crown[0, j] > 0]
            image_boxes = [(lo[0], hi[0]) for lo, hi in narrowed]
        if open_j:
            u, g, cons, binaries[i], bound = stack_program(model, image_boxes, relaxed)
            # The margin itself is the objective (its constant times a variable fixed at 1), so that
            # the solver's gap and dual bound are the margin's.
            w, offset, one = cp.Parameter(g.shape[0]), cp.Parameter(), cp.Variable()
            problem = cp.Problem(cp.Minimize(w @ g + offset * one), cons + [one == 1])
        decided = True
        for j in open_j:
            w.value, offset.value = C[k] - C[j], c[k] - c[j]
            left = time_limit - (time.perf_counter() - start)
            if left <= 0:
                decided = False
                break
            tau = DECISION_TOL * (1 + np.abs(w.value).sum() * bound + abs(offset.value))
            try:
                # Only the margin's sign is asked: a relative gap of 0.99 ends the search once the dual
                # bound is above 1% of a positive incumbent, and the target once an incumbent is below
                # -tau. cvxpy warns of "inaccurate" solutions at these stops; the dual bound is read.
                # The SciPy canonicalization backend builds a conv stack's program (25,000 variables on
                # MNIST) about 3x faster than the default C++ one: 7 s against 21 s, time the limit
                # does not count.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Solution may be inaccurate")
                    problem.solve(solver=cp.HIGHS, time_limit=left, mip_rel_gap=0.99, mip_abs_gap=tau / 10,
                                  objective_target=-tau, output_flag=False, canon_backend=cp.SCIPY_CANON_BACKEND)
            except (cp.error.SolverError, ValueError) as e:
                # cvxpy raises ValueError("Cannot unpack invalid solution") where HiGHS ends with status
                # UNKNOWN (numerical trouble, seen on LPs of conv stacks): the pair stays open.
                if isinstance(e, ValueError) and "invalid solution" not in str(e):
                    raise
                decided = False
                continue
            info = problem.solver_stats.extra_stats if problem.solver_stats is not None else None
            dual = getattr(info, "mip_dual_bound", None) if binaries[i] else problem.value
            solved = problem.status in ("optimal", "optimal_inaccurate", "user_limit")
            if dual is not None and np.isfinite(dual) and solved:
                margins[i, j] = max(margins[i, j], dual - tau)
            if margins[i, j] > 0:
                continue
            decided = False
            if not relaxed and u.value is not None and problem.value is not None and problem.value < tau:
                # The solver's input as pixels, clipped into the ball; re-solved in float64.
                cand = np.clip(u.value * std + mean, np.maximum(P[i] - eps, 0), np.minimum(P[i] + eps, 1))
                found = _verified_margins(model64, cand, k, options)
                if np.any(np.delete(found, k) <= 0):
                    status[i], counterexamples[i], cx_margins[i] = "falsified", cand, np.delete(found, k).min()
                    break
        seconds[i] = time.perf_counter() - start
        if status[i] != "falsified" and decided:
            status[i] = "certified"
        if progress is not None:
            progress(i + 1)
    certified = status == "certified"
    return OptimizeResult(status=status.astype(str), certified=certified, margins=margins,
                          counterexamples=counterexamples, counterexample_margins=cx_margins, seconds=seconds,
                          binaries=binaries, certified_accuracy=float(certified.mean()) if m else 0.0)

"""Predictions stopped where they provably cannot change (issue 27).

An iterate x of the average iteration for x* = relu(A x* + q) (A a matrix or a convolution) has the
residual r = relu(A x + q) - x, and for mu_inf(A) < 1 (DESIGN.md, "Average iteration")

    ||x - x*||_{inf,eta} <= ||r||_{inf,eta} / (1 - max(mu_inf(A), 0)) =: w,

so x* lies in the box [x - w eta, x + w eta] (and x* >= 0). The read-out's sound interval bounds over
that box (the relative classifier's margins, as the interval certificate takes them, minus their
rounding) decide the class: when every margin of the iterate's own class k is > 0 over the box, the
fixed point's logits have their maximum at k too, and the solve of that sample can stop. Samples that
are never decided stop as :meth:`predict` stops them, at the tolerance (or max_iter).

The residual here is the solver's own pre-activation z = A x + q, in the model's dtype; its rounding
is allowed for by (t + 4) u (max_i sum_j |a_ij| ||x||_inf + ||q||_inf), t the terms of a row's dot
product, u the dtype's unit roundoff: the bound of any summation order, which also covers the FFT
product of :func:`nemon_np.conv.correlate_circular_fft` (a few u of the largest entry, measured). The
injection q is the model's own, as in :meth:`predict`: the classes are those of the exact fixed
points of the model's injections.
"""
import warnings

import numpy as np
from scipy.optimize import OptimizeResult

from .interval import UNIT_ROUNDOFF
from .solvers import ConvergenceWarning

__all__ = ["STOP_RULES", "iterate_error_bound", "decided_labels", "predict_by_rule"]

STOP_RULES = ("converged", "decided")


def iterate_error_bound(X, Z, Q, row_sum, terms, mu, weights=None):
    """Per-sample w with |x_i - x*_i| <= w eta_i for every unit i, from iterates X, their computed
    pre-activations Z = A X + Q (one dtype; any layout (m, ...)) and the injections Q:

        w = ((1 + 2u) ||relu(z) - x||_inf + (t + 4) u (row_sum ||x||_inf + ||q||_inf)) / min(eta)
            / (1 - max(mu, 0)),

    u the unit roundoff of X's dtype, t = ``terms`` (entries of a row of A), ``row_sum`` the largest
    absolute row sum of A, ``mu`` an upper bound of mu_inf(A) < 1, eta the weights (None: 1).
    Returns (m,) float64."""
    if not mu < 1:
        raise ValueError(f"mu_inf = {mu:.6g} >= 1: no contraction, no bound on the iterate's error")
    m = len(X)
    u = float(np.finfo(X.dtype).eps) / 2
    flat = lambda A: A.reshape(m, -1)  # noqa: E731
    # In the arrays' dtype (no float64 copies of the states): the subtraction's rounding is the (1 + 2u).
    r = np.maximum(flat(Z), 0)
    r -= flat(X)
    residual = np.abs(r, out=r).max(axis=1).astype(np.float64)
    x_norm = np.abs(flat(X)).max(axis=1).astype(np.float64)
    scale = row_sum * x_norm + np.abs(flat(Q)).max(axis=1).astype(np.float64)
    eta_min = 1.0 if weights is None else float(np.min(weights))
    # The float64 arithmetic of this line rounds too: 8 u (float64) relative covers it.
    return ((1 + 2 * u) * residual + (terms + 4) * u * scale) / eta_min / (1.0 - max(mu, 0.0)) * (1 + 8 * UNIT_ROUNDOFF)


def _state_box(X, w, weights):
    """[X - w eta, X + w eta] in float64, the lower side clipped at 0 (every fixed point is >= 0),
    sound after the float64 rounding of the sums: |fl(x -+ v) - (x -+ v)| <= u (|x| + v), so each
    sample's widening grows by 2 u (max |x| + its widening), a scalar, instead of an ulp per entry."""
    m = len(X)
    eta_max = 1.0 if weights is None else float(np.max(weights))
    x_norm = np.abs(X.reshape(m, -1)).max(axis=1).astype(np.float64)
    w = w + 2 * UNIT_ROUNDOFF * (x_norm + w * eta_max) / (1.0 if weights is None else float(np.min(weights)))
    widen = w.reshape((-1,) + (1,) * (X.ndim - 1))
    widen = widen if weights is None else widen * weights
    lo = X.astype(np.float64)
    hi = lo + widen
    lo -= widen
    return np.maximum(lo, 0.0, out=lo), hi


def decided_labels(model, U, *, check_every=1, tol=1e-6, max_iter=500, method="average", alpha=None,
                   on_violation="raise", tol_mode="absolute"):
    """The predicted class of each input, each sample's solve stopped as soon as its class is decided
    (module docstring) or, if it never is, where :meth:`predict`'s solve stops it (``tol``, ``tol_mode``,
    ``max_iter``; the other solver options as ``equilibrium`` takes them). The classes are those of
    the fixed points: equal to :meth:`predict`'s, except where a fixed point's top two logits are
    closer than :meth:`predict`'s own error at ``tol``.

    The decision is checked every ``check_every`` iterations; the solves continue from where they
    stopped (one average step at the model's alpha), so a check costs no extra product of A, only the
    read-out's bounds. ``model`` provides ``_decision_parts(U, options)`` (:mod:`nemon_np.base`,
    :mod:`nemon_np.stack`).

    Returns (labels (m,), OptimizeResult with per-sample ``iterations`` (as the solver counts them:
    products of A less one), ``decided`` (stopped by the decision) and ``converged`` (reached ``tol``)).
    Raises ``ValueError`` when the model is not an l_inf contraction (monDEQ's methods, mu_inf >= 1).
    """
    if int(check_every) != check_every or check_every < 1:
        raise ValueError(f"check_every must be an integer >= 1, got {check_every!r}")
    if method not in ("average", "anderson", "adaptive"):
        raise ValueError(f"stop='decided' needs an l_inf-contractive solver (average, anderson, adaptive), "
                         f"got method {method!r}")
    options = dict(tol=tol, max_iter=max_iter, method=method, alpha=alpha, on_violation=on_violation,
                   tol_mode=tol_mode)
    parts = model._decision_parts(U, options)
    if parts is None:   # nothing implicit: the logits are exact at once
        labels = model.predict(U, **options)
        m = len(labels)
        return labels, OptimizeResult(iterations=np.zeros(m, np.int64), decided=np.ones(m, bool),
                                      converged=np.ones(m, bool))
    implicit, Q, logits, margins = parts
    mu = implicit.mu_inf_upper()
    if not mu < 1:
        raise ValueError(f"stop='decided' needs mu_inf < 1, got {mu:.6g}")
    row_sum, terms = implicit._implicit_row_scale()
    eta = implicit._state_weights()
    m = len(Q)
    labels, iterations = np.zeros(m, np.int64), np.zeros(m, np.int64)
    decided, converged = np.zeros(m, bool), np.zeros(m, bool)
    active, X0, done = np.arange(m), None, 0
    while len(active):
        budget = min(int(check_every) - 1, max_iter - done)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)   # a chunk's cap is not the run's
            X, info = implicit._solve_injected(Q, tol, budget, method, alpha, X0, on_violation, tol_mode)
        Z = info.preactivation
        guess = np.argmax(logits(X), axis=1)
        lo, hi = _state_box(X, iterate_error_bound(X, Z, Q, row_sum, terms, mu, eta), eta)
        M = margins(lo, hi, guess)[0]
        M[np.arange(len(guess)), guess] = np.inf
        now_decided = np.all(M > 0, axis=1)
        stop = now_decided | info.converged | (done + info.iterations >= max_iter)
        idx = active[stop]
        labels[idx], iterations[idx] = guess[stop], done + info.iterations[stop]
        decided[idx], converged[idx] = now_decided[stop], info.converged[stop]
        keep = ~stop
        # One average step, x + alpha (relu(z) - x), in place on the kept rows' copies.
        X0, step = X[keep], np.maximum(Z[keep], 0)
        step -= X0
        step *= X.dtype.type(info.alpha)
        X0 += step
        active, Q, done = active[keep], Q[keep], done + budget + 1
    if not np.all(decided | converged):
        warnings.warn(f"{int(np.sum(~(decided | converged)))} samples reached max_iter = {max_iter} undecided and "
                      f"above tol = {tol:.3g}", ConvergenceWarning, stacklevel=2)
    return labels, OptimizeResult(iterations=iterations, decided=decided, converged=converged)


def predict_by_rule(model, U, stop, solver_options):
    """``model.predict(U, stop, **solver_options)``: argmax of the logits at the solver's tolerance
    (``stop="converged"``) or :func:`decided_labels` (``stop="decided"``)."""
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
    if stop == "decided":
        return decided_labels(model, U, **solver_options)[0]
    return np.argmax(model.logits(U, **solver_options), axis=1)

"""Robustness radii of single images: the largest l_inf radius (pixel units) a certificate proves, the
exact radius between what exact verification proves and what it falsifies, and the radius at which
an attack first succeeds.

For an image u with label k, the exact robustness radius is r* = sup{eps : every u' in the eps-ball
(clipped to [0, 1]) keeps class k} (issue 26). Each function brackets a radius by bisection on eps
in [0, eps_max] to ``resolution``; keyword ``options`` (tol, max_iter) go to the certificates'
solves:

* :func:`certified_radius`: the largest eps (on the bisection grid) at which a certificate certifies
  the image; every certificate's bound loosens as the ball grows, so this is a lower bound of r*.
* :func:`exact_radius`: (lower, upper) with lower <= r* <= upper: lower the largest eps exact
  certifies, upper the distance ||u' - u||_inf of the nearest counterexample it found (a verified
  input that changes the class), or eps_max when none was found. A time-limited "unknown" is searched
  below, as a failure is, so that the lower end remains a proof.
* :func:`attack_radius`: the smallest eps at which PGD (20 steps, a random start) changes the
  class: an upper bound of r*, which an attack that misses overestimates.
"""
import numpy as np

from .attacks import attack
from .certificates import ExactCertificate, certify
from .pixels import forward_options, solver_options_for, to_inputs

__all__ = ["certified_radius", "exact_radius", "attack_radius"]


def _check(pixels, labels, eps_max, resolution):
    P = np.asarray(pixels, np.float64)
    labels = np.asarray(labels)
    if P.ndim != 2 or labels.shape != (len(P),):
        raise ValueError(f"pixels must be (m, features) and labels (m,), got {P.shape} and {labels.shape}")
    if not (0 < eps_max <= 1 and 0 < resolution < eps_max):
        raise ValueError(f"eps_max must lie in (0, 1] and resolution in (0, eps_max), got {eps_max!r} and "
                         f"{resolution!r}")
    return P, labels


def _bisect(proved, eps_max, resolution):
    """(largest eps proved, smallest eps not proved) by bisection; proved(eps) -> True, False or None
    (undecided, searched below like False). 0 is taken as proved."""
    lo, hi = 0.0, eps_max
    if proved(eps_max):
        return eps_max, eps_max
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        # Undecided (None) is searched below, as a failure is: the lower end stays a proof, and
        # the upper end of r*'s bracket comes from counterexamples only.
        lo, hi = (mid, hi) if proved(mid) else (lo, mid)
    return lo, hi


def certified_radius(model, pixels, labels, certificate="crown", eps_max=0.5, resolution=1e-3, **options):
    """(m,) the largest eps (to ``resolution``) at which ``certificate`` certifies each image; 0 where it does
    not certify even the image itself (misclassified)."""
    P, labels = _check(pixels, labels, eps_max, resolution)
    radii = np.zeros(len(P))
    for i in range(len(P)):
        def proved(eps):
            return bool(certify(model, P[i:i + 1], labels[i:i + 1], eps, certificate, **options).certified[0])
        radii[i] = _bisect(proved, eps_max, resolution)[0] if proved(0.0) else 0.0
    return radii


def exact_radius(model, pixels, labels, eps_max=0.5, resolution=1e-3, time_limit=60.0, **options):
    """(lower, upper), each (m,): lower <= r* <= upper for each image (module docstring)."""
    P, labels = _check(pixels, labels, eps_max, resolution)
    method = ExactCertificate(time_limit)
    lower, upper = np.zeros(len(P)), np.full(len(P), eps_max)
    for i in range(len(P)):
        def proved(eps):
            res = certify(model, P[i:i + 1], labels[i:i + 1], eps, method, **options)
            if res.status[0] == "falsified":
                upper[i] = min(upper[i], float(np.max(np.abs(res.counterexamples[0] - P[i]))))
                return False
            return True if res.status[0] == "certified" else None
        if proved(0.0) is not True:   # misclassified: its own counterexample, at distance 0
            continue
        lower[i] = _bisect(proved, eps_max, resolution)[0]
    return lower, upper


def attack_radius(model, pixels, labels, eps_max=0.5, resolution=1e-3, steps=20, seed=0):
    """(m,) the smallest eps (to ``resolution``) at which PGD changes each image's class; eps_max where it
    never does, 0 where the image is misclassified."""
    P, labels = _check(pixels, labels, eps_max, resolution)
    fwd = forward_options(solver_options_for(model))
    radii = np.zeros(len(P))
    for i in range(len(P)):
        def holds(eps):
            X = attack(model, P[i:i + 1], labels[i:i + 1], eps, "pgd", steps=steps, seed=seed) if eps else P[i:i + 1]
            return bool(model.predict(to_inputs(model, X), **fwd)[0] == labels[i])
        radii[i] = _bisect(holds, eps_max, resolution)[1] if holds(0.0) else 0.0
    return radii

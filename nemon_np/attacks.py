"""Attacks on the l_inf balls of images (pixel units, [0, 1] images): uniform noise, FGSM and PGD
through the model's implicit input gradient (Madry et al. 2018), for any model with ``logits`` and
``input_grad`` (dense, conv and stacked). They give upper bounds of robust accuracy, and their
successes are real counterexamples that the exact verifier takes before solving anything."""
import numpy as np

from .pixels import channel_stats, forward_options, solver_options_for, to_inputs

__all__ = ["attack", "ATTACKS"]

ATTACKS = ("noise", "fgsm", "pgd")


def _ce_pixel_grad(model, P, y, options):
    """Gradient of each sample's own cross-entropy with respect to its pixels."""
    U = to_inputs(model, P)
    _, std = channel_stats(model, P.shape[1])
    return model.input_grad(U, y, **options) * len(P) / std


def attack(model, pixels, labels, eps, kind="pgd", steps=10, step_size=None, seed=0, options=None):
    """Perturbed pixels within the l_inf ball of radius ``eps`` around ``pixels``, clipped to [0, 1].

    kind: "noise" (uniform in the ball), "fgsm" (one signed-gradient step of size eps) or "pgd"
    (random start in the ball, then ``steps`` signed-gradient steps of ``step_size``, default
    2.5 eps / steps, each projected back onto the ball and [0, 1]; the iterate with the highest
    loss per sample is kept). Gradients are the model's implicit input gradients.
    """
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    P = np.asarray(pixels, np.float64)
    options = options or solver_options_for(model)
    rng = np.random.default_rng(seed)
    lo, hi = np.maximum(P - eps, 0.0), np.minimum(P + eps, 1.0)
    if kind == "noise":
        return np.clip(P + rng.uniform(-eps, eps, size=P.shape), lo, hi)
    if kind == "fgsm":
        return np.clip(P + eps * np.sign(_ce_pixel_grad(model, P, labels, options)), lo, hi)
    step_size = 2.5 * eps / steps if step_size is None else step_size
    X = np.clip(P + rng.uniform(-eps, eps, size=P.shape), lo, hi)
    best, best_loss = X.copy(), np.full(len(P), -np.inf)
    fwd = forward_options(options)
    for _ in range(steps + 1):
        logits = model.logits(to_inputs(model, X), **fwd).astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        loss = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(P)), labels]
        better = loss > best_loss
        best[better], best_loss[better] = X[better], loss[better]
        X = np.clip(X + step_size * np.sign(_ce_pixel_grad(model, X, labels, options)), lo, hi)
    return best

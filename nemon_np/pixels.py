"""From pixels to model inputs: the normalization a model was trained with, l_inf boxes around
images, and the solver settings certified for a model. Pixel values are in [0, 1]."""
import numpy as np

__all__ = ["solver_options_for", "forward_options", "channel_stats", "to_inputs", "input_box", "input_ball"]


def solver_options_for(model, tol=None, max_iter=1000):
    """Forward/adjoint solvers certified for ``model``: monDEQ models (metadata certificate
    "mu_2") use Peaceman-Rachford and the direct adjoint, NEMON models the average iteration.
    Default tolerance 1e-4 in float32 (whose rounding stalls solves near 1e-5), 1e-8 in float64."""
    if tol is None:
        tol = 1e-4 if model.dtype == np.float32 else 1e-8
    if model.metadata.get("certificate") == "mu_2":
        return dict(tol=tol, max_iter=max_iter, method="peaceman-rachford", adjoint="direct")
    return dict(tol=tol, max_iter=max_iter, method="average", adjoint="iterative")


def forward_options(options):
    """The forward solve's settings of ``options`` (a :func:`solver_options_for` dict): all but the adjoint's,
    which ``logits`` and ``predict`` do not take. A new dict; ``options`` is left as it is."""
    return {k: v for k, v in options.items() if k != "adjoint"}


def channel_stats(model, n_features):
    """Per-feature mean and std (float64, (n_features,)) of the model's normalization (metadata
    "mean" and "std", per channel, channel-major layout); 0 and 1 when it has none."""
    mean = np.atleast_1d(np.asarray(model.metadata.get("mean", 0.0), np.float64))
    std = np.atleast_1d(np.asarray(model.metadata.get("std", 1.0), np.float64))
    if n_features % len(mean) or len(std) != len(mean):
        raise ValueError(f"the model's normalization has {len(mean)} channels, which do not divide "
                         f"{n_features} features")
    per = n_features // len(mean)
    return np.repeat(mean, per), np.repeat(std, per)


def to_inputs(model, pixels, dtype=None):
    """Model inputs ``(pixels - mean) / std`` from pixels in [0, 1], shape (m, features), per channel
    (channel-major layout, as :func:`nemon_np.data.normalize`), in ``dtype`` (default the model's)."""
    pixels = np.asarray(pixels, np.float64)
    mean, std = channel_stats(model, pixels.shape[1])
    return ((pixels - mean) / std).astype(model.dtype if dtype is None else dtype)


def input_box(model, pixels, eps):
    """The l_inf ball of radius ``eps`` around each image, clipped to the valid range [0, 1]
    (DESIGN.md: clipping is allowed and tightens), as float64 model inputs (U_lo, U_hi) (m, features).

    Normalization is increasing per feature (std > 0), so the box maps onto a box. The float64
    values hold every pixel vector of the ball up to float64 rounding of the normalization (an
    ulp; the interval bounds allow for more)."""
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    P = np.asarray(pixels, np.float64)
    if P.ndim != 2:
        raise ValueError(f"pixels must have shape (m, features), got {P.shape}")
    if P.size and not (P.min() >= 0 and P.max() <= 1):
        raise ValueError(f"pixels must lie in [0, 1], got range [{P.min():g}, {P.max():g}]")
    lo, hi = np.maximum(P - eps, 0.0), np.minimum(P + eps, 1.0)
    U_lo, U_hi = to_inputs(model, lo, np.float64), to_inputs(model, hi, np.float64)
    # One ulp outward each side: the normalization's own rounding.
    return np.nextafter(U_lo, -np.inf), np.nextafter(U_hi, np.inf)


def input_ball(U, eps, mean=0.0, std=1.0, clip=True):
    """The l_inf ball of radius ``eps`` in pixel units around normalized inputs U (m, features), as a
    box (U_lo, U_hi) in U's dtype: ``U -+ eps / std``, clipped to the normalized image of [0, 1] when
    ``clip`` (images), per feature (mean, std broadcast against a row). For training and monitoring;
    certificates take pixels (:func:`input_box`)."""
    U = np.asarray(U)
    std = np.asarray(std, np.float64)
    lo, hi = U - eps / std, U + eps / std
    if clip:
        mean = np.asarray(mean, np.float64)
        lo, hi = np.maximum(lo, -mean / std), np.minimum(hi, (1.0 - mean) / std)
    return lo.astype(U.dtype), hi.astype(U.dtype)

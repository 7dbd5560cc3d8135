"""Certified l_inf robustness: lower bounds of every margin y_k - y_j over the ball of radius eps
around an image (pixel units, clipped to [0, 1]), by name from one registry.

A certificate computes, for true class k, lower bounds m_j of y_k(u) - y_j(u) over every input u of
the ball (m_k = 0); the prediction is certified correct when every other m_j > 0. The bounds are
sound for the exact model with the stored parameters: solver tolerances and float rounding are
allowed for (see :meth:`nemon_np.base.ImplicitClassifier.interval_bounds`).

* ``lipschitz`` (DESIGN.md, "Input-output Lipschitz bound"): m_j = (a sound lower bound of the margin
  at the image itself) - ||(c_k - c_j) diag(eta)||_1 ||diag(eta)^-1 B||_inf eps_u / (1 - max(mu, 0)),
  eps_u = eps / min(std). For conv models B and C as in :func:`nemon_np.lipschitz.io_rows`; a
  hidden read-out layer multiplies the radius by ||H~||_inf (:func:`nemon_np.lipschitz.lipschitz_factors`).
* ``interval`` (DESIGN.md, "Interval certificates"): the relative classifier on the fixed point of the
  embedded network over the box.
* ``crown`` (:meth:`nemon_np.base.ImplicitClassifier.relaxed_margins`): linear relaxation (CROWN)
  of the read-out and of ``steps`` copies of the fixed-point map, bounded over the embedded network's
  box of x* and the input box; never below ``interval``.
* ``crown-full``: ``crown`` over boxes narrowed by the same relaxation, layer by layer
  (:meth:`nemon_np.stack.StackedClassifier.relaxed_boxes`; CROWN's own intermediate bounds, as Zhang
  et al. 2018 compute them): never below ``crown``, at the cost of two relaxation rows per open unit.
* ``combined``: the larger of the Lipschitz and the interval lower bound, pair by pair (both are
  lower bounds), so it certifies every point that either certifies, and possibly more.
* ``exact`` (:mod:`nemon_np.exact`, dense NEMONs): complete verification by mixed-integer linear
  programming on the pairs that crown leaves open; each image ends "certified", "falsified" (with a
  counterexample re-solved in float64) or "unknown" (its time limit ran out). ``lp``: the same
  program's linear relaxation (the triangle relaxation of every relu), never below crown.

Every certificate reports a status per image: "certified" or, where it proves nothing, "unknown";
only ``exact`` also says "falsified".

Every certificate needs mu_inf < 1 and raises :class:`nemon_np.WellPosednessError` otherwise (a
monDEQ model is certified by mu_2 alone, which gives neither bound).
"""
import os
import pathlib

import numpy as np
from scipy.optimize import OptimizeResult

from .conv_model import ConvNEMON
from .lipschitz import lipschitz_factors
from .measures import norm_inf
from .pixels import channel_stats, input_box, to_inputs

__all__ = ["Certificate", "CERTIFICATES", "get_certificate", "certify", "certified_rows"]

CERTIFICATES = {}


def _register(cls):
    CERTIFICATES[cls.name] = cls
    return cls


def get_certificate(name):
    """The :class:`Certificate` registered under ``name`` (an instance); a one-line ``ValueError`` otherwise."""
    if name not in CERTIFICATES:
        raise ValueError(f"unknown certificate {name!r}; choose one of {', '.join(CERTIFICATES)}")
    return CERTIFICATES[name]()


class Certificate:
    """One way of bounding margins over pixel balls. Subclasses define :meth:`margins`; a certificate
    that can also falsify overrides :meth:`run` and is ``complete`` when it decides every image it is
    given the time for (certified or falsified)."""
    name = None
    complete = False

    def margins(self, model, pixels, labels, eps, **options):
        """Sound lower bounds (m, n_out), float64, of y_k - y_j over the eps-ball of each image
        (pixels (m, features) in [0, 1]), k = labels, 0 at j = k; ``options`` (tol, max_iter) go to
        the fixed-point solves."""
        raise NotImplementedError

    def run(self, model, pixels, labels, eps, **options):
        """{"margins": :meth:`margins`, "status": (m,) "certified" or "unknown"} for a batch of images."""
        M = self.margins(model, pixels, labels, eps, **options)
        return {"margins": M, "status": np.where(certified_rows(M, labels), "certified", "unknown")}


@_register
class LipschitzCertificate(Certificate):
    """The Lipschitz bound: margin at the image minus its largest change over the ball."""
    name = "lipschitz"

    def margins(self, model, pixels, labels, eps, **options):
        U = to_inputs(model, pixels, np.float64)
        M, _ = model.interval_margins(U, U, labels, **options)   # a sound margin at the image itself
        mu = model.mu_inf_upper()
        _, std = channel_stats(model, U.shape[1])
        factors = {k: R for k, (R, _) in lipschitz_factors(model).items()}
        Ct = factors.pop("C")
        pair = np.abs(Ct[:, None, :] - Ct[None, :, :]).sum(axis=2)   # ||(c_k - c_j) diag(eta)||_1
        inner = np.prod([norm_inf(R) for R in factors.values()])     # ||B~||_inf (times ||H~||_inf)
        # The relative 1e-12 covers the rounding of the radius's few float64 products and sums.
        radius = pair * inner * (eps / std.min()) / (1.0 - max(mu, 0.0)) * (1 + 1e-12)
        rows = np.arange(len(U))
        M = M - radius[labels]
        M[rows, labels] = 0.0
        return M


@_register
class IntervalCertificate(Certificate):
    """The embedded network's box and the relative classifier."""
    name = "interval"

    def margins(self, model, pixels, labels, eps, **options):
        U_lo, U_hi = input_box(model, pixels, eps)
        return model.interval_margins(U_lo, U_hi, labels, **options)[0]


@_register
class CrownCertificate(Certificate):
    """Linear relaxation through the read-out and ``steps`` copies of the fixed-point map, over the
    embedded network's box. Default steps: 8 for dense models (cheap; on the default gamma = 0.95
    MNIST model 2 -> 4 -> 8 steps certify 58.0 -> 61.7 -> 62.2% at eps 0.02, 16 no more), 2 for conv
    models (a step convolves n_out copies of the state; the gamma = 0.5 models of docs/benchmarks.md
    certify no more with 4)."""
    name = "crown"

    def __init__(self, steps=None):
        self.steps = steps

    def margins(self, model, pixels, labels, eps, **options):
        U_lo, U_hi = input_box(model, pixels, eps)
        steps = self.steps if self.steps is not None else model.crown_steps
        return model.relaxed_margins(U_lo, U_hi, labels, steps=steps, **options)[0]


@_register
class CrownFullCertificate(CrownCertificate):
    """CROWN with its own intermediate bounds (Zhang et al. 2018): the relus and the implicit layer relax
    over the boxes of :meth:`nemon_np.stack.StackedClassifier.relaxed_boxes`, each narrowed by the same
    back-substitution, rather than over interval boxes; never below ``crown``, about 4 CPU s an image on
    the MNIST stack ``nemon-medium`` (two rows per open unit through every layer before it). NEMONs
    and ConvNEMONs are certified through their stack form (the same function). ``rounds``: passes of
    the narrowing (``relaxed_boxes``'s; each repeats the cost)."""
    name = "crown-full"

    def __init__(self, steps=None, rounds=1):
        super().__init__(steps)
        self.rounds = rounds

    def margins(self, model, pixels, labels, eps, **options):
        from .stack import as_stack
        stack = as_stack(model)
        U_lo, U_hi = input_box(stack, pixels, eps)
        steps = self.steps if self.steps is not None else stack.crown_steps
        boxes = stack.enclosing_boxes(U_lo, U_hi, **options)
        narrowed = stack.relaxed_boxes(U_lo, U_hi, steps=steps, rounds=self.rounds, boxes=boxes, **options)
        full = stack.relaxed_margins(U_lo, U_hi, labels, steps=steps, boxes=narrowed, **options)[0]
        # A relu's relaxation over a narrower box is not tighter for every row, so crown's bound is kept
        # where it is the larger.
        return np.maximum(full, stack.relaxed_margins(U_lo, U_hi, labels, steps=steps, boxes=boxes, **options)[0])


@_register
class CombinedCertificate(Certificate):
    """The larger of the Lipschitz and the interval lower bound of each margin."""
    name = "combined"

    def margins(self, model, pixels, labels, eps, **options):
        return np.maximum(LipschitzCertificate().margins(model, pixels, labels, eps, **options),
                          IntervalCertificate().margins(model, pixels, labels, eps, **options))


def _verify_image(item, shared):
    """One image's row of :func:`nemon_np.exact.verify_exact` (a task that Dask can run anywhere)."""
    from .exact import verify_exact
    _, pixels, label, crown = item
    model, eps, args = shared
    res = verify_exact(model, pixels[None, :], np.array([label]), eps, lower_bounds=crown[None, :], **args)
    return {k: res[k][0] for k in ExactCertificate.KEYS}


def _read_row(path):
    """A cached image's row (with the effort it was solved with, where the file has it), or None when
    there is none."""
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = ExactCertificate.KEYS + tuple(k for k in ("time_limit", "attack_steps", "narrow") if k in f.files)
            return {k: f[k][()] if f[k].ndim == 0 else f[k] for k in keys}
    except (FileNotFoundError, ValueError, KeyError, OSError):
        return None   # absent, or cut short by an interruption: solved again


def _write_row(path, row):
    """Write a row atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in row.items()})
    os.replace(tmp, path)


@_register
class ExactCertificate(Certificate):
    """Complete verification of dense NEMONs (:func:`nemon_np.exact.verify_exact`): crown first, then a
    mixed-integer program for each pair it leaves open; ``time_limit`` seconds an image.

    Images are independent work: with ``n_jobs`` > 1 they go to a local Dask cluster of that many
    processes, with ``scheduler`` (``tcp://HOST:PORT``) to a running one (:mod:`nemon_np.cluster`); the
    statuses are those of one process, up to what a time limit cuts off. With ``cache`` (a folder),
    every image is kept there as it finishes, under a name derived from the model's arrays, the image,
    its label, eps and the solver options, so that an interrupted verification resumes without solving
    it again and a changed model never reads a stale answer. A decided image (certified or falsified)
    is read back as it is; an "unknown" one only by a run that would not try harder (a time limit and
    attack steps no larger than those it was left unknown with), and is solved again otherwise.
    ``attack_steps``: PGD steps on each image crown leaves open, before any program (an image it breaks
    is falsified at once; :func:`nemon_np.exact.verify_exact`); 0 for none. ``narrow``: each open
    image's boxes narrowed by linear relaxation before its programs (``verify_exact``'s); a cached
    "unknown" found without it is solved again. ``progress``: a progress bar over the images."""
    name = "exact"
    relaxed = False
    complete = True
    KEYS = ("margins", "status", "counterexamples", "counterexample_margins", "seconds", "binaries")

    def __init__(self, time_limit=60.0, n_jobs=1, scheduler=None, cache=None, progress=False, attack_steps=20,
                 narrow=True):
        self.time_limit, self.n_jobs = time_limit, int(n_jobs)
        if self.n_jobs < 1:
            raise ValueError(f"n_jobs must be >= 1, got {n_jobs!r}")
        if int(attack_steps) != attack_steps or attack_steps < 0:
            raise ValueError(f"attack_steps must be a whole number >= 0, got {attack_steps!r}")
        self.scheduler, self.cache, self.progress = scheduler, cache, progress
        self.attack_steps = 0 if self.relaxed else int(attack_steps)
        self.narrow = bool(narrow)

    def run(self, model, pixels, labels, eps, **options):
        from .exact import as_milp_stack, image_cache_key, model_fingerprint
        P, labels = np.asarray(pixels, np.float64), np.asarray(labels)
        crown = CrownCertificate().margins(model, P, labels, eps, **options)
        stack = as_milp_stack(model)   # once here, not once an image in verify_exact
        rows = [None] * len(labels)
        names = [None] * len(labels)
        if self.cache is not None:
            folder = pathlib.Path(self.cache)
            folder.mkdir(parents=True, exist_ok=True)
            fingerprint = model_fingerprint(model)
            names = [folder / f"{image_cache_key(fingerprint, P[i], labels[i], eps, self.name, options)}.npz"
                     for i in range(len(labels))]
            rows = [self._reusable(_read_row(path)) for path in names]
        todo = [(i, P[i], labels[i], crown[i]) for i in range(len(labels)) if rows[i] is None]
        effort = dict(time_limit=self.time_limit, attack_steps=self.attack_steps, narrow=self.narrow)
        shared = (stack, eps, dict(relaxed=self.relaxed, **effort, **options))
        for (i, *_), row in self._map(todo, shared):
            rows[i] = row
            if names[i] is not None:
                _write_row(names[i], {**row, **effort})
        return {k: np.stack([row[k] for row in rows]) if rows else np.zeros(0) for k in self.KEYS}

    def _reusable(self, row):
        """A cached row, unless it is "unknown" from a smaller effort than this run's (then None)."""
        if row is None or str(row["status"]) != "unknown":
            return row
        if (row.get("time_limit", 0.0) >= self.time_limit and row.get("attack_steps", 0) >= self.attack_steps
                and row.get("narrow", False) >= self.narrow):
            return row
        return None

    def _map(self, todo, shared):
        """(item, row) for each image of ``todo``, here or on Dask, as each finishes."""
        if not todo:
            return
        if self.n_jobs == 1 and self.scheduler is None:
            from tqdm.auto import tqdm
            for item in tqdm(todo, desc=self.name, unit="image", disable=None if self.progress else True):
                yield item, _verify_image(item, shared)
            return
        from .cluster import dask_client, map_unordered
        with dask_client(self.scheduler, self.n_jobs) as client:
            yield from map_unordered(client, _verify_image, todo, key=lambda item: f"nemon-{self.name}-{item[0]}",
                                     desc=self.name, unit="image", progress=self.progress, shared=shared)

    def margins(self, model, pixels, labels, eps, **options):
        return self.run(model, pixels, labels, eps, **options)["margins"]


@_register
class LPCertificate(ExactCertificate):
    """The exact program's linear relaxation (the triangle relaxation of every relu, over the same
    boxes): between crown and exact."""
    name = "lp"
    relaxed = True
    complete = False


def certified_rows(margins, labels):
    """True where every margin lower bound but the true class's is > 0."""
    M = np.array(margins, np.float64)
    M[np.arange(len(M)), labels] = np.inf
    return np.all(M > 0, axis=1)


def certify(model, pixels, labels, eps, certificate="interval", *, batch_size=None, progress=None, **options):
    """Certify a model's predictions over the l_inf balls of radius ``eps`` (pixel units) around images.

    Parameters
    ----------
    model : NEMON or ConvNEMON with mu_inf < 1 (else :class:`nemon_np.WellPosednessError`)
    pixels : (m, features) array in [0, 1], channel-major as the data loaders flatten images
    labels : (m,) integer true classes
    eps : float >= 0, the radius in pixel units (boxes are clipped to [0, 1])
    certificate : a name of :data:`CERTIFICATES`: "interval" (default), "lipschitz", "crown", "crown-full",
        "combined", "lp" or "exact"; or a :class:`Certificate` (``ExactCertificate(time_limit=10)``)
    batch_size : images per solve (default 2000 for dense models, 100 for conv models)
    progress : callable, optional, called with the number of images done after each batch
    options : tol, max_iter of the fixed-point solves (:meth:`interval_bounds`)

    Returns
    -------
    OptimizeResult with ``certified`` (m,) bool (correct and provably constant over the ball),
    ``margins`` (m, n_out) float64 lower bounds of y_k - y_j, ``status`` (m,) "certified", "unknown"
    or (exact) "falsified", ``certified_accuracy`` (the mean of certified), ``certificate`` and ``eps``;
    exact adds ``counterexamples``, ``counterexample_margins``, ``seconds`` and ``binaries``
    (:func:`nemon_np.exact.verify_exact`).
    """
    method = certificate if isinstance(certificate, Certificate) else get_certificate(certificate)
    P = np.asarray(pixels, np.float64)
    labels = np.asarray(labels)
    if P.ndim != 2 or labels.shape != (len(P),):
        raise ValueError(f"pixels must be (m, features) and labels (m,), got {P.shape} and {labels.shape}")
    batch_size = batch_size or (100 if isinstance(model, ConvNEMON) else 2000)
    parts = []
    for start in range(0, len(P), batch_size):
        parts.append(method.run(model, P[start:start + batch_size], labels[start:start + batch_size], eps, **options))
        if progress is not None:
            progress(min(start + batch_size, len(P)))
    if not parts:
        parts = [{"margins": np.zeros((0, model.n_out)), "status": np.zeros(0, str)}]
    res = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # certified means proved: a margin bound > 0 for every other class, and not falsified
    certified = certified_rows(res["margins"], labels) & (res["status"] == "certified")
    return OptimizeResult(certified=certified, certified_accuracy=float(certified.mean()) if len(P) else 0.0,
                          certificate=method.name, eps=float(eps), **res)

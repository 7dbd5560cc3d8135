"""l_inf robustness of trained models in pixel units: attacks, certified accuracy, the report.

Accuracy under uniform noise, FGSM and PGD (through the model's implicit input gradient), the
certified accuracy of each certificate of :mod:`nemon_np.certificates` (rows ``certified-lipschitz``,
``certified-interval`` and ``certified-crown``), the Lipschitz bound and an empirical lower bound of the Lipschitz
constant: ``python -m nemon_np.robustness RUN_DIR``.
"""
import numpy as np

from .attacks import ATTACKS, attack
from .certificates import certify, get_certificate
from .lipschitz import lipschitz_bound
from .pixels import forward_options, solver_options_for, to_inputs
from .solvers import WellPosednessError

__all__ = ["attack", "attack_flags", "empirical_lipschitz", "robustness_report", "plot_report", "ATTACKS",
           "REPORT_CERTIFICATES"]

# The certificates the report tabulates, each as a row "certified-<name>".
REPORT_CERTIFICATES = ("lipschitz", "interval", "crown")


def empirical_lipschitz(model, pixels, radius=1e-3, steps=3, options=None):
    """A lower bound of the l_inf -> l_inf Lipschitz constant of u -> y (normalized-input units):
    for every sample and logit k, signed-gradient ascent of |y_k(u + d) - y_k(u)| over ||d||_inf <= radius,
    the largest ratio |dy_k| / ||d||_inf found. Every ratio is realized by two actual forward solves."""
    options = options or solver_options_for(model, tol=1e-10)
    fwd = forward_options(options)
    U = to_inputs(model, pixels).astype(np.float64)
    if model.dtype != np.float64:
        raise ValueError("empirical_lipschitz needs a float64 model (differences of 1e-3 are lost in float32)")
    Y0 = model.logits(U, **fwd)
    best = 0.0
    for k in range(model.n_out):
        for sign in (1.0, -1.0):
            E = np.zeros((len(U), model.n_out))
            E[:, k] = sign
            D = np.zeros_like(U)
            for _ in range(steps):
                D = np.clip(D + radius * np.sign(model.input_vjp(U + D, E, **options)), -radius, radius)
            dy = np.abs(model.logits(U + D, **fwd)[:, k] - Y0[:, k])
            du = np.abs(D).max(axis=1)
            ok = du > 0
            if ok.any():
                best = max(best, float((dy[ok] / du[ok]).max()))
    return best


def attack_flags(model, pixels, labels, eps, pgd_steps=10, seed=0, options=None, chunk=None, progress=None):
    """{kind: (m,) bool, image classified correctly after that attack at ``eps``} for each kind of
    :data:`ATTACKS` (:func:`nemon_np.attacks.attack`, PGD with ``pgd_steps`` steps). An image that survives
    every attack is an upper bound's witness only; an image certified but not surviving is a bug.

    ``chunk`` images are attacked at a time (None: all at once), bounding the memory of attacks on 10,000
    images; every chunk draws its random starts from ``seed``, so the figures depend on ``chunk``.
    ``progress(kind, flags)``, if given, is called after each attack."""
    P = np.asarray(pixels, np.float64)
    labels = np.asarray(labels)
    if len(P) == 0 or len(P) != len(labels):
        raise ValueError(f"attack_flags needs one label an image and at least one image, got {len(P)} images "
                         f"and {len(labels)} labels")
    options = options or solver_options_for(model)
    fwd = forward_options(options)
    chunk = chunk or len(P)
    flags = {}
    for kind in ATTACKS:
        flags[kind] = np.concatenate([
            model.predict(to_inputs(model, attack(model, P[s:s + chunk], labels[s:s + chunk], eps, kind,
                                                  steps=pgd_steps, seed=seed, options=options)), **fwd)
            == labels[s:s + chunk] for s in range(0, len(P), chunk)])
        if progress:
            progress(kind, flags[kind])
    return flags


def certified_flags(model, pixels, labels, eps_list, certificates=REPORT_CERTIFICATES, progress=None):
    """{"certified-<name>": [(m,) bool certified flags at each eps]} for each certificate (a name or a
    :class:`nemon_np.certificates.Certificate`, such as ``ExactCertificate(time_limit=10)``), and under
    "unknown" {"certified-<name>": [images left undecided at each eps]} for those that can also falsify
    (exact: its time limit ran out); None for every row when the model has no l_inf certificate
    (mu_inf >= 1: monDEQ), with the reason under "note". ``progress``, if given, is called after each
    certificate at each eps with a line saying what it found ("certified-crown at eps 0.3: 88.80%")."""
    rows, unknown = {}, {}
    methods = [get_certificate(c) if isinstance(c, str) else c for c in certificates]
    try:
        for method in methods:
            row = f"certified-{method.name}"
            rows[row] = []
            for eps in eps_list:
                res = certify(model, pixels, labels, eps, method)
                rows[row].append(res.certified)
                if method.complete:
                    unknown.setdefault(row, []).append(int(np.sum(res.status == "unknown")))
                if progress:
                    progress(f"{row} at eps {eps:g}: {100 * np.mean(res.certified):.2f}%")
    except WellPosednessError as e:
        return {f"certified-{method.name}": None for method in methods} | {"note": str(e)}
    return rows | ({"unknown": unknown} if unknown else {})


def robustness_report(model, pixels, labels, eps_list=(0.0, 0.01, 0.02, 0.05, 0.1), pgd_steps=10, seed=0,
                      lipschitz_samples=50, progress=None, certificates=REPORT_CERTIFICATES):
    """Accuracy under each attack at each eps (pixel units), certified accuracy by each certificate
    (:func:`certified_flags`; ``report["unknown"]`` counts what exact left undecided), the Lipschitz
    bound and an empirical lower bound of the Lipschitz constant, as one dict.

    ``"broken_certified"`` holds, per certificate and eps, how many certified images some attack
    misclassifies. A certificate is a proof, so every count must be 0; anything else is a bug
    (the report then says so). ``progress``, if given, is called after each attack and each
    certificate at each eps with a line saying what it found ("pgd at eps 0.3: 92.15%")."""
    options = solver_options_for(model)
    fwd = forward_options(options)
    P = np.asarray(pixels, np.float64)
    labels = np.asarray(labels)
    report = {"clean_acc": float(np.mean(model.predict(to_inputs(model, P), **fwd) == labels)),
              "eps": list(eps_list), "attacks": {kind: [] for kind in ATTACKS}}
    survived = []   # correct under every attack, at each eps
    for eps in eps_list:
        say = progress and (lambda kind, ok, eps=eps:
                            progress(f"{kind} at eps {eps:g}: {100 * np.mean(ok):.2f}%"))
        flags = attack_flags(model, P, labels, eps, pgd_steps, seed, options, progress=say)
        for kind, ok in flags.items():
            report["attacks"][kind].append(float(np.mean(ok)))
        survived.append(np.logical_and.reduce(list(flags.values())))
    flags = certified_flags(model, P, labels, eps_list, certificates, progress=progress)
    report["unknown"] = flags.pop("unknown", {})
    report["certified"] = {row: v if row == "note" or v is None else [float(np.mean(f)) for f in v]
                           for row, v in flags.items()}
    report["broken_certified"] = {row: [int(np.sum(f & ~ok)) for f, ok in zip(v, survived)]
                                  for row, v in flags.items() if row != "note" and v is not None}
    mu = model.mu_inf()
    report["mu_inf"] = mu
    report["lipschitz_bound"] = lipschitz_bound(model) if mu < 1 else None
    m64 = model if model.dtype == np.float64 else _as_float64(model)
    report["lipschitz_empirical"] = empirical_lipschitz(m64, P[:lipschitz_samples])
    return report


CERTIFIED_STYLE = {"certified-lipschitz": dict(marker="s", color="k", ls="--", label="certified (Lipschitz bound)"),
                   "certified-interval": dict(marker="D", color="C3", ls="--", label="certified (interval bounds)"),
                   "certified-crown": dict(marker="^", color="C4", ls=":", label="certified (linear relaxation)"),
                   "certified-crown-full": dict(marker="<", color="C8", ls=":",
                                                label="certified (linear relaxation, its own boxes)"),
                   "certified-lp": dict(marker="v", color="C5", ls=":", label="certified (LP relaxation)"),
                   "certified-exact": dict(marker="*", color="C6", ls="-", label="certified (exact, MILP)")}


def plot_report(report, path, title=""):
    """One figure of a :func:`robustness_report`: accuracy against the l_inf radius for each attack,
    and the certified accuracy of each certificate, which every attack must stay above."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    eps = report["eps"]
    labels = {"noise": "uniform noise", "fgsm": "FGSM", "pgd": "PGD (random start)"}
    for kind in ATTACKS:
        ax.plot(eps, [100 * a for a in report["attacks"][kind]], marker="o", label=labels[kind])
    for row, values in report["certified"].items():
        if row in CERTIFIED_STYLE and values is not None:
            ax.plot(eps, [100 * a for a in values], **CERTIFIED_STYLE[row])
    ax.set(xlabel="l_inf radius eps (pixels in [0, 1])", ylabel="accuracy (%)", ylim=(-2, 102), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _as_float64(model):
    return model.astype(np.float64)


def _report_choices():
    """The registry's certificates but those that ``--exact`` adds with its time limit and cache."""
    from .certificates import CERTIFICATES, ExactCertificate
    return [name for name, cls in CERTIFICATES.items() if not issubclass(cls, ExactCertificate)]


def main(argv=None):
    """``python -m nemon_np.robustness RUN_DIR``: attacks, certificate and Lipschitz bounds of a run."""
    import json
    import pathlib
    import time

    from tqdm.auto import tqdm

    from ._cli import OneLineErrorParser, add_threads_argument, limit_blas_threads, load_run

    p = OneLineErrorParser(prog="python -m nemon_np.robustness",
                           description="Accuracy of a trained model under l_inf perturbations of its test images "
                                       "(pixel units, [0, 1] images): uniform noise, FGSM and PGD through the "
                                       "model's implicit input gradient; certified accuracy by the Lipschitz "
                                       "bound (certified-lipschitz), by interval bounds through the embedded "
                                       "network (certified-interval) and by their linear relaxation (certified-crown), "
                                       "which every attack must stay above, image by image; and an "
                                       "empirical lower bound of the Lipschitz constant.")
    p.add_argument("run_dir", help="a folder written by python -m nemon_np.train (or its model.npz)")
    p.add_argument("--data-dir", default=None, help="folder with the data set (as for training)")
    p.add_argument("--samples", type=int, default=1000, help="test images used (the first N)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.1],
                   help="radii in pixel units")
    p.add_argument("--pgd-steps", type=int, default=10, help="PGD steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts and noise")
    p.add_argument("--out", default=None, help="write the report as JSON here (default RUN_DIR/robustness.json)")
    p.add_argument("--certificates", nargs="+", default=list(REPORT_CERTIFICATES), choices=_report_choices(),
                   metavar="NAME",
                   help=f"certificates to report, of {', '.join(_report_choices())} (default: "
                        f"{' '.join(REPORT_CERTIFICATES)}; crown-full costs seconds an image; lp and exact come "
                        "with --exact)")
    p.add_argument("--exact", action="store_true",
                   help="dense NEMONs and stacks of dense, conv, relu, bn, flatten and nemon layers: add the rows "
                        "certified-lp (the LP relaxation) and certified-exact (complete verification by mixed-integer "
                        "programming; images whose time limit runs out are counted as unknown, never as certified)")
    p.add_argument("--time-limit", type=float, default=60.0, help="with --exact: solver seconds an image")
    p.add_argument("--jobs", type=int, default=1,
                   help="with --exact: processes of a local Dask cluster sharing the images")
    p.add_argument("--scheduler", default=None,
                   help="with --exact: address of a running Dask scheduler (tcp://HOST:PORT) instead")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if not (0 < args.time_limit < float("inf")) or args.jobs < 1:
        p.error(f"--time-limit must be a positive number of seconds and --jobs >= 1, got {args.time_limit:g} "
                f"and {args.jobs}")
    if args.samples < 1 or args.pgd_steps < 1:
        p.error("--samples and --pgd-steps must be >= 1")
    if not all(0 <= e <= 1 for e in args.eps):
        p.error(f"every --eps is a radius in pixel units, in [0, 1]; got {' '.join(f'{e:g}' for e in args.eps)}")
    limit_blas_threads()
    model, data, model_path = load_run(p, args.run_dir, args.data_dir, args.threads)
    images = data.test_images[:args.samples]
    pixels = images.reshape(len(images), -1).astype(np.float64) / 255.0
    certificates = tuple(dict.fromkeys(args.certificates))
    if args.exact:
        from .certificates import ExactCertificate, LPCertificate
        from .exact import as_milp_stack
        try:
            as_milp_stack(model)
        except ValueError as e:
            p.error(f"--exact: {e}")
        cache = model_path.parent / "exact_cache"   # decided images are not solved again on a rerun
        certificates += (LPCertificate(args.time_limit, args.jobs, args.scheduler, cache=cache),
                         ExactCertificate(args.time_limit, args.jobs, args.scheduler, cache=cache, progress=True))
    bar = tqdm(total=(len(ATTACKS) + len(certificates)) * len(args.eps), desc="attacks and certificates",
               unit="step", disable=None)
    started = time.perf_counter()

    def progress(line):
        bar.update()
        if bar.disable:   # off a terminal (a log file) there is no bar: a line per step instead
            print(f"{line}  ({time.perf_counter() - started:.0f} s)", flush=True)

    report = robustness_report(model, pixels, data.test_labels[:args.samples], tuple(args.eps), args.pgd_steps,
                               args.seed, progress=progress, certificates=certificates)
    bar.close()
    print(f"{model}, {len(pixels)} test images, clean accuracy {100 * report['clean_acc']:.2f}%")
    print(f"{'eps (pixels)':>19s} " + " ".join(f"{e:>7g}" for e in args.eps))
    for kind in ATTACKS:
        print(f"{kind:>19s} " + " ".join(f"{100 * a:6.2f}%" for a in report["attacks"][kind]))
    for row, values in report["certified"].items():
        if row != "note":
            print(f"{row:>19s} " + (" ".join(f"{100 * a:6.2f}%" for a in values) if values is not None
                                    else "none: " + report["certified"]["note"]))
    for row, counts in report["unknown"].items():
        print(f"{'unknown (' + row.split('-')[1] + ')':>19s} " + " ".join(f"{n:7d}" for n in counts)
              + "   images left undecided (time limit), not counted as certified")
    broken = sum(sum(v) for v in report["broken_certified"].values())
    if report["broken_certified"]:
        print(f"certified images an attack misclassifies: {broken}" + (
            " (each certificate checked against every attack at every eps)" if broken == 0 else
            f" -- UNSOUND: a certificate failed against an attack: {report['broken_certified']}"))
    bound = report["lipschitz_bound"]
    print(f"Lipschitz bound {bound:.4g}" if bound is not None else "Lipschitz bound: none (mu_inf(A) >= 1)",
          f"(normalized-input units); empirical lower bound {report['lipschitz_empirical']:.4g}")
    out = pathlib.Path(args.out) if args.out else model_path.parent / "robustness.json"
    out.write_text(json.dumps(report, indent=2))
    figure = out.with_suffix(".png")
    plot_report(report, figure, f"{type(model).__name__} on {model.metadata.get('dataset', '?')}, "
                                f"{len(pixels)} test images")
    print(f"wrote {out} and {figure}")
    return 1 if broken else 0


if __name__ == "__main__":
    import sys
    sys.exit(main())

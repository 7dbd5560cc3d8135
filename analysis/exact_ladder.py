"""How much robustness each certificate leaves unproven: the ladder lipschitz <= interval <= crown <= lp
<= exact <= PGD over eps, on dense NEMONs trained three ways, with seconds per image, and exact
robustness radii against the certified and attacked ones.

    python analysis/exact_ladder.py [--out DIR] [--quick] [--seeds N] [--images M] [--jobs J]
                                    [--time-limit S] [--radius-images R] [--scheduler tcp://HOST:PORT]
                                    [--data-dir DIR]

Trains, on real MNIST, three kinds of dense NEMON (n = 100) per seed: "plain" (the defaults of
``python -m nemon_np.train``, gamma 0.95), "lipschitz" (the l_inf Lipschitz bound in the loss with
weight 1e-3) and "certified" (interval training at eps 0.1, gamma 0.5). On the first --images test
images it certifies every ball of radius eps (pixel units) by each certificate of
:func:`nemon_np.certify` (lipschitz, interval, crown, lp, and exact: complete verification by
mixed-integer programming, whose "unknown" images, out of time, are never counted as certified) and
attacks it by PGD (random start). Exact tries PGD's points first (20 steps) and solves a program only
for what neither crown nor the attack settles. Every certified image is checked against PGD and against exact:
the script fails if one is broken or falsified.

The gap of a certificate c to PGD splits exactly, image by image, because no exactly certified image
is broken by an attack:

    PGD - c = (exact - c)                        the certificate's share: robust, not proved by c
            + #(falsified, PGD correct) / m      the attack's share: not robust, PGD missed it
            + #(unknown,   PGD correct) / m      undecided in the time limit

Radii (seed 0, the first --radius-images images): the largest eps crown proves, a bracket of the exact
robustness radius (what exact proves, and its nearest verified counterexample) and the eps at which PGD
finds an attack, by bisection (:mod:`nemon_np.radius`).

Exact verification is independent work per image: it goes to a local Dask cluster of --jobs processes
(or to --scheduler), and every decided image is cached in --out, so that an interrupted study resumes
without solving it again; trained models are kept in --out too. Writes results.json, summary.json and,
as PNG and PDF, ladder.png (accuracy against eps per model kind, mean and std over seeds),
seconds.png (seconds an image per certificate) and radii.png.
"""
import pathlib
import sys
import time

import numpy as np

from _common import analysis_parser, finish, plt, save_figure, train_on_mnist
from nemon_np import load_model
from nemon_np.certificates import ExactCertificate, LPCertificate, certify
from nemon_np.data import load_mnist
from nemon_np.pixels import forward_options, solver_options_for, to_inputs
from nemon_np.radius import attack_radius, certified_radius, exact_radius
from nemon_np.robustness import attack
from nemon_np.training import TrainConfig

KINDS = {"plain": dict(),
         "lipschitz": dict(lipschitz_reg=1e-3),
         "certified": dict(certified_eps=0.1, gamma=0.5, eps_warmup=1, eps_ramp=10)}
CERTIFICATES = ("lipschitz", "interval", "crown", "lp", "exact")
FULL = dict(seeds=3, hidden=100, epochs=40, limit=None, images=100, eps=(0.01, 0.02, 0.05, 0.1), time_limit=60.0,
            radius_images=20, radius_time_limit=20.0, radius_resolution=0.0025, eps_max=0.2, pgd_steps=20)
QUICK = dict(seeds=1, hidden=16, epochs=2, limit=3000, images=10, eps=(0.02, 0.1), time_limit=3.0,
             radius_images=2, radius_time_limit=2.0, radius_resolution=0.02, eps_max=0.1, pgd_steps=5)


def train_or_load(kind, seed, data, cfg, folder):
    """The model of ``kind`` and ``seed``, trained once and kept in ``folder``; its training seconds."""
    path = folder / f"{kind}_s{seed}.npz"
    if path.exists():
        model = load_model(path)
        return model, float(model.metadata.get("train_seconds", np.nan))
    settings = dict(KINDS[kind])
    if cfg["epochs"] < 11 and "eps_ramp" in settings:   # the ramp fits in a short (quick) run
        settings.update(eps_warmup=0, eps_ramp=1)
    config = TrainConfig(hidden=cfg["hidden"], epochs=cfg["epochs"], seed=seed, **settings)
    model, seconds = train_on_mnist(config, data, cfg["limit"])
    model.metadata.update(train_seconds=seconds)
    model.save(path)
    return model, seconds


def ladder(model, pixels, labels, eps, cfg, cache, jobs, scheduler):
    """One model at one eps: certified share and seconds an image per certificate, PGD's accuracy, the
    exact statuses and the gap split (module docstring). Fails on a broken or falsified certificate."""
    fwd = forward_options(solver_options_for(model))
    methods = {name: name for name in CERTIFICATES[:3]}
    methods["lp"] = LPCertificate(cfg["time_limit"], jobs, scheduler, cache=cache)
    methods["exact"] = ExactCertificate(cfg["time_limit"], jobs, scheduler, cache=cache, progress=True)
    row, flags = {"certified": {}, "seconds_per_image": {}}, {}
    for name, method in methods.items():
        start = time.perf_counter()
        res = certify(model, pixels, labels, eps, method)
        row["seconds_per_image"][name] = (time.perf_counter() - start) / len(labels)
        row["certified"][name] = float(res.certified.mean())
        flags[name] = res.certified
        if name == "exact":
            status = res.status
    adversarial = attack(model, pixels, labels, eps, "pgd", steps=cfg["pgd_steps"], seed=0)
    pgd_correct = model.predict(to_inputs(model, adversarial), **fwd) == labels
    row["pgd"] = float(pgd_correct.mean())
    row["falsified"] = float(np.mean(status == "falsified"))
    row["unknown"] = float(np.mean(status == "unknown"))
    for name, certified in flags.items():
        broken = int(np.sum(certified & ~pgd_correct))
        falsified = int(np.sum(certified & (status == "falsified")))
        if broken or falsified:
            raise SystemExit(f"UNSOUND: {name} certifies {broken} images PGD breaks and {falsified} exact falsifies")
    row["gap_split"] = {name: {"certificate": row["certified"]["exact"] - row["certified"][name],
                               "attack": float(np.mean((status == "falsified") & pgd_correct)),
                               "unknown": float(np.mean((status == "unknown") & pgd_correct))}
                        for name in CERTIFICATES[:4]}
    return row


def radii(model, pixels, labels, cfg):
    kw = dict(eps_max=cfg["eps_max"], resolution=cfg["radius_resolution"])
    crown = certified_radius(model, pixels, labels, "crown", **kw)
    lower, upper = exact_radius(model, pixels, labels, time_limit=cfg["radius_time_limit"], **kw)
    pgd = attack_radius(model, pixels, labels, steps=cfg["pgd_steps"], **kw)
    return {"crown": crown.tolist(), "exact_lower": lower.tolist(), "exact_upper": upper.tolist(), "pgd": pgd.tolist()}


def aggregate(per_seed, eps):
    """{kind: {"certified": {name: (mean list, std list)}, "pgd": ..., ...}} over seeds."""
    out = {}
    for kind, rows in per_seed.items():
        def stat(get):
            x = np.array([[get(r[str(e)]) for e in eps] for r in rows])
            std = x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(len(eps))
            return {"mean": x.mean(axis=0).tolist(), "std": std.tolist()}
        out[kind] = {"certified": {n: stat(lambda r, n=n: r["certified"][n]) for n in CERTIFICATES},
                     "seconds_per_image": {n: stat(lambda r, n=n: r["seconds_per_image"][n]) for n in CERTIFICATES},
                     "pgd": stat(lambda r: r["pgd"]), "unknown": stat(lambda r: r["unknown"]),
                     "falsified": stat(lambda r: r["falsified"]),
                     "gap_split": {n: {part: stat(lambda r, n=n, part=part: r["gap_split"][n][part])
                                       for part in ("certificate", "attack", "unknown")} for n in CERTIFICATES[:4]}}
    return out


STYLE = {"lipschitz": dict(marker="s", color="k", ls="--"), "interval": dict(marker="D", color="C3", ls="--"),
         "crown": dict(marker="^", color="C4", ls=":"), "lp": dict(marker="v", color="C5", ls=":"),
         "exact": dict(marker="*", color="C6", ls="-"), "pgd": dict(marker="o", color="C0", ls="-")}


def plot(summary, eps, seeds, out):
    fig, axes = plt.subplots(1, len(summary), figsize=(4.6 * len(summary), 4), sharey=True, squeeze=False)
    for ax, (kind, s) in zip(axes[0], summary.items()):
        for name in CERTIFICATES:
            c = s["certified"][name]
            ax.errorbar(eps, 100 * np.array(c["mean"]), yerr=100 * np.array(c["std"]), capsize=3, label=name,
                        **STYLE[name])
        exact, unknown = np.array(s["certified"]["exact"]["mean"]), np.array(s["unknown"]["mean"])
        ax.fill_between(eps, 100 * exact, 100 * (exact + unknown), color="C6", alpha=0.2, label="exact: unknown")
        ax.errorbar(eps, 100 * np.array(s["pgd"]["mean"]), yerr=100 * np.array(s["pgd"]["std"]), capsize=3,
                    label="PGD (accuracy)", **STYLE["pgd"])
        ax.set(xscale="log", xlabel="l_inf radius eps (pixels)", title=f"{kind}, {seeds} seed(s)", ylim=(-2, 102))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("certified / attacked accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, "ladder")

    fig, axes = plt.subplots(1, len(summary), figsize=(4.6 * len(summary), 3.6), sharey=True, squeeze=False)
    for ax, (kind, s) in zip(axes[0], summary.items()):
        for name in CERTIFICATES:
            ax.plot(eps, s["seconds_per_image"][name]["mean"], label=name, **STYLE[name])
        ax.set(xscale="log", yscale="log", xlabel="l_inf radius eps (pixels)", title=kind)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("seconds an image")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, "seconds")


def plot_radii(radii_by_kind, out):
    fig, axes = plt.subplots(1, len(radii_by_kind), figsize=(4.6 * len(radii_by_kind), 3.8), squeeze=False)
    for ax, (kind, r) in zip(axes[0], radii_by_kind.items()):
        order = np.argsort(r["exact_lower"])
        x = np.arange(len(order))
        lo, hi = np.array(r["exact_lower"])[order], np.array(r["exact_upper"])[order]
        ax.vlines(x, lo, hi, color="C6", lw=4, alpha=0.6, label="exact radius (bracket)")
        ax.plot(x, lo, "_", color="C6", ms=14, mew=2)   # a closed bracket is a point
        ax.plot(x, np.array(r["crown"])[order], "^", color="C4", label="crown proves")
        ax.plot(x, np.array(r["pgd"])[order], "o", mfc="none", color="C0", label="PGD breaks at")
        ax.set(xlabel="image (sorted by exact radius)", ylabel="l_inf radius (pixels)", title=kind)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, "radii")


def main(argv=None):
    p = analysis_parser(__doc__, "runs/exact_ladder", "a small version for a smoke test (about a minute)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of each model kind (default 3; quick 1)")
    p.add_argument("--images", type=int, default=None, help="the first M test images (default 100; quick 10)")
    p.add_argument("--jobs", type=int, default=1, help="processes of a local Dask cluster sharing exact's images")
    p.add_argument("--time-limit", type=float, default=None, help="exact's seconds an image (default 60; quick 3)")
    p.add_argument("--radius-images", type=int, default=None, help="images whose radii are bracketed (default 20; "
                   "quick 2)")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler instead (tcp://HOST:PORT)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    given = (("seeds", args.seeds), ("images", args.images), ("time_limit", args.time_limit),
             ("radius_images", args.radius_images))
    cfg.update({k: v for k, v in given if v is not None})
    cfg["radius_time_limit"] = min(cfg["radius_time_limit"], cfg["time_limit"])   # one bisection step an exact run
    if min(cfg["seeds"], cfg["images"], cfg["radius_images"], args.jobs) < 1 or not cfg["time_limit"] > 0:
        p.error("--seeds, --images, --radius-images and --jobs must be >= 1, --time-limit > 0")
    out = pathlib.Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_mnist(args.data_dir)
    pixels = data.test_images[:cfg["images"]].reshape(cfg["images"], -1) / 255.0
    labels = data.test_labels[:cfg["images"]]
    per_seed, radii_by_kind, trained = {k: [] for k in KINDS}, {}, {}
    for kind in KINDS:
        for seed in range(args.seed, args.seed + cfg["seeds"]):
            model, seconds = train_or_load(kind, seed, data, cfg, out / "models")
            trained[f"{kind}_s{seed}"] = seconds
            cache = out / "exact_cache" / f"{kind}_s{seed}"
            rows = {}
            for eps in cfg["eps"]:
                print(f"{kind} seed {seed} eps {eps:g}", file=sys.stderr, flush=True)
                rows[str(eps)] = ladder(model, pixels, labels, eps, cfg, cache, args.jobs, args.scheduler)
            per_seed[kind].append(rows)
            if seed == args.seed:
                n = cfg["radius_images"]
                radii_by_kind[kind] = radii(model, pixels[:n], labels[:n], cfg)
    summary = aggregate(per_seed, cfg["eps"])
    plot(summary, list(cfg["eps"]), cfg["seeds"], out)
    plot_radii(radii_by_kind, out)
    lines = [f"{'model':>10s} {'eps':>6s} " + " ".join(f"{n:>10s}" for n in CERTIFICATES + ("pgd", "unknown"))]
    for kind, s in summary.items():
        for i, eps in enumerate(cfg["eps"]):
            cells = [s["certified"][n]["mean"][i] for n in CERTIFICATES]
            cells += [s["pgd"]["mean"][i], s["unknown"]["mean"][i]]
            lines.append(f"{kind:>10s} {eps:6g} " + " ".join(f"{100 * v:9.1f}%" for v in cells))
    lines.append("gap to PGD of crown: the certificate's share / the attack's / undecided (points, mean over seeds)")
    for kind, s in summary.items():
        for i, eps in enumerate(cfg["eps"]):
            g = s["gap_split"]["crown"]
            lines.append(f"{kind:>10s} {eps:6g} " + " / ".join(f"{100 * g[part]['mean'][i]:.1f}"
                                                               for part in ("certificate", "attack", "unknown")))
    results = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
               "kinds": {k: dict(v) for k, v in KINDS.items()}, "summary": summary, "per_seed": per_seed,
               "radii": radii_by_kind, "train_seconds": trained}
    return finish(out, results, lines, traces=("per_seed",), started=started)


if __name__ == "__main__":
    sys.exit(main())

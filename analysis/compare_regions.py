"""How much larger is the l_inf (NEMON) well-posedness region than the others?

    python analysis/compare_regions.py [--out DIR] [--quick] [--seed S] [--data-dir DIR]

Measures the paper's central claim (Jafarpour et al. 2021: mu_inf(A) <= gamma gives a larger,
polytopic search space) against the conditions tabulated in DESIGN.md: NEMON mu_inf(A) <= gamma,
its best-weighted version, the norm ||A||_inf <= gamma, Perron-Frobenius rho(|A|) <= gamma and
monDEQ mu_2(A) <= gamma (margin m = 1 - gamma). Ground truth for small n: x = relu(Ax + q) is
well-posed for every q iff I - A is a P-matrix.

Writes to --out (default runs/compare_regions): results.json and, as PNG and PDF,
share.* (Monte Carlo share inside each region against the entry scale), slices.* (2-D slices
of 2x2 matrix space), distance.* (Frobenius distance to each set) and accuracy.* (short MNIST
trainings constrained by each condition at the same margin). --quick is what the tests run.
"""
import pathlib
import sys
import time
import warnings

import numpy as np
from tqdm.auto import tqdm

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from _common import analysis_parser, finish, save_figure  # noqa: E402
from nemon_np import best_weights, mu_2, mu_inf, norm_inf, project_mu_inf  # noqa: E402
from nemon_np.projection import project_mondeq, project_norm_inf  # noqa: E402
from nemon_np.regions import (REGIONS, is_well_posed_exact, project_mondeq_cvxpy, project_mu_inf_cvxpy,  # noqa: E402
                              project_norm_inf_cvxpy, region_measures)

GAMMA = 0.95
LABELS = {"nemon": "NEMON  mu_inf(A)", "weighted": "NEMON, best weights", "norm": "norm  ||A||_inf",
          "perron-frobenius": "Perron-Frobenius  rho(|A|)", "mondeq": "monDEQ  mu_2(A)"}
COLORS = {"nemon": "C0", "weighted": "C9", "norm": "C2", "perron-frobenius": "C1", "mondeq": "C3"}

FULL = dict(ns=(2, 5, 10, 50, 100), scales=np.geomspace(0.05, 4.0, 14), samples={2: 400, 5: 400, 10: 300,
            50: 150, 100: 100}, exact_max_n=10, exact_samples=150, dist_ns=(5, 50, 100), dist_samples=30,
            train=dict(epochs=5, hidden=100, limit=None), inclusion_samples=3000)
QUICK = dict(ns=(2, 5, 10), scales=np.geomspace(0.1, 3.0, 6), samples={2: 60, 5: 60, 10: 40}, exact_max_n=5,
             exact_samples=40, dist_ns=(5, 20), dist_samples=5, train=dict(epochs=1, hidden=30, limit=3000),
             inclusion_samples=300)


def sample(rng, dist, n, scale, size):
    """Matrices with i.i.d. entries of standard deviation scale / sqrt(n) (so the spectrum is O(scale))."""
    sd = scale / np.sqrt(n)
    if dist == "gaussian":
        return rng.normal(0.0, sd, size=(size, n, n))
    return rng.uniform(-np.sqrt(3) * sd, np.sqrt(3) * sd, size=(size, n, n))


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a binomial proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def crossing_scale(scales, shares, level=0.5):
    """Scale at which a decreasing share curve crosses ``level`` (log-linear interpolation)."""
    shares = np.asarray(shares)
    below = np.nonzero(shares < level)[0]
    if below.size == 0:
        return None
    k = below[0]
    if k == 0:
        return float(scales[0])
    t = (shares[k - 1] - level) / (shares[k - 1] - shares[k])
    return float(np.exp(np.log(scales[k - 1]) + t * (np.log(scales[k]) - np.log(scales[k - 1]))))


# -- 1. Monte Carlo shares ------------------------------------------------------------------------

def monte_carlo(cfg, rng):
    out = []
    total = sum(len(cfg["scales"]) * 2 * cfg["samples"][n] for n in cfg["ns"])
    bar = tqdm(total=total, desc="Monte Carlo shares", unit="matrix", disable=None)
    for n in cfg["ns"]:
        for dist in ("gaussian", "uniform"):
            for scale in cfg["scales"]:
                size = cfg["samples"][n]
                values = {r: [] for r in REGIONS}
                exact = []
                for k, A in enumerate(sample(rng, dist, n, scale, size)):
                    for r, v in region_measures(A).items():
                        values[r].append(v)
                    if n <= cfg["exact_max_n"] and k < cfg["exact_samples"]:
                        exact.append(is_well_posed_exact(A))
                    bar.update()
                row = {"n": n, "dist": dist, "scale": float(scale), "samples": size}
                for r in REGIONS:
                    v = np.asarray(values[r])
                    inside = int(np.count_nonzero(v <= GAMMA))
                    certified = int(np.count_nonzero(v < 1.0))
                    row[r] = {"inside": inside / size, "ci": wilson(inside, size),
                              "certified_well_posed": certified / size}
                if exact:
                    k = int(np.count_nonzero(exact))
                    row["exact_well_posed"] = {"share": k / len(exact), "ci": wilson(k, len(exact)),
                                               "samples": len(exact)}
                out.append(row)
    bar.close()
    return out


def summarize_shares(rows, cfg):
    """Per n and distribution: the scale at which half the matrices are inside each region."""
    summary = []
    for n in cfg["ns"]:
        for dist in ("gaussian", "uniform"):
            sel = [r for r in rows if r["n"] == n and r["dist"] == dist]
            scales = [r["scale"] for r in sel]
            s50 = {reg: crossing_scale(scales, [r[reg]["inside"] for r in sel]) for reg in REGIONS}
            entry = {"n": n, "dist": dist, "scale_at_half_inside": s50}
            if s50["nemon"] and s50["mondeq"]:
                entry["nemon_over_mondeq"] = s50["nemon"] / s50["mondeq"]
            if s50["nemon"] and s50["norm"]:
                entry["nemon_over_norm"] = s50["nemon"] / s50["norm"]
            summary.append(entry)
    return summary


def plot_shares(rows, cfg, out):
    ns = cfg["ns"]
    fig, axes = plt.subplots(1, len(ns), figsize=(3.6 * len(ns), 3.6), sharey=True)
    for ax, n in zip(np.atleast_1d(axes), ns):
        for dist, ls in (("gaussian", "-"), ("uniform", "--")):
            sel = [r for r in rows if r["n"] == n and r["dist"] == dist]
            s = [r["scale"] for r in sel]
            for reg in REGIONS:
                y = [100 * r[reg]["inside"] for r in sel]
                lo = [100 * r[reg]["ci"][0] for r in sel]
                hi = [100 * r[reg]["ci"][1] for r in sel]
                ax.plot(s, y, ls, color=COLORS[reg], label=LABELS[reg] if dist == "gaussian" else None)
                ax.fill_between(s, lo, hi, color=COLORS[reg], alpha=0.12)
            if "exact_well_posed" in sel[0]:
                ax.plot(s, [100 * r["exact_well_posed"]["share"] for r in sel], ls, color="k", lw=1,
                        label="truly well-posed (P-matrix)" if dist == "gaussian" else None)
        ax.set(xscale="log", title=f"n = {n}", xlabel="entry scale s (std s / sqrt(n))")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set(ylabel=f"% of random A inside (gamma = {GAMMA})")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Share of random matrices inside each well-posedness region "
                 "(solid Gaussian, dashed uniform entries; bands: 95% CI)")
    fig.tight_layout()
    save_figure(fig, out, "share")


# -- 2. Two-dimensional slices --------------------------------------------------------------------

SLICES = (
    ("A = [[0, b], [c, 0]]", "b", "c", lambda x, y: np.array([[0.0, x], [y, 0.0]])),
    ("A = [[t, s], [s, t]] (symmetric)", "t", "s", lambda x, y: np.array([[x, y], [y, x]])),
    ("A = [[t, s], [-s, t]] (rotation-like)", "t", "s", lambda x, y: np.array([[x, y], [-y, x]])),
    ("A = [[a, b], [0, 0]]", "a", "b", lambda x, y: np.array([[x, y], [0.0, 0.0]])),
)


def exact_2x2(A):
    M = np.eye(2) - A
    return M[0, 0] > 0 and M[1, 1] > 0 and np.linalg.det(M) > 0


def plot_slices(out, resolution):
    """One row per slice, one column per region: the region filled, the truly well-posed set dotted."""
    grid = np.linspace(-2.5, 2.5, resolution)
    fig, axes = plt.subplots(len(SLICES), len(REGIONS), figsize=(2.7 * len(REGIONS), 2.8 * len(SLICES)),
                             sharex=True, sharey=True)
    cell = (grid[1] - grid[0]) ** 2
    areas = []
    for row, (title, xl, yl, make) in zip(axes, SLICES):
        masks = {r: np.zeros((resolution, resolution), bool) for r in REGIONS}
        truth = np.zeros((resolution, resolution), bool)
        for i, yv in enumerate(grid):
            for j, xv in enumerate(grid):
                A = make(xv, yv)
                for r, v in region_measures(A).items():
                    masks[r][i, j] = v <= GAMMA
                truth[i, j] = exact_2x2(A)
        areas.append({"slice": title, **{r: float(masks[r].sum() * cell) for r in REGIONS},
                      "exact_well_posed": float(truth.sum() * cell), "window": [-2.5, 2.5]})
        for ax, r in zip(row, REGIONS):
            ax.contourf(grid, grid, masks[r].astype(float), levels=[0.5, 1.5], colors=[COLORS[r]], alpha=0.35)
            ax.contour(grid, grid, truth.astype(float), levels=[0.5], colors="k", linewidths=1.0, linestyles=":")
            ax.set_title(f"{r}: area {masks[r].sum() * cell:.1f}", fontsize=8)
            ax.set(aspect="equal")
            ax.grid(alpha=0.3)
        row[0].set_ylabel(f"{title}\n{yl}", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("first free entry (b, t or a)", fontsize=8)
    fig.suptitle(f"Each region at gamma = {GAMMA} in four 2-D slices of 2x2 matrices, window [-2.5, 2.5]^2 "
                 "(dotted: truly well-posed, I - A a P-matrix)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out, "slices")
    return areas


# -- 3. Inclusions and counterexamples ------------------------------------------------------------

def inclusions(cfg, rng):
    checks = {"norm inside nemon": 0, "nemon inside weighted": 0, "perron-frobenius inside weighted": 0,
              "certified but not truly well-posed": 0}
    tested = 0
    nemon_not_mondeq = mondeq_not_nemon = None
    for _ in tqdm(range(cfg["inclusion_samples"]), desc="inclusions", unit="matrix", disable=None):
        n = int(rng.choice([2, 3, 4]))
        A = sample(rng, "gaussian", n, float(rng.uniform(0.3, 3.0)), 1)[0]
        v = region_measures(A)
        checks["norm inside nemon"] += v["norm"] <= GAMMA and v["nemon"] > GAMMA
        checks["nemon inside weighted"] += v["nemon"] <= GAMMA and v["weighted"] > GAMMA + 1e-9
        checks["perron-frobenius inside weighted"] += v["perron-frobenius"] <= GAMMA and v["weighted"] > GAMMA + 1e-9
        if min(v.values()) < 1:
            checks["certified but not truly well-posed"] += not is_well_posed_exact(A)
        tested += 1
        if nemon_not_mondeq is None and v["nemon"] <= GAMMA < v["mondeq"]:
            nemon_not_mondeq = A
        if mondeq_not_nemon is None and v["mondeq"] <= GAMMA < v["nemon"]:
            mondeq_not_nemon = A
    examples = {}
    for name, A in (("in NEMON, not in monDEQ", nemon_not_mondeq), ("in monDEQ, not in NEMON", mondeq_not_nemon)):
        if A is not None:
            A = np.round(A, 3)   # the rounded matrix is re-checked: it is what is printed
            v = region_measures(A)
            if (name.startswith("in NEMON") and v["nemon"] <= GAMMA < v["mondeq"]) or \
               (name.startswith("in monDEQ") and v["mondeq"] <= GAMMA < v["nemon"]):
                examples[name] = {"A": A.tolist(), "mu_inf": v["nemon"], "mu_2": v["mondeq"]}
    return {"samples": tested, "violations": {k: int(c) for k, c in checks.items()}, "counterexamples": examples}


# -- 4. Distances ---------------------------------------------------------------------------------

def distances_of(A):
    """Relative Frobenius distance ||A - P(A)|| / ||A|| to each convex set (and the weighted one
    at A's own best weights: an upper bound on the distance to the best-weighted region)."""
    nrm = np.linalg.norm(A)
    eta, _ = best_weights(A)
    proj = {"nemon": project_mu_inf(A, GAMMA), "weighted": project_mu_inf(A, GAMMA, weights=eta),
            "norm": project_norm_inf(A, GAMMA), "mondeq": project_mondeq(A, 1 - GAMMA)}
    return {r: float(np.linalg.norm(A - P) / nrm) for r, P in proj.items()}, proj


def random_distances(cfg, rng):
    rows = []
    for n in cfg["dist_ns"]:
        for scale in (1.0, 3.0):
            d = [distances_of(A)[0] for A in sample(rng, "gaussian", n, scale, cfg["dist_samples"])]
            rows.append({"n": n, "scale": scale, **{r: float(np.mean([x[r] for x in d])) for r in d[0]}})
    return rows


# -- 5. Short MNIST trainings ---------------------------------------------------------------------

def trainings(cfg, data_dir, seed):
    from nemon_np.data import DataError, load_mnist, normalize
    from nemon_np.training import TrainConfig, Trainer, evaluate
    try:
        data = load_mnist(data_dir)
    except DataError as e:
        return {"skipped": str(e)}, None
    t = cfg["train"]
    X = normalize(data.train_images[:t["limit"]], data.mean, data.std)
    y = data.train_labels[:t["limit"]]
    Xt, yt = normalize(data.test_images, data.mean, data.std), data.test_labels
    settings = {"nemon": dict(constraint="projection"), "weighted": dict(constraint="weighted"),
                "norm": dict(constraint="norm"),
                "mondeq": dict(constraint="mondeq", solver="peaceman-rachford", adjoint="direct"),
                "none": dict(constraint="none", adjoint="direct")}
    results, unconstrained = {}, None
    for name, extra in tqdm(settings.items(), desc="MNIST trainings", unit="model", disable=None):
        config = TrainConfig(epochs=t["epochs"], hidden=t["hidden"], gamma=GAMMA, seed=seed, **extra)
        start = time.perf_counter()
        trainer = Trainer(config, 784, 10).fit(X, y, Xt, yt, progress=False)
        last = trainer.history[-1]
        results[name] = {"test_acc": last["test_acc"], "seconds": time.perf_counter() - start,
                         "mu_inf": mu_inf(trainer.model.A), "mu_2": mu_2(trainer.model.A),
                         "fwd_converged_frac": last["fwd_converged_frac"]}
        if name == "none":
            unconstrained = trainer.model
    # The unconstrained model's A projected onto each set, without retraining: what is lost?
    model = unconstrained
    dist, proj = distances_of(model.A.astype(np.float64))
    A0 = model.A
    lost = {}
    for r, P in proj.items():
        model.A = P.astype(model.dtype)
        if r == "weighted":
            model.weights = best_weights(A0.astype(np.float64))[0]
        method = dict(method="peaceman-rachford") if r == "mondeq" else {}
        _, acc, _ = evaluate(model, Xt, yt, tol=1e-4, max_iter=500, **method)
        lost[r] = {"relative_distance": dist[r], "test_acc_after_projection": acc}
        model.weights = None
    model.A = A0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, acc0, _ = evaluate(model, Xt, yt, tol=1e-4, max_iter=500, on_violation="warn")
    return results, {"n": model.n_hidden, "test_acc_unconstrained": acc0, "projected": lost,
                     "mu_inf": mu_inf(A0), "mu_2": mu_2(A0), "norm_inf": norm_inf(A0)}


def plot_distance_and_accuracy(dist_rows, train, trained, out, budget=""):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    regs = ["nemon", "weighted", "norm", "mondeq"]
    labels = [f"n={r['n']}, s={r['scale']:g}" for r in dist_rows]
    x = np.arange(len(dist_rows) + (trained is not None))
    w = 0.2
    for k, reg in enumerate(regs):
        vals = [r[reg] for r in dist_rows]
        if trained is not None:
            vals.append(trained["projected"][reg]["relative_distance"])
        axes[0].bar(x + (k - 1.5) * w, vals, w, color=COLORS[reg], label=LABELS[reg])
    axes[0].set_xticks(x, labels + ([f"trained, unconstrained\nMNIST A (n={trained['n']})"] if trained else []),
                       fontsize=7, rotation=25)
    axes[0].set(ylabel="||A - P(A)||_F / ||A||_F", title=f"Distance to each set (gamma = {GAMMA}); lower is nearer")
    axes[0].legend(fontsize=7)
    if train and "skipped" not in train:
        names = list(train)
        axes[1].bar(names, [100 * train[k]["test_acc"] for k in names],
                    color=[COLORS.get(k, "0.5") for k in names])
        for i, k in enumerate(names):
            axes[1].text(i, 100 * train[k]["test_acc"], f"{100 * train[k]['test_acc']:.2f}", ha="center",
                         va="bottom", fontsize=8)
        lo = min(100 * v["test_acc"] for v in train.values())
        axes[1].set(ylim=(max(lo - 3, 0), 100), ylabel="MNIST test accuracy (%)",
                    title=f"MNIST, each condition at margin gamma = {GAMMA}{budget}")
    fig.tight_layout()
    save_figure(fig, out, "distance")


# -- oracle check ---------------------------------------------------------------------------------

def oracle_check(rng):
    """Closed-form projections against their cvxpy programs on a few random matrices."""
    pairs = {"nemon": (lambda A: project_mu_inf(A, GAMMA), lambda A: project_mu_inf_cvxpy(A, GAMMA)),
             "norm": (lambda A: project_norm_inf(A, GAMMA), lambda A: project_norm_inf_cvxpy(A, GAMMA)),
             "mondeq": (lambda A: project_mondeq(A, 1 - GAMMA), lambda A: project_mondeq_cvxpy(A, 1 - GAMMA))}
    worst = dict.fromkeys(pairs, 0.0)
    for n in (3, 12):
        A = rng.normal(size=(n, n))
        for name, (closed, oracle) in pairs.items():
            worst[name] = max(worst[name], float(np.abs(closed(A) - oracle(A)).max()))
    return worst


def verdict(summary, train):
    """The claim, answered in plain sentences from the numbers."""
    lines = []
    for s in summary:
        r = s.get("nemon_over_mondeq")
        if r is None:
            continue
        comp = "larger" if r > 1 else "smaller"
        lines.append(f"n={s['n']:3d} {s['dist']:8s}: half of the random matrices leave NEMON at scale "
                     f"{s['scale_at_half_inside']['nemon']:.3g}, monDEQ at {s['scale_at_half_inside']['mondeq']:.3g}: "
                     f"NEMON's region is {comp} by a factor {max(r, 1 / r):.2f} in scale; "
                     f"norm: {s['scale_at_half_inside']['norm']:.3g}")
    if train and "skipped" not in train:
        accs = ", ".join(f"{k} {100 * v['test_acc']:.2f}%" for k, v in train.items())
        lines.append(f"MNIST test accuracy at gamma = {GAMMA}: {accs}")
    return lines


def main(argv=None):
    p = analysis_parser(__doc__, "runs/compare_regions", "small samples, one short training each (< 1 minute)")
    p.add_argument("--no-training", action="store_true", help="skip the MNIST trainings")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    results = {"gamma": GAMMA, "quick": args.quick, "seed": args.seed, "oracle_max_deviation": oracle_check(rng)}
    results["shares"] = monte_carlo(cfg, rng)
    results["share_summary"] = summarize_shares(results["shares"], cfg)
    plot_shares(results["shares"], cfg, out)
    results["slice_areas"] = plot_slices(out, 121 if args.quick else 301)
    results["inclusions"] = inclusions(cfg, rng)
    results["distances_random"] = random_distances(cfg, rng)
    train, trained = (None, None) if args.no_training else trainings(cfg, args.data_dir, args.seed)
    results["training"], results["unconstrained_model"] = train, trained
    t = cfg["train"]
    budget = f"\n({t['epochs']} epochs, n = {t['hidden']}, {t['limit'] or 60000} training images)"
    plot_distance_and_accuracy(results["distances_random"], train, trained, out, budget)
    results["verdict"] = verdict(results["share_summary"], train)
    v = results["inclusions"]["violations"]
    lines = results["verdict"] + [f"inclusions on {results['inclusions']['samples']} random matrices: violations {v}"]
    lines += [f"{name}: A = {ex['A']}  (mu_inf {ex['mu_inf']:.3f}, mu_2 {ex['mu_2']:.3f})"
              for name, ex in results["inclusions"]["counterexamples"].items()]
    # The per-(size, distribution, scale) shares are the figure's data; share_summary is what is cited.
    return finish(out, results, lines, traces=("shares",), started=started)


if __name__ == "__main__":
    sys.exit(main())

"""Convergence of the fixed-point solvers: residual against iterations and wall time.

    python analysis/convergence.py [--model RUN_DIR] [--out DIR] [--quick] [--data-dir DIR]

Problems: (a) a trained MNIST model (RUN_DIR/model.npz from python -m nemon_np.train; without
--model a short training is run first) on 100 test images (the training batch size), and (b) random models (n = 100,
784 inputs) at several values of mu_inf(A), with and without a strongly negative diagonal
(alpha* < 1, where Picard loses its guarantee). Solvers: the average iteration at alpha*,
Picard, the paper code's adaptive step, Anderson acceleration, and monDEQ's forward-backward
(at its certified step m / L^2) and Peaceman-Rachford (alpha = 1), certified where mu_2(A) < 1.
A solver whose certificate fails on a problem still runs (marked "not certified"), to show what
happens without the guarantee.

Writes to --out (default runs/convergence): results.json and, as PNG and PDF, one figure per
problem (residual against iteration with the bound rho(alpha*)^k, and against wall time) and
contraction.* (empirical against theoretical contraction factor of the average iteration).
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
from nemon_np import NEMON, contraction_alpha, mu_2, mu_inf, project_mu_inf, solve_equilibrium  # noqa: E402
from nemon_np._timing import best_time  # noqa: E402
from nemon_np.solvers import MONDEQ_METHODS, NEMON_METHODS, WellPosednessError  # noqa: E402

TOLS = (1e-3, 1e-6, 1e-9)
SOLVERS = NEMON_METHODS + MONDEQ_METHODS
STYLE = {"average": ("C0", "-"), "picard": ("C1", "--"), "adaptive": ("C4", "-."), "anderson": ("C2", "-"),
         "forward-backward": ("C3", ":"), "peaceman-rachford": ("C5", "--")}


def random_problem(rng, mu, shift, n=100, n_in=784, batch=200):
    """A random model with mu_inf(A) = mu (A projected) and inputs like normalized MNIST."""
    A = project_mu_inf(rng.normal(size=(n, n)) / np.sqrt(n) + shift * np.eye(n), mu)
    B = rng.uniform(-1, 1, size=(n, n_in)) / np.sqrt(n_in)
    U = rng.uniform(-0.42, 2.8, size=(batch, n_in))
    return A, U @ B.T + 0.1 * rng.normal(size=n)


def trained_problem(model_dir, data_dir, quick, batch):
    from nemon_np.data import load_mnist, normalize
    from nemon_np.training import TrainConfig, Trainer
    data = load_mnist(data_dir)
    if model_dir is None:
        limit = 5000 if quick else None
        config = TrainConfig(epochs=1 if quick else 10)
        X = normalize(data.train_images[:limit], data.mean, data.std)
        model = Trainer(config, 784, 10).fit(X, data.train_labels[:limit], progress=False).model
        source = f"trained here: {config.epochs} epochs, {config.constraint}, gamma {config.gamma}"
    else:
        path = pathlib.Path(model_dir)
        model = NEMON.load(path / "model.npz" if path.is_dir() else path)
        source = str(path)
    mean, std = model.metadata.get("mean", data.mean), model.metadata.get("std", data.std)
    U = normalize(data.test_images[:batch], mean, std, np.float64)
    A = model.A.astype(np.float64)
    return A, U @ model.B.astype(np.float64).T + model.b, model.weights, source


def first_below(record, tol):
    """Per sample, the first iteration whose residual is <= tol (NaN where never)."""
    hit = record <= tol
    k = np.argmax(hit, axis=1).astype(float)
    k[~hit.any(axis=1)] = np.nan
    return k


def study(A, Q, weights, max_iter, repeats):
    """Every applicable solver on one problem: residual records, iterations and times to each tol."""
    out = {"mu_inf": mu_inf(A, weights), "mu_inf_unweighted": mu_inf(A), "mu_2": mu_2(A),
           "alpha_star": contraction_alpha(A), "solvers": {}}
    out["rho_average"] = 1 - out["alpha_star"] * (1 - max(out["mu_inf"], 0))
    for method in SOLVERS:
        entry = {"certified": True}
        opts = dict(method=method, weights=weights, max_iter=max_iter, on_violation="warn")
        try:
            # The certificate is checked once; an uncertified solver still runs, to show what happens.
            solve_equilibrium(A, Q[:1], tol=1e-3, **{**opts, "on_violation": "raise"})
        except WellPosednessError as e:
            entry.update(certified=False, why=str(e).split(" (pass")[0])
        if method == "adaptive" and out["alpha_star"] < 1:
            entry.update(certified=False, why="adaptive starts at alpha = 1 > alpha*: no a-priori guarantee")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method != "peaceman-rachford":
                record = np.full((len(Q), max_iter + 1), np.nan)
                X, info = solve_equilibrium(A, Q, tol=0.0, record=record, **opts)
                entry["alpha"] = info.alpha
                entry["median_residual"] = np.nanmedian(record, axis=0).tolist()
                entry["max_residual"] = np.nanmax(record, axis=0).tolist()
                for tol in TOLS:
                    k = first_below(record, tol)
                    missing = np.isnan(k).any()
                    entry[f"iterations_to_{tol:g}"] = {"mean": None if missing else float(np.mean(k)),
                                                       "max": None if missing else int(np.max(k)),
                                                       "reached": float(np.mean(~np.isnan(k)))}
                if method == "average":
                    # Empirical contraction: geometric mean of residual ratios until 1e-9 (or the end).
                    rates = []
                    for row in record:
                        row = row[~np.isnan(row)]
                        stop = np.argmax(row <= 1e-9) if (row <= 1e-9).any() else len(row) - 1
                        if stop >= 2 and row[0] > 0:
                            rates.append((row[stop] / row[0]) ** (1 / stop))
                    entry["empirical_rate_max"] = float(np.max(rates)) if rates else None
                    entry["empirical_rate_median"] = float(np.median(rates)) if rates else None
            for tol in TOLS:
                _, info = solve_equilibrium(A, Q, tol=tol, **opts)
                entry.setdefault("iterations", {})[f"{tol:g}"] = {
                    "mean": float(info.iterations.mean()), "max": int(info.iterations.max()),
                    "converged": float(info.converged.mean())}
                entry.setdefault("seconds", {})[f"{tol:g}"] = best_time(
                    lambda: solve_equilibrium(A, Q, tol=tol, **opts), repeats, warmup=False)
            curve = []
            for tol in np.geomspace(1e-1, 1e-10, 10):
                _, info = solve_equilibrium(A, Q, tol=tol, **opts)
                curve.append((best_time(lambda: solve_equilibrium(A, Q, tol=tol, **opts), repeats, warmup=False),
                              float(info.residual.max())))
            entry["time_curve"] = curve
        out["solvers"][method] = entry
    return out


def plot_problem(name, res, out, max_iter):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.3))
    for method, e in res["solvers"].items():
        color, ls = STYLE[method]
        label = f"{method} (alpha {e['alpha']:.3g})" if "alpha" in e else method
        if not e["certified"]:
            label += ", not certified"
        if "max_residual" in e:
            r = np.array(e["max_residual"], dtype=float)
            a1.semilogy(np.arange(len(r)), r, ls, color=color, label=label)
        t, r = zip(*e["time_curve"])
        a2.loglog(np.array(t) * 1e3, r, ls, marker=".", color=color, label=method)
    avg = res["solvers"].get("average", {})
    if "max_residual" in avg:
        r0 = avg["max_residual"][0]
        k = np.arange(max_iter + 1)
        a1.semilogy(k, r0 * res["rho_average"] ** k, color="k", lw=0.8, ls=":",
                    label=f"bound rho(alpha*)^k, rho = {res['rho_average']:.4f}")
    reached = [e["iterations_to_1e-09"]["max"] for e in res["solvers"].values()
               if e["certified"] and e.get("iterations_to_1e-09", {}).get("max") is not None]
    if reached:
        a1.set_xlim(0, 1.3 * max(reached) + 5)
    skipped = [f"{m}: {e['why']}" for m, e in res["solvers"].items() if not e["certified"]]
    a1.set(xlabel="iteration", ylabel="max over the batch of ||relu(Ax+q) - x||_inf",
           title=f"{name}: mu_inf {res['mu_inf']:.3g}, mu_2 {res['mu_2']:.3g}, alpha* {res['alpha_star']:.3g}",
           ylim=(1e-12, None))
    a2.set(xlabel="wall time (ms) to stop at a tolerance", ylabel="largest residual reached",
           title="residual against wall time (whole batch)")
    for a in (a1, a2):
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    if skipped:
        fig.text(0.01, 0.01, "not certified (run anyway): " + "; ".join(skipped)[:240], fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if skipped else 0, 1, 1))
    save_figure(fig, out, name)


def plot_contraction(problems, out):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, res in problems.items():
        e = res["solvers"].get("average", {})
        if e.get("empirical_rate_max") is not None:
            ax.scatter(res["rho_average"], e["empirical_rate_max"], label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="empirical = theoretical")
    ax.set(xlabel="theoretical rho(alpha*) = 1 - alpha* (1 - mu_inf)", ylabel="empirical rate (worst sample)",
           title="Average iteration: contraction factor", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out, "contraction")


def table(problems):
    lines = [f"{'problem':26s} {'solver':18s} " + " ".join(f"{'it@' + format(t, 'g'):>9s} {'ms':>7s}" for t in TOLS)]
    for name, res in problems.items():
        for method, e in res["solvers"].items():
            cells = []
            for t in TOLS:
                it = e["iterations"][f"{t:g}"]
                mark = "" if it["converged"] == 1 else "*"
                cells.append(f"{it['mean']:8.1f}{mark or ' '} {1e3 * e['seconds'][f'{t:g}']:7.2f}")
            mark = "" if e["certified"] else "  (not certified)"
            lines.append(f"{name:26s} {method:18s} " + " ".join(cells) + mark)
    lines.append("(it: mean iterations per sample when the batch stops at that tolerance; * = some samples "
                 "hit max_iter; ms: wall time for the batch; not certified: run although its guarantee fails)")
    return lines


def verdicts(problems):
    out = []
    for name, res in problems.items():
        s = res["solvers"]
        avg, aa = s.get("average", {}), s.get("anderson", {})
        if "iterations" in avg and "iterations" in aa:
            ia, ib = avg["iterations"]["1e-06"]["mean"], aa["iterations"]["1e-06"]["mean"]
            ta, tb = avg["seconds"]["1e-06"], aa["seconds"]["1e-06"]
            ok = ib <= ia / 2 and tb < ta
            out.append(f"{name}: Anderson to 1e-6 in {ib:.1f} iterations against {ia:.1f} ({ib / ia:.2f}x), "
                       f"{1e3 * tb:.2f} ms against {1e3 * ta:.2f} ms: target (<= half the iterations and less "
                       f"time) {'met' if ok else 'NOT met'}")
        for other in ("picard", "forward-backward"):
            o = s.get(other, {})
            if "iterations" in avg and "iterations" in o:
                ia, io = avg["iterations"]["1e-06"], o["iterations"]["1e-06"]
                fewer = ia["mean"] < io["mean"] or io["converged"] < 1
                out.append(f"{name}: average {ia['mean']:.1f} vs {other} {io['mean']:.1f} iterations to 1e-6"
                           f"{'' if io['converged'] == 1 else ' (' + other + ' did not converge for all samples)'}"
                           f": average {'needs fewer' if fewer else 'does NOT need fewer'}")
    return out


def main(argv=None):
    p = analysis_parser(__doc__, "runs/convergence", "small problems and budgets (what the tests run)")
    p.add_argument("--model", default=None, help="a training run folder (or model.npz); default: train one")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="BLAS threads while timing: on 2-core machines OpenBLAS's threaded path made the "
                        "(batch > 128) x 100 x 100 products of these solvers up to 6x slower than one thread")
    args = p.parse_args(argv)
    if args.blas_threads < 1:
        p.error("--blas-threads must be >= 1")
    from threadpoolctl import threadpool_limits
    with threadpool_limits(args.blas_threads, user_api="blas"):
        return run(args)


def run(args):
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    max_iter = 300 if args.quick else 2000
    repeats = 1 if args.quick else 3
    started = time.perf_counter()
    specs = ([(0.5, 0.0), (0.99, -2.0)] if args.quick
             else [(0.5, 0.0), (0.9, 0.0), (0.99, 0.0), (0.9, -2.0), (0.99, -2.0)])
    problems, meta = {}, {}
    # The trained model is studied on a batch of 100 test images, the training batch size.
    A, Q, w, source = trained_problem(args.model, args.data_dir, args.quick, 100)
    work = [("trained_mnist", (A, Q, w))] + [
        (f"random_mu{mu:g}_shift{shift:g}", random_problem(rng, mu, shift, batch=50 if args.quick else 200) + (None,))
        for mu, shift in specs]
    meta["trained_model"] = source
    meta["blas_threads"] = args.blas_threads
    for name, (A, Q, w) in tqdm(work, desc="convergence study", unit="problem", disable=None):
        problems[name] = study(A, Q, w, max_iter, repeats)
        plot_problem(name, problems[name], out, max_iter)
    plot_contraction(problems, out)
    lines, ver = table(problems), verdicts(problems)
    result = {"meta": meta, "max_iter": max_iter, "tolerances": TOLS, "problems": problems, "table": lines,
              "verdict": ver}
    return finish(out, result, lines + ver, traces=("median_residual", "max_residual", "time_curve"), started=started)


if __name__ == "__main__":
    sys.exit(main())

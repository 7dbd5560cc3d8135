"""Sweeps over training flags and seeds on Dask: ``python -m nemon_np.sweep``.

    python -m nemon_np.sweep --grid gamma=0.5,0.9,0.95 --grid hidden=50,100 --seeds 3 --out runs/sweep \\
        [--scheduler tcp://HOST:PORT] [--workers N] -- --dataset mnist --data-dir ../shared/data --epochs 10

Every combination of the --grid values, with --seeds N seeds (0 .. N-1, or from --first-seed), is
one run of ``python -m nemon_np.train`` with the flags after ``--`` (any flag of nemon_np.train) plus
the grid point's, writing its usual
folder (model.npz, metrics.json, metrics.csv, training_curves.png, and the run's output in log.txt)
under --out as ``<flag>=<value>_.../seed=<s>``. A run whose metrics.json holds its final summary is
complete and skipped on a rerun, so an interrupted or crashed sweep resumes where it stopped; a run
that fails is reported with its error (in its folder's error.txt too) and the others go on.

The runs go to Dask's distributed scheduler: by default a local cluster on this machine (processes,
one BLAS thread each, as many workers as cores), or with --scheduler an existing Dask cluster (``dask
scheduler`` and ``dask worker ADDRESS``, dask-jobqueue on SLURM/PBS, Kubernetes, ...). The workers
must see the same --out folder and the data folder at the same paths (a shared file system). Start
workers of your own with MALLOC_TRIM_THRESHOLD_ unset (Dask configuration
``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null``): Dask's default for it made a
training 1.3x slower; the local cluster does this itself.

The summary (summary.csv, summary.md, summary.png in --out) gives per grid point the number of seeds,
mean, standard deviation and a 95% interval (Student t) of the test accuracy and, where present, of
the certified accuracy, the Lipschitz bound, mu_inf and the seconds per epoch.
"""
import contextlib
import csv
import itertools
import json
import math
import pathlib
import sys
import traceback

import numpy as np
from scipy import stats

from .training import TRAINING_STATE, is_complete

__all__ = ["parse_grid", "plan_runs", "run_training", "summarize", "run_sweep", "METRICS"]

# (name in the summary, how to read it from a run's metrics.json)
METRICS = {
    "test_acc": lambda m: m["summary"]["test_acc"],
    "test_certified_acc": lambda m: m["summary"].get("test_certified_acc"),
    "lipschitz_bound": lambda m: m["epochs"][-1].get("lipschitz_bound"),
    "mu_inf": lambda m: m["summary"].get("mu_inf_saved"),
    "seconds_per_epoch": lambda m: float(np.median([r["epoch_seconds"] for r in m["epochs"]])),
}


def parse_grid(items, flags):
    """``["gamma=0.5,0.9", "hidden=50,100"]`` as an ordered {flag: [values as strings]}; flags are the
    training flags (names with underscores) allowed. A one-line ``ValueError`` for a bad item."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--grid {item!r}: expected FLAG=VALUE,VALUE,...")
        if name in ("seed", "out"):
            raise ValueError(f"--grid {name}: give seeds with --seeds and the folder with --out")
        if name not in flags:
            raise ValueError(f"--grid {name}: not a flag of nemon_np.train")
        if name in grid:
            raise ValueError(f"--grid {name} given twice")
        grid[name] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def _point_name(point):
    return "_".join(f"{k}={v}" for k, v in point.items()) or "default"


def plan_runs(grid, seeds, out, train_args, first_seed=0):
    """The runs of a sweep: (grid point dict, seed, run folder, argv of nemon_np.train), in grid order,
    seeds first_seed .. first_seed + seeds - 1 at every grid point."""
    names = list(grid)
    runs = []
    for values in itertools.product(*(grid[n] for n in names)):
        point = dict(zip(names, values))
        for seed in range(first_seed, first_seed + seeds):
            folder = pathlib.Path(out) / _point_name(point) / f"seed={seed}"
            argv = list(train_args) + [a for k, v in point.items() for a in ("--" + k.replace("_", "-"), v)]
            argv += ["--seed", str(seed), "--out", str(folder), "--no-progress"]
            runs.append((point, seed, folder, argv))
    return runs


def _last_line(path):
    lines = path.read_text().strip().splitlines()
    return lines[-1] if lines else ""


def _rerun_argv(argv, folder):
    """The training argv for a folder the sweep runs in: a run stopped after a complete epoch (its
    training state saved) is resumed from it; an empty folder or one whose run never finished an
    epoch is trained from scratch (--overwrite, since a failed start may have left files)."""
    if (folder / TRAINING_STATE).is_file() and (folder / "model.npz").is_file():
        keep = [a for i, a in enumerate(argv) if a == "--data-dir" or (i > 0 and argv[i - 1] == "--data-dir")]
        return ["--resume", str(folder), "--no-progress"] + keep
    return list(argv) + ["--overwrite"]


def run_training(argv, folder):
    """One run of ``nemon_np.train.main(argv)`` with its output streamed to ``folder/log.txt``; returns
    (status, message): "done", "skipped" if the run is complete by the time it starts (another sweep
    over the same folder finished it while this one waited), or "failed" with the error (also
    written to ``folder/error.txt``). Runs in a Dask worker: it never raises."""
    from . import train
    folder = pathlib.Path(folder)
    if is_complete(folder):
        return "skipped", ""
    argv = _rerun_argv(argv, folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").unlink(missing_ok=True)
    log_path = folder / "log.txt"
    with open(log_path, "w", buffering=1) as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                code = train.main(argv)
            error = None if code == 0 else f"exit status {code}"
        except SystemExit as e:   # argparse errors end in sys.exit
            error = f"exit status {e.code}"
        except Exception as e:  # noqa: BLE001 - a failed run is reported, the sweep goes on
            log.write(traceback.format_exc())
            error = f"{type(e).__name__}: {e}"
    if error:
        error = f"{error}: {_last_line(log_path)}" if error.startswith("exit status") else error
        (folder / "error.txt").write_text(error + "\n")
        return "failed", error
    return "done", ""


def _interval(values):
    """n, mean, standard deviation and the 95% Student-t interval of a list of numbers."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    n = len(x)
    if n == 0:
        return dict(n=0, mean=None, std=None, ci_low=None, ci_high=None)
    mean = float(x.mean())
    if n == 1:
        return dict(n=1, mean=mean, std=None, ci_low=None, ci_high=None)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, ci_low=mean - half, ci_high=mean + half)


def summarize(runs):
    """Per grid point and metric: n, mean, std, 95% interval over the complete runs' metrics.json.
    Returns a list of rows {"point": {...}, "runs": n, metric: {n, mean, std, ci_low, ci_high}}."""
    rows, by_point = [], {}
    for point, _, folder, _ in runs:
        by_point.setdefault(_point_name(point), (point, []))[1].append(folder)
    for point, folders in by_point.values():
        metrics = [json.loads((f / "metrics.json").read_text()) for f in folders if is_complete(f)]
        row = {"point": point, "runs": len(metrics)}
        for name, read in METRICS.items():
            row[name] = _interval([read(m) for m in metrics])
        rows.append(row)
    return rows


def _fmt(value, percent):
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.4g}"


def write_summary(rows, grid, out):
    """summary.csv (one row per grid point and metric), summary.md (a table: mean +- std [95% interval])
    and summary.png (test accuracy against each swept flag, error bars one standard deviation)."""
    out = pathlib.Path(out)
    flags = list(grid)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(flags + ["metric", "n", "mean", "std", "ci95_low", "ci95_high"])
        for row in rows:
            for name in METRICS:
                s = row[name]
                if s["n"]:
                    w.writerow([row["point"][k] for k in flags]
                               + [name, s["n"], s["mean"], s["std"], s["ci_low"], s["ci_high"]])
    present = [name for name in METRICS if any(row[name]["n"] for row in rows)]
    lines = ["| " + " | ".join(flags + ["seeds"] + present) + " |", "|" + "---|" * (len(flags) + 1 + len(present))]
    for row in rows:
        cells = [row["point"][k] for k in flags] + [str(row["runs"])]
        for name in present:
            s, pct = row[name], name.endswith("_acc")
            cell = _fmt(s["mean"], pct)
            if s["std"] is not None:
                cell += f" ± {_fmt(s['std'], pct)} [{_fmt(s['ci_low'], pct)}, {_fmt(s['ci_high'], pct)}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Accuracies in %: mean ± standard deviation over seeds [95% Student-t interval]; "
            "an interval needs two seeds or more.")
    (out / "summary.md").write_text("\n".join(lines + ["", note]) + "\n")
    _plot(rows, grid, out / "summary.png")
    return lines + ["", note]


def _plot(rows, grid, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    flags = list(grid) or ["default"]
    metrics = [m for m in ("test_acc", "test_certified_acc") if any(r[m]["n"] for r in rows)]
    fig, axes = plt.subplots(len(metrics), len(flags), figsize=(4.5 * len(flags), 3.6 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, flag in enumerate(flags):
            ax = axes[i, j]
            others = [k for k in grid if k != flag]
            groups = {}
            for r in rows:
                groups.setdefault(tuple(r["point"].get(k) for k in others), []).append(r)
            for key, group in groups.items():
                xs = [r["point"].get(flag, "default") for r in group]
                means = [np.nan if r[metric]["mean"] is None else 100 * r[metric]["mean"] for r in group]
                errs = [0 if r[metric]["std"] is None else 100 * r[metric]["std"] for r in group]
                label = ", ".join(f"{k}={v}" for k, v in zip(others, key)) or None
                ax.errorbar(range(len(xs)), means, yerr=errs, marker="o", capsize=3, label=label)
                ax.set_xticks(range(len(xs)), xs)
            ax.set(xlabel=flag, ylabel=f"{metric.replace('_', ' ')} (%)")
            ax.grid(alpha=0.3)
            if len(groups) > 1:
                ax.legend(fontsize=7)
    fig.suptitle("mean over seeds, bars: one standard deviation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run_planned(run):
    folder, argv = run
    return run_training(argv, str(folder))


def run_sweep(runs, scheduler=None, workers=None, progress=True, cluster=None):
    """Run the incomplete ``runs`` (from :func:`plan_runs`) on Dask: on ``cluster`` or the scheduler at
    address ``scheduler`` if given, else on a new local cluster of ``workers`` processes (default: the
    cores). Returns {run folder: (status, message)}, status "done", "failed" or "skipped" (complete)."""
    from tqdm.auto import tqdm

    from .cluster import dask_client, map_unordered

    results = {str(folder): ("skipped", "") for _, _, folder, _ in runs if is_complete(folder)}
    todo = [(folder, argv) for _, _, folder, argv in runs if str(folder) not in results]
    if not todo:
        return results
    with dask_client(scheduler, workers, cluster) as client:
        for (folder, _), (status, message) in map_unordered(
                client, _run_planned, todo, key=lambda run: f"nemon-train-{run[0]}", desc="sweep", unit="run",
                progress=progress):
            results[str(folder)] = (status, message)
            if status == "failed":
                tqdm.write(f"failed: {folder}: {message}")   # above the progress bar, as before
    return results


def main(argv=None):
    from ._cli import OneLineErrorParser
    from .train import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = OneLineErrorParser(prog="python -m nemon_np.sweep", description=__doc__,
                           formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2,...",
                   help="a training flag and its values; repeat for a grid over several flags")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds at every grid point")
    p.add_argument("--first-seed", type=int, default=0, help="seeds --first-seed .. --first-seed + N - 1")
    p.add_argument("--out", required=True, help="sweep folder: one run folder per grid point and seed, and the summary")
    p.add_argument("--scheduler", default=None,
                   help="address of an existing Dask scheduler (tcp://HOST:PORT); default: a local cluster here. "
                        "Its workers must see --out and the data folder at the same paths")
    p.add_argument("--workers", type=int, default=None, help="local cluster: worker processes (default: the cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is one on a terminal only)")
    args, unknown = p.parse_known_args(own)
    train_flags = {o for a in build_parser()._actions for o in a.option_strings}
    misplaced = [a for a in unknown if a.split("=")[0] in train_flags]
    if misplaced:
        p.error(f"{misplaced[0]} is a training flag: training flags go after --, as in python -m nemon_np.sweep "
                f"--grid ... --out DIR -- {misplaced[0]} ...")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    flags = {a.dest for a in build_parser()._actions if a.option_strings}
    try:
        grid = parse_grid(args.grid, flags)
        if args.seeds < 1 or args.first_seed < 0 or (args.workers is not None and args.workers < 1):
            raise ValueError("--seeds and --workers must be >= 1, --first-seed >= 0")
        forwarded = {a.split("=")[0] for a in train_args if a.startswith("--")}
        clash = forwarded & ({"--seed", "--out"} | {"--" + k.replace("_", "-") for k in grid})
        if clash:
            raise ValueError(f"{', '.join(sorted(clash))} after --: set by the sweep itself (--grid, --seeds, --out)")
        build_parser().parse_args(train_args)   # bad training flags fail here, not in every worker
    except ValueError as e:
        p.error(str(e))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(grid, args.seeds, out, train_args, args.first_seed)
    (out / "sweep.json").write_text(json.dumps({"grid": grid, "seeds": args.seeds, "train_args": train_args}, indent=2))
    print(f"sweep: {len(runs)} runs ({len(runs) // args.seeds} grid points x {args.seeds} seeds) into {out}, "
          f"on {args.scheduler or 'a local Dask cluster'}", flush=True)
    results = run_sweep(runs, args.scheduler, args.workers, progress=not args.no_progress)
    counts = {s: sum(1 for v in results.values() if v[0] == s) for s in ("done", "skipped", "failed")}
    lines = write_summary(summarize(runs), grid, out)
    print("\n".join(lines))
    for folder, (status, message) in results.items():
        if status == "failed":
            print(f"failed: {folder}: {message}", file=sys.stderr)
    print(f"{counts['done']} run, {counts['skipped']} already complete, {counts['failed']} failed; "
          f"wrote {out / 'summary.md'}, summary.csv and summary.png")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

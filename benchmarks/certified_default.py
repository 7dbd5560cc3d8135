"""Certified recipes at MNIST eps 0.1 as a user runs them (issue #27), timed as whole processes, then
certified on the saved models.

Run:  python benchmarks/certified_default.py --data-dir DIR [--recipe default | stack-12] [--seeds 0 1]
          [--old CHECKOUT] [--out runs/cert_default] [--samples 1000] [-- extra nemon_np.train flags]

The recipes (:data:`RECIPES`), each with the targets the issue sets for it:

* ``default``: ``python -m nemon_np.train --dataset mnist --certified-eps 0.1`` with nothing else (the dense
  model); targets certified >= 85%, clean >= 95%, whole run <= 300 s.
* ``stack-12``: the stack ``ibp-small-nemon`` over 12 epochs, the fastest recipe measured to certify what the
  conv NEMON recipe does (93.05% over 2 seeds, 2,879 s with ``--threads 2`` on the idle machine); targets
  certified >= 93.05% and whole run <= 960 s (3x faster).

For each seed it runs the command in a process of its own (one thread: OMP, OpenBLAS, numba) and takes
its wall time and its CPU time (user + system, which a machine shared with other jobs inflates less) over
the whole run (data loading, training, the per-epoch test evaluation and certification, saving); with
``--old CHECKOUT`` (another checkout of nemon_np) the same command runs on that code too, each seed old
then new, so that both are timed in one run, and the new / old ratios are printed. Each saved model then goes through
``python -m nemon_np.robustness`` at eps 0.1 (crown and interval certificates, PGD, FGSM, noise; it fails
if a certified image is broken). Prints seconds, clean accuracy, certified accuracies and PGD's, and
whether the recipe's targets are met.
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

from nemon_np._threads import ONE_THREAD_ENV
from vs_paper import split_train_flags


# name: (the flags after --dataset mnist --certified-eps 0.1, certified %, clean % or None, whole run seconds)
RECIPES = {
    "default": ([], 85.0, 95.0, 300.0),
    "stack-12": (["--model", "stack", "--arch", "ibp-small-nemon", "--weight-init", "ibp", "--epochs", "12", "--lr",
                  "0.001", "--gamma", "0.5", "--min-diagonal", "0", "--tol", "0.0001", "--eps-warmup", "1",
                  "--eps-ramp", "6", "--train-eps-factor", "1.2", "--certify-samples", "200",
                  "--warmup-reg", "0"], 93.05, None, 960.0),   # measured before the regularizers' default
}


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(code, seed, out, data_dir, extra):
    """(wall, CPU) seconds of the whole training process on the checkout ``code`` (None: this one)."""
    cmd = [sys.executable, "-m", "nemon_np.train", "--dataset", "mnist", "--certified-eps", "0.1", "--seed", str(seed),
           "--out", str(out), "--overwrite", "--no-progress"] + (["--data-dir", data_dir] if data_dir else []) + extra
    env = {**os.environ, **ONE_THREAD_ENV}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return seconds, cpu


def evaluate(run, data_dir, samples):
    """The robustness report of the saved model at eps 0.1 (this checkout's code)."""
    from nemon_np import robustness
    args = [str(run), "--samples", str(samples), "--eps", "0.1", "--pgd-steps", "20"]
    if robustness.main(args + (["--data-dir", data_dir] if data_dir else [])) != 0:
        raise SystemExit(f"robustness failed on {run}")
    return json.loads((pathlib.Path(run) / "robustness.json").read_text())


def main(argv=None):
    argv, extra = split_train_flags(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default", help="the recipe and its targets")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--old", default=None, help="another checkout of nemon_np, timed on the same command first")
    p.add_argument("--out", default="runs/cert_default")
    p.add_argument("--samples", type=int, default=1000, help="test images certified and attacked (the first N)")
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for label, code in ([("old", args.old)] if args.old else []) + [("new", None)]:
            run = pathlib.Path(args.out) / f"{label}_s{seed}"
            seconds, cpu = train(code, seed, run, args.data_dir, RECIPES[args.recipe][0] + extra)
            report = evaluate(run, args.data_dir, args.samples)
            row = {"code": label, "seed": seed, "seconds": seconds, "cpu_seconds": cpu, "report": report}
            rows.append(row)
            print(f"{label} seed {seed}: whole run {seconds:.0f} s ({cpu:.0f} CPU s); {json.dumps(_summary(report))}",
                  flush=True)
    for r in rows:
        s = _summary(r["report"])
        certified, clean, limit = RECIPES[args.recipe][1:]
        met = s["certified-crown"] >= certified and (clean is None or s["clean"] >= clean) and r["seconds"] <= limit
        targets = f">= {certified:g}%" + ("" if clean is None else f", clean >= {clean:g}%") + f", <= {limit:g} s"
        print(f"{r['code']} seed {r['seed']}: {r['seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU s), clean "
              f"{s['clean']:.2f}%, certified crown {s['certified-crown']:.2f}% (interval "
              f"{s['certified-interval']:.2f}%), PGD {s['pgd']:.2f}%: targets ({targets}) "
              f"{'met' if met else 'NOT met'}")
    if args.old:
        for seed in args.seeds:
            old, new = ([r for r in rows if r["seed"] == seed and r["code"] == c][0] for c in ("old", "new"))
            print(f"seed {seed}: new / old = {new['seconds'] / old['seconds']:.3f} wall, "
                  f"{new['cpu_seconds'] / old['cpu_seconds']:.3f} CPU")
    return 0


def _summary(report):
    """Clean accuracy, the certified accuracies and PGD's at eps 0.1 (the report's only radius), in %, and
    the certified images an attack broke (0: the robustness CLI fails otherwise)."""
    return {"clean": 100 * report["clean_acc"], "pgd": 100 * report["attacks"]["pgd"][0],
            **{k: 100 * v[0] for k, v in report["certified"].items()},
            "broken": sum(v[0] for v in report["broken_certified"].values())}


if __name__ == "__main__":
    sys.exit(main())

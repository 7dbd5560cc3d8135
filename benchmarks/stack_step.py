"""A certified (IBP) training step of a stacked model, this code against another checkout, or on one
thread against several, in one run.

Run:  python benchmarks/stack_step.py --old CHECKOUT [--arch ibp-small-nemon ibp-small] [--shape 1,28,28]
          [--steps 20] [--repeats 3]
      python benchmarks/stack_step.py --threads 2 [--arch nemon-medium] ...

For each architecture, each repeat runs the old code, then this one, each in a process of its own with
one-thread BLAS, OpenMP and numba, the old one with CHECKOUT first on ``PYTHONPATH`` (run this from a
folder other than the repository's, so that the current directory does not shadow it). With
``--threads N`` instead, both sides are this code, the second with ``StackedClassifier.n_jobs = N``
(its convolutions' image blocks shared by N threads), and both sides' seconds are wall seconds. A process
builds the stack (seed 0, IBP initialization, float32), draws 100 images in [0, 1] and their labels,
takes one step to compile and warm up, then times ``--steps`` calls of ``certified_loss_and_grad`` at
kappa 0.5 over boxes of radius 0.1 (normalized units), in CPU seconds (wall seconds with --threads).
Prints the medians per step, their ratio, and whether both sides gave the same loss.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

# This process runs this checkout's code (only its children get the old one on PYTHONPATH).
from nemon_np._threads import ONE_THREAD_ENV

WORKER = """
import json, sys, time
import numpy as np
from nemon_np.stack import StackedClassifier
arch, shape, steps = sys.argv[1], tuple(int(v) for v in sys.argv[2].split(",")), int(sys.argv[3])
n_jobs, clock = int(sys.argv[4]), getattr(time, sys.argv[5])
model = StackedClassifier(arch, shape, 10, weight_init="ibp", dtype=np.float32)
if n_jobs > 1:
    model.n_jobs = n_jobs
rng = np.random.default_rng(0)
U = rng.uniform(0, 1, (100, int(np.prod(shape)))).astype(np.float32)
y = rng.integers(0, 10, 100)
step = lambda: model.certified_loss_and_grad(U, y, U - 0.1, U + 0.1, 0.5, tol=1e-4, max_iter=300)
loss = step()[0]
t = clock()
for _ in range(steps):
    step()
print(json.dumps({"seconds": (clock() - t) / steps, "loss": float(loss)}))
"""


def time_step(code, arch, shape, steps, n_jobs=1, clock="process_time"):
    """(seconds a step by ``clock``, a function of ``time``; the first step's loss) on the checkout ``code``
    (None: the installed one), the stack's convolutions on ``n_jobs`` threads."""
    env = {**os.environ, **ONE_THREAD_ENV}
    if code is not None:
        env["PYTHONPATH"] = str(pathlib.Path(code).resolve())
    done = subprocess.run([sys.executable, "-c", WORKER, arch, shape, str(steps), str(n_jobs), clock], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the step failed on {code or 'this code'}:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["seconds"], out["loss"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", help="another checkout of nemon_np (its parent folder of nemon_np/)")
    p.add_argument("--threads", type=int, help="instead of --old: this code on one thread against this many")
    p.add_argument("--arch", nargs="+", default=["ibp-small-nemon", "ibp-small"], help="presets or layer strings")
    p.add_argument("--shape", default="1,28,28", help="input shape C,H,W")
    p.add_argument("--steps", type=int, default=20, help="steps timed in each process")
    p.add_argument("--repeats", type=int, default=3, help="old / new pairs")
    args = p.parse_args(argv)
    if (args.old is None) == (args.threads is None):
        p.error("give either --old CHECKOUT or --threads N")
    if args.threads is not None and args.threads < 2:
        p.error(f"--threads must be at least 2, got {args.threads}")
    sides = ((("old", args.old, 1), ("new", None, 1)) if args.old else
             (("1 thread", None, 1), (f"{args.threads} threads", None, args.threads)))
    (a, _, _), (b, _, _) = sides
    clock = "process_time" if args.old else "perf_counter"
    for arch in args.arch:
        times, losses = {a: [], b: []}, {}
        for _ in range(args.repeats):
            for label, code, n_jobs in sides:
                seconds, losses[label] = time_step(code, arch, args.shape, args.steps, n_jobs, clock)
                times[label].append(seconds)
        old, new = np.median(times[a]), np.median(times[b])
        same = abs(losses[a] - losses[b]) <= 1e-5 * abs(losses[a])
        print(f"{arch} on {args.shape}, batch 100: {a} {1e3 * old:.1f} ms, {b} {1e3 * new:.1f} ms a step "
              f"({'CPU' if args.old else 'wall'} seconds, "
              f"medians of {args.repeats}): {old / new:.2f}x; loss {losses[a]:.6f} / {losses[b]:.6f} "
              f"({'the same' if same else 'DIFFERENT'})", flush=True)


if __name__ == "__main__":
    main()

"""A certified (IBP) training step of a stacked model, this code against another checkout, in one run.

Run:  python benchmarks/stack_step.py --old CHECKOUT [--arch ibp-small-nemon ibp-small] [--shape 1,28,28]
          [--steps 20] [--repeats 3]

For each architecture, each repeat runs the old code, then this one, each in a process of its own with
one thread (OMP, OpenBLAS, numba), the old one with CHECKOUT first on ``PYTHONPATH`` (run this from a
folder other than the repository's, so that the current directory does not shadow it). A process
builds the stack (seed 0, IBP initialization, float32), draws 100 images in [0, 1] and their labels,
takes one step to compile and warm up, then times ``--steps`` calls of ``certified_loss_and_grad`` at
kappa 0.5 over boxes of radius 0.1 (normalized units) in CPU seconds. Prints the medians per step,
the new / old ratio, and whether both codes gave the same loss.
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
model = StackedClassifier(arch, shape, 10, weight_init="ibp", dtype=np.float32)
rng = np.random.default_rng(0)
U = rng.uniform(0, 1, (100, int(np.prod(shape)))).astype(np.float32)
y = rng.integers(0, 10, 100)
step = lambda: model.certified_loss_and_grad(U, y, U - 0.1, U + 0.1, 0.5, tol=1e-4, max_iter=300)
loss = step()[0]
t = time.process_time()
for _ in range(steps):
    step()
print(json.dumps({"seconds": (time.process_time() - t) / steps, "loss": float(loss)}))
"""


def time_step(code, arch, shape, steps):
    """(CPU seconds a step, the first step's loss) on the checkout ``code`` (None: the installed one)."""
    env = {**os.environ, **ONE_THREAD_ENV}
    if code is not None:
        env["PYTHONPATH"] = str(pathlib.Path(code).resolve())
    done = subprocess.run([sys.executable, "-c", WORKER, arch, shape, str(steps)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"the step failed on {code or 'this code'}:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["seconds"], out["loss"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="another checkout of nemon_np (its parent folder of nemon_np/)")
    p.add_argument("--arch", nargs="+", default=["ibp-small-nemon", "ibp-small"], help="presets or layer strings")
    p.add_argument("--shape", default="1,28,28", help="input shape C,H,W")
    p.add_argument("--steps", type=int, default=20, help="steps timed in each process")
    p.add_argument("--repeats", type=int, default=3, help="old / new pairs")
    args = p.parse_args(argv)
    for arch in args.arch:
        times, losses = {"old": [], "new": []}, {}
        for _ in range(args.repeats):
            for label, code in (("old", args.old), ("new", None)):
                seconds, losses[label] = time_step(code, arch, args.shape, args.steps)
                times[label].append(seconds)
        old, new = np.median(times["old"]), np.median(times["new"])
        same = abs(losses["old"] - losses["new"]) <= 1e-5 * abs(losses["old"])
        print(f"{arch} on {args.shape}, batch 100, one thread: old {1e3 * old:.1f} ms, new {1e3 * new:.1f} ms a "
              f"step (CPU, medians of {args.repeats}): {old / new:.2f}x; loss {losses['old']:.6f} / "
              f"{losses['new']:.6f} ({'the same' if same else 'DIFFERENT'})", flush=True)


if __name__ == "__main__":
    main()

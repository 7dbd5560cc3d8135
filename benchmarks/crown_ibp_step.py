"""The cost of a CROWN-IBP training step against an interval (IBP) step, on one stack, in one run.

Run:  python benchmarks/crown_ibp_step.py [--arch ibp-small-nemon] [--dataset-shape 1,28,28] [--repeats 5]

One batch of 100 random images in [0, 1], eps 0.1 (normalized units), float32, one BLAS thread; the
two steps alternate A B A B so that the machine's noise falls on both; prints the median seconds of
each and their ratio.
"""
import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from nemon_np.stack import StackedClassifier


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="ibp-small-nemon", help="a preset or comma-separated layers")
    parser.add_argument("--shape", default="1,28,28", help="input shape C,H,W")
    parser.add_argument("--repeats", type=int, default=5, help="A B pairs")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    model = StackedClassifier(args.arch, shape, 10, weight_init="ibp")
    rng = np.random.default_rng(0)
    U = rng.uniform(0, 1, (100, int(np.prod(shape)))).astype(np.float32)
    y = rng.integers(0, 10, 100)
    times = {0.0: [], 1.0: []}
    with threadpool_limits(1):
        for weight in times:   # compile and warm up
            model.certified_loss_and_grad(U, y, U - 0.1, U + 0.1, 0.5, crown_weight=weight, tol=1e-4, max_iter=300)
        for _ in range(args.repeats):
            for weight in times:
                t = time.perf_counter()
                model.certified_loss_and_grad(U, y, U - 0.1, U + 0.1, 0.5, crown_weight=weight, tol=1e-4,
                                              max_iter=300)
                times[weight].append(time.perf_counter() - t)
    ibp, crown = np.median(times[0.0]), np.median(times[1.0])
    print(f"{args.arch} on {shape}, batch 100, one thread: IBP step {ibp:.3f} s, CROWN-IBP step (beta 1) "
          f"{crown:.3f} s, ratio {crown / ibp:.2f}x (medians of {args.repeats})")


if __name__ == "__main__":
    main()

"""Where a dense training epoch's CPU seconds go, against its BLAS floor (issue #27).

Run:  python benchmarks/dense_epoch_parts.py [--images N] [--data-dir DIR] [-- extra nemon_np.train flags]

One epoch of ``python -m nemon_np.train --dataset mnist`` (its defaults, plus whatever follows ``--``) on the
first N MNIST training images, from a fresh model, one thread, after a warm-up that loads the compiled
kernels. The library's own step runs unchanged; timers around its compiled parts split the epoch into

* the input product U B^T and its gradient delta^T U (BLAS),
* the fixed-point kernels, forward and adjoint (BLAS products of the working rows and the row updates),
* the projection onto mu_inf(A) <= gamma, and Adam's update,
* the rest: Python around the step, the input checks, the read-out, the loss and the small products.

The floor is ``vs_paper.blas_floor`` at the epoch's own iteration counts: numpy's matmul alone for the
products an epoch cannot avoid. The last line says what the epoch would be against it if the rest took no
time at all: a bound on what any restructuring of the Python could give.
"""
import argparse
import sys
import time
from collections import defaultdict

import numpy as np
from threadpoolctl import threadpool_limits

from vs_paper import blas_floor, first_mnist, our_config, split_train_flags

from nemon_np import models, optim, projection, solvers
from nemon_np.training import Trainer


def timed(table, key, fn):
    """fn, with its CPU seconds added to table[key(args)] at each call."""
    def wrapper(*args):
        start = time.process_time()
        out = fn(*args)
        table[key(args)] += time.process_time() - start
        return out
    return wrapper


def instrument(table):
    """Timers around the step's compiled parts (module globals, looked up at each call); returns an undo."""
    patches = [
        (models.DenseImplicitMap, "_inject", staticmethod(timed(table, lambda a: "input product U B^T",
                                                                models.DenseImplicitMap._inject))),
        (models.DenseImplicitMap, "_inject_grad", staticmethod(timed(table, lambda a: "input gradient delta^T U",
                                                                     models.DenseImplicitMap._inject_grad))),
        # _averaged_fixed_point's 8th and 9th arguments are relu and l1: the forward solve and the adjoint.
        (solvers, "_averaged_fixed_point", timed(table, lambda a: "forward kernel" if a[7] else "adjoint kernel",
                                                 solvers._averaged_fixed_point)),
        (projection, "_project_rows", timed(table, lambda a: "projection", projection._project_rows)),
        (projection, "_round_inside", timed(table, lambda a: "projection", projection._round_inside)),
        (optim, "_adam_update", timed(table, lambda a: "Adam", optim._adam_update)),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, new in patches:
        setattr(owner, name, new)
    return lambda: [setattr(owner, name, old) for owner, name, old in saved]


def main(argv=None):
    argv, extra = split_train_flags(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=60000, help="the first N training images (default all 60,000)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    if args.images < 100:
        p.error("--images must be >= 100")
    config = our_config("dense", 1, extra)
    if config.model != "nemon" or config.certified_eps > 0:
        p.error("this script splits the clean dense epoch (no --model, no --certified-eps)")
    X, y, _, _ = first_mnist(args.data_dir, args.images, test_images=1)
    table = defaultdict(float)
    with threadpool_limits(1):
        Trainer(config, 784, 10).fit(X[:200], y[:200], progress=False)   # loads the compiled kernels
        trainer = Trainer(config, 784, 10)
        undo = instrument(table)
        try:
            start = time.process_time()
            trainer.fit(X, y, progress=False)
            total = time.process_time() - start
        finally:
            undo()
        row = trainer.history[-1]
        floor = blas_floor(args.images, config.hidden, row["fwd_iter_mean"], row["bwd_iter_mean"],
                           np.dtype(config.dtype), config.batch_size)
    rest = total - sum(table.values())
    print(f"dense epoch, {args.images} images, n = {config.hidden}, {config.dtype}, one thread: {total:.3f} CPU s, "
          f"forward {row['fwd_iter_mean']:.2f} / adjoint {row['bwd_iter_mean']:.2f} iterations a sample")
    for name, seconds in sorted(table.items(), key=lambda kv: -kv[1]) + [("the rest", rest)]:
        print(f"  {name:26s} {seconds:6.3f} s  {100 * seconds / total:5.1f}%")
    print(f"BLAS floor {floor:.3f} s: the epoch is {total / floor:.2f}x it; "
          f"without the rest it would be {(total - rest) / floor:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test evaluation stopped where each class is decided, against the solve to the tolerance (issue 27).

Run:  python benchmarks/decided_stop.py --data-dir ../shared/data [--model conv] [--images 3000]
          [--test-images 2000] [--check-every 1 2 4] [--repeats 2] [-- extra nemon_np.train flags]

Trains ``python -m nemon_np.train --dataset mnist`` (conv: ``--model conv --kernel 5``; its defaults
plus whatever follows ``--``) for one epoch on the first --images training images, then evaluates the
first --test-images test images with ``stop="converged"`` and with ``stop="decided"`` at each
--check-every, in turn, --repeats times, one thread. Prints CPU seconds, forward iterations a sample,
accuracy (which must be equal: the decided classes are the fixed points') and the ratios.
"""
import argparse
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from vs_paper import first_mnist, our_config, split_train_flags


def main(argv=None):
    argv, extra = split_train_flags(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="MNIST folder (as for nemon_np.train)")
    p.add_argument("--model", choices=("dense", "conv"), default="conv")
    p.add_argument("--images", type=int, default=3000, help="training images (the first N)")
    p.add_argument("--test-images", type=int, default=2000, help="test images (the first N)")
    p.add_argument("--check-every", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    threadpool_limits(1)
    from nemon_np.training import Trainer, evaluate
    X, y, Xt, yt = first_mnist(args.data_dir, args.images, args.test_images)
    config = our_config(args.model, 1, extra)
    shape = (1, 28, 28) if config.model == "conv" else None
    trainer = Trainer(config, 784, 10, image_shape=shape)
    trainer.fit(X, y, progress=False)
    options = config.solver_options()
    variants = {"converged": {}} | {f"decided, check every {c}": dict(stop="decided", check_every=c)
                                    for c in args.check_every}
    evaluate(trainer.model, Xt[:200], yt[:200], stop="decided", **options)   # compile outside the timing
    seconds = {name: [] for name in variants}
    for rep in range(args.repeats):
        for name, kw in variants.items():
            t0 = time.process_time()
            _, acc, its = evaluate(trainer.model, Xt, yt, **kw, **options)
            seconds[name].append(time.process_time() - t0)
            print(f"[{rep + 1}/{args.repeats}] {name:24s}: {seconds[name][-1]:6.2f} CPU s, {its.mean():5.2f} "
                  f"iterations a sample, accuracy {100 * acc:.2f}%", flush=True)
    base = np.median(seconds["converged"])
    for name, s in seconds.items():
        print(f"{name:24s}: median {np.median(s):6.2f} CPU s, converged / this {base / np.median(s):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

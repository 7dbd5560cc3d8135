"""The conv model's product K * x by FFT against the k^2 taps, A B A B in one run (issue 27).

Run:  python benchmarks/conv_product.py --data-dir ../shared/data [--images 2000] [--test-images 2000]
          [--repeats 2] [-- extra nemon_np.train flags]

Trains ``python -m nemon_np.train --dataset mnist --model conv --kernel 5`` (its defaults, plus whatever
follows ``--``) for one epoch on the first --images training images, then evaluates the first
--test-images test images, once with ``ConvNEMON.conv_product = "direct"`` and once with "fft", in
turn, --repeats times, one thread; prints the CPU seconds of each, the accuracy and the iterations
(which must be equal: the two products differ by rounding only) and the ratios direct / fft.
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
    p.add_argument("--images", type=int, default=2000, help="training images (the first N)")
    p.add_argument("--test-images", type=int, default=2000, help="test images (the first N)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    threadpool_limits(1)
    from nemon_np import ConvNEMON
    from nemon_np.training import Trainer, evaluate
    X, y, Xt, yt = first_mnist(args.data_dir, args.images, args.test_images)
    config = our_config("conv", 1, extra)
    Trainer(config, 784, 10, image_shape=(1, 28, 28)).fit(X[:200], y[:200], progress=False)   # compile outside
    rows = {"direct": [], "fft": []}
    for rep in range(args.repeats):
        for product in rows:
            ConvNEMON.conv_product = product
            t0 = time.process_time()
            trainer = Trainer(config, 784, 10, image_shape=(1, 28, 28))
            trainer.fit(X, y, progress=False)
            t1 = time.process_time()
            _, acc, its = evaluate(trainer.model, Xt, yt, **config.solver_options())
            rows[product].append((t1 - t0, time.process_time() - t1))
            h = trainer.history[-1]
            print(f"[{rep + 1}/{args.repeats}] {product:6s}: train {t1 - t0:6.2f} CPU s, test "
                  f"{rows[product][-1][1]:6.2f} CPU s, test accuracy {100 * acc:.2f}%, iterations forward "
                  f"{h['fwd_iter_mean']:.2f} / adjoint {h['bwd_iter_mean']:.2f} / test {its.mean():.2f}", flush=True)
    med = {k: np.median(np.array(v), axis=0) for k, v in rows.items()}
    print(f"medians of {args.repeats}: training {med['direct'][0]:.2f} -> {med['fft'][0]:.2f} CPU s "
          f"({med['direct'][0] / med['fft'][0]:.2f}x), test {med['direct'][1]:.2f} -> {med['fft'][1]:.2f} CPU s "
          f"({med['direct'][1] / med['fft'][1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

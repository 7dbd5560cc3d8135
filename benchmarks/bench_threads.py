"""BLAS threads and the training step: why training and the CLIs cap BLAS at one thread.

Run:  python benchmarks/bench_threads.py --data-dir ../shared/data [--steps 50]

Times one optimizer step (batch 100, the training defaults) of a dense NEMON (clean and certified
training) and of a conv NEMON (the MNIST conv defaults with pooling 2), with 1 and with 2 OpenBLAS
threads (threadpoolctl), on real MNIST; prints the seconds per step and their ratio.
"""
import argparse
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from nemon_np.data import load_mnist, normalize
from nemon_np.training import TrainConfig, Trainer


def time_steps(trainer, X, y, steps, eps=0.0, kappa=1.0):
    trainer.step(X[:100], y[:100], 1e-3, eps, kappa)   # compile and warm up
    t0 = time.perf_counter()
    for k in range(steps):
        i = (k % (len(X) // 100)) * 100
        trainer.step(X[i:i + 100], y[i:i + 100], 1e-3, eps, kappa)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="MNIST folder (as for nemon_np.train)")
    p.add_argument("--steps", type=int, default=50, help="timed steps (conv: a fifth of them)")
    args = p.parse_args(argv)
    d = load_mnist(args.data_dir)
    X, y = normalize(d.train_images[:5000], d.mean, d.std), d.train_labels[:5000]
    blas = [(i["internal_api"], i.get("version"), i["num_threads"]) for i in threadpool_info()
            if i["user_api"] == "blas"]
    print(f"BLAS: {blas}")
    cases = [("dense, clean", TrainConfig(), 784, None, 0.0, 1.0, args.steps),
             ("dense, certified eps 0.1 (n = 200)", TrainConfig(certified_eps=0.1, hidden=200), 784, None, 0.12, 0.5,
              args.steps),
             ("conv, clean (32 channels, pool 2)", TrainConfig(model="conv", pool=2), 784, (1, 28, 28), 0.0, 1.0,
              max(args.steps // 5, 2))]
    for name, config, n_in, shape, eps, kappa, steps in cases:
        seconds = {}
        for threads in (1, 2):
            config.blas_threads = None
            trainer = Trainer(config, n_in, 10, image_shape=shape)
            trainer.model.metadata.update(mean=np.array(d.mean), std=np.array(d.std))
            with threadpool_limits(threads, user_api="blas"):
                seconds[threads] = time_steps(trainer, X, y, steps, eps, kappa)
        print(f"{name}: {1e3 * seconds[1]:.1f} ms a step with 1 BLAS thread, {1e3 * seconds[2]:.1f} ms with 2: "
              f"2 threads take {seconds[2] / seconds[1]:.2f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Conv training speed, the MNIST 99% recipe, with whichever nemon_np is importable.

Run:  python benchmarks/bench_conv_epoch.py --data-dir ../shared/data [--images 3000] [--init RUN] [--gamma G]
          [--min-diagonal M] [--lr LR] [--tol-mode relative] [--threads N]
      PYTHONPATH=/path/to/another/checkout python benchmarks/bench_conv_epoch.py ...  (the same on other code)

Trains one epoch of the recipe (32 channels, pooling 2, gamma 0.9, tol 1e-3, 1-pixel shifts, the
library's own defaults otherwise, BLAS threads included) on the first --images training images,
starting from the saved model --init if given (a trained model's iterations, not a fresh one's),
and prints the seconds per 1,000 images and the iterations per sample; --tol-mode relative where the
code has it; --gamma, --min-diagonal and --lr to time another recipe (the fast one: gamma 0.5, floor
0); --threads for the conv model's own threads (code that has them). Run it on two checkouts in one
session to compare them.
"""
import argparse
import sys
import time

import nemon_np
from nemon_np.data import load_mnist, normalize
from nemon_np.training import TrainConfig, Trainer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="MNIST folder (as for nemon_np.train)")
    p.add_argument("--images", type=int, default=3000, help="training images (the first N)")
    p.add_argument("--init", default=None, help="start from this saved conv model (model.npz)")
    p.add_argument("--tol-mode", default=None, help="absolute or relative (code that has the setting)")
    p.add_argument("--gamma", type=float, default=None, help="gamma instead of the recipe's 0.9 (the fast recipe: 0.5)")
    p.add_argument("--min-diagonal", type=float, default=None, help="diagonal floor (code that has the setting; the "
                   "fast recipe: 0)")
    p.add_argument("--lr", type=float, default=None, help="Adam's rate instead of the conv default 5e-3 (a small one "
                   "keeps an --init model where its training left it)")
    p.add_argument("--threads", type=int, default=None, help="the conv model's threads (code that has the setting)")
    args = p.parse_args(argv)
    d = load_mnist(args.data_dir)
    X, y = normalize(d.train_images[:args.images], d.mean, d.std), d.train_labels[:args.images]
    given = {"tol_mode": args.tol_mode, "gamma": args.gamma, "min_diagonal": args.min_diagonal, "lr": args.lr,
             "threads": args.threads}
    extra = {k: v for k, v in given.items() if v is not None}
    config = TrainConfig(model="conv", pool=2, augment="shift", augment_pad=1, epochs=1, init=args.init, **extra)
    trainer = Trainer(config, 784, 10, image_shape=(1, 28, 28))
    warm = Trainer(config, 784, 10, image_shape=(1, 28, 28))
    warm.fit(X[:200], y[:200], progress=False)   # compile the kernels outside the timing
    t0 = time.perf_counter()
    trainer.fit(X, y, progress=False)
    seconds = time.perf_counter() - t0
    row = trainer.history[-1]
    print(f"nemon_np from {nemon_np.__file__}: {1000 * seconds / len(X):.2f} s per 1,000 images, forward "
          f"{row['fwd_iter_mean']:.1f} and adjoint {row['bwd_iter_mean']:.1f} iterations a sample ({len(X)} images, "
          f"{extra or 'defaults'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

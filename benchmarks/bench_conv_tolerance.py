"""Conv training iterations per sample over a run: tolerance modes and the diagonal floor.

Run:  python benchmarks/bench_conv_tolerance.py --data-dir ../shared/data [--images 20000] [--epochs 5]
                                                [--variants absolute relative floor relative+floor]

Trains the MNIST conv recipe (32 channels, pooling 2, gamma 0.9, tol 1e-3, 1-pixel shifts) on the
first --images training images for --epochs epochs once per variant, same seed, one after the other:

* ``absolute``: the default stopping rule ||F(x) - x|| <= tol;
* ``relative``: ``--tol-mode relative``, stop at ||F(x) - x|| <= tol max(1, ||F(x)||);
* ``floor``: ``--min-diagonal 0``, centre taps K[c, c, centre] >= 0, so that the average iteration's
  step alpha* = 1 / (1 - min(min_c K[c, c, centre], 0)) stays 1 and its contraction factor at gamma;
* ``relative+floor``: both.

Prints per epoch the forward and adjoint iterations per sample, alpha*, the seconds and the test
accuracy of each, then the growth of the forward iterations from the first to the last epoch and
each variant's training time as a ratio to the first variant's.
"""
import argparse
import sys

import numpy as np

from nemon_np.data import load_mnist, normalize
from nemon_np.training import TrainConfig, Trainer

VARIANTS = {"absolute": {}, "relative": dict(tol_mode="relative"), "floor": dict(min_diagonal=0.0),
            "relative+floor": dict(tol_mode="relative", min_diagonal=0.0)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="MNIST folder (as for nemon_np.train)")
    p.add_argument("--images", type=int, default=20000, help="training images (the first N)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
                   help="settings to compare, in this order (ratios are to the first)")
    p.add_argument("--gamma", type=float, default=0.9, help="bound on mu_inf(K) for every variant")
    args = p.parse_args(argv)
    d = load_mnist(args.data_dir)
    X, y = normalize(d.train_images[:args.images], d.mean, d.std), d.train_labels[:args.images]
    Xt, yt = normalize(d.test_images, d.mean, d.std), d.test_labels
    histories = {}
    for name in args.variants:
        config = TrainConfig(model="conv", pool=2, augment="shift", augment_pad=1, epochs=args.epochs,
                             gamma=args.gamma, **VARIANTS[name])
        trainer = Trainer(config, 784, 10, image_shape=(1, 28, 28))
        trainer.model.metadata.update(mean=np.array(d.mean), std=np.array(d.std))
        print(f"{name}:")
        print("  epoch  fwd it  adj it  test fwd it  alpha*  train s  test acc", flush=True)

        def report(row):
            print(f"  {row['epoch']:5d}  {row['fwd_iter_mean']:6.1f}  {row['bwd_iter_mean']:6.1f}  "
                  f"{row['test_fwd_iter_mean']:11.1f}  {row['alpha_star']:6.3f}  {row['train_seconds']:7.0f}  "
                  f"{100 * row['test_acc']:7.2f}%", flush=True)
        trainer.fit(X, y, Xt, yt, progress=False, on_epoch=report)
        histories[name] = trainer.history
    first = sum(r["train_seconds"] for r in histories[args.variants[0]])
    for name, h in histories.items():
        seconds = sum(r["train_seconds"] for r in h)
        growth = h[-1]["fwd_iter_mean"] / h[0]["fwd_iter_mean"]
        print(f"{name}: forward iterations {h[0]['fwd_iter_mean']:.1f} -> {h[-1]['fwd_iter_mean']:.1f} "
              f"({growth:.2f}x), test {h[-1]['test_fwd_iter_mean']:.1f}, training {seconds:.0f} s "
              f"({seconds / first:.2f} of {args.variants[0]}), test accuracy {100 * h[-1]['test_acc']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())

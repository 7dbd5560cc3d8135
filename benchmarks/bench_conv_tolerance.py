"""Conv training with the absolute and the relative tolerance: iterations per sample over a run.

Run:  python benchmarks/bench_conv_tolerance.py --data-dir ../shared/data [--images 20000] [--epochs 5]

Trains the MNIST conv recipe (32 channels, pooling 2, gamma 0.9, tol 1e-3, 1-pixel shifts) on the
first --images training images for --epochs epochs, once with ``--tol-mode absolute`` (the
default) and once with ``relative`` (stop at ||F(x) - x|| <= tol max(1, ||F(x)||)), same seed, one
after the other; prints per epoch the forward and adjoint iterations per sample, the seconds and the
test accuracy of each, and the growth of the forward iterations from the first to the last epoch.
"""
import argparse
import sys

import numpy as np

from nemon_np.data import load_mnist, normalize
from nemon_np.training import TrainConfig, Trainer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="MNIST folder (as for nemon_np.train)")
    p.add_argument("--images", type=int, default=20000, help="training images (the first N)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per run")
    args = p.parse_args(argv)
    d = load_mnist(args.data_dir)
    X, y = normalize(d.train_images[:args.images], d.mean, d.std), d.train_labels[:args.images]
    Xt, yt = normalize(d.test_images, d.mean, d.std), d.test_labels
    histories = {}
    for mode in ("absolute", "relative"):
        config = TrainConfig(model="conv", pool=2, augment="shift", augment_pad=1, epochs=args.epochs, tol_mode=mode)
        trainer = Trainer(config, 784, 10, image_shape=(1, 28, 28))
        trainer.model.metadata.update(mean=np.array(d.mean), std=np.array(d.std))
        trainer.fit(X, y, Xt, yt, progress=False)
        histories[mode] = trainer.history
        print(f"tol_mode {mode}:")
        print("  epoch  fwd it  adj it  test fwd it  train s  test acc")
        for r in trainer.history:
            print(f"  {r['epoch']:5d}  {r['fwd_iter_mean']:6.1f}  {r['bwd_iter_mean']:6.1f}  "
                  f"{r['test_fwd_iter_mean']:11.1f}  {r['train_seconds']:7.0f}  {100 * r['test_acc']:7.2f}%",
                  flush=True)
    for mode, h in histories.items():
        growth = h[-1]["fwd_iter_mean"] / h[0]["fwd_iter_mean"]
        print(f"{mode}: forward iterations {h[0]['fwd_iter_mean']:.1f} -> {h[-1]['fwd_iter_mean']:.1f} "
              f"({growth:.2f}x), training {sum(r['train_seconds'] for r in h):.0f} s, "
              f"test accuracy {100 * h[-1]['test_acc']:.2f}%")
    a, r = (sum(x["train_seconds"] for x in histories[m]) for m in ("absolute", "relative"))
    print(f"relative / absolute training time: {r / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

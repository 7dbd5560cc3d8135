"""Does a hidden read-out layer lift interval-certified accuracy? The explicit conv twin, with and without it.

Run:  python benchmarks/bench_explicit_readout.py --data-dir DIR [--certified-eps 0.1] [--epochs 5]
          [--channels 32] [--pool 2] [--readout-hidden 0 100] [--samples 1000] [--out results.json]

A one-conv-layer explicit network (benchmarks/explicit_ibp.py: the ConvNEMON of the same settings
with K = 0) is trained on MNIST with the certified loss and schedule of
``python -m nemon_np.train --model conv --certified-eps EPS`` (the library's defaults: gamma is
irrelevant here, train eps 1.2 x EPS, kappa 1 -> 0.5 over half the epochs after one clean epoch),
once per --readout-hidden width, and certified by nemon_np.certify (sound, rounding included) on
the first --samples test images at 0.1 and 0.3. Explicit networks train 15-80x faster than the
implicit ones, so this pilots the read-out for the conv NEMON runs (docs/benchmarks.md).
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_certified import evaluate  # noqa: E402
from explicit_ibp import ExplicitNet, train_explicit  # noqa: E402

from nemon_np.data import load_dataset, normalize  # noqa: E402
from nemon_np.pixels import input_ball  # noqa: E402
from nemon_np.training import TrainConfig  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="data folder (as for training)")
    p.add_argument("--certified-eps", type=float, default=0.1, help="the radius trained for, pixel units")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--pool", type=int, default=2)
    p.add_argument("--readout-hidden", type=int, nargs="+", default=[0, 100], help="widths to compare (0: linear)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1000, help="first N test images")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.3], help="radii certified, pixel units")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    threadpool_limits(1, user_api="blas")
    data = load_dataset("mnist", args.data_dir)
    mean, std = np.array(data.mean), np.array(data.std)
    X = normalize(data.train_images, mean, std, np.float32)
    pixels = data.test_images[:args.samples].reshape(args.samples, -1) / 255.0
    labels = data.test_labels[:args.samples]
    ball = lambda U, eps: input_ball(U, eps, mean[0], std[0], clip=True)  # noqa: E731
    results = []
    for width in args.readout_hidden:
        config = TrainConfig(model="conv", channels=args.channels, pool=args.pool, readout_hidden=width,
                             epochs=args.epochs, certified_eps=args.certified_eps,
                             eps_ramp=max(args.epochs // 2, 1), seed=args.seed).validate()
        net = ExplicitNet(X.shape[1], args.channels, 10, seed=args.seed, image_shape=(1, 28, 28), pool=args.pool,
                          readout_hidden=width)
        t0 = time.perf_counter()
        train_explicit(net, X, data.train_labels, config, ball)
        seconds = time.perf_counter() - t0
        twin = net.as_nemon()
        twin.metadata.update(mean=mean, std=std)
        r = evaluate(twin, pixels, labels, args.eps, ("interval",))
        r.update(readout_hidden=width, train_seconds=seconds, config=vars(config))
        results.append(r)
        print(f"readout_hidden {width:4d}: clean {100 * r['clean_acc']:.2f}%, certified "
              + ", ".join(f"{100 * a:.2f}% at {e:g}" for e, a in zip(args.eps, r["certified"]["interval"]))
              + f" ({seconds:.0f} s training)", flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

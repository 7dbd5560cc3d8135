"""Time one certified-training batch of a saved conv model, on one thread and on two.

Run:  python benchmarks/bench_certified_step.py RUN [--data-dir DIR] [--eps 0.12] [--threads 1 2]

The IBP-style loss and gradient (ConvNEMON.certified_loss_and_grad: the clean solve, the embedded
network's solve and both adjoints) on the first 100 training images, boxes of --eps pixels
(clipped to [0, 1] as in training),
kappa 0.5, tol 1e-3, one BLAS thread as training uses; best of 3 calls for each thread count.
"""
import argparse
import sys

from threadpoolctl import threadpool_limits

from nemon_np._timing import best_time
from nemon_np.data import load_dataset, normalize
from nemon_np.loading import load_model
from nemon_np.pixels import channel_stats, input_ball


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (or model.npz) of a conv model")
    p.add_argument("--data-dir", default=None, help="data folder (as for training)")
    p.add_argument("--eps", type=float, default=0.12, help="box radius in pixel units")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time")
    args = p.parse_args(argv)
    path = args.run if args.run.endswith(".npz") else args.run + "/model.npz"
    model = load_model(path)
    data = load_dataset(model.metadata["dataset"], args.data_dir)
    mean, std = model.metadata["mean"], model.metadata["std"]
    U = normalize(data.train_images[:100], mean, std, model.dtype)
    y = data.train_labels[:100]
    U_lo, U_hi = input_ball(U, args.eps, *channel_stats(model, U.shape[1]))   # the boxes training uses
    with threadpool_limits(1, user_api="blas"):
        for n in args.threads:
            model.n_jobs = n
            seconds = best_time(lambda: model.certified_loss_and_grad(U, y, U_lo, U_hi, 0.5, tol=1e-3), 3)
            print(f"{n} thread(s): {1000 * seconds:.0f} ms a certified batch of 100 ({path}, eps {args.eps:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

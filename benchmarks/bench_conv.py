"""Convolutional NEMON benchmark: the convolution's GFLOP/s, and forward+backward time per batch.

Run:  python benchmarks/bench_conv.py [--repeats N] [--channels C] [--batch M]

The convolution (shift-and-multiply with BLAS, nemon_np.conv) is timed on MNIST-sized (1 x 28 x 28 input,
C channels) and CIFAR-sized (3 x 32 x 32) images beside numpy's matmul on the im2col shape, and
a ConvNEMON forward + backward (tolerance 1e-4, float32) on a random batch.
"""
import argparse

import numpy as np

from nemon_np._timing import best_time
from nemon_np.conv import conv_apply, conv_transpose
from nemon_np.conv_model import ConvNEMON


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; the best is reported")
    p.add_argument("--channels", type=int, default=32, help="channels C of the implicit layer")
    p.add_argument("--batch", type=int, default=100, help="images per batch")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    C, k, m = args.channels, 3, args.batch
    for name, (c_in, H) in (("MNIST", (1, 28)), ("CIFAR-10", (3, 32))):
        X = rng.normal(size=(m, C, H, H)).astype(np.float32)
        K = (rng.normal(size=(C, C, k, k)) / (3 * C)).astype(np.float32)
        flops = 2.0 * m * H * H * C * C * k * k
        t_conv = best_time(lambda: conv_apply(K, X), args.repeats)
        t_tr = best_time(lambda: conv_transpose(K, X), args.repeats)
        # The same FLOPs as one matmul of the im2col shape (m H W, C k k) @ (C k k, C).
        cols = rng.normal(size=(m * H * H, C * k * k)).astype(np.float32)
        Kf = K.reshape(C, -1).T.copy()
        t_mm = best_time(lambda: cols @ Kf, args.repeats)
        print(f"{name}: conv {C}x{C}x{k}x{k} on {m} images {H}x{H}: {flops / t_conv / 1e9:.1f} GFLOP/s "
              f"({t_conv * 1e3:.1f} ms; transpose {t_tr * 1e3:.1f} ms); one numpy matmul of the same FLOPs "
              f"(im2col shape) {flops / t_mm / 1e9:.1f} GFLOP/s ({t_mm * 1e3:.1f} ms)")
        model = ConvNEMON(c_in, (H, H), channels=C, kernel=k, pool=4, gamma=0.5, dtype=np.float32)
        U = rng.normal(size=(m, c_in, H, H)).astype(np.float32)
        y = rng.integers(0, 10, size=m)
        t_fb = best_time(lambda: model.loss_and_grad(U, y, tol=1e-4), max(1, args.repeats // 2))
        _, info = model.equilibrium(U, tol=1e-4)
        per_epoch = t_fb * (60000 if name == "MNIST" else 50000) / m
        print(f"{name}: ConvNEMON forward+backward, batch {m}, tol 1e-4 (random init, mu_inf 0.5): "
              f"{t_fb:.2f} s, {info['iterations'].mean():.1f} forward iterations; about {per_epoch / 60:.0f} min "
              f"per epoch at this rate")


if __name__ == "__main__":
    main()

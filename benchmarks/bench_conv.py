"""Convolutional NEMON benchmark: the convolution's GFLOP/s, and forward+backward time per batch.

Run:  python benchmarks/bench_conv.py [--repeats N] [--channels C] [--batch M]

The convolution (shift-and-multiply with BLAS, nemon_np.conv) is timed on MNIST-sized (1 x 28 x 28 input,
C channels) and CIFAR-sized (3 x 32 x 32) images beside numpy's matmul on the im2col shape: as the
fixed-point loop runs it (channel-last, padded state: correlate_padded) and through the public
channel-first conv_apply (transposes and padding included). Then the fused average step, and a
ConvNEMON forward + backward (float32, the conv training defaults: gamma 0.9, tol 1e-3) on a
random batch, or on a trained model's batch with --model RUN_DIR.
"""
import argparse

import numpy as np
import scipy.fft

from nemon_np._timing import best_time
from nemon_np import load_model
from nemon_np.conv import (conv_apply, conv_taps, correlate_padded, pad_channel_last, transpose_kernel,
                           weight_grad_channel_last)
from nemon_np.conv_model import ConvNEMON
from nemon_np.conv_solvers import _average_step
from nemon_np.training import MODEL_DEFAULTS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions; the best is reported")
    p.add_argument("--channels", type=int, default=32, help="channels C of the implicit layer")
    p.add_argument("--batch", type=int, default=100, help="images per batch")
    p.add_argument("--model", action="append", default=[],
                   help="a trained conv run (folder or model.npz) to time forward+backward on, with its data set "
                        "from --data-dir; may be repeated")
    p.add_argument("--data-dir", action="append", default=[], help="data folder for each --model")
    args = p.parse_args(argv)
    tol, gamma = MODEL_DEFAULTS["conv"]["tol"], MODEL_DEFAULTS["conv"]["gamma"]
    rng = np.random.default_rng(0)
    C, k, m = args.channels, 3, args.batch
    for name, (c_in, H) in (("MNIST", (1, 28)), ("CIFAR-10", (3, 32))):
        X = rng.normal(size=(m, C, H, H)).astype(np.float32)
        K = (rng.normal(size=(C, C, k, k)) / (3 * C)).astype(np.float32)
        flops = 2.0 * m * H * H * C * C * k * k
        t_conv = best_time(lambda: conv_apply(K, X), args.repeats)
        fft = fft_circular_conv(K, X)
        np.testing.assert_allclose(fft(X), conv_apply(K, X), rtol=1e-3, atol=1e-3)
        t_fft = best_time(lambda: fft(X), args.repeats)
        taps = conv_taps(K)
        Xp = np.ascontiguousarray(pad_channel_last(X.transpose(0, 2, 3, 1), k, "circular"))
        Y = np.empty_like(Xp)
        t_loop = best_time(lambda: correlate_padded(taps, Xp, out=Y), args.repeats)
        # The adjoint's product A^T y is the same correlation with the transposed kernel's taps.
        taps_t = conv_taps(transpose_kernel(K))
        t_transpose = best_time(lambda: correlate_padded(taps_t, Xp, out=Y), args.repeats)
        delta = rng.normal(size=(m, H, H, C)).astype(np.float32)
        Xcl_in = np.ascontiguousarray(X.transpose(0, 2, 3, 1))
        t_wgrad = best_time(lambda: weight_grad_channel_last(delta, Xcl_in, k, "circular"), args.repeats)
        Xcl = np.zeros((m, H, H, C), np.float32)
        Q, P = rng.normal(size=Xcl.shape).astype(np.float32), np.empty_like(Xcl)
        state = (np.zeros(m, bool), np.zeros(m, np.int64), np.zeros(m, np.float32))

        def step():
            state[0][:] = False
            _average_step(Y, Q, Xcl, np.empty((m, 0, 0, 0), np.float32), Xp, P, *state, 0, 0.9, np.float32(0), 50,
                          True, False, False, True)
        t_step = best_time(step, args.repeats)
        # The same FLOPs as one matmul of the im2col shape (m H W, C k k) @ (C k k, C).
        cols = rng.normal(size=(m * H * H, C * k * k)).astype(np.float32)
        Kf = K.reshape(C, -1).T.copy()
        t_mm = best_time(lambda: cols @ Kf, args.repeats)
        print(f"{name}: conv {C}x{C}x{k}x{k} on {m} images {H}x{H}, in the solver loop (channel-last, padded): "
              f"{flops / t_loop / 1e9:.1f} GFLOP/s ({t_loop * 1e3:.1f} ms), {t_mm / t_loop:.2f} of matmul; "
              f"through conv_apply (NCHW): {flops / t_conv / 1e9:.1f} GFLOP/s ({t_conv * 1e3:.1f} ms); one numpy "
              f"matmul of the same FLOPs (im2col shape) {flops / t_mm / 1e9:.1f} GFLOP/s ({t_mm * 1e3:.1f} ms); "
              f"fused average step {t_step * 1e3:.1f} ms; scipy.fft (circular) {t_fft * 1e3:.1f} ms, "
              f"{t_fft / t_loop:.2f}x the loop's convolution")
        print(f"{name}: transpose (adjoint, in the loop) {flops / t_transpose / 1e9:.1f} GFLOP/s, "
              f"{t_mm / t_transpose:.2f} of matmul; weight gradient (weight_grad_channel_last, padding "
              f"included) {flops / t_wgrad / 1e9:.1f} GFLOP/s, {t_mm / t_wgrad:.2f} of matmul")
        model = ConvNEMON(c_in, (H, H), channels=C, kernel=k, pool=4, gamma=gamma, dtype=np.float32)
        U = rng.normal(size=(m, c_in, H, H)).astype(np.float32)
        _time_model(f"{name}: ConvNEMON (random init)", model, U, rng.integers(0, 10, size=m), tol, args.repeats,
                    60000 if name == "MNIST" else 50000)
    for run, data_dir in zip(args.model, args.data_dir + [None] * len(args.model)):
        from nemon_np.data import load_dataset, normalize
        model = load_model(run if run.endswith(".npz") else f"{run}/model.npz")
        data = load_dataset(model.metadata["dataset"], data_dir, download=False)
        U = normalize(data.train_images[:m], model.metadata["mean"], model.metadata["std"], model.dtype)
        _time_model(f"{data.name}: trained {run}", model, U, data.train_labels[:m], tol, args.repeats,
                    len(data.train_images))


def fft_circular_conv(K, X, workers=2):
    """The circular correlation of X (m, C_in, H, W) with K (C_out, C_in, k, k) by scipy.fft: the
    kernel as an H x W filter, one rfft2 of the batch, a (C_in -> C_out) product per frequency,
    one irfft2. The alternative the issue asks to measure; the kernel's FFT is precomputed, as
    it would be once per iteration loop."""
    C_out, C_in, k, _ = K.shape
    m, _, H, W = X.shape
    p = k // 2
    Hk = np.zeros((C_out, C_in, H, W), X.dtype)
    for a in range(k):
        for e in range(k):
            Hk[:, :, (p - a) % H, (p - e) % W] = K[:, :, a, e]
    Kf = np.ascontiguousarray(scipy.fft.rfft2(Hk, workers=workers).transpose(2, 3, 1, 0))  # (H, Wf, C_in, C_out)

    def apply(X):
        Xf = scipy.fft.rfft2(X, workers=workers).transpose(2, 3, 0, 1)  # (H, Wf, m, C_in)
        Yf = np.matmul(Xf, Kf).transpose(2, 3, 0, 1)
        return scipy.fft.irfft2(Yf, s=(H, W), workers=workers)
    return apply


def _time_model(name, model, U, y, tol, repeats, n_train):
    m = len(U)
    t_fb = best_time(lambda: model.loss_and_grad(U, y, tol=tol), max(1, repeats // 2))
    _, _, info = model.loss_and_grad(U, y, tol=tol, return_info=True)
    print(f"{name}: forward+backward, batch {m}, tol {tol:g}, mu_inf(K) {model.mu_inf():.3f}: {t_fb:.3f} s, "
          f"{info['forward'].iterations.mean():.1f} forward and {info['backward'].iterations.mean():.1f} adjoint "
          f"iterations a sample; {t_fb * n_train / m / 60:.1f} min per epoch of {n_train} images at this rate")


if __name__ == "__main__":
    main()

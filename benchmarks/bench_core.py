"""Core benchmark: projection vs cvxpy, forward+backward time, fixed-point loop GFLOP/s.

Run:  python benchmarks/bench_core.py [--repeats N] [--seed S]

Everything is measured in one run on one machine, so the ratios are comparable
even on a shared, noisy machine. Numba compilation happens before any timing.
"""
import argparse
import platform

import numpy as np

import nemon_np
from nemon_np._timing import best_time
from nemon_np.projection import project_mu_inf
from nemon_np.regions import project_mu_inf_cvxpy
from nemon_np.solvers import _averaged_fixed_point


def bench_projection(rng, repeats):
    n, gamma = 100, 0.5
    A = rng.normal(size=(n, n)) / np.sqrt(n)
    t_fast = best_time(lambda: project_mu_inf(A, gamma), 20 * repeats)
    t_cvx = best_time(lambda: project_mu_inf_cvxpy(A, gamma), max(2, repeats // 5))
    diff = np.abs(project_mu_inf(A, gamma) - project_mu_inf_cvxpy(A, gamma)).max()
    print(f"projection n={n}: nemon_np {t_fast * 1e3:.3f} ms, cvxpy (OSQP, polished) {t_cvx * 1e3:.1f} ms, "
          f"ratio {t_cvx / t_fast:.0f}x, max |difference| {diff:.1e}")


def mnist_like_model(dtype, seed):
    """n=100, n_in=784, n_out=10 with mu_inf(A) = 0.5 exactly and a dense A of realistic scale."""
    rng = np.random.default_rng(seed)
    model = nemon_np.NEMON(784, 100, 10, gamma=0.5, seed=seed, dtype=dtype)
    model.A = project_mu_inf((rng.normal(size=(100, 100)) / 10).astype(dtype), 0.5)
    model.b = (0.1 * rng.normal(size=100)).astype(dtype)
    return model


def bench_forward_backward(rng, repeats, tol):
    U = rng.uniform(-0.42, 2.8, size=(100, 784))   # the range of normalized MNIST pixels
    y = rng.integers(0, 10, size=100)
    for dtype in (np.float32, np.float64):
        model = mnist_like_model(dtype, 0)
        Ud = U.astype(dtype)
        _, _, info = model.loss_and_grad(Ud, y, tol=tol, return_info=True)
        t = best_time(lambda: model.loss_and_grad(Ud, y, tol=tol), repeats)
        t_fwd = best_time(lambda: model.equilibrium(Ud, tol=tol), repeats)
        f, b = info["forward"].iterations, info["backward"].iterations
        print(f"forward+backward {np.dtype(dtype).name}, batch 100, n=100, n_in=784, tol {tol:g}: "
              f"{t * 1e3:.2f} ms (forward alone {t_fwd * 1e3:.2f} ms); "
              f"iterations forward mean {f.mean():.1f} max {f.max()}, backward mean {b.mean():.1f} max {b.max()}")


def bench_loop_gflops(rng, repeats, tol):
    """FLOPs of the loop: 2 n^2 per sample per evaluation of A x (the matmul)."""
    n = m = 100
    for dtype in (np.float32, np.float64):
        model = mnist_like_model(dtype, 0)
        U = rng.uniform(-0.42, 2.8, size=(m, 784)).astype(dtype)
        Q = np.ascontiguousarray(U @ model.B.T + model.b)
        AT = np.ascontiguousarray(model.A.T)
        alpha = dtype(nemon_np.contraction_alpha(model.A))
        args = (AT, Q, np.empty((0, n), dtype), np.zeros_like(Q), alpha, dtype(tol), 500, True, False)
        its = _averaged_fixed_point(*args)[2]
        t_loop = best_time(lambda: _averaged_fixed_point(*args), 5 * repeats)
        flops = 2.0 * n * n * (its + 1).sum()
        X = rng.normal(size=(m, n)).astype(dtype)
        t_mm = best_time(lambda: X @ AT, 100 * repeats)
        loop, mm = flops / t_loop / 1e9, 2.0 * m * n * n / t_mm / 1e9
        print(f"fixed-point loop {np.dtype(dtype).name}: {loop:.1f} GFLOP/s over {its.sum() + m} sample-steps "
              f"({its.max() + 1} sweeps); numpy matmul ({m},{n})@({n},{n}): {mm:.1f} GFLOP/s; ratio {loop / mm:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions; the best is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problems")
    parser.add_argument("--tol", type=float, default=1e-6, help="fixed-point tolerance (l_inf residual)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    from threadpoolctl import threadpool_info
    blas = [(i["internal_api"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"nemon_np {nemon_np.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"BLAS {blas}")
    rng = np.random.default_rng(args.seed)
    bench_projection(rng, args.repeats)
    bench_forward_backward(rng, args.repeats, args.tol)
    bench_loop_gflops(rng, args.repeats, args.tol)


if __name__ == "__main__":
    main()

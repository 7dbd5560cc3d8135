"""Threaded conv products (nemon_np._threads): the same numbers as one thread. (That the BLAS calls
release the GIL is a speed, measured in benchmarks/bench_conv_epoch.py, not asserted here.)"""
import numpy as np
import pytest

from nemon_np import ConvNEMON
from nemon_np._threads import check_n_jobs, gemm_into, map_ranges, split_ranges
from nemon_np.conv import (conv_taps, correlate_padded, pad_channel_last, project_conv_mu_inf,
                           weight_grad_channel_last)
from nemon_np.conv_solvers import conv_fixed_point


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm_into_matches_numpy_on_row_views(rng, dtype, beta):
    big = rng.normal(size=(40, 7)).astype(dtype)
    A = rng.normal(size=(7, 5)).astype(dtype)
    Y = rng.normal(size=(30, 5)).astype(dtype)
    expected = big[3:33] @ A + beta * Y
    gemm_into(Y, A, big[3:33], beta)
    tight = dtype == np.float64
    np.testing.assert_allclose(Y, expected, rtol=1e-12 if tight else 1e-5, atol=1e-12 if tight else 1e-5)


def test_gemm_into_rejects_strided_and_mismatched_inputs(rng):
    A, X, Y = rng.normal(size=(4, 3)), rng.normal(size=(6, 4)), np.zeros((6, 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm_into(Y, A, np.asfortranarray(X), 0.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm_into(Y, A.astype(np.float32), X, 0.0)
    with pytest.raises(ValueError, match="shapes do not match"):
        gemm_into(Y, A, X[:5], 0.0)


def test_split_ranges_cover_in_order_and_n_jobs_is_checked():
    for n in (0, 1, 5, 101):
        for parts in (1, 2, 3, 8):
            ranges = split_ranges(n, parts)
            assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
            assert len(ranges) <= parts and all(b > a for a, b in ranges)
            sizes = [b - a for a, b in ranges]
            assert not sizes or max(sizes) - min(sizes) <= 1
    assert map_ranges(lambda a, b: (a, b), 10, 3) == split_ranges(10, 3)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive whole number"):
            check_n_jobs(bad, "threads")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_convolution_weight_gradient_and_solve_match_one_thread(rng, dtype):
    C, m = 4, 7
    K = project_conv_mu_inf(rng.normal(size=(C, C, 3, 3)), 0.8).astype(dtype)
    X = rng.normal(size=(m, 6, 5, C)).astype(dtype)
    Xp = np.ascontiguousarray(pad_channel_last(X, 3, "circular"))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    one = correlate_padded(conv_taps(K), Xp)
    for n_jobs in (2, 3):
        np.testing.assert_allclose(correlate_padded(conv_taps(K), Xp, n_jobs=n_jobs), one, rtol=tol, atol=tol)
        np.testing.assert_allclose(weight_grad_channel_last(X, X, 3, "zero", n_jobs=n_jobs),
                                   weight_grad_channel_last(X, X, 3, "zero"), rtol=tol, atol=tol)
        for method in ("average", "anderson"):
            serial = conv_fixed_point(K, X, 1.0, 1e-4, 200, method=method, rho=0.8)
            threaded = conv_fixed_point(K, X, 1.0, 1e-4, 200, method=method, rho=0.8, n_jobs=n_jobs)
            np.testing.assert_array_equal(threaded[2], serial[2])
            for a, b in zip(threaded, serial):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_conv_model_gradients_and_interval_bounds_do_not_depend_on_threads(rng):
    model = ConvNEMON(1, (8, 8), channels=4, pool=2, gamma=0.5, seed=1, dtype=np.float64)
    U, y = rng.uniform(size=(9, 64)), rng.integers(0, 10, 9)
    loss1, g1 = model.loss_and_grad(U, y, tol=1e-10)
    lo1 = model.interval_margins(U - 0.05, U + 0.05, y, tol=1e-10)[0]
    model.n_jobs = 2
    loss2, g2 = model.loss_and_grad(U, y, tol=1e-10)
    lo2 = model.interval_margins(U - 0.05, U + 0.05, y, tol=1e-10)[0]
    assert loss1 == pytest.approx(loss2, rel=1e-12)
    for name in g1:
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(lo2, lo1, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="n_jobs"):
        ConvNEMON(1, (8, 8), channels=4, pool=2, n_jobs=0)


def test_correlation_accepts_non_contiguous_taps_and_images(rng):
    K = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    Xp = np.ascontiguousarray(pad_channel_last(rng.normal(size=(2, 5, 4, 2)).astype(np.float32), 3, "circular"))
    expected = correlate_padded(conv_taps(K), Xp)
    taps_view = conv_taps(np.concatenate([K, K], axis=1))[:, :, ::2]         # strided taps
    wide = np.concatenate([Xp, Xp], axis=3)
    np.testing.assert_allclose(correlate_padded(conv_taps(K), wide[..., :2]), expected, rtol=1e-6)
    np.testing.assert_allclose(correlate_padded(taps_view, Xp), correlate_padded(conv_taps(K[:, [0, 0]]), Xp),
                               rtol=1e-6)

import itertools
import subprocess
import sys
import warnings

import numpy as np
import pytest

import nemon_np

from nemon_np import (ConvergenceWarning, WellPosednessError, contraction_alpha, contraction_factor,
                      mu_inf, project_mu_inf, solve_adjoint, solve_equilibrium)
from nemon_np.solvers import (WellPosednessWarning, _averaged_fixed_point, _max_magnitude,
                              averaged_fixed_point_reference)


def well_posed(rng, n, mu, diag_shift=0.0, weights=None):
    A = rng.normal(size=(n, n)) / np.sqrt(n) + diag_shift * np.eye(n)
    return project_mu_inf(A, mu, weights)


def enumerate_fixed_point(A, q):
    """The fixed point of x = relu(Ax + q) by trying every activation pattern (tiny n only)."""
    n = len(q)
    for pattern in itertools.product((0.0, 1.0), repeat=n):
        D = np.diag(pattern)
        x = np.linalg.solve(np.eye(n) - D @ A, D @ q)
        z = A @ x + q
        if np.all((z > 0) == np.array(pattern, bool)) or np.allclose(np.maximum(z, 0), x, atol=1e-12):
            return x
    raise AssertionError("no consistent activation pattern")


def test_fixed_point_equals_the_enumerated_direct_solve(rng):
    n = 5
    A = well_posed(rng, n, 0.6, diag_shift=-1.0)
    Q = rng.normal(size=(8, n))
    for method in ("average", "picard") if contraction_alpha(A) >= 1 else ("average",):
        X, info = solve_equilibrium(A, Q, tol=1e-13, max_iter=10_000, method=method)
        expected = np.array([enumerate_fixed_point(A, q) for q in Q])
        np.testing.assert_allclose(X, expected, atol=1e-8, rtol=0)
        assert np.all(info.residual <= 1e-13)


def test_fixed_point_solves_its_active_linear_system(rng):
    n = 60
    A = well_posed(rng, n, 0.9)
    Q = rng.normal(size=(30, n))
    X, info = solve_equilibrium(A, Q, tol=1e-12)
    D = (info.preactivation > 0).astype(float)
    for x, q, d in zip(X, Q, D):
        direct = np.linalg.solve(np.eye(n) - d[:, None] * A, d * q)
        # Error bound of DESIGN.md: ||x_k - x*|| <= residual / (1 - mu_inf(A)).
        assert np.abs(x - direct).max() <= 1e-12 / (1 - mu_inf(A)) + 1e-14


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("start", ["random", "zero"])   # the kernel skips the zero start's product
def test_kernel_matches_numpy_reference(rng, dtype, start):
    n, m = 40, 25
    A = well_posed(rng, n, 0.5).astype(dtype)
    Q = rng.normal(size=(m, n)).astype(dtype)
    S = (rng.random((m, n)) > 0.4).astype(dtype)
    X0 = rng.normal(size=(m, n)).astype(dtype) if start == "random" else np.zeros((m, n), dtype)
    tol = dtype(1e-10 if dtype == np.float64 else 1e-4)
    no_mask = np.empty((0, n), dtype)
    for relu, l1, mask in ((True, False, no_mask), (False, True, S), (True, True, S), (False, False, no_mask)):
        args = (np.ascontiguousarray(A.T), Q, mask, X0, dtype(0.8), tol, 300, relu, l1)
        got = _averaged_fixed_point(*args)
        ref = averaged_fixed_point_reference(*args)
        if dtype == np.float64:
            np.testing.assert_array_equal(got[2], ref[2])      # same iteration counts
            np.testing.assert_allclose(got[0], ref[0], atol=1e-12)
            np.testing.assert_allclose(got[1], ref[1], atol=1e-12)
        else:  # BLAS and NumPy sum in different orders: compare the converged points.
            np.testing.assert_allclose(got[0], ref[0], atol=1e-3)
            assert np.abs(got[2] - ref[2]).max() <= 3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_by_bit_patterns_is_the_floating_max(rng, dtype):
    """The l_inf residual's maximum, taken over IEEE 754 bit patterns, is np.max for entries >= 0: across
    magnitudes (subnormals to inf), with signed zeros, and NaN when there is one (a NaN residual never
    passes the tolerance)."""
    tiny = np.finfo(dtype).tiny
    rows = [np.abs(rng.normal(size=n)).astype(dtype) * scale for n in (1, 7, 100, 333)
            for scale in (dtype(1), dtype(1e30), tiny / 8)]
    rows += [np.array([0.0, -0.0], dtype), np.array([-0.0], dtype), np.array([3.0, np.inf, 1.0], dtype)]
    for v in rows:
        assert _max_magnitude(v.copy()) == v.max()
    v = np.abs(rng.normal(size=50)).astype(dtype)
    v[17] = np.nan
    assert np.isnan(_max_magnitude(v))


def test_samples_are_solved_independently(rng):
    n = 30
    A = well_posed(rng, n, 0.8)
    Q = rng.normal(size=(12, n))
    Q[3] = -1.0                     # x* = 0 at once
    Q[7] *= 50                      # large input: many more iterations
    X, info = solve_equilibrium(A, Q, tol=1e-10)
    assert info.iterations[3] == 0 and np.all(X[3] == 0)
    assert info.iterations[7] > np.median(info.iterations)
    for i in range(len(Q)):
        Xi, infoi = solve_equilibrium(A, Q[i:i + 1], tol=1e-10)
        np.testing.assert_allclose(Xi[0], X[i], atol=1e-13)
        assert infoi.iterations[0] == info.iterations[i]


@pytest.mark.parametrize("weighted", [False, True])
def test_contraction_factor_bounds_the_error(rng, weighted):
    n = 25
    eta = rng.uniform(0.3, 3.0, size=n) if weighted else None
    A = well_posed(rng, n, 0.7, diag_shift=-0.8, weights=eta)
    assert contraction_alpha(A) < 1.0
    Q = 3 * rng.normal(size=(6, n))
    Xstar, _ = solve_equilibrium(A, Q, tol=1e-14, max_iter=100_000, weights=eta)
    rho = contraction_factor(A, weights=eta)
    norm = (lambda v: np.abs(v / eta).max(axis=-1)) if weighted else (lambda v: np.abs(v).max(axis=-1))
    e0 = norm(Xstar)                                           # x_0 = 0
    for k in range(1, 30):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            Xk, info = solve_equilibrium(A, Q, tol=0.0, max_iter=k, weights=eta)
        assert np.all(info.iterations == k)
        assert np.all(norm(Xk - Xstar) <= rho ** k * e0 * (1 + 1e-9) + 1e-13)


def test_bad_settings_are_refused(rng):
    n = 10
    A = well_posed(rng, n, 0.5, diag_shift=-2.0)   # alpha* < 1: Picard is not guaranteed
    Q = rng.normal(size=(3, n))
    with pytest.raises(WellPosednessError, match="alpha"):
        solve_equilibrium(A, Q, method="picard")
    with pytest.raises(WellPosednessError, match="alpha"):
        solve_equilibrium(A, Q, alpha=0.99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = solve_equilibrium(A, Q, method="picard", on_violation="warn", max_iter=2000)
    assert any(issubclass(w.category, WellPosednessWarning) and "alpha" in str(w.message) for w in caught)
    # On this matrix Picard indeed fails where the average iteration converges.
    assert not info.converged.all() and solve_equilibrium(A, Q)[1].converged.all()
    bad = np.eye(n) * 1.2
    with pytest.raises(WellPosednessError, match="mu_inf"):
        solve_equilibrium(bad, Q)
    with pytest.raises(ValueError, match="shape"):
        solve_equilibrium(A, Q[:, :5])
    with pytest.raises(ValueError, match="method"):
        solve_equilibrium(A, Q, method="newton")
    with pytest.raises(ValueError, match="tol"):
        solve_equilibrium(A, Q, tol=-1)
    with pytest.raises(ValueError, match="max_iter"):
        solve_equilibrium(A, Q, max_iter=2.5)
    with pytest.raises(ValueError, match="non-finite"):
        solve_equilibrium(A, np.full((2, n), np.nan))


def test_max_iter_bounds_the_work_and_warns(rng):
    A = well_posed(np.random.default_rng(0), 20, 0.95)
    Q = 10 * rng.normal(size=(5, 20))
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        X, info = solve_equilibrium(A, Q, tol=1e-15, max_iter=3)
    assert np.all(info.iterations <= 3) and not info.converged.all()


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_adjoint_solvers_agree(rng, dtype, tol):
    n, m = 50, 20
    A = well_posed(rng, n, 0.9).astype(dtype)
    mask = (rng.random((m, n)) > 0.5).astype(dtype)
    G = rng.normal(size=(m, n)).astype(dtype)
    W_it, info_it = solve_adjoint(A, mask, G, tol=tol, max_iter=5000)
    W_dir, info_dir = solve_adjoint(A, mask, G, method="direct")
    assert W_it.dtype == dtype and W_dir.dtype == dtype
    # l_1 error bound from the residual, as for the forward iteration.
    bound = info_it.residual / (1 - mu_inf(A))
    rounding = 50 * np.finfo(dtype).eps * np.abs(W_dir).sum(axis=1)
    assert np.all(np.abs(W_it - W_dir).sum(axis=1) <= bound * 1.01 + rounding)
    # The direct solve satisfies w = g + A^T D w.
    np.testing.assert_allclose(W_dir, G + (W_dir * mask) @ A, atol=100 * np.finfo(dtype).eps * np.abs(W_dir).max())


def test_float32_solution_converges(rng):
    A = well_posed(rng, 100, 0.5).astype(np.float32)
    Q = rng.normal(size=(100, 100)).astype(np.float32)
    X, info = solve_equilibrium(A, Q, tol=1e-5)
    assert X.dtype == np.float32 and info.converged.all()
    X64, _ = solve_equilibrium(A.astype(np.float64), Q.astype(np.float64), tol=1e-12)
    assert np.abs(X - X64).max() <= 1e-5 / (1 - mu_inf(A)) + 1e-5


def test_numba_kernels_are_cached_for_the_next_process(tmp_path):
    code = ("import numpy as np, nemon_np\n"
            "from nemon_np.solvers import _averaged_fixed_point\n"
            "from nemon_np.projection import _project_rows\n"
            "nemon_np.solve_equilibrium(np.zeros((3, 3)), np.ones((2, 3)))\n"
            "nemon_np.project_mu_inf(np.ones((3, 3)), 0.0)\n"
            "print(sum(_averaged_fixed_point.stats.cache_hits.values()),"
            " sum(_project_rows.stats.cache_hits.values()))\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    hits = [int(v) for v in out.split()]
    assert all(h >= 1 for h in hits), f"second process recompiled: cache hits {hits}"


def mondeq_matrix(rng, n, m):
    """monDEQ's parametrization A = (1 - m) I - W^T W + S - S^T: mu_2(A) <= 1 - m."""
    W = rng.normal(size=(n, n)) / np.sqrt(n)
    S = rng.normal(size=(n, n)) / np.sqrt(n)
    return (1 - m) * np.eye(n) - W.T @ W + S - S.T


def test_monDEQ_splittings_reach_the_enumerated_fixed_point(rng):
    n = 5
    A = mondeq_matrix(rng, n, 0.2)
    Q = rng.normal(size=(6, n))
    expected = np.array([enumerate_fixed_point(A, q) for q in Q])
    for method in ("forward-backward", "peaceman-rachford"):
        X, info = solve_equilibrium(A, Q, method=method, tol=1e-13, max_iter=200_000)
        np.testing.assert_allclose(X, expected, atol=1e-8, rtol=0)
        assert info.converged.all() and "mu_2" in info
    with pytest.raises(WellPosednessError, match="mu_2"):
        solve_equilibrium(np.eye(n) * 1.1, Q, method="peaceman-rachford")
    margin = 1 - np.linalg.eigvalsh((A + A.T) / 2)[-1]
    limit = 2 * margin / np.linalg.norm(np.eye(n) - A, 2) ** 2
    with pytest.raises(WellPosednessError, match="2 m / L"):
        solve_equilibrium(A, Q, method="forward-backward", alpha=1.01 * limit)


def test_every_solver_reaches_the_same_fixed_point_where_both_certificates_hold(rng):
    n = 40
    A = project_mu_inf(mondeq_matrix(rng, n, 0.5) / 4, 0.9)
    assert mu_inf(A) <= 0.9 + 1e-12 and np.linalg.eigvalsh((A + A.T) / 2)[-1] < 1
    Q = rng.normal(size=(10, n))
    ref, _ = solve_equilibrium(A, Q, tol=1e-13, max_iter=100_000)
    for method in ("picard", "forward-backward", "peaceman-rachford"):
        if method == "picard" and contraction_alpha(A) < 1:
            continue
        X, _ = solve_equilibrium(A, Q, method=method, tol=1e-13, max_iter=500_000)
        np.testing.assert_allclose(X, ref, atol=1e-8, rtol=0)


def test_forward_backward_kernel_matches_reference(rng):
    n, m = 20, 8
    A = mondeq_matrix(rng, n, 0.3)
    Q = rng.normal(size=(m, n))
    args = (np.ascontiguousarray(A.T), Q, np.empty((0, n)), np.zeros((m, n)), 0.05, 1e-9, 2000, True, False, True)
    got, ref = _averaged_fixed_point(*args), averaged_fixed_point_reference(*args)
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_allclose(got[0], ref[0], atol=1e-12)


def test_monDEQ_certified_adjoint_is_direct_only(rng):
    n = 10
    A = mondeq_matrix(rng, n, 0.2)
    mask = (rng.random((3, n)) > 0.5).astype(float)
    G = rng.normal(size=(3, n))
    W, info = solve_adjoint(A, mask, G, method="direct", certificate="mu_2")
    np.testing.assert_allclose(W, G + (W * mask) @ A, atol=1e-12)
    with pytest.raises(ValueError, match="direct"):
        solve_adjoint(A, mask, G, method="iterative", certificate="mu_2")


@pytest.mark.parametrize("relu, l1", [(True, False), (False, True)])
def test_anderson_kernel_matches_numpy_reference(rng, relu, l1):
    from nemon_np.solvers import _anderson_fixed_point, anderson_fixed_point_reference
    n, m = 30, 12
    A = well_posed(rng, n, 0.95, diag_shift=-1.5)
    Q = 3 * rng.normal(size=(m, n))
    S = (rng.random((m, n)) > 0.3).astype(float) if l1 else np.empty((0, n))
    alpha = contraction_alpha(A)
    rho = contraction_factor(A)
    for max_iter in (3, 200):    # out of budget (possibly on a rejected candidate) and converged
        args = (np.ascontiguousarray(A.T if relu else A), Q, S, np.zeros((m, n)), alpha, 1e-10, max_iter, relu, l1,
                4, 1e-10, rho)
        got, ref = _anderson_fixed_point(*args), anderson_fixed_point_reference(*args)
        np.testing.assert_array_equal(got[2], ref[2])
        np.testing.assert_allclose(got[0], ref[0], atol=1e-9)
        np.testing.assert_allclose(got[3], ref[3], rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("method", ["adaptive", "anderson"])
def test_accelerated_solvers_reach_the_enumerated_fixed_point(rng, method):
    n = 5
    A = well_posed(rng, n, 0.8, diag_shift=-1.0)
    Q = rng.normal(size=(6, n))
    expected = np.array([enumerate_fixed_point(A, q) for q in Q])
    X, info = solve_equilibrium(A, Q, method=method, tol=1e-13, max_iter=10_000)
    np.testing.assert_allclose(X, expected, atol=1e-8, rtol=0)
    assert info.converged.all()


@pytest.mark.parametrize("mu, shift", [(0.5, 0.0), (0.9, 0.0), (0.99, 0.0), (0.9, -2.0), (0.99, -2.0)])
def test_anderson_is_not_worse_than_plain_at_the_budgets_that_reach_each_tolerance(mu, shift):
    """At the iteration budget the plain average iteration needs for 1e-3, 1e-6 and 1e-9, the
    batch's largest Anderson residual is no larger (known exceptions, at budgets of a few
    iterations where alpha* is small, are reported in docs/benchmarks.md)."""
    rng = np.random.default_rng(int(100 * mu) + int(shift))
    A = well_posed(rng, 100, mu, diag_shift=shift)
    Q = 3 * rng.normal(size=(50, 100))
    for tol in (1e-3, 1e-6, 1e-9):
        _, plain = solve_equilibrium(A, Q, tol=tol, max_iter=10_000)
        budget = int(plain.iterations.max())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            _, plain_at = solve_equilibrium(A, Q, tol=0.0, max_iter=budget)
            _, anderson = solve_equilibrium(A, Q, tol=0.0, max_iter=budget, method="anderson")
        assert anderson.residual.max() <= plain_at.residual.max()


@pytest.mark.parametrize("method", ["adaptive", "anderson"])
def test_accelerated_adjoints_agree_with_the_direct_solve(rng, method):
    n = 40
    A = well_posed(rng, n, 0.9)
    mask = (rng.random((10, n)) > 0.5).astype(float)
    G = rng.normal(size=(10, n))
    W, info = solve_adjoint(A, mask, G, method=method, tol=1e-12, max_iter=5000)
    Wd, _ = solve_adjoint(A, mask, G, method="direct")
    np.testing.assert_allclose(W, Wd, atol=1e-10)
    assert info.converged.all()


@pytest.mark.parametrize("method", ["average", "anderson"])
def test_relative_tolerance_follows_the_state_scale(rng, method):
    """tol_mode="relative": stop at ||F(x) - x|| <= tol max(1, ||F(x)||), checked independently; on a
    problem scaled up 1000x the iterations stay what they were, where the absolute rule needs more."""
    A = nemon_np.project_mu_inf(rng.normal(size=(30, 30)) / 5, 0.9)
    Q = rng.normal(size=(20, 30))
    its = {}
    for scale in (1.0, 1000.0):
        for mode in ("absolute", "relative"):
            X, info = nemon_np.solve_equilibrium(A, scale * Q, tol=1e-6, max_iter=5000, method=method, tol_mode=mode)
            F = np.maximum(X @ A.T + scale * Q, 0)
            residual = np.abs(F - X).max(axis=1)
            if mode == "relative":
                residual /= np.maximum(np.abs(F).max(axis=1), 1)
            np.testing.assert_allclose(info.residual, residual, rtol=1e-6, atol=1e-15)
            assert np.all(residual <= 1e-6) and info.converged.all()
            its[scale, mode] = info.iterations.mean()
    assert its[1000.0, "relative"] <= its[1.0, "relative"] + 2
    assert its[1000.0, "absolute"] > its[1000.0, "relative"] + 5


def test_conv_relative_tolerance(rng):
    from nemon_np.conv import conv_apply_channel_last, project_conv_mu_inf
    from nemon_np.conv_solvers import conv_fixed_point
    K = project_conv_mu_inf(rng.normal(size=(3, 3, 3, 3)) / 3, 0.8)
    Q = 500 * rng.normal(size=(4, 6, 6, 3))
    X, P, its, res = conv_fixed_point(K, Q, 1.0, 1e-6, 5000, "circular", relative=True)
    F = np.maximum(conv_apply_channel_last(K, X) + Q, 0)
    rel = np.abs(F - X).reshape(4, -1).max(axis=1) / np.maximum(np.abs(F).reshape(4, -1).max(axis=1), 1)
    np.testing.assert_allclose(res, rel, rtol=1e-6)
    assert np.all(rel <= 1e-6)
    _, _, its_abs, _ = conv_fixed_point(K, Q, 1.0, 1e-6, 5000, "circular")
    assert its_abs.mean() > its.mean()

import numpy as np
import pytest

from nemon_np import best_weights, mu_1, mu_2, mu_inf, norm_inf, row_measures


def log_norm_limit(A, h=1e-7):
    """mu(A) = lim_{h->0+} (||I + hA||_inf - 1) / h: the definition, independent of the formula."""
    return (norm_inf(np.eye(len(A)) + h * A) - 1.0) / h


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_mu_inf_is_the_one_sided_lipschitz_limit(rng, n):
    A = rng.normal(size=(n, n))
    assert mu_inf(A) == pytest.approx(log_norm_limit(A), abs=1e-6)
    assert mu_1(A) == pytest.approx(log_norm_limit(A.T), abs=1e-6)


def test_mu_inf_matches_explicit_row_formula(rng):
    A = rng.normal(size=(9, 9))
    expected = max(A[i, i] + sum(abs(A[i, j]) for j in range(9) if j != i) for i in range(9))
    assert mu_inf(A) == pytest.approx(expected, rel=1e-14)


def test_measure_properties(rng):
    A, B = rng.normal(size=(2, 12, 12))
    assert mu_inf(A) <= norm_inf(A) + 1e-15
    assert mu_inf(A + B) <= mu_inf(A) + mu_inf(B) + 1e-12          # subadditive
    assert mu_inf(3.0 * A) == pytest.approx(3.0 * mu_inf(A))       # positively homogeneous
    assert mu_inf(A + 2.0 * np.eye(12)) == pytest.approx(mu_inf(A) + 2.0)
    # mu_2 bounds the real parts of the eigenvalues and is the symmetric part's top eigenvalue.
    assert np.linalg.eigvals(A).real.max() <= mu_2(A) + 1e-12
    assert mu_2(A) == pytest.approx(np.linalg.eigvalsh((A + A.T) / 2).max())
    assert mu_2(A) == pytest.approx((np.linalg.norm(np.eye(12) + 1e-7 * A, 2) - 1) / 1e-7, abs=1e-5)


def test_weighted_measure_is_the_similarity_transform(rng):
    A = rng.normal(size=(8, 8))
    eta = rng.uniform(0.2, 3.0, size=8)
    S = np.diag(1 / eta) @ A @ np.diag(eta)
    assert mu_inf(A, weights=eta) == pytest.approx(mu_inf(S), rel=1e-13)
    assert mu_inf(A, weights=7.0 * eta) == pytest.approx(mu_inf(A, weights=eta), rel=1e-13)
    np.testing.assert_allclose(row_measures(A, eta), row_measures(S), rtol=1e-13)


def test_best_weights_reach_the_metzler_abscissa(rng):
    A = rng.normal(size=(10, 10))
    eta, value = best_weights(A)
    M = np.abs(A)
    np.fill_diagonal(M, np.diag(A))
    assert mu_inf(A, weights=eta) == pytest.approx(value, abs=1e-10)
    # An independent reference: the weighted mu_inf is <= t for some weights eta >= 1 iff M eta <= t eta
    # is feasible, a linear program; bisection on t finds the smallest such t.
    from scipy.optimize import linprog

    def feasible(t):
        return linprog(np.zeros(10), A_ub=M - t * np.eye(10), b_ub=np.zeros(10), bounds=[(1, None)] * 10).status == 0
    lo, hi = value - 1.0, value + 1.0
    assert feasible(hi) and not feasible(lo)
    for _ in range(40):
        lo, hi = (lo, (lo + hi) / 2) if feasible((lo + hi) / 2) else ((lo + hi) / 2, hi)
    assert value == pytest.approx(hi, abs=1e-6)
    # No other weighting does better, and the unweighted one never does.
    for _ in range(20):
        assert mu_inf(A, weights=rng.uniform(0.1, 1, 10)) >= value - 1e-10
    assert value <= mu_inf(A) + 1e-12
    assert value <= np.abs(np.linalg.eigvals(np.abs(A))).max() + 1e-12   # inside Perron-Frobenius


@pytest.mark.parametrize("bad, message", [
    (np.ones((2, 3)), "square"),
    (np.ones(3), "square"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "non-finite"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "non-finite"),
    (np.eye(2, dtype=complex), "real numbers"),
    (np.eye(2, dtype=bool), "real numbers"),
    (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
    (np.zeros((0, 0)), "empty"),
])
def test_bad_matrices_are_rejected_with_a_message(bad, message):
    for f in (mu_inf, mu_1, mu_2):
        with pytest.raises(ValueError, match=message):
            f(bad)


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        mu_inf(np.eye(3), weights=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        mu_inf(np.eye(3), weights=[1.0, 1.0])


def test_integer_matrices_are_accepted():
    assert mu_inf(np.array([[1, -2], [3, 0]])) == 3.0
    assert norm_inf([[1, -2], [3, 0]]) == 3.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_row_measures_kernel_matches_its_numpy_reference(rng, dtype, weighted):
    from nemon_np.measures import row_measures_reference
    A = rng.normal(size=(60, 60)).astype(dtype)
    eta = rng.uniform(0.1, 10.0, size=60) if weighted else None
    got = row_measures(A, eta)
    assert got.dtype == np.float64
    # the same float64 terms, summed in order rather than pairwise
    np.testing.assert_allclose(got, row_measures_reference(A, eta), rtol=1e-13, atol=1e-13)
    assert mu_inf(A, eta) == got.max()

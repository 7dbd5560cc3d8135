import numpy as np
import pytest

from nemon_np import (mu_inf, parametrize_mu_inf, parametrize_mu_inf_grad, parametrize_mu_inf_inverse,
                      project_mu_inf, row_measures)
from nemon_np.projection import _round_inside, project_mu_inf_reference, round_inside_reference
from nemon_np.regions import project_mu_inf_cvxpy
from conftest import finite_difference


@pytest.mark.parametrize("n, gamma, scale", [(1, 0.5, 1.0), (3, 0.0, 1.0), (20, 0.9, 0.3),
                                             (60, -0.5, 1.0), (200, 0.5, 0.1)])
def test_projection_equals_the_cvxpy_qp(rng, n, gamma, scale):
    A = scale * rng.normal(size=(n, n))
    P = project_mu_inf(A, gamma)
    np.testing.assert_allclose(P, project_mu_inf_cvxpy(A, gamma), atol=1e-6, rtol=0)
    assert mu_inf(P) <= gamma + 1e-12


def test_weighted_projection_equals_the_cvxpy_qp(rng):
    n = 30
    A = rng.normal(size=(n, n)) / 3
    eta = rng.uniform(0.2, 5.0, size=n)
    P = project_mu_inf(A, 0.2, weights=eta)
    np.testing.assert_allclose(P, project_mu_inf_cvxpy(A, 0.2, weights=eta), atol=1e-6, rtol=0)
    assert mu_inf(P, weights=eta) <= 0.2 + 1e-12


@pytest.mark.parametrize("weighted", [False, True])
def test_numba_kernel_matches_numpy_reference(rng, weighted):
    for n in (1, 2, 5, 33):
        A = rng.normal(size=(n, n))
        eta = rng.uniform(0.5, 2.0, size=n) if weighted else None
        np.testing.assert_allclose(project_mu_inf(A, 0.1, eta), project_mu_inf_reference(A, 0.1, eta),
                                   atol=1e-13, rtol=0)


def test_projection_is_a_projection(rng):
    n, gamma = 25, 0.3
    A = rng.normal(size=(n, n))
    A[:5] *= 1e-3                      # a few rows already inside
    inside = row_measures(A) <= gamma
    assert inside.any() and not inside.all()
    A_before = A.copy()
    P = project_mu_inf(A, gamma)
    np.testing.assert_array_equal(A, A_before)                  # input untouched
    np.testing.assert_array_equal(P[inside], A[inside])          # rows inside untouched
    np.testing.assert_array_equal(project_mu_inf(P, gamma), P)   # idempotent
    # Variational inequality of a Euclidean projection onto a convex set:
    # <A - P, Z - P> <= 0 for every Z in the set.
    for _ in range(20):
        Z = project_mu_inf(3 * rng.normal(size=(n, n)), gamma)
        assert np.sum((A - P) * (Z - P)) <= 1e-9


def test_float32_stays_inside_and_keeps_its_dtype(rng):
    for gamma in (0.0, 0.37, 0.95):
        A = rng.normal(size=(100, 100)).astype(np.float32)
        P = project_mu_inf(A, gamma)
        assert P.dtype == np.float32
        assert mu_inf(P) <= gamma + 1e-12
        np.testing.assert_allclose(P, project_mu_inf(A.astype(np.float64), gamma), atol=1e-6)
        np.testing.assert_array_equal(project_mu_inf(P, gamma), P)


@pytest.mark.parametrize("shape, signed", [((50, 50), True), ((50, 50), False), ((8, 72), True)])
def test_rounding_into_float32_matches_its_numpy_reference(rng, shape, signed):
    # Entries a hair off float32 values, so that rounding to nearest goes both ways.
    P64 = rng.normal(size=shape).astype(np.float32).astype(np.float64) * (1 + rng.normal(size=shape) * 1e-7)
    diag = np.arange(shape[0]) if shape[0] == shape[1] else np.full(shape[0], 4)
    # Zeros and values that round to a signed zero or to a subnormal, on the diagonal and beside it.
    special = [0.0, -0.0, 1e-50, -1e-50, 3e-45, -3e-45, 1e-39, -1e-39, 0.7, -0.7]
    for values in (special[:shape[0]], special[shape[0]:]):
        rows = np.arange(len(values))
        P64[rows, diag[rows]] = values
        P64[rows, (diag[rows] + 1) % shape[1]] = values
    got = _round_inside(P64, np.float32, diag, signed)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, round_inside_reference(P64, np.float32, diag, signed))
    off = np.ones(shape, bool)
    if signed:
        off[np.arange(shape[0]), diag] = False
        assert np.all(got[~off].astype(np.float64) <= P64[~off])
    assert np.all(np.abs(got[off].astype(np.float64)) <= np.abs(P64[off]))


def test_projection_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        project_mu_inf(np.ones((3, 2)), 0.5)
    with pytest.raises(ValueError, match="gamma"):
        project_mu_inf(np.eye(2), np.nan)


def test_parametrization_covers_the_polytope(rng):
    gamma = 0.4
    for _ in range(5):
        T = 2 * rng.normal(size=(15, 15))
        assert mu_inf(parametrize_mu_inf(T, gamma)) <= gamma + 1e-12
    # Every A of P(gamma) is reached (surjectivity), including rows on the boundary.
    A = project_mu_inf(rng.normal(size=(15, 15)), gamma)
    np.testing.assert_allclose(parametrize_mu_inf(parametrize_mu_inf_inverse(A, gamma), gamma), A,
                               atol=1e-13)
    with pytest.raises(ValueError, match="outside"):
        parametrize_mu_inf_inverse(rng.normal(size=(15, 15)) + np.eye(15), gamma)


def test_parametrization_gradient_matches_finite_differences(rng):
    n, gamma = 6, 0.2
    T = rng.normal(size=(n, n))
    G0 = rng.normal(size=(n, n))

    def loss(T):
        A = parametrize_mu_inf(T, gamma)
        return np.sum(G0 * A) + 0.5 * np.sum(A ** 2)

    grad = parametrize_mu_inf_grad(T, G0 + parametrize_mu_inf(T, gamma))
    np.testing.assert_allclose(grad, finite_difference(lambda: loss(T), T), rtol=1e-6, atol=1e-8)


def test_weighted_parametrization_is_inside_and_its_gradient_matches(rng):
    from nemon_np import parametrize_weighted_mu_inf, parametrize_weighted_mu_inf_grad
    n, gamma = 7, 0.3
    T = rng.normal(size=(n, n))
    s = rng.normal(size=n)
    A, eta = parametrize_weighted_mu_inf(T, s, gamma)
    assert mu_inf(A, weights=eta) <= gamma + 1e-12
    # With zero log-scales it is the plain parametrization.
    np.testing.assert_allclose(parametrize_weighted_mu_inf(T, np.zeros(n), gamma)[0], parametrize_mu_inf(T, gamma))
    G0 = rng.normal(size=(n, n))

    def loss(T, s):
        A, _ = parametrize_weighted_mu_inf(T, s, gamma)
        return np.sum(G0 * A) + 0.25 * np.sum(A ** 2)

    A, _ = parametrize_weighted_mu_inf(T, s, gamma)
    dT, ds = parametrize_weighted_mu_inf_grad(T, s, G0 + 0.5 * A)
    for P, grad in ((T, dT), (s, ds)):
        np.testing.assert_allclose(grad, finite_difference(lambda: loss(T, s), P), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("gamma, floor, weighted", [(0.9, 0.0, False), (0.5, -0.2, True), (-0.3, -0.5, False)])
def test_projection_with_a_diagonal_floor_equals_the_cvxpy_qp(rng, gamma, floor, weighted):
    """The floor binds on rows whose diagonal starts below it and on rows the plain projection
    pushes below it; both kinds are in this A (diagonal entries spread around the floor)."""
    n = 40
    A = rng.normal(size=(n, n)) / 4
    A[np.diag_indices(n)] = rng.uniform(floor - 1.0, 1.5, size=n)
    eta = rng.uniform(0.3, 3.0, size=n) if weighted else None
    P = project_mu_inf(A, gamma, eta, min_diagonal=floor)
    np.testing.assert_allclose(P, project_mu_inf_cvxpy(A, gamma, eta, min_diagonal=floor), atol=1e-6, rtol=0)
    assert mu_inf(P, weights=eta) <= gamma + 1e-12 and np.diag(P).min() >= floor
    plain = project_mu_inf(A, gamma, eta)
    assert np.diag(plain).min() < floor   # the floor did bind somewhere
    np.testing.assert_array_equal(project_mu_inf(P, gamma, eta, min_diagonal=floor), P)   # idempotent


def test_diagonal_floor_in_float32_and_bad_floors(rng):
    A = rng.normal(size=(30, 30)).astype(np.float32)
    P = project_mu_inf(A, 0.9, min_diagonal=0.0)
    assert P.dtype == np.float32 and mu_inf(P) <= 0.9 and np.diag(P).min() >= 0.0
    for bad in (0.1, 1.0, np.nan):
        with pytest.raises(ValueError, match="min_diagonal must be <= 0 and <= gamma"):
            project_mu_inf(A, 0.9, min_diagonal=bad)
    with pytest.raises(ValueError, match="min_diagonal"):
        project_mu_inf(A, -0.5, min_diagonal=-0.2)

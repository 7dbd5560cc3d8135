"""Property-based tests of the mathematical core (hypothesis).

Every property is checked on generated examples under the "ci" profile of conftest.py: a fixed
example budget and derandomized (the same examples on every run), so the suite stays deterministic
and within its time budget. ``HYPOTHESIS_PROFILE=dev`` explores more.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nemon_np import (ConvNEMON, mu_1, mu_inf, norm_inf, parametrize_mu_inf, parametrize_mu_inf_grad,
                      parametrize_weighted_mu_inf, parametrize_weighted_mu_inf_grad, project_mu_inf, solve_adjoint,
                      solve_equilibrium)
from nemon_np.conv import mu_inf_conv, project_conv_mu_inf
from nemon_np.models import NEMON
from conftest import finite_difference

entries = st.floats(-3, 3, allow_nan=False, width=64)
nonzero = st.floats(0.01, 3) | st.floats(-3, -0.01)   # |.| is differentiable away from 0
gammas = st.floats(-1.0, 0.95)


@st.composite
def square(draw, n_min=1, n_max=6, elements=entries):
    n = draw(st.integers(n_min, n_max))
    return draw(arrays(np.float64, (n, n), elements=elements))


@st.composite
def square_and_weights(draw, n_min=1, n_max=6):
    A = draw(square(n_min, n_max))
    eta = draw(arrays(np.float64, len(A), elements=st.floats(0.2, 5)))
    return A, eta


def _in_set(seed, n, gamma, eta):
    """A random matrix of the set mu_inf,eta(A) <= gamma (a projection of a random one)."""
    return project_mu_inf(np.random.default_rng(seed).normal(scale=2, size=(n, n)), gamma, eta)


# -- projection --------------------------------------------------------------------------------------

@given(square_and_weights(), gammas, st.booleans())
def test_projection_is_idempotent_inside_and_nearest(Aeta, gamma, weighted):
    A, eta = Aeta
    eta = eta if weighted else None
    P = project_mu_inf(A, gamma, eta)
    assert mu_inf(P, eta) <= gamma + 1e-12
    np.testing.assert_array_equal(project_mu_inf(P, gamma, eta), P)
    d = np.linalg.norm(A - P)
    for seed in range(5):   # no point of the set is closer
        assert d <= np.linalg.norm(A - _in_set(seed, len(A), gamma, eta)) + 1e-9


@given(arrays(np.float64, (2, 2, 3, 3), elements=entries), gammas)
def test_conv_projection_is_idempotent_and_inside(K, gamma):
    P = project_conv_mu_inf(K, gamma)
    assert mu_inf_conv(P) <= gamma + 1e-12
    np.testing.assert_array_equal(project_conv_mu_inf(P, gamma), P)


# -- measures ----------------------------------------------------------------------------------------

@given(square(), st.floats(0, 10))
def test_measure_bounds_homogeneity_and_transpose(A, c):
    assert mu_inf(A) <= norm_inf(A) + 1e-12
    assert abs(mu_inf(c * A) - c * mu_inf(A)) <= 1e-9 * (1 + c * norm_inf(A))
    # mu_1 from its definition, the largest column value a_jj + sum_{i != j} |a_ij|
    columns = np.diag(A) + np.abs(A).sum(axis=0) - np.abs(np.diag(A))
    assert mu_1(A) == pytest.approx(columns.max(), abs=1e-12)
    assert mu_inf(A) >= max(np.linalg.eigvals(A).real) - 1e-9   # a measure bounds the spectral abscissa


@given(square(2, 5), st.data())
def test_measure_is_subadditive_and_weighted_by_similarity(A, data):
    B = data.draw(arrays(np.float64, A.shape, elements=entries))
    eta = data.draw(arrays(np.float64, len(A), elements=st.floats(0.2, 5)))
    assert mu_inf(A + B) <= mu_inf(A) + mu_inf(B) + 1e-12
    assert mu_inf(A + B, eta) <= mu_inf(A, eta) + mu_inf(B, eta) + 1e-12
    D = np.diag(eta)
    assert abs(mu_inf(A, eta) - mu_inf(np.linalg.inv(D) @ A @ D)) <= 1e-9 * (1 + norm_inf(A)) * eta.max() / eta.min()


# -- parametrizations --------------------------------------------------------------------------------

@given(square(1, 4, nonzero), gammas)
def test_parametrization_is_always_inside_with_its_gradient(T, gamma):
    assert mu_inf(parametrize_mu_inf(T, gamma)) <= gamma + 1e-12
    G = np.random.default_rng(0).normal(size=T.shape)
    np.testing.assert_allclose(parametrize_mu_inf_grad(T, G),
                               finite_difference(lambda: np.sum(G * parametrize_mu_inf(T, gamma)), T, h=1e-7),
                               atol=1e-6)


@given(square(1, 4, nonzero), gammas, st.data())
def test_weighted_parametrization_is_always_inside_with_its_gradient(T, gamma, data):
    s = data.draw(arrays(np.float64, len(T), elements=st.floats(-1.5, 1.5)))
    A, eta = parametrize_weighted_mu_inf(T, s, gamma)
    assert mu_inf(A, eta) <= gamma + 1e-9
    G = np.random.default_rng(1).normal(size=T.shape)
    dT, ds = parametrize_weighted_mu_inf_grad(T, s, G)
    f = lambda: np.sum(G * parametrize_weighted_mu_inf(T, s, gamma)[0])  # noqa: E731
    np.testing.assert_allclose(dT, finite_difference(f, T, h=1e-7), atol=1e-5)
    np.testing.assert_allclose(ds, finite_difference(f, s, h=1e-7), atol=1e-5)


# -- solvers -----------------------------------------------------------------------------------------

@given(st.integers(2, 8), st.floats(-2.0, 0.95), st.integers(0, 10_000), st.sampled_from(["average", "anderson"]))
def test_fixed_point_is_reached_and_unique_from_any_start(n, mu, seed, method):
    rng = np.random.default_rng(seed)
    A = _in_set(seed, n, mu, None)
    Q = rng.normal(size=(4, n))
    X, info = solve_equilibrium(A, Q, method=method, tol=1e-11, max_iter=20_000)
    assert np.all(info.residual <= 1e-11)
    X2, _ = solve_equilibrium(A, Q, method=method, tol=1e-11, max_iter=20_000, X0=10 * rng.normal(size=(4, n)))
    # Both within tol / (1 - max(mu, 0)) of the one fixed point.
    assert np.abs(X - X2).max() <= 2e-11 / (1 - max(mu_inf(A), 0)) + 1e-13
    np.testing.assert_allclose(X, np.maximum(X @ A.T + Q, 0), atol=1e-10)


@given(st.integers(2, 8), st.floats(-2.0, 0.95), st.integers(0, 10_000))
def test_adjoint_solves_its_linear_system(n, mu, seed):
    rng = np.random.default_rng(seed)
    A = _in_set(seed, n, mu, None)
    mask = (rng.random((3, n)) < 0.6).astype(float)
    G = rng.normal(size=(3, n))
    W, _ = solve_adjoint(A, mask, G, tol=1e-12, max_iter=20_000)
    direct, _ = solve_adjoint(A, mask, G, method="direct")
    np.testing.assert_allclose(W, direct, atol=1e-9 / (1 - max(mu_inf(A), 0)))


# -- interval bounds ---------------------------------------------------------------------------------

def _assert_box_holds(model, U, eps, rng, n):
    """Fixed points of n inputs of the box U -+ eps (corners and interior points) lie in its bounds."""
    X_lo, X_hi, _ = model.interval_bounds(U - eps, U + eps)
    for t in range(n):
        V = U + eps * (rng.choice([-1.0, 1.0], size=U.shape) if t % 2 else rng.uniform(-1, 1, size=U.shape))
        X, _ = model.equilibrium(V, tol=1e-12, max_iter=50_000)
        assert np.all(X_lo <= X) and np.all(X <= X_hi)


@given(st.integers(1, 6), st.floats(-1.5, 0.95), st.floats(0, 1), st.integers(0, 10_000), st.booleans())
def test_interval_bounds_are_sound_on_any_model_in_the_set(n, mu, eps, seed, weighted):
    rng = np.random.default_rng(seed)
    eta = rng.uniform(0.3, 3, size=n) if weighted else None
    model = NEMON(3, n, 2, gamma=0.5, seed=seed, dtype=np.float64, weights=eta)
    model.A = project_mu_inf(rng.normal(scale=2, size=(n, n)), mu, eta)
    model.B, model.b = rng.normal(size=(n, 3)), rng.normal(size=n)
    _assert_box_holds(model, rng.normal(size=(2, 3)), eps, rng, 20)


@given(st.floats(-1.0, 0.9), st.floats(0, 0.5), st.integers(0, 10_000), st.sampled_from(["circular", "zero"]))
def test_conv_interval_bounds_are_sound_on_any_model_in_the_set(mu, eps, seed, padding):
    rng = np.random.default_rng(seed)
    model = ConvNEMON(1, (4, 4), channels=2, kernel=3, n_out=2, pool=2, gamma=0.5, padding=padding, seed=seed,
                      dtype=np.float64)
    model.K = project_conv_mu_inf(rng.normal(scale=1.5, size=model.K.shape), mu)
    model.b = rng.normal(size=2)
    _assert_box_holds(model, rng.normal(size=(2, 16)), eps, rng, 10)

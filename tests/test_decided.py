"""Predictions stopped where they provably cannot change (nemon_np.decided): the iterate's error bound
against fixed points solved directly, and the decided classes against those of fixed points solved to
1e-12 in float64, for dense and conv models and every stack kind."""
import numpy as np
import pytest

import nemon_np
from conftest import random_model
from nemon_np import ConvNEMON
from nemon_np.stack import StackedClassifier
from nemon_np.conv import project_conv_mu_inf
from nemon_np.decided import decided_labels, iterate_error_bound
from test_stack import ARCHS, random_stack

EXACT = dict(tol=1e-12, max_iter=5000)


def exact_classes(model, U):
    return model.astype(np.float64).logits(U, **EXACT).argmax(axis=1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_error_bound_holds_for_any_iterate(rng, dtype, weighted):
    n, m, mu = 12, 40, 0.85
    eta = rng.uniform(0.5, 2.0, n) if weighted else None
    A = nemon_np.project_mu_inf(rng.normal(size=(n, n)) / np.sqrt(n), mu, eta).astype(dtype)
    Q = (2 * rng.normal(size=(m, n))).astype(dtype)
    X_star, _ = nemon_np.solve_equilibrium(A.astype(np.float64), Q.astype(np.float64), tol=1e-14, max_iter=20000,
                                           weights=eta)
    # Iterates of every kind: random, near the fixed point, the fixed point itself.
    X = np.vstack([np.abs(rng.normal(size=(m // 2, n))), X_star[m // 2:] + 1e-3 * rng.normal(size=(m // 2, n))])
    X = np.vstack([X, X_star[:5]]).astype(dtype)
    Qx = np.vstack([Q, Q[:5]])
    Z = X @ A.T + Qx
    mu_up = nemon_np.mu_inf(A.astype(np.float64), eta) + 1e-12
    w = iterate_error_bound(X, Z, Qx, np.abs(A.astype(np.float64)).sum(axis=1).max(), n, mu_up, eta)
    error = np.abs(X.astype(np.float64) - np.vstack([X_star, X_star[:5]]))
    assert np.all(error <= w[:, None] * (1.0 if eta is None else eta))
    # Not vacuous: within 1 / (1 - mu) of the worst error on the random iterates.
    worst = (error / (1.0 if eta is None else eta)).max(axis=1)
    assert np.all(w[:m // 2] <= worst[:m // 2] * 2 * 2.0 / (1 - mu) + 1e-5)


def _dense(dtype, weighted, hidden):
    return random_model(8, 20, 5, 0.8, seed=4, dtype=dtype,
                        weights=np.random.default_rng(1).uniform(0.5, 2, 20) if weighted else None,
                        readout_hidden=hidden)


def _conv(dtype, k):
    model = ConvNEMON(2, (7, 7), channels=3, kernel=k, pool=1, gamma=0.8, seed=2, dtype=dtype)
    model.K = project_conv_mu_inf(np.random.default_rng(3).normal(size=model.K.shape).astype(dtype) / 3, 0.8)
    model.b = (0.3 * np.random.default_rng(5).normal(size=model.b.shape)).astype(dtype)
    return model


MODELS = {"dense": lambda dt: _dense(dt, False, 0), "dense weighted": lambda dt: _dense(dt, True, 0),
          "dense hidden read-out": lambda dt: _dense(dt, False, 6), "conv k3": lambda dt: _conv(dt, 3),
          "conv k5 (fft)": lambda dt: _conv(dt, 5)}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(MODELS))
def test_decided_classes_are_the_fixed_points_and_come_sooner(rng, dtype, name):
    model = MODELS[name](dtype)
    U = 2 * rng.normal(size=(60, model.n_in))
    tol = 1e-4 if dtype == np.float32 else 1e-8
    labels, info = decided_labels(model, U, tol=tol, max_iter=500)
    np.testing.assert_array_equal(labels, exact_classes(model, U))
    np.testing.assert_array_equal(labels, model.predict(U, stop="decided", tol=tol))
    plain = model.logits_and_info(U, tol=tol, max_iter=500)[1].iterations
    assert np.all(info.iterations <= plain + 1)
    assert info.decided.mean() > 0.5 and info.iterations.mean() < plain.mean()
    # Checked every 3 iterations: the same classes, never earlier than checked every one.
    labels3, info3 = decided_labels(model, U, tol=tol, check_every=3)
    np.testing.assert_array_equal(labels3, labels)
    assert np.all(info3.iterations >= info.iterations - 1)


@pytest.mark.parametrize("arch,shape", ARCHS)
def test_decided_classes_of_every_stack(rng, arch, shape):
    model = random_stack(arch, shape, seed=7, dtype=np.float32)
    U = rng.normal(size=(40, int(np.prod(shape))))
    labels, info = decided_labels(model, U, tol=1e-4)
    np.testing.assert_array_equal(labels, exact_classes(model, U))
    if model.implicit_index is None:
        assert np.all(info.iterations == 0)


def test_stop_rules_and_bad_settings(rng):
    model = _dense(np.float64, False, 0)
    U = rng.normal(size=(5, 8))
    with pytest.raises(ValueError, match="stop must be one of converged, decided, got 'early'"):
        model.predict(U, stop="early")
    with pytest.raises(ValueError, match="check_every must be an integer >= 1, got 0"):
        decided_labels(model, U, check_every=0)
    with pytest.raises(ValueError, match="needs an l_inf-contractive solver"):
        model.predict(U, stop="decided", method="forward-backward")
    stack = StackedClassifier("dense6,relu", (8,), 3)
    np.testing.assert_array_equal(stack.predict(U, stop="decided"), stack.predict(U))

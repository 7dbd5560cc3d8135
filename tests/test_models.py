import numpy as np
import pytest

import nemon_np
from nemon_np import NEMON, lipschitz_bound, mu_inf, norm_inf
from conftest import TIGHT, finite_difference, random_model


def rel_err(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


@pytest.mark.parametrize("n_in, n, n_out, mu, adjoint", [
    (4, 3, 2, 0.5, "iterative"), (4, 3, 2, 0.5, "direct"),
    (9, 12, 4, 0.9, "iterative"), (9, 12, 4, 0.9, "direct"),
    (6, 20, 3, -1.0, "iterative"),
])
def test_gradients_match_finite_differences(n_in, n, n_out, mu, adjoint):
    rng = np.random.default_rng(n + n_in)
    model = random_model(n_in, n, n_out, mu, seed=n)
    U = rng.normal(size=(5, n_in))
    y = rng.integers(0, n_out, size=5)

    def loss():
        return model.loss_and_grad(U, y, **TIGHT)[0]

    _, grads = model.loss_and_grad(U, y, adjoint=adjoint, **TIGHT)
    for name, P in model.params().items():
        assert grads[name].shape == P.shape
        assert rel_err(grads[name], finite_difference(loss, P)) < 1e-5, name
    assert rel_err(model.input_grad(U, y, adjoint=adjoint, **TIGHT), finite_difference(loss, U)) < 1e-5


@pytest.mark.parametrize("readout_hidden", [0, 4])
def test_jfb_gradient_is_that_of_one_step_from_the_frozen_fixed_point(readout_hidden):
    """adjoint="jfb" (w = g) differentiates L(y(relu(A x + B u + b))) with x the fixed point held fixed
    (Fung et al. 2022): central differences of that function are the reference, for every parameter and
    the input. It is not the gradient: the iterative adjoint's differs."""
    from nemon_np.losses import softmax_cross_entropy
    rng = np.random.default_rng(7)
    model = random_model(6, 10, 3, 0.8, seed=3, readout_hidden=readout_hidden)
    U = rng.normal(size=(5, 6))
    y = rng.integers(0, 3, size=5)
    X_fixed, _ = model.equilibrium(U, tol=1e-13, max_iter=20_000)

    def one_step_loss():
        X = np.maximum(X_fixed @ model.A.T + U @ model.B.T + model.b, 0)
        return softmax_cross_entropy(model.readout(X), y)[0]

    _, grads = model.loss_and_grad(U, y, adjoint="jfb", **TIGHT)
    _, exact = model.loss_and_grad(U, y, **TIGHT)
    for name, P in model.params().items():
        assert rel_err(grads[name], finite_difference(one_step_loss, P)) < 1e-6, name
    assert rel_err(grads["A"], exact["A"]) > 1e-3   # an approximation, measurably not the gradient
    assert rel_err(model.input_grad(U, y, adjoint="jfb", **TIGHT), finite_difference(one_step_loss, U)) < 1e-6


def test_weighted_model_runs_where_only_the_weighted_measure_is_small():
    rng = np.random.default_rng(3)
    n = 8
    eta = rng.uniform(0.1, 10, size=n)
    model = random_model(5, n, 3, 0.5, seed=1, weights=eta)
    assert mu_inf(model.A) > 1 > model.mu_inf()
    U = rng.normal(size=(4, 5))
    y = rng.integers(0, 3, size=4)
    X, info = model.equilibrium(U, tol=1e-12)
    assert info.converged.all()
    _, grads = model.loss_and_grad(U, y, **TIGHT)
    assert rel_err(grads["A"], finite_difference(lambda: model.loss_and_grad(U, y, **TIGHT)[0], model.A)) < 1e-5
    plain = random_model(5, n, 3, 0.5, seed=1)
    plain.A = model.A
    with pytest.raises(nemon_np.WellPosednessError):
        plain.equilibrium(U)


def test_equilibrium_info_and_logits(rng):
    model = NEMON(784, 100, 10, gamma=0.5, seed=0, dtype=np.float32)
    U = rng.normal(size=(7, 784)).astype(np.float32)
    X, info = model.equilibrium(U)
    assert X.shape == (7, 100) and X.dtype == np.float32
    assert info["iterations"].shape == (7,) and info["residual"].shape == (7,)
    assert np.all(info.residual <= 1e-6)
    np.testing.assert_allclose(model.logits(U), X @ model.C.T + model.c, rtol=1e-6)
    assert model.predict(U).shape == (7,)
    assert mu_inf(model.A) <= 0.5


def test_lipschitz_bound_holds_and_has_the_stated_form(rng):
    for weights in (None, rng.uniform(0.2, 4, size=30)):
        model = random_model(12, 30, 5, 0.6, seed=2, weights=weights)
        L = lipschitz_bound(model)
        B, C = model.B, model.C
        if weights is None:
            assert L == pytest.approx(norm_inf(C) * norm_inf(B) / (1 - mu_inf(model.A)))
        U1 = rng.normal(size=(200, 12))
        U2 = U1 + rng.uniform(-1, 1, size=U1.shape) * rng.uniform(0, 0.5, size=(200, 1))
        dy = np.abs(model.logits(U1, tol=1e-12) - model.logits(U2, tol=1e-12)).max(axis=1)
        du = np.abs(U1 - U2).max(axis=1)
        assert np.all(dy <= L * du + 1e-9)
    model.A = 1.5 * np.eye(30)
    model.weights = None
    with pytest.raises(ValueError, match="mu_inf"):
        lipschitz_bound(model)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_roundtrip(tmp_path, dtype):
    model = random_model(6, 5, 3, 0.4, seed=4, dtype=dtype, weights=np.linspace(0.5, 2, 5))
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = NEMON.load(path)
    for k, v in model.params().items():
        np.testing.assert_array_equal(getattr(loaded, k), v)
        assert getattr(loaded, k).dtype == dtype
    assert (loaded.gamma, loaded.seed, loaded.dtype) == (model.gamma, model.seed, model.dtype)
    np.testing.assert_array_equal(loaded.weights, model.weights)
    unweighted = random_model(6, 5, 3, 0.4, seed=4, dtype=dtype)
    unweighted.save(path)
    assert NEMON.load(path).weights is None


def test_load_rejects_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.npz"
    NEMON(3, 4, 2).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        NEMON.load(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.ones(3))
    with pytest.raises(ValueError, match="not a nemon_np model"):
        NEMON.load(foreign)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array("nemon_np.NEMON"), version=np.array(1), A=np.array([object()]))
    with pytest.raises(ValueError, match="pickled.npz"):
        NEMON.load(pickled)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="text.npz"):
        NEMON.load(text)


def test_bad_arguments_give_clear_errors(rng):
    with pytest.raises(ValueError, match="gamma"):
        NEMON(3, 4, 2, gamma=1.0)
    with pytest.raises(ValueError, match="n_hidden"):
        NEMON(3, 0, 2)
    with pytest.raises(ValueError, match="dtype"):
        NEMON(3, 4, 2, dtype=np.int32)
    model = NEMON(3, 4, 2)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        model.logits(np.ones((2, 5)))
    with pytest.raises(ValueError, match="labels"):
        model.loss_and_grad(np.ones((2, 3)), np.array([0, 2]))
    with pytest.raises(ValueError, match="integer"):
        model.loss_and_grad(np.ones((2, 3)), np.array([0.0, 1.0]))


def test_gradients_of_a_monDEQ_certified_model_match_finite_differences():
    rng = np.random.default_rng(11)
    n = 8
    model = random_model(6, n, 3, 0.5, seed=3)
    W, S = rng.normal(size=(2, n, n)) / np.sqrt(n)
    model.A = 0.8 * np.eye(n) - W.T @ W + S - S.T
    assert mu_inf(model.A) > 1          # only monDEQ's certificate holds
    U = rng.normal(size=(4, 6))
    y = rng.integers(0, 3, size=4)
    kw = dict(method="peaceman-rachford", adjoint="direct", tol=1e-13, max_iter=100_000)
    _, grads = model.loss_and_grad(U, y, **kw)
    loss = lambda: model.loss_and_grad(U, y, **kw)[0]  # noqa: E731
    for name in ("A", "B", "C"):
        assert rel_err(grads[name], finite_difference(loss, getattr(model, name))) < 1e-5, name


def test_input_vjp_is_the_jacobian_of_the_logits(rng):
    model = random_model(6, 7, 3, 0.7, seed=5)
    U = rng.normal(size=(4, 6))
    V = rng.normal(size=(4, 3))
    got = model.input_vjp(U, V, **TIGHT)
    fd = finite_difference(lambda: float(np.sum(V * model.logits(U, tol=1e-13, max_iter=20_000))), U)
    assert rel_err(got, fd) < 1e-5
    # Against the explicit Jacobian C (I - D A)^-1 D B of each sample.
    X, info = model.equilibrium(U, tol=1e-13)
    for i in range(4):
        D = np.diag((info.preactivation[i] > 0).astype(float))
        J = model.C @ np.linalg.solve(np.eye(7) - D @ model.A, D @ model.B)
        np.testing.assert_allclose(got[i], V[i] @ J, atol=1e-10)

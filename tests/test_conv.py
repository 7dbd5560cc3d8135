import numpy as np
import pytest

from nemon_np import mu_inf
from nemon_np.conv import conv_apply, conv_matrix, conv_transpose, mu_inf_conv, project_conv_mu_inf
from nemon_np.losses import softmax_cross_entropy


@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("C, k, H, W", [(1, 3, 4, 5), (3, 3, 5, 4), (2, 5, 6, 5)])
def test_convolution_and_transpose_match_the_dense_matrix(rng, padding, C, k, H, W):
    K = rng.normal(size=(C, C, k, k))
    A = conv_matrix(K, H, W, padding)
    X = rng.normal(size=(3, C, H, W))
    np.testing.assert_allclose(conv_apply(K, X, padding).reshape(3, -1), X.reshape(3, -1) @ A.T, atol=1e-12)
    np.testing.assert_allclose(conv_transpose(K, X, padding).reshape(3, -1), X.reshape(3, -1) @ A, atol=1e-12)


@pytest.mark.parametrize("C, k, H", [(1, 3, 3), (3, 3, 5), (2, 5, 7)])
def test_conv_measure_is_the_dense_measure(rng, C, k, H):
    K = rng.normal(size=(C, C, k, k))
    assert mu_inf_conv(K) == pytest.approx(mu_inf(conv_matrix(K, H, H, "circular")), rel=1e-12)
    # Zero padding: border rows lose taps, interior rows attain the formula.
    assert mu_inf_conv(K) == pytest.approx(mu_inf(conv_matrix(K, H, H, "zero")), rel=1e-12)


def test_paper_code_diagonal_shift_does_not_bound_mu_inf(rng):
    C, k, gamma = 2, 3, 0.5
    K = rng.normal(size=(C, C, k, k))
    shifted = K.copy()
    for c in range(C):                       # K - (C max|K| - gamma) on the centre taps
        shifted[c, c, 1, 1] -= C * np.abs(K).max() - gamma
    assert mu_inf_conv(shifted) > gamma


@pytest.mark.parametrize("dtype, floor", [(np.float64, None), (np.float32, None), (np.float64, -0.1),
                                          (np.float32, 0.0)])
def test_conv_projection_is_exact_and_inside(rng, dtype, floor):
    import cvxpy as cp
    from nemon_np.regions import POLISHED_OSQP, _solve
    C, k, gamma = 3, 3, 0.4
    K = rng.normal(size=(C, C, k, k)).astype(dtype)
    P = project_conv_mu_inf(K, gamma, min_diagonal=floor)
    assert P.dtype == dtype and mu_inf_conv(P) <= gamma + 1e-12
    centre_taps = P[np.arange(C), np.arange(C), k // 2, k // 2]
    if floor is not None:
        assert centre_taps.min() >= floor
        assert project_conv_mu_inf(K, gamma)[np.arange(C), np.arange(C), k // 2, k // 2].min() < floor   # it binds
    for padding in ("circular", "zero"):
        assert mu_inf(conv_matrix(P, 4, 4, padding)) <= gamma + 1e-12
    np.testing.assert_array_equal(project_conv_mu_inf(P, gamma, min_diagonal=floor), P)
    # Oracle: the QP over the kernel entries with one constraint per output channel.
    R = K.astype(np.float64).reshape(C, -1)
    centre = np.arange(C) * k * k + (k // 2) * k + k // 2
    mask = np.ones_like(R)
    mask[np.arange(C), centre] = 0
    Xv = cp.Variable(R.shape)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Xv) - cp.sum(cp.multiply(R, Xv))),
                      [cp.hstack([Xv[c, centre[c]] for c in range(C)])
                       + cp.sum(cp.abs(cp.multiply(mask, Xv)), axis=1) <= gamma]
                      + ([] if floor is None else [cp.hstack([Xv[c, centre[c]] for c in range(C)]) >= floor]))
    oracle = _solve(prob, Xv, cp.OSQP, POLISHED_OSQP)
    np.testing.assert_allclose(P.reshape(C, -1), oracle, atol=1e-5 if dtype == np.float32 else 1e-6)


def test_conv_rejects_bad_shapes(rng):
    with pytest.raises(ValueError, match="k odd"):
        conv_apply(rng.normal(size=(2, 2, 2, 2)), rng.normal(size=(1, 2, 4, 4)))
    with pytest.raises(ValueError, match="batch, 2"):
        conv_apply(rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(1, 3, 4, 4)))
    with pytest.raises(ValueError, match="at least 3 x 3"):
        conv_apply(rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(1, 2, 2, 2)))


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_rectangular_kernels_and_the_weight_gradient(rng, padding):
    from conftest import finite_difference
    from nemon_np.conv import conv_weight_grad
    K = rng.normal(size=(4, 2, 3, 3))                 # 2 input channels to 4
    X = rng.normal(size=(2, 2, 5, 5))
    A = conv_matrix(K, 5, 5, padding)
    assert A.shape == (100, 50)
    np.testing.assert_allclose(conv_apply(K, X, padding).reshape(2, -1), X.reshape(2, -1) @ A.T, atol=1e-12)
    D = rng.normal(size=(2, 4, 5, 5))
    np.testing.assert_allclose(conv_transpose(K, D, padding).reshape(2, -1), D.reshape(2, -1) @ A, atol=1e-12)
    fd = finite_difference(lambda: float(np.sum(D * conv_apply(K, X, padding))), K)
    np.testing.assert_allclose(conv_weight_grad(D, X, 3, padding), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_conv_nemon_fixed_point_and_gradients(rng, padding):
    from conftest import finite_difference
    from nemon_np.conv_model import ConvNEMON
    model = ConvNEMON(2, (4, 4), channels=3, kernel=3, n_out=3, pool=2, gamma=0.7, padding=padding, seed=1)
    model.K = project_conv_mu_inf(rng.normal(size=model.K.shape) / 3, 0.7)
    model.b = 0.2 * rng.normal(size=3)
    U = rng.normal(size=(3, 2, 4, 4))
    y = np.array([0, 2, 1])
    X, info = model.equilibrium(U, tol=1e-13, max_iter=5000)
    # The fixed point of the dense problem with the same matrices.
    A, Bm = conv_matrix(model.K, 4, 4, padding), conv_matrix(model.B, 4, 4, padding)
    Q = U.reshape(3, -1) @ Bm.T + np.repeat(model.b, 16)
    Xd = X.transpose(0, 3, 1, 2).reshape(3, -1)  # the model's state is channel-last
    np.testing.assert_allclose(np.maximum(Xd @ A.T + Q, 0), Xd, atol=1e-12)
    kw = dict(tol=1e-13, adjoint_tol=1e-13, max_iter=5000)
    _, grads = model.loss_and_grad(U, y, with_input=True, **kw)
    loss = lambda: model.loss_and_grad(U, y, **kw)[0]  # noqa: E731
    for name, P in model.params().items():
        fd = finite_difference(loss, P)
        assert np.abs(grads[name] - fd).max() <= 1e-5 * np.abs(fd).max(), name
    fd = finite_difference(loss, U)
    assert np.abs(grads["U"] - fd).max() <= 1e-5 * np.abs(fd).max()

    # adjoint="jfb" (w = g) differentiates one step of the layer from the fixed point held fixed, here
    # through the dense matrices of the convolutions: every parameter and the input.
    def one_step_loss():
        A, Bm = conv_matrix(model.K, 4, 4, padding), conv_matrix(model.B, 4, 4, padding)
        X_next = np.maximum(Xd @ A.T + U.reshape(3, -1) @ Bm.T + np.repeat(model.b, 16), 0)
        return softmax_cross_entropy(model.readout(X_next.reshape(3, 3, 4, 4).transpose(0, 2, 3, 1)), y)[0]

    _, jfb = model.loss_and_grad(U, y, with_input=True, adjoint="jfb", **kw)
    for name, P in list(model.params().items()) + [("U", U)]:
        fd = finite_difference(one_step_loss, P)
        assert np.abs(jfb[name] - fd).max() <= 1e-6 * np.abs(fd).max(), name
    assert np.abs(jfb["K"] - grads["K"]).max() > 1e-3 * np.abs(grads["K"]).max()   # not the gradient

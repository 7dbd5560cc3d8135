import numpy as np
import pytest

from nemon_np import mu_inf
from nemon_np.conv import conv_apply, conv_matrix, conv_transpose, mu_inf_conv, project_conv_mu_inf


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


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conv_projection_is_exact_and_inside(rng, dtype):
    import cvxpy as cp
    from nemon_np.regions import POLISHED_OSQP, _solve
    C, k, gamma = 3, 3, 0.4
    K = rng.normal(size=(C, C, k, k)).astype(dtype)
    P = project_conv_mu_inf(K, gamma)
    assert P.dtype == dtype and mu_inf_conv(P) <= gamma + 1e-12
    for padding in ("circular", "zero"):
        assert mu_inf(conv_matrix(P, 4, 4, padding)) <= gamma + 1e-12
    np.testing.assert_array_equal(project_conv_mu_inf(P, gamma), P)
    # Oracle: the QP over the kernel entries with one constraint per output channel.
    R = K.astype(np.float64).reshape(C, -1)
    centre = np.arange(C) * k * k + (k // 2) * k + k // 2
    mask = np.ones_like(R)
    mask[np.arange(C), centre] = 0
    Xv = cp.Variable(R.shape)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Xv) - cp.sum(cp.multiply(R, Xv))),
                      [cp.hstack([Xv[c, centre[c]] for c in range(C)])
                       + cp.sum(cp.abs(cp.multiply(mask, Xv)), axis=1) <= gamma])
    oracle = _solve(prob, Xv, cp.OSQP, POLISHED_OSQP)
    np.testing.assert_allclose(P.reshape(C, -1), oracle, atol=1e-5 if dtype == np.float32 else 1e-6)


def test_conv_rejects_bad_shapes(rng):
    with pytest.raises(ValueError, match="k odd"):
        conv_apply(rng.normal(size=(2, 2, 2, 2)), rng.normal(size=(1, 2, 4, 4)))
    with pytest.raises(ValueError, match="batch, 2"):
        conv_apply(rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(1, 3, 4, 4)))
    with pytest.raises(ValueError, match="at least 3 x 3"):
        conv_apply(rng.normal(size=(2, 2, 3, 3)), rng.normal(size=(1, 2, 2, 2)))

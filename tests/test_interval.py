"""Interval bounds through the embedded network: soundness, tightness properties, gradients, float32."""
import numpy as np
import pytest

import nemon_np
from nemon_np import ConvNEMON, WellPosednessError, mu_inf
from nemon_np.certificates import CERTIFICATES, certified_rows, certify
from nemon_np.conv import mu_inf_conv
from nemon_np.interval import embed, fold_embedded_grad, margin_lower_bounds, metzler_split
from nemon_np.pixels import input_box, to_inputs
from nemon_np.projection import parametrize_mondeq
from conftest import EXACT, box_samples, finite_difference, random_model


def _conv_model(rng, padding, mu=0.7, channels=3, dtype=np.float64):
    """A conv model with a dense kernel (no zero taps) scaled to mu_inf < mu."""
    m = ConvNEMON(2, (5, 5), channels=channels, kernel=3, n_out=4, pool=1 if padding == "zero" else 5,
                  gamma=0.9, padding=padding, seed=1, dtype=dtype)
    K = rng.normal(size=m.K.shape)
    m.K = (K * mu / mu_inf_conv(np.abs(K))).astype(dtype)
    m.b = (0.3 * rng.normal(size=channels)).astype(dtype)
    m.c = rng.normal(size=4).astype(dtype)
    return m


def test_embedded_matrix_has_the_measure_of_a(rng):
    for weighted in (False, True):
        eta = rng.uniform(0.2, 5, size=9) if weighted else None
        A = rng.normal(size=(9, 9))
        E = embed(A)
        AM, AN = metzler_split(A)
        np.testing.assert_array_equal(AM + AN, A)
        assert np.all(AM - np.diag(np.diag(A)) >= 0) and np.all(AN <= 0) and np.all(np.diag(AN) == 0)
        eta2 = None if eta is None else np.concatenate([eta, eta])
        assert mu_inf(E, eta2) == pytest.approx(mu_inf(A, eta), abs=1e-12)
    K = rng.normal(size=(3, 3, 3, 3))
    assert mu_inf_conv(embed(K)) == pytest.approx(mu_inf_conv(K), abs=1e-12)


def test_fold_is_the_chain_rule_of_the_embedding(rng):
    for shape in ((6, 6), (3, 3, 3, 3)):
        P = rng.normal(size=shape)
        G = rng.normal(size=embed(P).shape)
        np.testing.assert_allclose(fold_embedded_grad(G, P), finite_difference(lambda: np.sum(G * embed(P)), P),
                                   atol=1e-8)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mu", [0.95, 0.3, -1.5])
def test_dense_bounds_hold_for_every_input_of_the_box(rng, weighted, mu):
    n = 25
    eta = rng.uniform(0.3, 3, size=n) if weighted else None
    model = random_model(6, n, 4, mu, seed=int(10 * abs(mu)) + weighted, weights=eta)
    U = rng.normal(size=(20, 6))
    for eps in (0.0, 0.05, 0.5):
        X_lo, X_hi, info = model.interval_bounds(U - eps, U + eps)
        assert np.all(X_lo <= X_hi) and info.radius.max() < 1e-6
        for V in box_samples(rng, U - eps, U + eps, 60):
            X, _ = model.equilibrium(V, **EXACT)
            assert np.all(X_lo <= X) and np.all(X <= X_hi)


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_conv_bounds_hold_for_every_input_of_the_box(rng, padding):
    model = _conv_model(rng, padding)
    U = rng.normal(size=(6, 2 * 5 * 5))
    X_lo, X_hi, _ = model.interval_bounds(U - 0.1, U + 0.1)
    for V in box_samples(rng, U - 0.1, U + 0.1, 40):
        X, _ = model.equilibrium(V, **EXACT)
        assert np.all(X_lo <= X) and np.all(X <= X_hi)


def test_margin_bounds_hold_and_tighten_with_the_box(rng):
    model = random_model(6, 20, 5, 0.9, seed=4)
    U = rng.normal(size=(15, 6))
    labels = rng.integers(0, 5, size=15)
    previous = None
    for eps in (0.3, 0.1, 0.01, 0.0):
        M, _ = model.interval_margins(U - eps, U + eps, labels)
        assert np.all(M[np.arange(15), labels] == 0)
        for V in box_samples(rng, U - eps, U + eps, 30):
            Y = model.logits(V, **EXACT)
            assert np.all(M <= Y[np.arange(15), labels][:, None] - Y)
        if previous is not None:   # nested boxes, nested bounds
            assert np.all(M >= previous - 1e-12)
        previous = M
    Y = model.logits(U, **EXACT)
    np.testing.assert_allclose(M, Y[np.arange(15), labels][:, None] - Y, atol=1e-6)   # a point: the margin


def test_relative_classifier_is_tighter_than_separate_logit_bounds(rng):
    model = random_model(6, 20, 5, 0.9, seed=5)
    U = rng.normal(size=(10, 6))
    labels = rng.integers(0, 5, size=10)
    X_lo, X_hi, _ = model.interval_bounds(U - 0.2, U + 0.2)
    C = model.C
    Y_lo = np.maximum(C, 0) @ X_lo.T + np.minimum(C, 0) @ X_hi.T
    Y_hi = np.maximum(C, 0) @ X_hi.T + np.minimum(C, 0) @ X_lo.T
    separate = Y_lo.T[np.arange(10), labels][:, None] - Y_hi.T
    Xc, Xr = (X_lo + X_hi) / 2, (X_hi - X_lo) / 2
    relative = margin_lower_bounds(C, model.c * 0, Xc, Xr, labels)
    others = np.ones_like(relative, bool)
    others[np.arange(10), labels] = False
    assert np.all(relative[others] >= separate[others] - 1e-12)
    assert np.any(relative[others] > separate[others] + 1e-6)


def test_float32_bounds_are_sound_for_the_exact_model(rng):
    """A float32 model solved to a loose tolerance: its bounds, widened by the residual, still hold for
    the exact fixed points of the same parameters (computed in float64). Without the widening the
    zero-width boxes below would miss the exact point in about half the cases."""
    model = random_model(6, 40, 4, 0.9, seed=6, dtype=np.float32)
    exact = random_model(6, 40, 4, 0.9, seed=6)
    for k in ("A", "B", "b", "C", "c"):
        setattr(exact, k, getattr(model, k).astype(np.float64))
    U = rng.normal(size=(50, 6)).astype(np.float32).astype(np.float64)
    for eps, tol in ((0.0, 1e-2), (0.0, 1e-4), (0.05, 1e-3)):
        X_lo, X_hi, info = model.interval_bounds(U - eps, U + eps, tol=tol)
        assert info.radius.max() > 0
        for V in box_samples(rng, U - eps, U + eps, 10):
            X, _ = exact.equilibrium(V, **EXACT)
            assert np.all(X_lo <= X) and np.all(X <= X_hi)
    labels = rng.integers(0, 4, size=50)
    M, _ = model.interval_margins(U, U, labels, tol=1e-2)
    Y = exact.logits(U, **EXACT)
    assert np.all(M <= Y[np.arange(50), labels][:, None] - Y)


def test_unconverged_solves_give_wider_sound_bounds(rng):
    model = random_model(6, 30, 4, 0.95, seed=7)
    U = rng.normal(size=(10, 6))
    X_lo, X_hi, info = model.interval_bounds(U - 0.1, U + 0.1, max_iter=3)
    tight_lo, tight_hi, _ = model.interval_bounds(U - 0.1, U + 0.1)
    assert info.radius.max() > 1e-3
    assert np.all(X_lo <= tight_lo + 1e-12) and np.all(X_hi >= tight_hi - 1e-12)


def test_models_without_the_l_inf_contraction_are_refused(rng):
    model = random_model(6, 10, 3, 0.5, seed=8)
    model.A = parametrize_mondeq(rng.normal(size=(10, 10)), rng.normal(size=(10, 10)), 0.05)
    assert mu_inf(model.A) >= 1
    U = rng.normal(size=(4, 6))
    with pytest.raises(WellPosednessError, match="interval bounds need the l_inf contraction"):
        model.interval_bounds(U - 0.1, U + 0.1)
    model.metadata.update(mean=0.0, std=1.0)
    for name in CERTIFICATES:
        with pytest.raises(WellPosednessError):
            certify(model, np.full((4, 6), 0.5), np.zeros(4, int), 0.1, name)


def test_boxes_must_be_ordered(rng):
    model = random_model(6, 10, 3, 0.5, seed=9)
    U = rng.normal(size=(4, 6))
    with pytest.raises(ValueError, match="U_lo <= U_hi"):
        model.interval_bounds(U + 0.1, U - 0.1)
    with pytest.raises(ValueError, match="pixels must lie in"):
        input_box(model, np.full((2, 6), 1.5), 0.1)


@pytest.mark.parametrize("weighted", [False, True])
def test_certified_loss_gradient_matches_finite_differences(rng, weighted):
    n = 7
    eta = rng.uniform(0.5, 2, size=n) if weighted else None
    model = random_model(5, n, 3, 0.6, seed=2, weights=eta)
    A = rng.normal(size=(n, n))   # no zero entries: |.| and the split are differentiable there
    model.A = A * 0.5 / mu_inf(np.abs(A), eta)
    U = rng.normal(size=(4, 5))
    y = rng.integers(0, 3, size=4)
    tight = dict(tol=1e-13, adjoint_tol=1e-13, max_iter=20_000)
    loss = lambda: model.certified_loss_and_grad(U, y, U - 0.1, U + 0.2, 0.3, **tight)[0]  # noqa: E731
    _, grads = model.certified_loss_and_grad(U, y, U - 0.1, U + 0.2, 0.3, **tight)
    for name, P in model.params().items():
        np.testing.assert_allclose(grads[name], finite_difference(loss, P), rtol=1e-5, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_conv_certified_loss_gradient_matches_finite_differences(rng, padding):
    model = _conv_model(rng, padding, mu=0.5, channels=2)
    U = rng.normal(size=(3, 50))
    y = np.array([0, 1, 3])
    tight = dict(tol=1e-13, adjoint_tol=1e-13, max_iter=20_000)
    loss = lambda: model.certified_loss_and_grad(U, y, U - 0.1, U + 0.1, 0.4, **tight)[0]  # noqa: E731
    _, grads = model.certified_loss_and_grad(U, y, U - 0.1, U + 0.1, 0.4, **tight)
    for name, P in model.params().items():
        np.testing.assert_allclose(grads[name], finite_difference(loss, P), rtol=1e-5, atol=1e-8, err_msg=name)


def test_kappa_one_is_the_clean_loss(rng):
    model = random_model(5, 7, 3, 0.6, seed=3)
    U = rng.normal(size=(4, 5))
    y = rng.integers(0, 3, size=4)
    loss, grads = model.certified_loss_and_grad(U, y, U - 0.1, U + 0.1, 1.0, tol=1e-10)
    clean, clean_grads = model.loss_and_grad(U, y, tol=1e-10)
    assert loss == clean
    assert grads.keys() == clean_grads.keys()
    for name, g in clean_grads.items():
        np.testing.assert_array_equal(grads[name], g, err_msg=name)
    with pytest.raises(ValueError, match="kappa"):
        model.certified_loss_and_grad(U, y, U - 0.1, U + 0.1, 1.5)


def test_combined_certificate_certifies_no_fewer_points_than_either(rng):
    model = random_model(8, 30, 4, 0.5, seed=11)
    model.B *= 0.2
    model.metadata.update(mean=0.5, std=0.5)
    pixels = rng.random((200, 8))
    labels = model.predict(to_inputs(model, pixels))
    counts = []
    for eps in (0.002, 0.01, 0.05, 0.2):
        got = {name: certify(model, pixels, labels, eps, name).certified for name in CERTIFICATES}
        assert np.all(got["combined"] >= got["interval"]) and np.all(got["combined"] >= got["lipschitz"])
        counts.append({name: int(v.sum()) for name, v in got.items()})
    assert counts[0]["lipschitz"] > 0 and counts[0]["interval"] > 0, counts


def test_certified_rows_ignore_the_true_class():
    M = np.array([[0.0, 1.0, 2.0], [0.5, 0.0, -0.1], [3.0, 2.0, 0.0]])
    np.testing.assert_array_equal(certified_rows(M, np.array([0, 1, 2])), [True, False, True])


def test_certify_batches_agree_with_one_batch(rng):
    model = random_model(8, 30, 4, 0.5, seed=12)
    model.metadata.update(mean=0.5, std=0.5)
    pixels = rng.random((45, 8))
    labels = rng.integers(0, 4, size=45)
    one = certify(model, pixels, labels, 0.02, batch_size=100)
    parts = certify(model, pixels, labels, 0.02, batch_size=7)
    np.testing.assert_allclose(one.margins, parts.margins, atol=1e-12)
    assert one.certified_accuracy == parts.certified_accuracy
    assert nemon_np.certify is certify


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_embedded_convolution_by_centre_and_radius_is_the_2c_convolution(rng, padding):
    from nemon_np.conv import conv_taps, correlate_embedded_padded, correlate_padded, pad_channel_last
    from nemon_np.conv_solvers import conv_fixed_point
    K = rng.normal(size=(3, 3, 3, 3))
    K *= 0.5 / mu_inf_conv(np.abs(K))   # contractive, centre taps > -1: alpha* = 1
    KM, KN = metzler_split(K)
    X = rng.normal(size=(4, 6, 5, 6))
    Xp = pad_channel_last(X, 3, padding)
    np.testing.assert_allclose(correlate_embedded_padded(conv_taps(KM + KN), conv_taps(KM - KN), Xp),
                               correlate_padded(conv_taps(embed(K)), Xp), atol=1e-13)
    Q = rng.normal(size=(4, 6, 5, 6))
    full = conv_fixed_point(embed(K), Q, 0.8, 1e-12, 2000, padding)
    split = conv_fixed_point(KM + KN, Q, 0.8, 1e-12, 2000, padding, K_diff=KM - KN)
    np.testing.assert_allclose(split[0], full[0], atol=1e-11)


@pytest.mark.parametrize("method", ["average", "anderson"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedded_solve_by_sum_and_difference_is_the_2n_solve(rng, method, dtype):
    """solve_equilibrium / solve_adjoint with embedded=True (two n x n products a step) give the fixed
    points and adjoints of the formed 2n x 2n embedded matrix, weighted or not, to the solve's accuracy."""
    from nemon_np import solve_adjoint, solve_equilibrium
    n, m = 12, 7
    A = rng.normal(size=(n, n))
    A = (A * 0.5 / mu_inf(np.abs(A))).astype(dtype)   # contractive with room to spare
    eta = rng.uniform(0.8, 1.25, size=n)               # weighted measure <= 0.5 * 1.25 / 0.8 < 1
    E = embed(A)
    Q = rng.normal(size=(m, 2 * n)).astype(dtype)
    G = rng.normal(size=(m, 2 * n)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for weights in (None, eta):
        eta2 = None if weights is None else np.concatenate([weights, weights])
        X, info = solve_equilibrium(A, Q, method=method, tol=tol, max_iter=2000, weights=weights, embedded=True)
        X_ref, info_ref = solve_equilibrium(E, Q, method=method, tol=tol, max_iter=2000, weights=eta2)
        assert X.shape == (m, 2 * n) and info.mu_inf == pytest.approx(info_ref.mu_inf, abs=1e-12)
        np.testing.assert_allclose(X, X_ref, atol=20 * tol)
        mask = (info.preactivation > 0).astype(dtype)
        for adjoint in ("iterative", "direct"):
            W, _ = solve_adjoint(A, mask, G, method=adjoint, tol=tol, max_iter=2000, weights=weights, embedded=True)
            W_ref, _ = solve_adjoint(E, mask, G, method=adjoint, tol=tol, max_iter=2000, weights=eta2)
            np.testing.assert_allclose(W, W_ref, atol=50 * tol * (1 if dtype == np.float64 else 10))
    with pytest.raises(ValueError, match="embedded networks are solved by"):
        solve_equilibrium(A, Q, method="peaceman-rachford", embedded=True)


def test_margin_bound_gradient_by_label_equals_the_pairwise_formula(rng):
    """The per-label products of margin_lower_bounds_grad against the formula written over every
    (sample, class) pair, and against finite differences of margin_lower_bounds."""
    from nemon_np.interval import margin_lower_bounds_grad
    m, n_out, n = 40, 6, 9
    C, c = rng.normal(size=(n_out, n)), rng.normal(size=n_out)
    X_c, X_r = rng.normal(size=(m, n)), np.abs(rng.normal(size=(m, n)))
    labels, dM = rng.integers(0, n_out, m), rng.normal(size=(m, n_out))
    dM_off = dM.copy()
    dM_off[np.arange(m), labels] = 0.0
    D = C[labels][:, None, :] - C[None, :, :]
    V = dM_off[:, :, None] * (X_c[:, None, :] - np.sign(D) * X_r[:, None, :])
    onehot = np.eye(n_out)[labels]
    expected = (np.einsum("mj,mjn->mn", dM_off, D), -np.einsum("mj,mjn->mn", dM_off, np.abs(D)),
                onehot.T @ V.sum(axis=1) - V.sum(axis=0), onehot.T @ dM_off.sum(axis=1) - dM_off.sum(axis=0))
    got = margin_lower_bounds_grad(C, X_c, X_r, labels, dM)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-12)
    f = lambda: np.sum(dM * margin_lower_bounds(C, c, X_c, X_r, labels))  # noqa: E731
    np.testing.assert_allclose(got[0], finite_difference(f, X_c), atol=1e-6)
    np.testing.assert_allclose(got[2], finite_difference(f, C), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_box_kernels_equal_their_numpy_forms(rng, dtype):
    """The one-pass relu box and its gradient equal the NumPy forms bit for bit (up to the sign of
    zero), on spatial batches with boxes straddling 0, and fall back to them for mixed inputs."""
    from nemon_np.interval import relu_box, relu_box_grad, relu_box_grad_reference, relu_box_reference
    c, r = rng.normal(size=(4, 5, 6, 3)).astype(dtype), rng.random((4, 5, 6, 3)).astype(dtype)
    lo, hi = c - r, c + r
    for got, want in zip(relu_box(lo, hi), relu_box_reference(lo, hi)):
        assert got.dtype == dtype and np.array_equal(got, want)
    dG_c, dG_r = rng.normal(size=lo.shape).astype(dtype), rng.normal(size=lo.shape).astype(dtype)
    for got, want in zip(relu_box_grad(dG_c, dG_r, lo, hi), relu_box_grad_reference(dG_c, dG_r, lo, hi)):
        assert got.dtype == dtype and np.array_equal(got, want)
    # A strided view and a broadcast scalar go through the same formulas.
    for got, want in zip(relu_box(lo[:, ::2], hi[:, ::2]), relu_box_reference(lo[:, ::2], hi[:, ::2])):
        assert np.array_equal(got, want)
    assert np.array_equal(relu_box(lo, 0.5)[0], relu_box_reference(lo, 0.5)[0])

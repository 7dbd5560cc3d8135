"""Convolutional NEMON beyond the convolution itself: the channel-last solver against the generic
reference, the kernel parametrization, persistence, the Lipschitz bound and certificate, the
augmentation, and training on real MNIST through the library and the CLI."""
import json

import numpy as np
import pytest

from conftest import finite_difference
from nemon_np import ConvNEMON, load_model
from nemon_np.conv import (conv_apply, conv_input_norm, conv_matrix, correlate_circular_fft, kernel_spectrum,
                           mu_inf_conv, parametrize_conv_mu_inf, parametrize_conv_mu_inf_grad,
                           parametrize_conv_mu_inf_inverse, project_conv_mu_inf)
from nemon_np.conv_solvers import conv_fixed_point
from nemon_np.data import augment_crop_flip, augment_flip, augment_shift, normalize
from nemon_np.measures import norm_inf
from nemon_np.certificates import certify
from nemon_np.lipschitz import lipschitz_bound, lipschitz_bound_and_grad, smooth_lipschitz_bound_and_grad
from nemon_np.robustness import attack
from nemon_np.solvers import averaged_fixed_point_operator
from nemon_np.training import TrainConfig, Trainer


def _channel_last(A):
    return np.ascontiguousarray(A.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("chunk", [2, 16])   # the product and step of 5 chunks of 2 or less, or of one of 9
def test_channel_last_solver_matches_the_generic_reference(rng, monkeypatch, padding, adjoint, chunk):
    import nemon_np.conv_solvers as cs
    monkeypatch.setattr(cs, "PRODUCT_CHUNK", chunk)
    C, H, W, m = 3, 6, 5, 9
    K = project_conv_mu_inf(rng.normal(size=(C, C, 3, 3)), 0.8)
    alpha = 1.0 / (1.0 - min(np.diag(K[:, :, 1, 1]).min(), 0.0))
    Q = rng.normal(size=(m, C, H, W)) * rng.uniform(0.01, 3, size=(m, 1, 1, 1))  # samples finish at different steps
    S = (rng.random((m, C, H, W)) > 0.4).astype(float) if adjoint else None
    X0 = Q.copy() if adjoint else None
    apply = lambda X: conv_apply(K, X.reshape(-1, C, H, W), padding).reshape(len(X), -1)  # noqa: E731
    flat = lambda A: None if A is None else A.reshape(m, -1)  # noqa: E731
    for tol, max_iter in ((1e-10, 400), (1e-3, 6)):
        Xr, Pr, ir, rr = averaged_fixed_point_operator(apply, flat(Q), alpha, tol, max_iter, relu=not adjoint,
                                                       l1=adjoint, S=flat(S), X0=flat(X0))
        X, P, its, res = conv_fixed_point(K, _channel_last(Q), alpha, tol, max_iter, padding, relu=not adjoint,
                                          l1=adjoint, S=None if S is None else _channel_last(S),
                                          X0=None if X0 is None else _channel_last(X0))
        np.testing.assert_array_equal(its, ir)
        assert len(set(its)) > 1 or max_iter == 6
        np.testing.assert_allclose(X, _channel_last(Xr.reshape(m, C, H, W)), atol=1e-12)
        np.testing.assert_allclose(P, _channel_last(Pr.reshape(m, C, H, W)), atol=1e-12)
        np.testing.assert_allclose(res, rr, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("method", ["average", "anderson"])
def test_zero_start_skips_the_first_convolution_with_the_same_result(rng, monkeypatch, method):
    import nemon_np.conv_solvers as cs
    calls = []
    real = cs.correlate_padded
    monkeypatch.setattr(cs, "correlate_padded", lambda *a, **k: calls.append(1) or real(*a, **k))
    K = project_conv_mu_inf(rng.normal(size=(3, 3, 3, 3)), 0.8)
    Q = rng.normal(size=(4, 6, 5, 3))
    implicit = conv_fixed_point(K, Q, 1.0, 1e-8, 300, method=method, rho=0.8)
    n_implicit, calls[:] = len(calls), []
    explicit = conv_fixed_point(K, Q, 1.0, 1e-8, 300, X0=np.zeros_like(Q), method=method, rho=0.8)
    assert n_implicit == len(calls) - 1 > 0
    for a, b in zip(implicit, explicit):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("C_out, C_in, k, H, W", [(2, 3, 5, 6, 7), (4, 1, 3, 5, 4), (3, 3, 5, 5, 5), (2, 2, 1, 4, 6)])
def test_fft_product_matches_the_dense_matrix(rng, dtype, C_out, C_in, k, H, W):
    K = rng.normal(size=(C_out, C_in, k, k))
    X = rng.normal(size=(3, C_in, H, W))
    expected = (X.reshape(3, -1) @ conv_matrix(K, H, W, "circular").T).reshape(3, C_out, H, W)
    Y = correlate_circular_fft(kernel_spectrum(K.astype(dtype), H, W), _channel_last(X).astype(dtype))
    assert Y.dtype == dtype and Y.shape == (3, H, W, C_out)
    scale = np.abs(expected).max() * (1e-13 if dtype == np.float64 else 1e-5)
    np.testing.assert_allclose(Y, _channel_last(expected), atol=scale)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("method", ["average", "anderson"])
@pytest.mark.parametrize("chunk", [2, 16])   # the FFT's workspace reused by chunks and shrinking working sets
def test_fft_solver_matches_the_generic_reference(rng, monkeypatch, adjoint, method, chunk):
    import nemon_np.conv_solvers as cs
    monkeypatch.setattr(cs, "PRODUCT_CHUNK", chunk)
    C, H, W, m = 3, 7, 6, 5
    K = project_conv_mu_inf(rng.normal(size=(C, C, 5, 5)), 0.8)
    alpha = 1.0 / (1.0 - min(np.diag(K[:, :, 2, 2]).min(), 0.0))
    Q = rng.normal(size=(m, C, H, W)) * rng.uniform(0.01, 3, size=(m, 1, 1, 1))
    S = (rng.random((m, C, H, W)) > 0.4).astype(float) if adjoint else None
    X0 = Q.copy() if adjoint else None
    apply = lambda X: conv_apply(K, X.reshape(-1, C, H, W)).reshape(len(X), -1)  # noqa: E731
    flat = lambda A: None if A is None else A.reshape(m, -1)  # noqa: E731
    Xr, Pr, ir, rr = averaged_fixed_point_operator(apply, flat(Q), alpha, 1e-10, 2000, relu=not adjoint, l1=adjoint,
                                                   S=flat(S), X0=flat(X0))
    X, P, its, res = conv_fixed_point(K, _channel_last(Q), alpha, 1e-10, 2000, relu=not adjoint, l1=adjoint,
                                      S=None if S is None else _channel_last(S),
                                      X0=None if X0 is None else _channel_last(X0), method=method,
                                      rho=1 - alpha * (1 - max(mu_inf_conv(K), 0)), product="fft")
    assert np.all(res <= 1e-10)
    if method == "average":   # the same iteration: the same steps
        np.testing.assert_array_equal(its, ir)
    np.testing.assert_allclose(X, _channel_last(Xr.reshape(m, C, H, W)), atol=1e-8)


@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_the_padding_is_numpys(rng, padding, k):
    from nemon_np.conv import pad_channel_last, pad_channel_last_reference
    X = rng.normal(size=(3, 6, 5, 2)).astype(np.float32)
    Xp = pad_channel_last(X, k, padding)
    np.testing.assert_array_equal(Xp, pad_channel_last_reference(X, k, padding))
    assert Xp.flags.c_contiguous


def test_auto_product_takes_the_fft_for_circular_5x5_and_the_taps_otherwise(rng, monkeypatch):
    import nemon_np.conv_solvers as cs
    calls = {"direct": 0, "fft": 0}
    for name, attr in (("direct", "correlate_padded"), ("fft", "correlate_circular_fft")):
        real = getattr(cs, attr)
        monkeypatch.setattr(cs, attr, lambda *a, _real=real, _name=name, **kw: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a, **kw))
    Q = rng.normal(size=(2, 6, 6, 3))
    for k, padding, expected in ((5, "circular", "fft"), (3, "circular", "direct"), (5, "zero", "direct")):
        calls.update(direct=0, fft=0)
        K = project_conv_mu_inf(rng.normal(size=(3, 3, k, k)), 0.5)
        conv_fixed_point(K, Q, 1.0, 1e-8, 100, padding)
        assert calls[expected] > 0 and calls[{"fft": "direct", "direct": "fft"}[expected]] == 0
    with pytest.raises(ValueError, match="product must be one of auto, direct, fft, got 'fast'"):
        conv_fixed_point(K, Q, 1.0, 1e-8, 100, product="fast")
    with pytest.raises(ValueError, match="product 'fft' does not apply to zero padding"):
        conv_fixed_point(K, Q, 1.0, 1e-8, 100, "zero", product="fft")


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_every_registered_product_that_fits_is_the_convolution(rng, padding):
    """Each class of the products' registry, where it fits, writes K * x for the padded states' interior,
    as the dense matrix of the convolution gives it (direct conv_matrix product); one that does not fit
    is refused by name."""
    from nemon_np.conv import pad_channel_last
    from nemon_np.conv_solvers import CONV_PRODUCTS, get_conv_product
    C, H, W, k = 3, 7, 6, 5
    K = rng.normal(size=(C, C, k, k))
    X = rng.normal(size=(4, H, W, C))
    Xp = pad_channel_last(X, k, padding)
    M = conv_matrix(K, H, W, padding)
    expected = (X.transpose(0, 3, 1, 2).reshape(4, -1) @ M.T).reshape(4, C, H, W).transpose(0, 2, 3, 1)
    assert set(CONV_PRODUCTS) == {"direct", "fft"}
    for name, cls in CONV_PRODUCTS.items():
        if not cls.fits(padding, k, False):
            with pytest.raises(ValueError, match=f"product {name!r} does not apply"):
                get_conv_product(name, padding, k, False)
            continue
        assert get_conv_product(name, padding, k, False) is cls
        out = np.zeros(Xp.shape[:3] + (C,))
        Y = cls(K, None, H, W, np.float64, 1)(np.ascontiguousarray(Xp), out)
        np.testing.assert_allclose(Y[:, :H, :W], expected, atol=1e-12)
        # Its weight gradient, d/dK of sum(delta * K x), entry by entry from the matrices of the unit kernels.
        delta = rng.normal(size=expected.shape)
        G = cls.weight_grad(delta, X, k, padding, 1)
        flat_x, flat_d = X.transpose(0, 3, 1, 2).reshape(4, -1), delta.transpose(0, 3, 1, 2).reshape(4, -1)
        for idx in np.ndindex(K.shape):
            E = np.zeros(K.shape)
            E[idx] = 1
            assert abs(G[idx] - np.sum(flat_d * (flat_x @ conv_matrix(E, H, W, padding).T))) < 1e-10, (name, idx)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("m, H, W, C_out, C_in, k", [(3, 7, 6, 4, 2, 5), (2, 5, 5, 3, 3, 5), (4, 9, 8, 2, 5, 3),
                                                     (2, 4, 4, 2, 2, 3)])
def test_fft_weight_gradient_matches_the_taps(rng, dtype, m, H, W, C_out, C_in, k):
    """The weight gradient by FFT equals the taps' (circular padding) to float rounding of the largest entry,
    in the inputs' dtype."""
    from nemon_np.conv import weight_grad_channel_last, weight_grad_circular_fft
    delta, X = rng.normal(size=(m, H, W, C_out)).astype(dtype), rng.normal(size=(m, H, W, C_in)).astype(dtype)
    taps, fft = weight_grad_channel_last(delta, X, k, "circular"), weight_grad_circular_fft(delta, X, k)
    assert fft.dtype == dtype and fft.shape == (C_out, C_in, k, k)
    assert np.abs(fft - taps).max() <= (1e-13 if dtype == np.float64 else 2e-6) * np.abs(taps).max()


def test_conv_model_gradient_alike_by_either_product(rng, monkeypatch):
    """A 5 x 5 conv model's loss gradient (K by the product's own weight gradient, in the clean and the
    certified loss) is the same, to float rounding, whether the solver takes the taps or the FFT."""
    model = ConvNEMON(1, (6, 6), channels=3, kernel=5, n_out=10, pool=1, gamma=0.5, seed=0, dtype=np.float64)
    U = rng.uniform(0, 1, size=(5, 36))
    y = rng.integers(0, 10, 5)
    grads = {}
    for product in ("direct", "fft"):
        monkeypatch.setattr(model, "conv_product", product)
        clean = model.loss_and_grad(U, y, tol=1e-12)[1]
        robust = model.certified_loss_and_grad(U, y, U - 0.05, U + 0.05, 0.5, tol=1e-12)[1]
        grads[product] = (clean, robust)
    for a, b in zip(grads["direct"], grads["fft"]):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-8, atol=1e-10 * np.abs(a[key]).max(), err_msg=key)


def test_conv_model_predicts_alike_by_either_product(rng, monkeypatch):
    model = ConvNEMON(1, (8, 8), channels=4, kernel=5, pool=2, gamma=0.8, seed=3)
    U = rng.normal(size=(6, 64))
    logits = {}
    for product in ("direct", "fft"):
        monkeypatch.setattr(model, "conv_product", product)
        logits[product] = model.logits(U, tol=1e-6)
    np.testing.assert_allclose(logits["fft"], logits["direct"], atol=1e-4)
    np.testing.assert_array_equal(logits["fft"].argmax(1), logits["direct"].argmax(1))


def test_channel_last_solver_rejects_mismatched_shapes(rng):
    K = project_conv_mu_inf(rng.normal(size=(3, 3, 3, 3)), 0.5)
    with pytest.raises(ValueError, match="channel-last"):
        conv_fixed_point(K, rng.normal(size=(2, 3, 6, 6)), 0.5, 1e-6, 10)  # channel-first by mistake
    with pytest.raises(ValueError, match="S must have"):
        conv_fixed_point(K, rng.normal(size=(2, 6, 6, 3)), 0.5, 1e-6, 10, S=np.ones((2, 6, 6, 2)))
    for method in ("average", "anderson"):   # the zero start builds its padding without pad_channel_last
        with pytest.raises(ValueError, match="padding must be one of"):
            conv_fixed_point(K, rng.normal(size=(2, 6, 6, 3)), 0.5, 1e-6, 10, padding="reflect", method=method,
                             rho=0.5)
        with pytest.raises(ValueError, match="circular padding needs images at least 3 x 3"):
            conv_fixed_point(K, rng.normal(size=(2, 2, 6, 3)), 0.5, 1e-6, 10, method=method, rho=0.5)


def test_kernel_parametrization_bound_gradient_and_inverse(rng):
    C, k, gamma = 4, 3, 0.6
    for _ in range(20):
        T = rng.normal(size=(C, C, k, k))
        assert mu_inf_conv(parametrize_conv_mu_inf(T, gamma)) <= gamma + 1e-12
    T = rng.normal(size=(C, C, k, k))
    G = rng.normal(size=T.shape)
    fd = finite_difference(lambda: float(np.sum(G * parametrize_conv_mu_inf(T, gamma))), T)
    np.testing.assert_allclose(parametrize_conv_mu_inf_grad(T, G), fd, atol=1e-7)
    K = project_conv_mu_inf(rng.normal(size=(C, C, k, k)), gamma)
    np.testing.assert_allclose(parametrize_conv_mu_inf(parametrize_conv_mu_inf_inverse(K, gamma), gamma), K,
                               atol=1e-13)
    with pytest.raises(ValueError, match="outside"):
        parametrize_conv_mu_inf_inverse(K * 3, gamma)


def test_conv_input_norm_is_the_dense_operator_norm(rng):
    B = rng.normal(size=(4, 3, 3, 3))
    assert conv_input_norm(B) == pytest.approx(norm_inf(conv_matrix(B, 5, 6)), rel=1e-12)
    assert conv_input_norm(B) >= norm_inf(conv_matrix(B, 5, 6, "zero")) * (1 - 1e-12)


def test_save_load_round_trip_and_dispatch(rng, tmp_path):
    model = ConvNEMON(2, (8, 8), channels=3, kernel=3, n_out=4, pool=2, gamma=0.8, padding="zero", seed=3,
                      dtype=np.float32)
    model.b = rng.normal(size=3).astype(np.float32)
    model.metadata.update(dataset="mnist", mean=np.array([0.1, 0.2]))
    model.save(tmp_path / "m.npz")
    back = load_model(tmp_path / "m.npz")
    assert isinstance(back, ConvNEMON) and back.padding == "zero" and back.image_size == (8, 8)
    assert back.metadata["dataset"] == "mnist"
    U = rng.normal(size=(5, 2 * 8 * 8)).astype(np.float32)
    np.testing.assert_array_equal(back.logits(U, tol=1e-5), model.logits(U, tol=1e-5))
    data = (tmp_path / "m.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="bad.npz"):
        load_model(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="U must have shape"):
        model.logits(U[:, :-1])


def _random_conv_model(rng, padding="circular", gamma=0.7):
    model = ConvNEMON(2, (4, 4), channels=3, kernel=3, n_out=3, pool=2, gamma=gamma, padding=padding, seed=1)
    model.K = project_conv_mu_inf(rng.normal(size=model.K.shape) / 3, gamma)
    model.b = 0.2 * rng.normal(size=3)
    return model


@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_lipschitz_bound_holds_and_matches_the_dense_form(rng, padding):
    model = _random_conv_model(rng, padding)
    B = conv_matrix(model.B, 4, 4, padding)
    # The head acting on the channel-last state, pooling included, as a dense matrix.
    pool = np.zeros((3 * 4, 3 * 16))
    for c in range(3):
        for i in range(4):
            for j in range(4):
                pool[((i // 2) * 2 + j // 2) * 3 + c, c * 16 + i * 4 + j] = 0.25
    dense_bound = norm_inf(model.C @ pool) * norm_inf(B) / (1 - max(model.mu_inf(), 0))
    L = lipschitz_bound(model)
    if padding == "circular":
        assert L == pytest.approx(dense_bound, rel=1e-12)
    assert L >= dense_bound * (1 - 1e-12)
    for _ in range(20):
        u1 = rng.normal(size=(1, 32))
        u2 = u1 + rng.uniform(-1e-3, 1e-3, size=u1.shape)
        dy = np.abs(model.logits(u1, tol=1e-13, max_iter=5000) - model.logits(u2, tol=1e-13, max_iter=5000)).max()
        assert dy <= L * np.abs(u1 - u2).max() * (1 + 1e-9)


def test_conv_lipschitz_subgradients_match_finite_differences(rng):
    model = _random_conv_model(rng, gamma=0.8)
    model.K = 0.02 * rng.normal(size=model.K.shape)
    model.K[np.arange(3), np.arange(3), 1, 1] = [0.1, 0.3, 0.2]  # distinct channel measures: no ties at the max
    assert 0 < model.mu_inf() < 1
    _, grads = lipschitz_bound_and_grad(model)
    value, smooth = smooth_lipschitz_bound_and_grad(model)
    assert value >= lipschitz_bound(model) * (1 - 1e-12)  # the smooth form bounds the exact one (mu <= gamma)
    smooth_value = lambda: smooth_lipschitz_bound_and_grad(model)[0]  # noqa: E731
    for name in ("K", "B", "C"):
        P = getattr(model, name)
        fd = finite_difference(lambda: lipschitz_bound(model), P, h=1e-7)
        np.testing.assert_allclose(grads[name], fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())
        fd = finite_difference(smooth_value, P, h=1e-7)
        np.testing.assert_allclose(smooth[name], fd, rtol=1e-5, atol=1e-6 * max(np.abs(fd).max(), 1))


def test_augmentation_is_a_shifted_window_possibly_flipped(rng):
    X = rng.normal(size=(20, 3 * 6 * 5)).astype(np.float32)
    out = augment_crop_flip(X, (3, 6, 5), np.random.default_rng(0), pad=2)
    assert out.shape == X.shape and out.dtype == X.dtype
    P = np.pad(X.reshape(20, 3, 6, 5), ((0, 0), (0, 0), (2, 2), (2, 2)))
    flips = 0
    for n in range(20):
        img = out[n].reshape(3, 6, 5)
        windows = [(P[n, :, a:a + 6, e:e + 5], f) for a in range(5) for e in range(5) for f in (False, True)]
        matches = [f for w, f in windows if np.array_equal(w[:, :, ::-1] if f else w, img)]
        assert matches, n
        flips += all(matches)
    assert 0 < flips < 20
    np.testing.assert_array_equal(augment_crop_flip(X, (3, 6, 5), np.random.default_rng(0), pad=2), out)


def test_flip_augmentation_mirrors_some_images_and_moves_none(rng):
    X = rng.normal(size=(40, 3 * 6 * 5)).astype(np.float32)
    out = augment_flip(X, (3, 6, 5), np.random.default_rng(0))
    assert out.shape == X.shape and out.dtype == X.dtype
    images, results = X.reshape(40, 3, 6, 5), out.reshape(40, 3, 6, 5)
    flipped = np.array([np.array_equal(results[n], images[n, :, :, ::-1]) for n in range(40)])
    kept = np.array([np.array_equal(results[n], images[n]) for n in range(40)])
    assert np.all(flipped ^ kept) and 5 < flipped.sum() < 35
    np.testing.assert_array_equal(augment_flip(X, (3, 6, 5), np.random.default_rng(0)), out)


@pytest.fixture(scope="module")
def mnist_images(mnist_data):
    d = mnist_data
    return (normalize(d.train_images[:1500], d.mean, d.std), d.train_labels[:1500],
            normalize(d.test_images[:300], d.mean, d.std), d.test_labels[:300])


@pytest.mark.parametrize("constraint, min_diagonal", [("projection", None), ("parametrization", None),
                                                      ("projection", 0.0)])
def test_conv_training_on_real_mnist_learns_and_stays_well_posed(mnist_images, constraint, min_diagonal):
    X, y, Xt, yt = mnist_images
    config = TrainConfig(model="conv", channels=8, epochs=1, lr=1e-2, schedule="constant", tol=1e-3, gamma=0.9,
                         constraint=constraint, min_diagonal=min_diagonal)
    trainer = Trainer(config, X.shape[1], 10, image_shape=(1, 28, 28)).fit(X, y, Xt, yt, progress=False)
    row = trainer.history[-1]
    assert row["test_acc"] > 0.6, row  # chance is 0.1
    assert trainer.model.mu_inf() <= 0.9 + 1e-12
    assert row["lipschitz_bound"] > 0
    K = trainer.model.K
    centre = K[np.arange(8), np.arange(8), 1, 1]
    if min_diagonal is None:
        # Training does push centre taps below zero (the floor below is not idle), and alpha* with them.
        assert centre.min() < 0 and row["alpha_star"] == pytest.approx(1 / (1 - centre.min()))
    else:
        assert centre.min() >= min_diagonal and trainer.model.alpha_star() == row["alpha_star"] == 1.0


def test_conv_lipschitz_regularization_lowers_the_bound(mnist_images):
    X, y, _, _ = mnist_images
    bounds = []
    for reg in (0.0, 0.1):
        config = TrainConfig(model="conv", channels=8, epochs=1, lr=1e-2, schedule="constant", tol=1e-3,
                             lipschitz_reg=reg)
        model = Trainer(config, X.shape[1], 10, image_shape=(1, 28, 28)).fit(X[:1000], y[:1000], progress=False).model
        bounds.append(lipschitz_bound(model))
    assert bounds[1] < 0.7 * bounds[0], bounds


def test_certified_conv_points_are_never_broken(mnist_images):
    X, y, Xt, yt = mnist_images
    config = TrainConfig(model="conv", channels=8, epochs=1, lr=1e-2, schedule="constant", tol=1e-3, gamma=0.5)
    model = Trainer(config, X.shape[1], 10, image_shape=(1, 28, 28)).fit(X, y, progress=False).model
    model.metadata.update(mean=np.array([0.1307]), std=np.array([0.3081]))
    pixels = np.clip(Xt[:40] * 0.3081 + 0.1307, 0, 1)
    eps = 0.002
    certified = certify(model, pixels, yt[:40], eps, "lipschitz").certified
    attacked = attack(model, pixels, yt[:40], eps, "pgd", steps=5)
    assert np.abs(attacked - pixels).max() <= eps + 1e-12
    still = model.predict((attacked - 0.1307) / 0.3081, tol=1e-4) == yt[:40]
    assert certified.any()
    assert np.all(still[certified])


def test_shift_augmentation_translates_without_flipping(rng):
    X = rng.normal(size=(30, 2 * 7 * 6)).astype(np.float32)
    out = augment_shift(X, (2, 7, 6), np.random.default_rng(1), max_shift=2)
    assert out.shape == X.shape and out.dtype == X.dtype
    seen = set()
    for n in range(30):
        img, ref = out[n].reshape(2, 7, 6), X[n].reshape(2, 7, 6)
        # Independent construction: a translation by (a, e) reads pixel (i + a, j + e), clamped to the image.
        found = []
        for a in range(-2, 3):
            for e in range(-2, 3):
                rows = np.clip(np.arange(7) + a, 0, 6)
                cols = np.clip(np.arange(6) + e, 0, 5)
                if np.array_equal(ref[:, rows][:, :, cols], img):
                    found.append((a, e))
        assert found, n
        seen.update(found)
    assert len(seen) > 10   # many different shifts are drawn, not one
    np.testing.assert_array_equal(augment_shift(X, (2, 7, 6), np.random.default_rng(1), max_shift=2), out)


def test_training_config_reads_augment_flags():
    assert TrainConfig(model="conv", augment=True).validate().augment == "crop-flip"
    assert TrainConfig(model="conv", augment=False).validate().augment == "none"
    assert TrainConfig(model="conv", augment="shift").validate().augment_pad == 2
    assert TrainConfig(model="conv", augment="shift", augment_pad=1).validate().augment_pad == 1
    assert TrainConfig(model="conv", augment="flip").validate().augment_pad is None
    with pytest.raises(ValueError, match="augment must be one of"):
        TrainConfig(model="conv", augment="rotate").validate()
    for bad in (dict(augment="none", augment_pad=2), dict(augment="shift", augment_pad=0),
                dict(augment="flip", augment_pad=1)):
        with pytest.raises(ValueError, match="augment_pad must be a positive whole number"):
            TrainConfig(model="conv", **bad).validate()


def test_warm_start_resumes_from_the_saved_model_and_checks_it(tmp_path, rng):
    X = rng.normal(size=(40, 1 * 8 * 8)).astype(np.float32)
    y = rng.integers(0, 3, size=40)
    config = dict(model="conv", channels=3, pool=2, epochs=1, batch_size=20, tol=1e-3)
    first = Trainer(TrainConfig(**config), 64, 3, image_shape=(1, 8, 8)).fit(X, y, progress=False)
    first.model.save(tmp_path / "model.npz")
    warm = Trainer(TrainConfig(**config, init=str(tmp_path)), 64, 3, image_shape=(1, 8, 8))
    for name in ("K", "B", "b", "C", "c"):
        np.testing.assert_array_equal(getattr(warm.model, name), getattr(first.model, name))
    fresh = Trainer(TrainConfig(**config), 64, 3, image_shape=(1, 8, 8))
    assert not np.array_equal(fresh.model.C, first.model.C)
    for change, message in ((dict(channels=4), "channels = 3, the config asks for 4"),
                            (dict(pool=4), "pool = 2"), (dict(gamma=0.8), "gamma"),
                            (dict(dtype="float64"), "dtype = float32")):
        with pytest.raises(ValueError, match=message):
            Trainer(TrainConfig(**{**config, **change}, init=str(tmp_path)), 64, 3, image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="holds a conv model"):
        Trainer(TrainConfig(model="nemon", hidden=5, init=str(tmp_path / "model.npz")), 64, 3)
    with pytest.raises(ValueError, match="no model file"):
        Trainer(TrainConfig(**config, init=str(tmp_path / "missing.npz")), 64, 3, image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="cannot warm-start"):
        TrainConfig(model="nemon", constraint="weighted", init=str(tmp_path)).validate()


def test_cli_trains_a_conv_model_and_evaluates_it(shared_data, tmp_path, capsys):
    from nemon_np import evaluate, train
    out = tmp_path / "run"
    code = train.main(["--dataset", "mnist", "--model", "conv", "--channels", "4", "--data-dir", str(shared_data),
                       "--limit-train", "300", "--epochs", "1", "--tol", "1e-3", "--augment", "--out", str(out),
                       "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "mu_inf(K)" in text and "verified" in text and "augmented" in text
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["verified"] and summary["mu_inf_saved"] <= 0.95 + 1e-12
    assert (out / "training_curves.png").stat().st_size > 0
    assert evaluate.main([str(out), "--data-dir", str(shared_data), "--tol", "1e-3"]) == 0
    assert "mu_inf(K)" in capsys.readouterr().out
    from nemon_np import robustness
    assert robustness.main([str(out), "--data-dir", str(shared_data), "--samples", "20", "--pgd-steps", "2",
                            "--eps", "0", "0.01"]) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert report["lipschitz_bound"] >= report["lipschitz_empirical"] > 0
    pgd = report["attacks"]["pgd"]
    for row in ("certified-lipschitz", "certified-interval"):
        assert len(report["certified"][row]) == len(pgd) == 2
        assert all(a >= c for a, c in zip(pgd, report["certified"][row])), row
    # The interval bounds certify no fewer points than the Lipschitz bound on this model, at each radius.
    assert all(i >= lip for i, lip in zip(report["certified"]["certified-interval"],
                                          report["certified"]["certified-lipschitz"]))
    assert (out / "robustness.png").stat().st_size > 1000


@pytest.mark.parametrize("flags, message", [
    (["--model", "conv", "--constraint", "weighted"], "supports constraint"),
    (["--model", "conv", "--kernel", "4"], "kernel must be odd"),
    (["--model", "conv", "--pool", "0"], "pool must be a positive whole number"),
    (["--model", "conv", "--solver", "picard"], "solver average or anderson"),
    (["--model", "conv", "--constraint", "parametrization", "--min-diagonal", "0"],
     "min_diagonal goes with constraint projection"),
    (["--model", "conv", "--min-diagonal", "0.5"], "min_diagonal must be <= 0"),
])
def test_conv_cli_bad_flags_give_one_line_errors(flags, message, capsys):
    from nemon_np import train
    with pytest.raises(SystemExit):
        train.main(flags)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_conv_anderson_reaches_the_fixed_point_in_fewer_iterations(rng, padding, adjoint):
    """Anderson on the conv solver: the same fixed point as the plain iteration (both to 1e-10), in
    fewer iterations; forward (relu, l_inf) and adjoint (identity with a mask, l_1)."""
    C, H = 4, 7
    K = project_conv_mu_inf(rng.normal(size=(C, C, 3, 3)) / 2, 0.9)
    alpha = 1.0 / (1.0 - min(np.diag(K[:, :, 1, 1]).min(), 0.0))
    rho = 1.0 - alpha * (1.0 - max(mu_inf_conv(K), 0.0))
    Q = rng.normal(size=(6, H, H, C))
    S = (rng.random(Q.shape) < 0.6).astype(float) if adjoint else None
    kw = dict(relu=not adjoint, l1=adjoint, S=S, X0=Q if adjoint else None)
    Xa, _, ia, ra = conv_fixed_point(K, Q, alpha, 1e-10, 5000, padding, **kw)
    Xn, _, iN, rn = conv_fixed_point(K, Q, alpha, 1e-10, 5000, padding, method="anderson", rho=rho, **kw)
    assert np.all(rn <= 1e-10)
    np.testing.assert_allclose(Xn, Xa, atol=1e-8)
    assert iN.mean() < ia.mean()


def test_conv_model_trains_with_anderson(rng):
    model = ConvNEMON(1, (6, 6), channels=3, kernel=3, n_out=3, pool=2, gamma=0.8, seed=0)
    U, y = rng.normal(size=(5, 36)), np.array([0, 1, 2, 0, 1])
    plain = model.loss_and_grad(U, y, tol=1e-10, max_iter=5000)
    accelerated = model.loss_and_grad(U, y, tol=1e-10, max_iter=5000, method="anderson", adjoint="anderson")
    assert plain[0] == pytest.approx(accelerated[0], abs=1e-9)
    for k in plain[1]:
        np.testing.assert_allclose(accelerated[1][k], plain[1][k], atol=1e-8)

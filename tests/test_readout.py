"""The hidden read-out layer y = C relu(H f + h) + c: gradients against finite differences, interval
and Lipschitz certificates sound against sampled inputs, persistence, and training through the CLI."""
import json
import pathlib
import sys

import numpy as np
import pytest

from nemon_np import ConvNEMON, NEMON, load_model, mu_inf
from nemon_np.certificates import CERTIFICATES, certify
from nemon_np.conv import mu_inf_conv
from nemon_np.lipschitz import lipschitz_bound, lipschitz_bound_and_grad, smooth_lipschitz_bound_and_grad
from nemon_np.pixels import to_inputs
from nemon_np.readout import enclosing_hidden_box, hidden_box, hidden_box_grad, readout_affine_lower_bounds
from nemon_np.train import main as train_main
from conftest import EXACT, TIGHT, box_samples, finite_difference, random_model


def _dense(rng, weighted=False, n=7, p=5, mu=0.6, dtype=np.float64):
    eta = rng.uniform(0.5, 2, size=n) if weighted else None
    model = random_model(5, n, 3, mu, seed=2, weights=eta, readout_hidden=p, dtype=dtype)
    A = rng.normal(size=(n, n))   # no zero entries: |.| and the split are differentiable there
    model.A = (A * mu / mu_inf(np.abs(A), eta)).astype(dtype)
    return model


def _conv(rng, p=4, dtype=np.float64):
    model = ConvNEMON(2, (4, 4), channels=2, kernel=3, n_out=3, pool=2, gamma=0.9, seed=1, dtype=dtype,
                      readout_hidden=p)
    K = rng.normal(size=model.K.shape)
    model.K = (K * 0.5 / mu_inf_conv(np.abs(K))).astype(dtype)
    model.b = (0.3 * rng.normal(size=2)).astype(dtype)
    model.h = (0.3 * rng.normal(size=p)).astype(dtype)
    return model


def test_hidden_box_holds_and_its_gradient_is_the_chain_rule(rng):
    H, h = rng.normal(size=(6, 9)), rng.normal(size=6)
    F_c, F_r = rng.normal(size=(4, 9)), rng.uniform(0, 0.3, size=(4, 9))
    G_c, G_r = enclosing_hidden_box(F_c, F_r, H, h)[:2]
    for F in box_samples(rng, F_c - F_r, F_c + F_r, 200):
        G = np.maximum(F @ H.T + h, 0)
        assert np.all(G_c - G_r <= G) and np.all(G <= G_c + G_r)
    np.testing.assert_allclose(hidden_box(F_c, F_r, H, h), enclosing_hidden_box(F_c, F_r, H, h), atol=1e-12)
    W_c, W_r = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    objective = lambda: np.sum(W_c * hidden_box(F_c, F_r, H, h)[0] + W_r * hidden_box(F_c, F_r, H, h)[1])  # noqa: E731
    P_lo, P_hi = hidden_box(F_c, F_r, H, h)[2:]
    dF_c, dF_r, dH, dh = hidden_box_grad(W_c, W_r, F_c, F_r, H, P_lo, P_hi)
    for got, P in ((dF_c, F_c), (dF_r, F_r), (dH, H), (dh, h)):
        np.testing.assert_allclose(got, finite_difference(objective, P), rtol=1e-6, atol=1e-8)


def _readout_problem(rng, m=6, n_f=9, p=7, n_out=4, dtype=np.float64):
    H, h = rng.normal(size=(p, n_f)).astype(dtype), (0.5 * rng.normal(size=p)).astype(dtype)
    C, c = rng.normal(size=(n_out, p)).astype(dtype), rng.normal(size=n_out).astype(dtype)
    F_c, F_r = rng.normal(size=(m, n_f)), rng.uniform(0, 0.4, size=(m, n_f))
    return H, h, C, c, F_c, F_r, rng.integers(0, n_out, size=m)


def _primal_crown(H, h, C, c, F_c, F_r, P_lo, P_hi, labels):
    """CROWN in its primal form, one margin at a time: the linear lower bound a . P + b0 of
    d . relu(P) (slope 1 on active units, 0 on inactive ones, on units that change sign the chord
    below zero where d_i < 0 and the line 0 where d_i >= 0), minimized over the feature box."""
    H, h, C, c = (np.asarray(a, np.float64) for a in (H, h, C, c))
    M = np.zeros((len(labels), len(C)))
    for s, k in enumerate(labels):
        for j in range(len(C)):
            d, a, b0 = C[k] - C[j], np.zeros(len(h)), c[k] - c[j]
            for i, (lo, hi) in enumerate(zip(P_lo[s], P_hi[s])):
                if lo >= 0:
                    a[i] = d[i]
                elif hi > 0 and d[i] < 0:
                    a[i] = d[i] * hi / (hi - lo)
                    b0 -= a[i] * lo
            w = a @ H
            M[s, j] = 0.0 if j == k else w @ F_c[s] - np.abs(w) @ F_r[s] + a @ h + b0
    return M


def _box_minimum(W, beta, F_c, F_r):
    return np.einsum("mjf,mf->mj", W, F_c) - np.einsum("mjf,mf->mj", np.abs(W), F_r) + beta


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_readout_affine_bounds_hold_pointwise_and_are_crown(rng, dtype):
    H, h, C, c, F_c, F_r, labels = _readout_problem(rng, dtype=dtype)
    P_lo, P_hi = enclosing_hidden_box(F_c, F_r, H, h)[2:]
    W, beta = readout_affine_lower_bounds(C, c, H, h, F_c, F_r, P_lo, P_hi, labels)
    rows = np.arange(len(labels))
    H64, h64, C64, c64 = (a.astype(np.float64) for a in (H, h, C, c))
    for F in box_samples(rng, F_c - F_r, F_c + F_r, 400):   # the affine bound holds at every point
        Y = np.maximum(F @ H64.T + h64, 0) @ C64.T + c64
        assert np.all(np.einsum("mjf,mf->mj", W, F) + beta <= Y[rows, labels][:, None] - Y)
    M = _box_minimum(W, beta, F_c, F_r)
    crown = _primal_crown(H, h, C, c, F_c, F_r, P_lo, P_hi, labels)
    np.testing.assert_allclose(M, crown, rtol=0, atol=1e-10)
    assert np.all(M <= crown)   # the rounding allowance only lowers the bound
    # a linear read-out (C reads f directly): the exact margins, less a rounding allowance
    W, beta = readout_affine_lower_bounds(H, h[:len(H)], None, None, F_c, F_r, None, None, labels % len(H))
    k = labels % len(H)
    np.testing.assert_array_equal(W[rows[:, None], np.arange(len(H))[None]],
                                  np.where((np.arange(len(H)) == k[:, None])[..., None], 0.0,
                                           H64[k][:, None] - H64[None]))
    exact = h64[k][:, None] - h64[None]
    assert np.all(beta <= exact) and np.allclose(beta, np.where(np.arange(len(H)) == k[:, None], 0.0, exact),
                                                 rtol=0, atol=1e-12)


def test_readout_affine_bounds_stay_below_the_triangle_lp(rng):
    import cvxpy as cp
    H, h, C, c, F_c, F_r, labels = _readout_problem(rng, m=3, n_out=3)
    P_lo, P_hi = enclosing_hidden_box(F_c, F_r, H, h)[2:]
    M = _box_minimum(*readout_affine_lower_bounds(C, c, H, h, F_c, F_r, P_lo, P_hi, labels), F_c, F_r)
    for s, k in enumerate(labels):
        lo, hi = P_lo[s], P_hi[s]
        f, g = cp.Variable(H.shape[1]), cp.Variable(len(h))
        P = H @ f + h
        chord = np.where(hi > 0, hi / np.maximum(hi - lo, 1e-300), 0.0)
        cons = [f >= F_c[s] - F_r[s], f <= F_c[s] + F_r[s], g >= 0, g >= P,
                g <= cp.multiply(np.where(lo >= 0, 1.0, chord), P - np.where(lo >= 0, 0.0, lo))]
        for j in set(range(len(C))) - {k}:
            lp = cp.Problem(cp.Minimize((C[k] - C[j]) @ g + c[k] - c[j]), cons)
            lp.solve()
            assert M[s, j] <= lp.value + 1e-6, (s, j, M[s, j], lp.value)


@pytest.mark.parametrize("kind", ["dense", "weighted", "conv"])
@pytest.mark.parametrize("kappa", [1.0, 0.3])
def test_loss_gradients_match_finite_differences(rng, kind, kappa):
    model = _conv(rng) if kind == "conv" else _dense(rng, weighted=kind == "weighted")
    U = rng.normal(size=(3, model.n_in))
    y = np.array([0, 1, 2])
    loss = lambda: model.certified_loss_and_grad(U, y, U - 0.1, U + 0.2, kappa, **TIGHT)[0]  # noqa: E731
    _, grads = model.certified_loss_and_grad(U, y, U - 0.1, U + 0.2, kappa, **TIGHT)
    assert set(grads) == set(model.params()) >= {"H", "h"}
    for name, P in model.params().items():
        np.testing.assert_allclose(grads[name], finite_difference(loss, P), rtol=1e-5, atol=1e-8, err_msg=name)
    dU = model.input_grad(U, y, **TIGHT)
    np.testing.assert_allclose(dU, finite_difference(lambda: model.loss_and_grad(U, y, **TIGHT)[0], U),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["dense", "weighted", "conv", "float32"])
def test_interval_margins_hold_for_every_input_of_the_box(rng, kind):
    if kind == "conv":
        model = _conv(rng)
    else:
        model = _dense(rng, weighted=kind == "weighted", n=20, p=12, mu=0.9,
                       dtype=np.float32 if kind == "float32" else np.float64)
    exact = model
    if kind == "float32":   # the bounds hold for the exact model of the stored float32 parameters
        exact = _dense(rng, n=20, p=12, mu=0.9)
        for k, v in model.params().items():
            setattr(exact, k, v.astype(np.float64))
    U = rng.normal(size=(12, model.n_in))
    labels = rng.integers(0, model.n_out, size=12)
    for eps in (0.0, 0.05, 0.3):
        M, _ = model.interval_margins(U - eps, U + eps, labels)
        for V in box_samples(rng, U - eps, U + eps, 40):
            Y = exact.logits(V, **EXACT)
            assert np.all(M <= Y[np.arange(12), labels][:, None] - Y)


@pytest.mark.parametrize("kind", ["dense", "weighted", "conv"])
def test_lipschitz_bound_holds_and_its_subgradient_is_the_gradient(rng, kind):
    model = _conv(rng) if kind == "conv" else _dense(rng, weighted=kind == "weighted", n=10, p=6)
    L = lipschitz_bound(model)
    U = rng.normal(size=(200, model.n_in))
    V = U + rng.uniform(-0.01, 0.01, size=U.shape)
    ratio = (np.abs(model.logits(U, **EXACT) - model.logits(V, **EXACT)).max(axis=1)
             / np.abs(U - V).max(axis=1))
    assert ratio.max() <= L
    value, grads = lipschitz_bound_and_grad(model)
    assert value == L and "H" in grads
    for name in ("B", "C", "H"):
        P = getattr(model, name)
        np.testing.assert_allclose(grads[name], finite_difference(lambda: lipschitz_bound(model), P),
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    smooth, smooth_grads = smooth_lipschitz_bound_and_grad(model)
    assert smooth >= L * (1 - max(model.mu_inf(), 0)) / (1 - max(model.gamma, 0)) and "H" in smooth_grads
    for name in ("B", "C", "H"):
        P = getattr(model, name)
        np.testing.assert_allclose(smooth_grads[name],
                                   finite_difference(lambda: smooth_lipschitz_bound_and_grad(model)[0], P),
                                   rtol=1e-5, atol=1e-7, err_msg=name)


def test_certificates_are_sound_and_combined_certifies_no_fewer(rng):
    model = _dense(rng, n=20, p=12, mu=0.5)
    model.B *= 0.2
    model.metadata.update(mean=0.5, std=0.5)
    pixels = rng.random((100, 5))
    labels = model.predict(to_inputs(model, pixels))
    counts = {}
    for eps in (0.002, 0.02):
        got = {name: certify(model, pixels, labels, eps, name) for name in CERTIFICATES}
        for name, result in got.items():
            for _ in range(20):   # no point of the ball beats a certified margin bound
                V = to_inputs(model, np.clip(pixels + rng.uniform(-eps, eps, pixels.shape), 0, 1), np.float64)
                Y = model.logits(V, **EXACT)
                assert np.all(result.margins <= Y[np.arange(100), labels][:, None] - Y + 1e-12)
        assert np.all(got["combined"].certified >= got["interval"].certified)
        assert np.all(got["combined"].certified >= got["lipschitz"].certified)
        counts[eps] = {name: int(r.certified.sum()) for name, r in got.items()}
    assert counts[0.002]["lipschitz"] > 0 and counts[0.002]["interval"] > 0, counts


def test_save_and_load_keep_the_layer_and_mark_the_file(rng, tmp_path):
    for model in (_dense(rng), _conv(rng)):
        path = tmp_path / "model.npz"
        model.save(path)
        loaded = load_model(path)
        assert loaded.readout_hidden == model.readout_hidden and repr(loaded) == repr(model)
        U = rng.normal(size=(4, model.n_in))
        np.testing.assert_array_equal(loaded.logits(U, **EXACT), model.logits(U, **EXACT))
        assert int(np.load(path)["version"]) == 2
    linear = NEMON(4, 5, 3, gamma=0.5)
    linear.save(tmp_path / "linear.npz")
    assert int(np.load(tmp_path / "linear.npz")["version"]) == 1 and load_model(tmp_path / "linear.npz").H is None
    arrays = dict(np.load(path))
    arrays["H"] = arrays["H"][:, :-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="hidden read-out layer's shapes"):
        load_model(tmp_path / "bad.npz")


@pytest.mark.parametrize("width", [-1, 2.5, "3", True])
def test_bad_widths_are_one_line_errors(width):
    with pytest.raises(ValueError, match="readout_hidden must be a whole number >= 0"):
        NEMON(4, 5, 3, readout_hidden=width)
    with pytest.raises(ValueError, match="readout_hidden must be a whole number >= 0"):
        ConvNEMON(1, (4, 4), channels=2, pool=2, readout_hidden=width)


def test_cli_trains_a_model_with_a_hidden_read_out_layer(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(["--dataset", "mnist", "--data-dir", str(shared_data), "--readout-hidden", "32",
                       "--hidden", "100", "--epochs", "4", "--limit-train", "10000", "--certify-samples", "300",
                       "--certified-eps", "0.05", "--eps-ramp", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    model = load_model(out / "model.npz")
    assert model.readout_hidden == 32 and model.H.shape == (32, 100) and model.C.shape == (10, 32)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["test_acc"] > 0.8 and summary["test_certified_acc"] > 0.2, summary   # 87.6 / 41.0% measured
    assert "readout_hidden=32" in capsys.readouterr().out


@pytest.mark.parametrize("image_shape", [None, (1, 4, 4)])
@pytest.mark.parametrize("readout_hidden", [0, 5])
def test_explicit_twin_gradients_match_finite_differences(rng, image_shape, readout_hidden):
    """The explicit baseline of benchmarks/bench_certified.py, with and without the hidden read-out layer."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from explicit_ibp import ExplicitNet
    net = ExplicitNet(16, 3, 4, seed=1, dtype=np.float64, image_shape=image_shape, kernel=3, pool=2,
                      readout_hidden=readout_hidden)
    for k in net.params:   # no zero biases: every relu is away from its kink
        net.params[k] += 0.1 * rng.normal(size=net.params[k].shape)
    U = rng.normal(size=(3, 16))
    y = np.array([0, 1, 3])
    loss = lambda: net.loss_and_grad(U, y, U - 0.1, U + 0.2, 0.3)[0]  # noqa: E731
    _, grads = net.loss_and_grad(U, y, U - 0.1, U + 0.2, 0.3)
    assert set(grads) == set(net.params) == ({"B", "b", "C", "c"} | ({"H", "h"} if readout_hidden else set()))
    for name, P in net.params.items():
        np.testing.assert_allclose(grads[name], finite_difference(loss, P), rtol=1e-5, atol=1e-8, err_msg=name)
    twin = net.as_nemon()
    M, _ = twin.interval_margins(U - 0.1, U + 0.2, y)   # the twin is certified by the library's sound bounds
    assert twin.readout_hidden == readout_hidden and np.all(np.isfinite(M))

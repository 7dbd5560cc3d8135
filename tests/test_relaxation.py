"""Linear-relaxation (CROWN) certificates: the Lagrangian relu bound for any multipliers, sound
margins through the unrolled fixed point (sampled inputs, exact solves), never below the interval
margins, and the conv path equal to the same model written as a dense NEMON."""
import numpy as np
import pytest

from nemon_np import ConvNEMON
from nemon_np.certificates import certify
from nemon_np.conv import mu_inf_conv
from nemon_np.pixels import to_inputs
from nemon_np.relaxation import crown_multipliers, relu_offsets, relu_relaxation, relu_relaxation_grad
from conftest import EXACT, box_samples, conv_as_dense, finite_difference, random_model


def test_the_relu_bound_holds_for_any_multipliers_and_zero_gives_intervals(rng):
    V = rng.normal(size=(5, 30))
    lo = rng.normal(size=30)
    hi = lo + rng.uniform(0, 2, size=30)
    for lam in (rng.normal(size=V.shape), crown_multipliers(V, lo, hi), np.zeros_like(V)):
        bound = (relu_offsets(V, lam, lo, hi)).sum(axis=1)
        for Z in box_samples(rng, lo, hi, 200):   # v . relu(z) >= lam . z + sum kappa
            assert np.all(V @ np.maximum(Z, 0) >= lam @ Z + bound - 1e-12)
        ends = np.stack([lo, hi, np.clip(0, lo, hi)])   # the minimum is attained at one of these
        assert np.allclose(bound, np.sum(np.min(V[:, None, :] * np.maximum(ends, 0) - lam[:, None, :] * ends,
                                                axis=1), axis=1))
    interval = np.minimum(V * np.maximum(lo, 0), V * np.maximum(hi, 0)).sum(axis=1)
    np.testing.assert_allclose(relu_offsets(V, 0 * V, lo, hi).sum(axis=1), interval)


def test_the_training_relu_relaxation_is_crowns_and_its_gradient_matches_finite_differences(rng):
    """relu_relaxation's closed form equals crown_multipliers and relu_offsets; its gradient (away from
    the kinks at lo = 0, hi = 0 and V = 0, which random draws avoid) matches central differences."""
    V = rng.normal(size=(3, 4, 25))
    lo = rng.normal(size=(3, 1, 25))
    hi = lo + rng.uniform(0.1, 2, size=(3, 1, 25))
    lam, kappa = relu_relaxation(V, lo, hi)
    np.testing.assert_allclose(lam, crown_multipliers(V, lo, hi), rtol=1e-15)
    np.testing.assert_allclose(kappa, relu_offsets(V, crown_multipliers(V, lo, hi), lo, hi), rtol=1e-12, atol=1e-15)
    assert np.any(kappa < 0) and np.any((lam != 0) & (lam != V))   # chord units are in the draw
    dlam, dkappa = rng.normal(size=V.shape), rng.normal(size=V.shape)

    def objective():
        lam, kappa = relu_relaxation(V, lo, hi)
        return np.sum(dlam * lam + dkappa * kappa)
    dV, dlo, dhi = relu_relaxation_grad(V, lo, hi, dlam, dkappa)
    np.testing.assert_allclose(dV, finite_difference(objective, V), atol=1e-7)
    np.testing.assert_allclose(dlo, finite_difference(objective, lo), atol=1e-7)
    np.testing.assert_allclose(dhi, finite_difference(objective, hi), atol=1e-7)
    # dkappa broadcast along the rows, as the layers pass it, gives the same gradient
    dkappa_rows = rng.normal(size=(3, 4, 1))
    full = relu_relaxation_grad(V, lo, hi, dlam, np.broadcast_to(dkappa_rows, V.shape).copy())
    for a, b in zip(relu_relaxation_grad(V, lo, hi, dlam, dkappa_rows), full):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    lam32, kappa32 = relu_relaxation(V.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32))
    assert lam32.dtype == kappa32.dtype == np.float32   # training stays in the model's dtype


def _dense(rng, kind, readout_hidden):
    eta = rng.uniform(0.5, 2, size=16) if kind == "weighted" else None
    dtype = np.float32 if kind == "float32" else np.float64
    return random_model(6, 16, 4, 0.7, seed=5, weights=eta, readout_hidden=readout_hidden, dtype=dtype)


def _conv(rng, readout_hidden, dtype=np.float64):
    model = ConvNEMON(2, (4, 4), channels=3, kernel=3, n_out=4, pool=2, gamma=0.9, seed=1, dtype=dtype,
                      readout_hidden=readout_hidden)
    K = rng.normal(size=model.K.shape)
    model.K = (K * 0.6 / mu_inf_conv(np.abs(K))).astype(dtype)
    model.b = (0.3 * rng.normal(size=3)).astype(dtype)
    return model


@pytest.mark.parametrize("kind", ["dense", "weighted", "float32", "conv"])
@pytest.mark.parametrize("readout_hidden", [0, 7])
def test_relaxed_margins_are_sound_and_never_below_the_interval_margins(rng, kind, readout_hidden):
    model = _conv(rng, readout_hidden) if kind == "conv" else _dense(rng, kind, readout_hidden)
    exact = model
    if kind == "float32":   # the bounds hold for the exact model of the stored float32 parameters
        exact = _dense(rng, "dense", readout_hidden)
        for k, v in model.params().items():
            setattr(exact, k, v.astype(np.float64))
    U = rng.normal(size=(10, model.n_in))
    labels = rng.integers(0, model.n_out, size=10)
    rows = np.arange(10)
    gains = 0
    for eps in (0.0, 0.05, 0.3):
        interval, _ = model.interval_margins(U - eps, U + eps, labels)
        M, _ = model.relaxed_margins(U - eps, U + eps, labels, steps=3)
        assert np.all(M >= interval)
        gains += np.sum(M > interval + 1e-9)
        for V in box_samples(rng, U - eps, U + eps, 30):
            Y = exact.logits(V, **EXACT)
            assert np.all(M <= Y[rows, labels][:, None] - Y)
    assert gains > 0   # the relaxation is tighter somewhere: the comparison above is not vacuous


def test_more_steps_never_lower_the_bound_and_steps_are_checked(rng):
    model = _dense(rng, "dense", 7)
    U = rng.normal(size=(20, model.n_in))
    labels = model.predict(U)
    previous = None
    for steps in range(4):
        M, _ = model.relaxed_margins(U - 0.1, U + 0.1, labels, steps=steps)
        assert previous is None or np.all(M >= previous)
        previous = M
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        model.relaxed_margins(U, U, labels, steps=-1)


@pytest.mark.parametrize("readout_hidden", [0, 5])
def test_conv_relaxed_margins_equal_the_same_model_written_densely(rng, readout_hidden):
    conv = _conv(rng, readout_hidden)
    dense = conv_as_dense(conv)
    U = rng.normal(size=(6, conv.n_in))
    np.testing.assert_allclose(conv.logits(U, **EXACT), dense.logits(U, **EXACT), atol=1e-9)
    labels = conv.predict(U)
    for steps in (0, 2):
        M_conv, _ = conv.relaxed_margins(U - 0.1, U + 0.1, labels, steps=steps, tol=1e-12)
        M_dense, _ = dense.relaxed_margins(U - 0.1, U + 0.1, labels, steps=steps, tol=1e-12)
        np.testing.assert_allclose(M_conv, M_dense, rtol=0, atol=1e-8)


def test_crown_certificate_is_sound_and_certifies_no_fewer_than_interval(rng):
    model = _dense(rng, "dense", 7)
    model.metadata.update(mean=0.5, std=0.5)
    pixels = rng.random((100, 6))
    labels = model.predict(to_inputs(model, pixels))
    for eps in (0.01, 0.05):
        crown, interval = certify(model, pixels, labels, eps, "crown"), certify(model, pixels, labels, eps, "interval")
        assert np.all(crown.certified >= interval.certified) and np.all(crown.margins >= interval.margins)
        for _ in range(20):
            V = to_inputs(model, np.clip(pixels + rng.uniform(-eps, eps, pixels.shape), 0, 1), np.float64)
            Y = model.logits(V, **EXACT)
            assert np.all(crown.margins <= Y[np.arange(100), labels][:, None] - Y)

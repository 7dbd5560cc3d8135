"""Warm starts across epochs (issue #27): any start reaches the same fixed point and box, the trainer
stores and reuses each sample's, and fewer iterations follow on real training."""
import json

import numpy as np
import pytest

from nemon_np.interval import embed
from nemon_np.solvers import solve_equilibrium
from nemon_np.training import TrainConfig, Trainer, config_from_dict
from nemon_np.warm_starts import WarmStarts

from conftest import random_model


def _direct_fixed_point(A, Q, X):
    """x = D (A x + q) solved exactly, D the activation pattern of X: (I - D A) x = D q per sample."""
    out = np.empty_like(X)
    for i, (q, x) in enumerate(zip(Q, X)):
        D = np.diag((x @ A.T + q > 0).astype(float))
        out[i] = np.linalg.solve(np.eye(len(q)) - D @ A, D @ q)
    return out


@pytest.mark.parametrize("mu", [0.5, 0.95])
def test_any_start_reaches_the_direct_solution(rng, mu):
    """From zero, from a random start and from a nearby one, the forward solve ends within tol / (1 - mu)
    of the exact fixed point (the activation pattern's linear system); the near start takes fewer steps."""
    model = random_model(12, 30, 3, mu, seed=3)
    U = rng.normal(size=(40, 12))
    Q = U @ model.B.T + model.b
    tol = 1e-10
    cold, info_cold = solve_equilibrium(model.A, Q, tol=tol)
    exact = _direct_fixed_point(model.A, Q, cold)
    bound = tol / (1 - mu) + 1e-12
    for X0 in (10 * rng.normal(size=Q.shape), exact + 1e-3 * rng.normal(size=Q.shape)):
        X, info = solve_equilibrium(model.A, Q, tol=tol, X0=X0)
        assert np.abs(X - exact).max() <= bound
    assert info.iterations.mean() < info_cold.iterations.mean()


def test_a_warm_embedded_box_is_the_formed_embedded_networks(rng):
    """The embedded network solved from a start near its box equals the formed 2n x 2n embedded network
    solved from zero, within the error bound."""
    model = random_model(8, 20, 3, 0.8, seed=4)
    U_c, U_r = rng.normal(size=(25, 8)), 0.1 * rng.random((25, 8))
    tol = 1e-10
    reference, _ = solve_equilibrium(embed(model.A), model._embedded_injection(U_c, U_r, model.B, model.b), tol=tol)
    start = reference + 0.01 * rng.normal(size=reference.shape)
    X, _ = model.embedded_box(U_c, U_r, tol, 500, "average", X0=start)
    assert np.abs(X - reference).max() <= 2 * tol / (1 - 0.8)


def test_the_certified_step_takes_its_starts_and_returns_its_states(rng):
    """Trainer.step with starts uses them (fewer iterations from the cold step's own solution), returns
    the fixed points and the box it solved, and computes the same loss and gradients to the tolerance."""
    cfg = TrainConfig(model="nemon", hidden=20, dtype="float64", tol=1e-10, certified_eps=0.1, eps_ramp=1,
                      epochs=2, warm_start=True)
    X, y = rng.normal(size=(30, 16)), rng.integers(0, 4, 30)
    trainer = Trainer(cfg, 16, 4)
    snapshot = {k: v.copy() for k, v in trainer.model.params().items()}

    def step(starts):
        for k, v in snapshot.items():
            trainer.model.params()[k][...] = v
        return trainer.step(X, y, 0.0, eps=0.1, kappa=0.5, starts=starts)

    cold = step(None)
    assert cold["state"].shape == (30, 20) and cold["box"].shape == (30, 40)
    warm = step((cold["state"], cold["box"]))
    assert np.abs(warm["state"] - cold["state"]).max() < 1e-8 and np.abs(warm["box"] - cold["box"]).max() < 1e-8
    assert warm["fwd"].max() <= 1 and warm["emb_fwd"].max() <= 1 < cold["emb_fwd"].mean()
    assert warm["loss"] == pytest.approx(cold["loss"], rel=1e-8)


def test_the_store_keeps_rows_by_sample():
    warm = WarmStarts(5)
    assert warm.starts([0, 1]) == (None, None) and warm.arrays() == {}
    warm.update([3, 1], np.array([[1.0, 2.0], [3.0, 4.0]]))
    X0, box0 = warm.starts([1, 3, 0])
    assert np.array_equal(X0, [[3.0, 4.0], [1.0, 2.0], [0.0, 0.0]]) and box0 is None
    warm.update([0], np.ones((1, 2)), np.full((1, 4), 7.0))
    again = WarmStarts.from_arrays(warm.arrays())
    assert again.n_samples == 5
    for a, b in zip(again.starts([0, 1, 3]), warm.starts([0, 1, 3])):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="rows of shape"):
        warm.update([2], np.ones((1, 3)))
    with pytest.raises(ValueError, match="unequal lengths"):
        WarmStarts.from_arrays({"states": np.ones((5, 2)), "boxes": np.ones((4, 4))})


def test_defaults_and_bad_settings():
    """On by default for certified dense nemon runs only; elsewhere a one-line error; a stored config
    from before warm starts resumes without them."""
    assert TrainConfig(certified_eps=0.1).validate().warm_start is True
    assert TrainConfig().validate().warm_start is False
    assert TrainConfig(model="conv", certified_eps=0.1).validate().warm_start is False
    assert TrainConfig(certified_eps=0.1, warm_start=False).validate().warm_start is False
    for bad in (dict(model="conv"), dict(arch="dense6,relu,nemon5"), dict(model="mondeq")):
        with pytest.raises(ValueError, match="warm_start keeps every training sample's fixed point") as e:
            TrainConfig(warm_start=True, **bad).validate()
        assert "\n" not in str(e.value)
    stored = json.loads(json.dumps(vars(TrainConfig(certified_eps=0.1).validate())))
    del stored["warm_start"]
    assert config_from_dict(stored).validate().warm_start is False


def test_warm_starts_cut_the_iterations_of_real_certified_training(shared_data):
    """Certified training on real MNIST with and without warm starts: the same losses to float rounding
    (the solves agree to the tolerance), fewer forward and embedded iterations in the last epoch, where
    the learning rate has come down (measured: 2.0 against 2.7 forward, 1.9 against 2.5 embedded)."""
    from nemon_np.data import load_dataset, normalize
    data = load_dataset("mnist", shared_data)
    X = normalize(data.train_images[:2000], data.mean, data.std, np.float32)
    y = data.train_labels[:2000]
    runs = {}
    for warm in (True, False):
        cfg = TrainConfig(hidden=100, epochs=6, eps_warmup=1, eps_ramp=1, certified_eps=0.1, warm_start=warm)
        trainer = Trainer(cfg, 784, 10)
        trainer.model.metadata.update(dataset="mnist", mean=np.array(data.mean), std=np.array(data.std))
        runs[warm] = trainer.fit(X, y, progress=False).history
    for w, c in zip(runs[True], runs[False]):
        assert w["train_loss"] == pytest.approx(c["train_loss"], rel=0.02)
    last_w, last_c = runs[True][-1], runs[False][-1]
    assert last_w["fwd_iter_mean"] < 0.85 * last_c["fwd_iter_mean"]
    assert last_w["embedded_fwd_iter_mean"] < 0.85 * last_c["embedded_fwd_iter_mean"]

"""Certified (interval) training: schedule, settings, and what it buys on real MNIST."""
import json

import numpy as np
import pytest

from nemon_np import train
from nemon_np.certificates import certify
from nemon_np.data import load_mnist, normalize
from nemon_np.pixels import to_inputs
from nemon_np.robustness import _as_float64, attack
from nemon_np.training import TrainConfig, Trainer
from conftest import box_samples


def test_schedule_warms_up_ramps_and_holds():
    cfg = TrainConfig(certified_eps=0.1, epochs=10, eps_warmup=1, eps_ramp=4, kappa=0.5).validate()
    assert cfg.gamma == 0.5 and cfg.train_eps_factor == 1.2          # the certified defaults
    assert cfg.certified_schedule(0.5) == (0.0, 1.0)
    eps, kappa = cfg.certified_schedule(3.0)                          # half-way up the ramp
    assert eps == pytest.approx(0.06) and kappa == pytest.approx(0.75)
    assert cfg.certified_schedule(7.0) == pytest.approx((0.12, 0.5))
    assert TrainConfig().validate().certified_schedule(5) == (0.0, 1.0)
    assert TrainConfig().validate().gamma == 0.95                     # clean training keeps its defaults


@pytest.mark.parametrize("settings, message", [
    (dict(model="mondeq", certified_eps=0.1), "certified_eps needs interval bounds"),
    (dict(constraint="none", certified_eps=0.1), "certified_eps needs interval bounds"),
    (dict(certified_eps=0.1, epochs=5, eps_ramp=10), "exceeds epochs"),
    (dict(certified_eps=-0.1), "certified_eps must be"),
    (dict(certified_eps=0.1, kappa=1.5), "kappa must lie"),
    (dict(certified_eps=0.1, train_eps_factor=0), "train_eps_factor"),
])
def test_bad_certified_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).validate()


@pytest.fixture(scope="module")
def trained_pair(shared_data):
    """The same small float32 model trained clean and with certified training at eps 0.1."""
    d = load_mnist(shared_data, download=False)
    X, y = normalize(d.train_images[:6000], d.mean, d.std), d.train_labels[:6000]
    models = {}
    for name, eps in (("clean", 0.0), ("certified", 0.1)):
        cfg = TrainConfig(hidden=40, epochs=4, certified_eps=eps, eps_warmup=0, eps_ramp=2, gamma=0.5, seed=1)
        trainer = Trainer(cfg, 784, 10)
        trainer.model.metadata.update(mean=np.array(d.mean), std=np.array(d.std))
        trainer.fit(X, y, progress=False)
        models[name] = trainer
    pixels = d.test_images[:300].reshape(300, -1) / 255.0
    return models, pixels, d.test_labels[:300]


def test_certified_training_certifies_what_clean_training_does_not(trained_pair):
    models, pixels, labels = trained_pair
    clean = certify(models["clean"].model, pixels, labels, 0.1).certified_accuracy
    robust = certify(models["certified"].model, pixels, labels, 0.1).certified_accuracy
    assert robust > 0.3 and robust > clean + 0.25, (clean, robust)
    history = models["certified"].history
    assert history[-1]["eps"] == pytest.approx(0.12) and history[-1]["kappa"] == pytest.approx(0.5)
    assert history[-1]["train_robust_loss"] > 0 and history[-1]["embedded_fwd_iter_mean"] > 0


def test_pgd_never_breaks_a_certified_point(trained_pair):
    """Attacks on the exact model (the float32 parameters evaluated in float64 to 1e-10): every point
    the interval certificate certifies keeps its label under PGD, FGSM and noise at that radius."""
    models, pixels, labels = trained_pair
    model = models["certified"].model
    exact = _as_float64(model)
    options = dict(tol=1e-10, max_iter=5000, method="average", adjoint="iterative")
    for eps in (0.05, 0.1):
        cert = certify(model, pixels, labels, eps).certified
        assert cert.sum() > 50
        for kind in ("pgd", "fgsm", "noise"):
            adv = attack(exact, pixels[cert], labels[cert], eps, kind, steps=20, options=options)
            assert np.all(exact.predict(to_inputs(exact, adv), tol=1e-10, max_iter=5000) == labels[cert]), kind


def test_cli_certified_training_reports_certified_accuracy(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data-dir", str(shared_data), "--limit-train", "2000", "--hidden", "20", "--epochs", "2",
                       "--certified-eps", "0.1", "--eps-warmup", "0", "--eps-ramp", "1", "--certify-samples", "200",
                       "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "certified training at eps 0.1" in text and "certified@0.1 (first 200)" in text and "interval bounds" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["test_certified_samples"] == 200
    assert 0 <= metrics["summary"]["test_certified_acc"] <= metrics["summary"]["test_acc"] + 0.05
    assert metrics["config"]["train_eps_factor"] == 1.2


def test_conv_certified_training_runs(shared_data, tmp_path):
    out = tmp_path / "conv"
    assert train.main(["--data-dir", str(shared_data), "--model", "conv", "--channels", "4", "--pool", "4",
                       "--limit-train", "300", "--epochs", "2", "--certified-eps", "0.1", "--eps-warmup", "0",
                       "--eps-ramp", "1", "--certify-samples", "50", "--out", str(out), "--no-progress"]) == 0
    last = json.loads((out / "metrics.json").read_text())["epochs"][-1]
    assert last["eps"] == pytest.approx(0.12) and last["test_certified_samples"] == 50
    assert last["embedded_fwd_iter_mean"] > 0


def test_trained_model_bounds_hold_for_thousands_of_inputs(trained_pair):
    """On the certified-trained model: 2,000 inputs of the pixel balls (corners and interior points) have
    their exact fixed points inside the interval bounds."""
    models, pixels, labels = trained_pair
    model = models["certified"].model
    exact = _as_float64(model)
    from nemon_np.pixels import input_box
    rng = np.random.default_rng(0)
    P = pixels[:20]
    U_lo, U_hi = input_box(model, P, 0.1)
    X_lo, X_hi, _ = model.interval_bounds(U_lo, U_hi)
    for V in box_samples(rng, U_lo, U_hi, 100):
        X, _ = exact.equilibrium(V, tol=1e-12, max_iter=20_000)
        assert np.all(X_lo <= X) and np.all(X <= X_hi)


@pytest.mark.parametrize("constraint", ["projection", "parametrization", "weighted", "norm"])
def test_certified_training_in_every_l_inf_constraint_mode(shared_data, constraint):
    d = load_mnist(shared_data, download=False)
    X, y = normalize(d.train_images[:1000], d.mean, d.std), d.train_labels[:1000]
    cfg = TrainConfig(hidden=20, epochs=2, certified_eps=0.05, eps_warmup=0, eps_ramp=1, constraint=constraint)
    trainer = Trainer(cfg, 784, 10)
    trainer.model.metadata.update(mean=np.array(d.mean), std=np.array(d.std))
    trainer.fit(X, y, progress=False)
    assert trainer.model.mu_inf() <= cfg.gamma + 1e-9
    assert trainer.history[-1]["train_robust_loss"] > 0
    pixels = d.test_images[:100].reshape(100, -1) / 255.0
    assert 0 <= certify(trainer.model, pixels, d.test_labels[:100], 0.05).certified_accuracy <= 1

import json
from dataclasses import asdict

import numpy as np
import pytest

import nemon_np
from nemon_np import mu_inf
from nemon_np.data import normalize
from nemon_np.models import NEMON
from nemon_np.optim import Adam, _adam_update, adam_update_reference, learning_rate
from nemon_np.lipschitz import lipschitz_bound, lipschitz_bound_and_grad
from nemon_np.losses import softmax_cross_entropy
from nemon_np.training import TrainConfig, Trainer
from conftest import finite_difference, random_model


@pytest.fixture(scope="module")
def mnist_arrays(mnist_data):
    d = mnist_data
    return (normalize(d.train_images[:4000], d.mean, d.std), d.train_labels[:4000],
            normalize(d.test_images[:2000], d.mean, d.std), d.test_labels[:2000])


def test_adam_kernel_matches_reference(rng):
    for dtype in (np.float32, np.float64):
        p, g, m, v = (rng.normal(size=500).astype(dtype) for _ in range(4))
        v = np.abs(v)
        ref = [a.copy() for a in (p, g, m, v)]
        args = tuple(dtype(x) for x in (0.9, 0.999, 1e-3, 1e-8))
        _adam_update(p, g, m, v, *args)
        adam_update_reference(*ref, *args)
        for a, b in zip((p, m, v), (ref[0], ref[2], ref[3])):
            # a few ulps of the O(1) entries: the kernel may fuse b1 m + (1 - b1) g into one
            # rounding (fastmath), which matters where the two terms cancel
            ulp = np.finfo(dtype).eps
            np.testing.assert_allclose(a, b, rtol=8 * ulp, atol=8 * ulp * np.abs(b).max())


def test_cross_entropy_matches_scipy_and_finite_differences(rng):
    from scipy.special import log_softmax
    Y = rng.normal(scale=3.0, size=(7, 5))
    Y[0] += 800.0   # exp overflows without the shift by the row maximum
    labels = rng.integers(0, 5, size=7)
    loss, dY = softmax_cross_entropy(Y, labels)
    assert loss == pytest.approx(-log_softmax(Y, axis=1)[np.arange(7), labels].mean(), rel=1e-13)
    fd = finite_difference(lambda: softmax_cross_entropy(Y, labels)[0], Y, h=1e-5)
    np.testing.assert_allclose(dY, fd, atol=1e-8)
    assert softmax_cross_entropy(Y.astype(np.float32), labels)[1].dtype == np.float32


def test_adam_minimizes_a_quadratic():
    target = np.array([3.0, -2.0])
    x = {"x": np.zeros(2)}
    opt = Adam(lr=0.1)
    for _ in range(500):
        opt.step(x, {"x": 2 * (x["x"] - target)})
    np.testing.assert_allclose(x["x"], target, atol=1e-3)


def test_learning_rate_schedules():
    assert learning_rate("constant", 0.1, 0.7) == 0.1
    assert learning_rate("cosine", 0.1, 0.0) == pytest.approx(0.1)
    assert learning_rate("cosine", 0.1, 0.5) == pytest.approx(0.05)
    assert learning_rate("cosine", 0.1, 1.0) == pytest.approx(0.0)
    assert [learning_rate("step", 1.0, p) for p in (0.1, 0.3, 0.6, 0.99)] == pytest.approx([1, 0.1, 0.01, 0.001])
    with pytest.raises(ValueError, match="schedule"):
        learning_rate("linear", 0.1, 0.5)


@pytest.mark.parametrize("weighted", [False, True])
def test_lipschitz_subgradient_matches_finite_differences(rng, weighted):
    eta = rng.uniform(0.5, 2, size=6) if weighted else None
    model = random_model(5, 6, 3, 0.6, seed=7, weights=eta)
    model.A = 0.05 * rng.normal(size=(6, 6)) + 0.3 * np.eye(6)   # distinct row measures: no ties at the max
    assert 0 < model.mu_inf() < 1
    _, grads = lipschitz_bound_and_grad(model)
    for name in ("A", "B", "C"):
        fd = finite_difference(lambda: lipschitz_bound(model), getattr(model, name), h=1e-7)
        np.testing.assert_allclose(grads[name], fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())


@pytest.mark.parametrize("constraint", ["projection", "parametrization", "weighted", "norm"])
def test_training_on_real_mnist_learns_and_stays_well_posed(mnist_arrays, constraint, tmp_path):
    X, y, Xt, yt = mnist_arrays
    config = TrainConfig(hidden=40, epochs=3, gamma=0.9, constraint=constraint, lr=2e-3, seed=1)
    trainer = Trainer(config, 784, 10).fit(X, y, Xt, yt, progress=False)
    h = trainer.history
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["test_acc"] > 0.85                       # 10% is chance
    model = trainer.model
    path = tmp_path / "m.npz"
    model.save(path)
    saved = NEMON.load(path)
    assert saved.mu_inf() <= 0.9 + 1e-12
    if constraint == "weighted":
        assert saved.weights is not None and np.ptp(np.log(saved.weights)) > 0   # weights were learned
    # The logged train accuracy is that of the batches seen; the test one matches a fresh evaluation.
    assert np.mean(saved.predict(Xt, tol=1e-4) == yt) == pytest.approx(h[-1]["test_acc"], abs=2e-3)


def test_diagonal_floor_holds_through_training_and_keeps_alpha_star(mnist_arrays):
    """Without the floor, training drives diagonal entries below zero (alpha* < 1); with
    min_diagonal=0 every a_ii stays >= 0, so alpha* = 1, with mu_inf(A) <= gamma."""
    X, y, Xt, yt = mnist_arrays
    for floor in (None, 0.0):
        config = TrainConfig(hidden=40, epochs=3, gamma=0.9, lr=2e-3, seed=1, min_diagonal=floor)
        trainer = Trainer(config, 784, 10).fit(X, y, Xt, yt, progress=False)
        model = trainer.model
        assert model.mu_inf() <= 0.9 + 1e-12 and trainer.history[-1]["test_acc"] > 0.83
        assert trainer.history[-1]["alpha_star"] == nemon_np.contraction_alpha(model.A) == model.alpha_star()
        if floor is None:
            assert np.diag(model.A).min() < 0 and model.alpha_star() < 1
        else:
            assert np.diag(model.A).min() >= 0 and model.alpha_star() == 1


def test_mondeq_and_unconstrained_training(mnist_arrays):
    X, y, Xt, yt = mnist_arrays
    config = TrainConfig(hidden=30, epochs=2, gamma=0.3, constraint="mondeq", solver="peaceman-rachford",
                         adjoint="direct", lr=3e-3, seed=3)
    trainer = Trainer(config, 784, 10).fit(X, y, Xt, yt, progress=False)
    assert nemon_np.mu_2(trainer.model.A) <= 0.3 + 1e-9 and trainer.history[-1]["test_acc"] > 0.8
    free = Trainer(TrainConfig(hidden=30, epochs=2, constraint="none", adjoint="direct", lr=3e-3, seed=3),
                   784, 10).fit(X, y, Xt, yt, progress=False)
    assert 0 <= free.history[-1]["fwd_converged_frac"] <= 1 and free.history[-1]["test_acc"] > 0.8


def test_lipschitz_regularization_lowers_the_bound(mnist_arrays):
    X, y, Xt, yt = mnist_arrays
    bounds = []
    for reg in (0.0, 1e-2):
        config = TrainConfig(hidden=30, epochs=2, gamma=0.5, lipschitz_reg=reg, seed=2)
        history = Trainer(config, 784, 10).fit(X, y, progress=False).history
        bounds.append(history[-1]["lipschitz_bound"])
        assert history[-1]["train_acc"] > 0.75
    assert bounds[1] < 0.6 * bounds[0]


def test_cli_trains_writes_outputs_and_evaluates(shared_data, tmp_path, capsys):
    from nemon_np import evaluate, train
    out = tmp_path / "run"
    rc = train.main(["--data-dir", str(shared_data), "--epochs", "2", "--limit-train", "3000", "--hidden", "30",
                     "--out", str(out), "--no-progress", "--constraint", "weighted", "--gamma", "0.8"])
    assert rc == 0
    for name in ("model.npz", "metrics.json", "metrics.csv", "training_curves.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["summary"]["verified"]
    assert metrics["config"]["constraint"] == "weighted"
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train_loss", "test_acc", "mu_inf", "lipschitz_bound", "fwd_iter_mean", "bwd_iter_max",
                "epoch_seconds", "train_cpu_seconds"):
        assert col in header
    for row in metrics["epochs"]:   # a clock of its own: this process's CPU, not the wall's
        assert 0 < row["train_cpu_seconds"] < 10 * row["epoch_seconds"] and row["train_seconds"] < row["epoch_seconds"]
    model = NEMON.load(out / "model.npz")
    assert model.metadata["dataset"] == "mnist" and model.weights is not None
    capsys.readouterr()
    assert evaluate.main([str(out), "--data-dir", str(shared_data)]) == 0
    report = capsys.readouterr().out
    assert f"test accuracy   {100 * metrics['epochs'][-1]['test_acc']:.2f}%" in report   # the run's own figure
    assert "mu_inf(A)" in report and "weighted" in report and "Lipschitz bound" in report


@pytest.mark.parametrize("flags, message", [
    (["--gamma", "1.0"], "gamma"), (["--hidden", "-3"], "hidden"), (["--dataset", "svhn"], "dataset"),
    (["--epochs", "0"], "epochs"), (["--lr", "-1"], "lr"), (["--tol", "0"], "tol"),
    (["--constraint", "mondeq", "--solver", "average"], "monDEQ solver"),
    (["--solver", "peaceman-rachford", "--constraint", "mondeq", "--adjoint", "iterative"], "direct"),
    (["--constraint", "weighted", "--min-diagonal", "-0.1"], "min_diagonal goes with constraint projection"),
    (["--gamma", "-0.2", "--min-diagonal", "-0.1"], "min_diagonal must be <= 0 and <= gamma"),
    (["--threads", "2"], "threads = 2 applies to conv models and stacks only"),
    (["--model", "conv", "--threads", "0"], "threads must be a positive whole number"),
    # A setting that shapes another kind of model would be ignored: an error, not a silent no-op.
    (["--arch", "ibp-small", "--hidden", "300"], "hidden shapes nemon, mondeq models only, not model stack"),
    (["--model", "conv", "--hidden", "50"], "hidden shapes nemon, mondeq models only, not model conv"),
    (["--channels", "4"], "channels shapes conv models only, not model nemon"),
    (["--arch", "ibp-small", "--readout-hidden", "5"], "readout_hidden shapes nemon, mondeq, conv models only"),
])
def test_cli_bad_flags_give_one_line_errors(flags, message, capsys):
    from nemon_np import train
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_stored_configs_of_other_models_drop_the_dense_width_they_were_written_with():
    """Runs written before the architecture check resolved hidden = 100 for every model: a stored stack or
    conv config still loads (for --resume) and validates, without a width it never read."""
    from nemon_np.training import config_from_dict
    for model, extra in (("stack", dict(arch="ibp-small")), ("conv", {})):
        stored = asdict(TrainConfig(model=model, **extra).validate()) | {"hidden": 100}
        config = config_from_dict(stored).validate()
        assert config.hidden is None and config.model == model
    assert config_from_dict(asdict(TrainConfig(hidden=7).validate())).validate().hidden == 7


def test_ctrl_c_keeps_the_last_complete_checkpoint(shared_data, tmp_path, monkeypatch, capsys):
    from nemon_np import train
    from nemon_np.training import Trainer as T
    calls = {"n": 0}
    original = T.step

    def interrupted_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:           # in the second epoch (20 batches per epoch)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(T, "step", interrupted_step)
    out = tmp_path / "run"
    rc = train.main(["--data-dir", str(shared_data), "--epochs", "3", "--limit-train", "2000", "--hidden", "20",
                     "--out", str(out), "--no-progress"])
    assert rc == 130
    assert "last complete epoch (1)" in capsys.readouterr().err
    model = NEMON.load(out / "model.npz")
    assert model.mu_inf() <= model.gamma + 1e-12
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 1
    assert not list(out.glob("*.part"))


def test_sklearn_estimator_in_a_grid_search(mnist_arrays):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, y, Xt, yt = mnist_arrays
    clf = nemon_np.NEMONClassifier(hidden=20, epochs=5, gamma=0.5, lr=3e-3)
    assert clone(clf).get_params() == clf.get_params()
    clf.set_params(gamma=0.3)
    assert clf.gamma == 0.3
    labels = np.array(list("abcdefghij"))[y[:1500]]
    search = GridSearchCV(make_pipeline(StandardScaler(), clf), {"nemonclassifier__gamma": [0.0, 0.9]}, cv=2)
    search.fit(X[:1500], labels)
    best = search.best_estimator_
    assert set(best.predict(Xt[:300])) <= set("abcdefghij")
    proba = best.predict_proba(Xt[:300])
    assert proba.shape == (300, 10) and np.allclose(proba.sum(axis=1), 1)
    assert best.score(Xt[:300], np.array(list("abcdefghij"))[yt[:300]]) > 0.7
    fitted = best[-1]
    assert mu_inf(fitted.model_.A) <= fitted.gamma + 1e-12
    with pytest.raises(ValueError, match="gamma"):
        nemon_np.NEMONClassifier(gamma=2.0).fit(X[:50], y[:50])
    mondeq = nemon_np.NEMONClassifier(model="mondeq", hidden=20, epochs=2, lr=3e-3).fit(X, y)
    assert mondeq.config_.solver == "peaceman-rachford" and mondeq.score(Xt[:300], yt[:300]) > 0.7


def test_logged_batch_accuracy_is_that_of_the_model_predictions(mnist_arrays):
    X, y, _, _ = mnist_arrays
    trainer = Trainer(TrainConfig(hidden=20, epochs=1, seed=5), 784, 10)
    trainer.model.c[:] = np.linspace(-3, 3, 10).astype(trainer.model.c.dtype)   # the bias decides many
    U, labels = X[:100], y[:100]
    expected = int(np.count_nonzero(trainer.model.predict(U, tol=1e-4, max_iter=300) == labels))
    assert trainer.step(U, labels, lr=1e-3)["correct"] == expected


def test_metrics_of_a_run_resumed_from_an_older_version_keep_every_column(tmp_path):
    """Epochs written before a metric existed (train_cpu_seconds) sit beside epochs that have it: the csv has
    the column, empty where an epoch lacks it, and the curves are drawn."""
    import csv
    from nemon_np.training import metric_columns, plot_history, write_metrics
    old = {"epoch": 1, "train_loss": 0.5, "train_acc": 0.9, "fwd_iter_mean": 3.0, "fwd_iter_max": 4,
           "bwd_iter_mean": 1.0, "bwd_iter_max": 2, "mu_inf": 0.5, "mu_inf_unweighted": 0.5,
           "lipschitz_bound": 2.0, "train_seconds": 1.0, "epoch_seconds": 1.5}
    history = [old, {**old, "epoch": 2, "train_cpu_seconds": 0.9}]
    assert metric_columns(history) == list(old) + ["train_cpu_seconds"]
    write_metrics(tmp_path, TrainConfig(), history)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["train_cpu_seconds"] for r in rows] == ["", "0.9"] and [r["epoch"] for r in rows] == ["1", "2"]
    plot_history(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from nemon_np.data import normalize
from nemon_np.projection import parametrize_mondeq, parametrize_mondeq_grad
from nemon_np.certificates import certify
from nemon_np.lipschitz import lipschitz_bound, smooth_lipschitz_bound_and_grad
from nemon_np.pixels import to_inputs
from nemon_np.robustness import ATTACKS, attack, empirical_lipschitz
from nemon_np.training import TrainConfig, Trainer
from nemon_np import mu_2
from conftest import finite_difference

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(mnist_data):
    """A small float64 NEMON trained with Lipschitz regularization on real MNIST, and test pixels."""
    d = mnist_data
    X = normalize(d.train_images[:3000], d.mean, d.std, np.float64)
    config = TrainConfig(hidden=30, epochs=2, gamma=0.5, lipschitz_reg=3e-2, dtype="float64", lr=3e-3, seed=4)
    model = Trainer(config, 784, 10).fit(X, d.train_labels[:3000], progress=False).model
    model.metadata.update(mean=np.array(d.mean), std=np.array(d.std))
    pixels = d.test_images[:60].reshape(60, -1) / 255.0
    return model, pixels, d.test_labels[:60]


def test_pixels_map_to_the_training_normalization(trained):
    model, pixels, _ = trained
    np.testing.assert_allclose(to_inputs(model, pixels), (pixels - 0.1307) / 0.3081, rtol=1e-12)


@pytest.mark.parametrize("kind", ["noise", "fgsm", "pgd"])
def test_attacks_stay_in_the_ball_and_the_image_range(trained, kind):
    model, pixels, labels = trained
    for eps in (0.0, 0.02, 0.1):
        adv = attack(model, pixels, labels, eps, kind, steps=3)
        assert np.all(np.abs(adv - pixels) <= eps + 1e-12)
        assert adv.min() >= 0.0 and adv.max() <= 1.0


def test_pgd_is_at_least_as_strong_as_fgsm(trained):
    model, pixels, labels = trained
    acc = lambda P: np.mean(model.predict(to_inputs(model, P), tol=1e-8) == labels)  # noqa: E731
    for eps in (0.05, 0.1):
        fgsm = acc(attack(model, pixels, labels, eps, "fgsm"))
        pgd = acc(attack(model, pixels, labels, eps, "pgd", steps=10))
        assert pgd <= fgsm


def test_forward_options_are_the_solver_options_without_the_adjoint(trained):
    from nemon_np.pixels import forward_options, solver_options_for
    model, pixels, _ = trained
    for certificate in (None, "mu_2"):   # the NEMON's average iteration, monDEQ's Peaceman-Rachford
        m = type("M", (), {"dtype": np.float64, "metadata": {"certificate": certificate}})()
        options = solver_options_for(m)
        fwd = forward_options(options)
        assert "adjoint" in options and fwd == {k: options[k] for k in options if k != "adjoint"}
    options = solver_options_for(model)
    model.predict(to_inputs(model, pixels[:5]), **forward_options(options))   # what predict takes
    with pytest.raises(TypeError):
        model.predict(to_inputs(model, pixels[:5]), **options)


def test_attack_flags_are_the_attacks_image_by_image_in_chunks_or_not(trained):
    """Each kind's flags are its attack's predictions checked against the labels; attacked in chunks, each
    chunk is the attack of those images alone (FGSM, with no random start, does not depend on the chunk)."""
    from nemon_np.robustness import attack_flags
    model, pixels, labels = trained
    seen = []
    whole = attack_flags(model, pixels, labels, 0.1, pgd_steps=3, seed=2, progress=lambda k, f: seen.append(k))
    chunked = attack_flags(model, pixels, labels, 0.1, pgd_steps=3, seed=2, chunk=25)
    assert seen == list(ATTACKS) and list(whole) == list(ATTACKS)
    correct = lambda P, y: model.predict(to_inputs(model, P)) == y  # noqa: E731
    for kind in ATTACKS:
        np.testing.assert_array_equal(whole[kind], correct(attack(model, pixels, labels, 0.1, kind, steps=3, seed=2),
                                                           labels))
        np.testing.assert_array_equal(chunked[kind], np.concatenate([
            correct(attack(model, pixels[s:s + 25], labels[s:s + 25], 0.1, kind, steps=3, seed=2), labels[s:s + 25])
            for s in (0, 25, 50)]))
    np.testing.assert_array_equal(whole["fgsm"], chunked["fgsm"])
    assert 0 < whole["pgd"].sum() < whole["noise"].sum()   # not vacuous: PGD breaks images noise does not
    for P, y in ((pixels[:0], labels[:0]), (pixels, labels[:-1])):
        with pytest.raises(ValueError, match="one label an image and at least one image"):
            attack_flags(model, P, y, 0.1)


def test_certified_points_are_never_broken(trained):
    model, pixels, labels = trained
    eps = 0.01
    cert = certify(model, pixels, labels, eps, "lipschitz").certified
    assert cert.any(), "this model should certify some points at eps = 0.01"
    for kind in ("pgd", "fgsm", "noise"):
        adv = attack(model, pixels[cert], labels[cert], eps, kind, steps=10)
        assert np.all(model.predict(to_inputs(model, adv), tol=1e-8) == labels[cert])


def test_bound_is_never_below_the_empirical_lipschitz(trained):
    model, pixels, _ = trained
    low = empirical_lipschitz(model, pixels[:20])
    assert 0 < low <= lipschitz_bound(model)


def test_smooth_bound_is_an_upper_bound_with_its_gradient(trained):
    model, _, _ = trained
    value, grads = smooth_lipschitz_bound_and_grad(model)
    assert value >= lipschitz_bound(model) * (1 - max(model.mu_inf(), 0)) / (1 - max(model.gamma, 0)) - 1e-9
    B = model.B
    h = 1e-6
    i, j = np.unravel_index(np.argmax(np.abs(grads["B"])), B.shape)
    old = B[i, j]
    B[i, j] = old + h
    up = smooth_lipschitz_bound_and_grad(model)[0]
    B[i, j] = old - h
    down = smooth_lipschitz_bound_and_grad(model)[0]
    B[i, j] = old
    assert (up - down) / (2 * h) == pytest.approx(grads["B"][i, j], rel=1e-5)


def test_mondeq_parametrization_and_gradient(rng):
    n, m = 6, 0.1
    W, S = rng.normal(size=(2, n, n))
    A = parametrize_mondeq(W, S, m)
    assert mu_2(A) <= 1 - m + 1e-12
    G0 = rng.normal(size=(n, n))
    dW, dS = parametrize_mondeq_grad(W, S, G0)
    for P, grad in ((W, dW), (S, dS)):
        fd = finite_difference(lambda: np.sum(G0 * parametrize_mondeq(W, S, m)), P)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_robustness_cli_and_quick_analysis(tmp_path, shared_data):
    from nemon_np import train
    run = tmp_path / "run"
    assert train.main(["--data-dir", str(shared_data), "--model", "mondeq", "--epochs", "1", "--limit-train", "2000",
                       "--hidden", "20", "--out", str(run), "--no-progress"]) == 0
    proc = subprocess.run([sys.executable, "-m", "nemon_np.robustness", str(run), "--data-dir", str(shared_data),
                           "--samples", "50", "--pgd-steps", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pgd" in proc.stdout and "RuntimeWarning" not in proc.stderr
    assert "certified-lipschitz" in proc.stdout and "certified-interval" in proc.stdout
    report = json.loads((run / "robustness.json").read_text())
    for kind in ATTACKS:   # off a terminal, a line per step instead of the bar, with its figure
        for eps, acc in zip(report["eps"], report["attacks"][kind]):
            assert f"{kind} at eps {eps:g}: {100 * acc:.2f}%" in proc.stdout
    assert report["lipschitz_bound"] is None or report["mu_inf"] < 1
    if report["mu_inf"] >= 1:   # a monDEQ model: no l_inf certificate, said so, not zeros
        assert report["certified"]["certified-interval"] is None and "mu_inf" in report["certified"]["note"]
    assert (run / "robustness.png").stat().st_size > 1000
    out = tmp_path / "rob"
    proc = subprocess.run([sys.executable, str(ROOT / "analysis" / "robustness.py"), "--quick", "--out", str(out),
                           "--data-dir", str(shared_data)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert "monDEQ" in res["models"] and len(res["models"]) >= 4
    ibp = res["models"]["NEMON IBP eps=0.1"]
    assert ibp["config"]["certified_eps"] == 0.1
    lam = res["models"]["NEMON lambda=0.01"]
    # Interval training certifies more at eps = 0.1 by intervals than the regularized model does.
    i = res["eps"].index(0.1)
    assert ibp["certified"]["certified-interval"][i] >= lam["certified"]["certified-interval"][i]
    for name, r in res["models"].items():   # the attacks never beat a certificate, image by image
        for row in ("certified-lipschitz", "certified-interval"):
            if r["certified"].get(row) is not None:
                assert all(a >= c for a, c in zip(r["attacks"]["pgd"], r["certified"][row])), name
                assert r["broken_certified"][row] == [0] * len(res["eps"]), name
    assert sum(r["certified"]["certified-interval"][i] for r in res["models"].values()
               if r["certified"].get("certified-interval")) > 0   # the check above was not vacuous
    for kind in ("noise", "fgsm", "pgd", "certified-lipschitz", "certified-interval"):
        assert (out / f"{kind}.png").stat().st_size > 1000 and (out / f"{kind}.pdf").stat().st_size > 1000
    assert not any("ABOVE THE BOUND" in v for v in res["verdict"])


def test_report_counts_certified_images_an_attack_breaks(monkeypatch):
    """The report checks each certificate against the attacks image by image: sound certificates
    give 0, and a certificate that certifies everything is caught."""
    import nemon_np.robustness as robustness
    from conftest import random_model
    model = random_model(6, 12, 3, 0.5, seed=3, readout_hidden=5)
    model.B *= 4   # inputs, not the bias c, decide the class: attacks at eps 0.5 succeed
    model.c[:] = 0
    model.metadata.update(mean=0.5, std=0.5)
    pixels = np.random.default_rng(0).random((60, 6))
    labels = model.predict(to_inputs(model, pixels))
    eps = (0.0, 0.05, 0.5)
    report = robustness.robustness_report(model, pixels, labels, eps, pgd_steps=5, lipschitz_samples=5)
    assert report["broken_certified"]["certified-interval"] == [0, 0, 0]
    assert report["certified"]["certified-interval"][0] == 1.0   # every image certified at its own point
    assert report["attacks"]["pgd"][2] < 1.0   # the attack does break images at 0.5

    def certifies_everything(model, pixels, labels, eps, name):
        return certify(model, pixels, labels, 0.0, name) if eps == 0 else type(
            "R", (), {"certified": np.ones(len(pixels), bool)})()
    monkeypatch.setattr(robustness, "certify", certifies_everything)
    broken = robustness.robustness_report(model, pixels, labels, eps, pgd_steps=5, lipschitz_samples=5)
    expected = [0]
    for e in eps[1:]:   # the count is of images some attack misclassifies
        survivors = np.ones(60, bool)
        for kind in robustness.ATTACKS:
            X = robustness.attack(model, pixels, labels, e, kind, steps=5)
            survivors &= model.predict(to_inputs(model, X)) == labels
        expected.append(int(np.sum(~survivors)))
    assert broken["broken_certified"]["certified-interval"] == expected and expected[2] > 0


def test_report_exact_and_lp_rows_lie_between_crown_and_the_attacks():
    """On a small dense model: crown <= lp <= exact <= PGD's accuracy at every eps, image by image where
    it can be (no certified image broken), nothing left unknown, and exact's unknown counts reported."""
    import nemon_np.robustness as robustness
    from nemon_np.certificates import ExactCertificate, LPCertificate
    from conftest import random_model
    model = random_model(4, 8, 3, 0.6, seed=5)
    model.B *= 3
    model.metadata.update(mean=0.5, std=0.5)
    pixels = np.random.default_rng(1).random((25, 4))
    labels = model.predict(to_inputs(model, pixels))
    eps = (0.02, 0.1)
    certificates = robustness.REPORT_CERTIFICATES + (LPCertificate(), ExactCertificate(time_limit=30))
    report = robustness.robustness_report(model, pixels, labels, eps, pgd_steps=10, lipschitz_samples=5,
                                          certificates=certificates)
    c = report["certified"]
    for i in range(len(eps)):
        assert c["certified-crown"][i] <= c["certified-lp"][i] <= c["certified-exact"][i] <= report["attacks"]["pgd"][i]
    assert report["unknown"] == {"certified-exact": [0, 0]}
    assert all(v == [0, 0] for v in report["broken_certified"].values())
    assert 0 < c["certified-exact"][1] < 1.0   # not vacuous: some balls are robust, some are not


def test_robustness_cli_exact_rows_on_a_dense_run_and_an_error_for_conv(tmp_path, shared_data, capsys):
    from nemon_np import robustness, train
    run = tmp_path / "run"
    assert train.main(["--data-dir", str(shared_data), "--epochs", "1", "--limit-train", "1000", "--hidden", "12",
                       "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    argv = [str(run), "--data-dir", str(shared_data), "--samples", "15", "--pgd-steps", "2", "--eps", "0.01",
            "--exact", "--time-limit", "20"]
    assert robustness.main(argv) == 0
    out = capsys.readouterr().out
    assert "certified-exact" in out and "certified-lp" in out and "unknown (exact)" in out
    report = json.loads((run / "robustness.json").read_text())
    assert report["certified"]["certified-exact"][0] >= report["certified"]["certified-crown"][0]
    for row in ("certified-crown", "certified-exact"):   # each certificate's line as it ends
        assert f"{row} at eps 0.01: {100 * report['certified'][row][0]:.2f}%" in out
    assert len(list((run / "exact_cache").glob("*.npz"))) >= 1   # decided images kept for a rerun
    # --certificates takes its choices from the registry; crown-full is never below crown.
    chosen = tmp_path / "chosen.json"
    assert robustness.main([str(run), "--data-dir", str(shared_data), "--samples", "15", "--pgd-steps", "2",
                            "--eps", "0.05", "--certificates", "crown", "crown-full", "--out", str(chosen)]) == 0
    report = json.loads(chosen.read_text())
    assert set(report["certified"]) == {"certified-crown", "certified-crown-full"}
    assert report["certified"]["certified-crown-full"][0] >= report["certified"]["certified-crown"][0]
    assert sum(report["broken_certified"]["certified-crown-full"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        robustness.main([str(run), "--certificates", "exact"])
    assert "invalid choice: 'exact'" in capsys.readouterr().err
    conv = tmp_path / "conv"
    assert train.main(["--data-dir", str(shared_data), "--model", "conv", "--channels", "2", "--epochs", "1",
                       "--limit-train", "200", "--out", str(conv), "--no-progress"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        robustness.main([str(conv), "--data-dir", str(shared_data), "--samples", "5", "--exact"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--exact: exact verification handles dense NEMONs" in err[0]

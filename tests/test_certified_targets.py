"""benchmarks/certified_targets.py: a target's row from run evaluations recorded by an earlier session (the
run folders gone with its checkout), merged as the script documents, written rounded."""
import copy
import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import certified_targets  # noqa: E402


def _record(run, crown, clean, seconds):
    """One run's evaluation in the script's own form (as evaluate_run returns it)."""
    return {"run": run, "clean": {"1000": clean, "10000": clean + 0.123456789},
            "certified": {"interval": {"1000": crown - 0.5, "10000": crown - 0.4},
                          "crown": {"1000": crown, "10000": crown + 0.21}},
            "pgd": {"1000": crown + 3.0, "10000": crown + 3.1}, "broken_certified": {"interval": 0, "crown": 0},
            "certify_seconds": {"interval": 1.0, "crown": 2.0}, "train_seconds": seconds,
            "epoch_seconds": seconds + 10, "epochs": 3, "command": f"python -m nemon_np.train --out {run}",
            "curve": {"train_seconds": [seconds / 3, 2 * seconds / 3, seconds], "certified": [None, 50.0, 80.0],
                      "clean": [98.0, 97.0, 96.0]}}


def _file(path, dataset, eps, nemon, explicit):
    path.write_text(json.dumps({"targets": [{"dataset": dataset, "eps": eps,
                                             "runs": {"nemon": nemon, "explicit": explicit}}]}))
    return path


def test_a_row_is_made_from_recorded_evaluations_of_runs_not_here(tmp_path, monkeypatch, shared_data):
    monkeypatch.chdir(tmp_path)   # no run folder of these names here
    one = _file(tmp_path / "one.json", "mnist", 0.3, [_record("runs/n_s0", 89.0, 96.8, 8175.0)],
                [_record("runs/x_s0", 88.9, 96.6, 8405.0)])
    two = _file(tmp_path / "two.json", "mnist", 0.3, [_record("runs/n_s1", 88.0 + 1 / 3, 96.5, 8000.0)], [])
    other = {"dataset": "cifar10", "eps": 0.1, "certified_per_seed": [1.0]}
    out = tmp_path / "out.json"
    out.write_text(json.dumps({"targets": [other]}))
    argv = ["--data-dir", str(shared_data), "--eps", "0.3", "--target", "90", "--out", str(out),
            "--nemon", "runs/n_s0", "runs/n_s1", "--explicit", "runs/x_s0"]
    assert certified_targets.main(argv + ["--recorded", str(one), str(two)]) == 0
    targets = json.loads(out.read_text())["targets"]
    assert targets[0] == other                            # the file's other targets are kept
    row = targets[1]
    assert row["certified_per_seed"] == [89.0, 88.3333] and row["clean_per_seed"] == [96.8, 96.5]
    assert row["seconds_per_seed"] == [8175.0, 8000.0] and row["certified_all_per_seed"] == [89.21, 88.5433]
    assert row["shortfall"] == round(90 - np.mean([89.0, 88.0 + 1 / 3]), 2) and row["met"] is False
    assert row["explicit_matched"]["certified_per_seed"] == [88.9] and row["broken_certified"] == 0
    assert row["seconds_clock"] == "wall"   # these records have no CPU seconds
    assert row["runs"]["nemon"][1]["clean"]["10000"] == round(96.5 + 0.123456789, 4)
    assert (tmp_path / "certified_targets_mnist_0.3.png").is_file()   # the recorded curves, drawn
    assert (tmp_path / "certified_targets_matched.png").is_file()     # every target beside its twin

    # --out's own records are read too: the same row again without --recorded.
    assert certified_targets.main(argv) == 0
    assert json.loads(out.read_text())["targets"][1]["certified_per_seed"] == [89.0, 88.3333]


def test_a_row_at_a_radius_written_rounded_is_replaced_not_repeated(tmp_path, monkeypatch, shared_data):
    """8/255 is written as 0.0314: a second pass at 8/255 still finds the row's recorded runs and replaces it."""
    monkeypatch.chdir(tmp_path)
    eps = 8 / 255
    one = _file(tmp_path / "one.json", "mnist", eps, [_record("runs/n_s0", 30.0, 40.0, 5000.0)],
                [_record("runs/x_s0", 31.0, 42.0, 5000.0)])
    out = tmp_path / "out.json"
    argv = ["--data-dir", str(shared_data), "--eps", repr(eps), "--target", "30", "--out", str(out),
            "--nemon", "runs/n_s0", "--explicit", "runs/x_s0"]
    assert certified_targets.main(argv + ["--recorded", str(one)]) == 0
    assert [t["eps"] for t in json.loads(out.read_text())["targets"]] == [0.0314]
    assert certified_targets.main(argv) == 0   # the runs as --out recorded them at 0.0314
    targets = json.loads(out.read_text())["targets"]
    assert len(targets) == 1 and targets[0]["certified_per_seed"] == [30.0]


def test_runs_neither_here_nor_recorded_are_one_line_errors(tmp_path, monkeypatch, capsys, shared_data):
    monkeypatch.chdir(tmp_path)
    rec = _file(tmp_path / "rec.json", "mnist", 0.1, [_record("runs/n_s0", 89.0, 96.8, 1.0)], [])
    base = ["--data-dir", str(shared_data), "--out", str(tmp_path / "out.json"), "--nemon", "runs/n_s0",
            "--explicit", "runs/x_s0"]
    for extra, message in ((["--eps", "0.3", "--recorded", str(tmp_path / "absent.json")], "no such file"),
                           (["--eps", "0.1", "--recorded", str(rec)], "runs/x_s0: no such run folder"),
                           (["--eps", "0.3", "--recorded", str(rec)], "runs/n_s0: no such run folder")):
        with pytest.raises(SystemExit):
            certified_targets.main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1]


def test_exact_verification_is_asked_of_every_run_or_of_none(tmp_path, monkeypatch, capsys, shared_data):
    """A run recorded without exact verification cannot stand beside runs verified exactly."""
    monkeypatch.chdir(tmp_path)
    rec = _file(tmp_path / "rec.json", "mnist", 0.1, [_record("runs/n_s0", 89.0, 96.8, 1.0)],
                [_record("runs/x_s0", 88.0, 96.8, 1.0)])
    with pytest.raises(SystemExit):
        certified_targets.main(["--data-dir", str(shared_data), "--out", str(tmp_path / "out.json"), "--eps", "0.1",
                                "--nemon", "runs/n_s0", "--explicit", "runs/x_s0", "--recorded", str(rec),
                                "--exact-images", "1000"])
    assert "runs/n_s0 is recorded without exact verification" in capsys.readouterr().err.strip().splitlines()[-1]


def test_figures_are_given_on_the_first_1000_images_and_on_all_of_them():
    flags = np.arange(2500) % 4 != 0                       # 75% true throughout, 100% of the last 500
    flags[2000:] = True
    assert certified_targets.percent_of_first(flags) == {1000: 75.0, 2500: 80.0}
    assert certified_targets.percent_of_first(flags[:1000]) == {1000: 75.0}
    assert certified_targets.percent_of_first(flags[:200]) == {200: 75.0}   # fewer than 1,000: all of them only


def test_rounded_rounds_floats_only_and_keeps_the_shape():
    value = {"a": [1 / 3, 2, float("nan"), {"b": 94.69999999999999}], "c": "text", "d": None, "e": True}
    out = certified_targets.rounded(copy.deepcopy(value))
    assert out["a"][0] == 0.3333 and out["a"][1] == 2 and np.isnan(out["a"][2]) and out["a"][3]["b"] == 94.7
    assert out["c"] == "text" and out["d"] is None and out["e"] is True


def test_dumps_keeps_the_value_and_puts_number_lists_on_one_line():
    value = {"targets": [{"command": "python -m nemon_np.train --arch a,b [x]", "per_seed": [94.69999999999999, 1 / 3],
                          "curve": {"clean": [98.0, None, 97.123456]}, "runs": {"nemon": [{"run": "r"}]}}]}
    text = certified_targets.dumps(value)
    back = json.loads(text)
    assert back["targets"][0]["per_seed"] == [94.7, 0.3333] and back["targets"][0]["curve"]["clean"] == [98.0, None,
                                                                                                         97.1235]
    assert back["targets"][0]["command"] == value["targets"][0]["command"]
    assert '"per_seed": [94.7, 0.3333]' in text and '"clean": [98.0, null, 97.1235]' in text


def _matched_row(dataset, eps, nemon, explicit, nemon_seconds, explicit_seconds):
    return {"dataset": dataset, "eps": eps, "target": 90.0, "certified_per_seed": nemon,
            "certified_all_per_seed": [v + 1 for v in nemon], "seconds_per_seed": nemon_seconds,
            "explicit_matched": {"certified_per_seed": explicit, "certified_all_per_seed": [v + 1 for v in explicit],
                                 "seconds": float(np.mean(explicit_seconds))}}


def test_the_matched_comparison_claims_a_side_only_where_every_seed_says_so():
    rows = [_matched_row("cifar10", 8 / 255, [24.3, 23.7], [23.6, 25.8], [4867.0, 4741.0], [4825.0, 4678.0]),
            _matched_row("mnist", 0.3, [90.4, 90.4], [88.9, 89.0], [6500.0, 6450.0], [5000.0]),
            _matched_row("mnist", 0.1, [94.0, 94.5], [95.0, 96.0], [100.0, 300.0], [100.0, 100.0]),
            {"dataset": "mnist", "eps": 0.2, "certified_per_seed": [1.0]}]          # no twin: left out
    c = certified_targets.matched_comparison(rows)
    assert [r["label"] for r in c] == ["MNIST 0.1", "MNIST 0.3", "CIFAR-10 8/255"]
    assert [r["verdict"] for r in c] == ["explicit ahead", "nemon ahead", "within the seeds' spread"]
    assert c[0]["difference"] == pytest.approx(94.25 - 95.5) and c[0]["seconds_ratio"] == pytest.approx(2.0)
    assert c[1]["seconds_ratio"] == pytest.approx(6475.0 / 5000.0) and c[1]["explicit_all"] == [89.9, 90.0]
    assert c[2]["difference"] == pytest.approx(24.0 - 24.7)
    # A row from before the clock was recorded was matched on wall seconds; a recorded clock is kept.
    assert [r["seconds_clock"] for r in c] == ["wall"] * 3
    rows[1]["seconds_clock"] = "cpu"
    assert [r["seconds_clock"] for r in certified_targets.matched_comparison(rows)] == ["wall", "cpu", "wall"]
    # One seed on a side claims nothing, not even a clear win.
    one = certified_targets.matched_comparison([_matched_row("mnist", 0.3, [90.0], [97.0, 97.5], [1.0], [1.0]),
                                                _matched_row("mnist", 0.1, [90.0], [90.0], [1.0], [1.0])])
    assert [r["verdict"] for r in one] == ["one seed: no verdict"] * 2


def test_both_sides_are_matched_on_cpu_seconds_only_where_every_run_has_them():
    cpu = {"train_cpu_seconds": 5.0}
    assert certified_targets.seconds_clock({"nemon": [cpu, cpu], "explicit": [cpu]}) == "cpu"
    assert certified_targets.seconds_clock({"nemon": [cpu, {"train_cpu_seconds": None}], "explicit": [cpu]}) == "wall"
    assert certified_targets.seconds_clock({"nemon": [cpu], "explicit": [{}]}) == "wall"
    epochs = [{"train_cpu_seconds": 1.5}, {"train_cpu_seconds": 2.25}]
    assert certified_targets.training_cpu_seconds(epochs) == 3.75
    assert certified_targets.training_cpu_seconds(epochs + [{"train_seconds": 9.0}]) is None   # resumed old run


@pytest.mark.parametrize("settings", [
    dict(),
    dict(certified_eps=0.1, warm_start=False, epochs=3, eps_warmup=1, eps_ramp=1),
    dict(certified_eps=0.1, min_diagonal=-np.inf, hidden=100),   # a dense run from before the default floor
    dict(model="conv", certified_eps=0.3, augment="shift", augment_pad=2, pool=2),
    dict(arch="nemon-medium", certified_eps=0.1, epochs=25, min_diagonal=0.0, eps_ramp=8, grad_clip=10.0, seed=1),
    dict(arch="ibp-small", augment="crop-flip", certified_eps=2 / 255, warmup_reg=0.0, train_eps_factor=1.1),
])
def test_a_recorded_command_trains_the_run_it_was_read_from(tmp_path, settings):
    """command_of's flags, parsed by ``nemon_np.train``, give the run's settings back, switches and a certified
    recipe's own defaults included, so a recorded command still reproduces its run after a default changes."""
    from dataclasses import asdict, fields

    from nemon_np.train import build_parser
    from nemon_np.training import TrainConfig
    config = TrainConfig(**settings).validate()
    (tmp_path / "metrics.json").write_text(json.dumps({"config": asdict(config), "run": {"dataset": "cifar10"},
                                                       "epochs": []}))
    command = certified_targets.command_of(tmp_path)
    prefix = "python -m nemon_np.train "
    assert command.startswith(prefix + "--dataset cifar10")
    args = build_parser().parse_args(command[len(prefix):].split())
    again = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)}).validate()
    assert asdict(again) == asdict(config)
    if config.model == "stack" and config.certified_eps > 0:
        assert f"--warmup-reg {config.warmup_reg:g}" in command   # spelled out even where it is the default


def test_exact_verification_of_both_sides_enters_the_row(tmp_path, monkeypatch, shared_data, mnist_data):
    """--exact-images: two real (tiny) runs, verified exactly on the first 1,000 test images (the whole test set
    here); exact certifies at least what crown does and at most what survives PGD, no certified image is broken,
    and the row takes it as its certificate where it is the best."""
    import dataclasses

    from nemon_np.train import main as train
    monkeypatch.chdir(tmp_path)
    for kind, arch in (("n", "dense16,relu,nemon8"), ("x", "dense16,relu,dense8,relu")):
        train(["--dataset", "mnist", "--data-dir", str(shared_data), "--arch", arch, "--limit-train", "2000",
               "--epochs", "2", "--certified-eps", "0.02", "--eps-warmup", "0", "--eps-ramp", "1",
               "--certify-samples", "10", "--no-progress", "--out", f"runs/{kind}_s0"])
    small = dataclasses.replace(mnist_data, test_images=mnist_data.test_images[:1000],
                                test_labels=mnist_data.test_labels[:1000])
    monkeypatch.setattr(certified_targets, "load_dataset", lambda name, data_dir=None: small)
    out = tmp_path / "out.json"
    argv = ["--eps", "0.02", "--out", str(out), "--nemon", "runs/n_s0", "--explicit", "runs/x_s0",
            "--exact-images", "1000", "--time-limit", "20", "--pgd-steps", "5"]
    assert certified_targets.main(argv) == 0
    row = json.loads(out.read_text())["targets"][0]
    for side in (row, row["explicit_matched"]):
        (exact,), (crown,), (pgd,) = side["exact_per_seed"], side["crown_per_seed"], side["pgd_per_seed"]
        assert crown <= exact <= pgd
        assert side["certificate"] == ("exact" if exact > crown else side["certificate"])
        assert side["certified_per_seed"] == [max(exact, crown, side["interval_per_seed"][0])]
    assert row["broken_certified"] == 0
    exact = json.loads((tmp_path / "runs/n_s0/targets_eps0.02_exact1000_t20_pgd5.json").read_text())
    assert exact["images"] == 1000 and exact["broken"] == 0
    assert exact["unknown"] == 0 or exact["certified"]["1000"] < row["pgd_per_seed"][0]


def test_each_runs_evaluation_is_kept_as_it_finishes(tmp_path, monkeypatch):
    """A pass stopped during its second run keeps the first run's evaluation beside its model (before, every
    evaluation was written once all had finished, and a stop lost them all)."""
    monkeypatch.chdir(tmp_path)
    for run in ("runs/a", "runs/b"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "model.npz").write_bytes(b"")

    def evaluate(run, data, eps, pgd_steps):
        if run == "runs/b":
            raise KeyboardInterrupt   # the session's end
        return _record(run, 90.0, 98.0, 100.0)
    monkeypatch.setattr(certified_targets, "evaluate_run", evaluate)
    monkeypatch.setattr(certified_targets, "load_dataset", lambda name, data_dir=None: None)
    with pytest.raises(KeyboardInterrupt):
        certified_targets.main(["--eps", "0.1", "--out", str(tmp_path / "out.json"), "--nemon", "runs/a",
                                "--explicit", "runs/b"])
    assert json.loads((tmp_path / "runs/a/targets_eps0.1_pgd20.json").read_text())["run"] == "runs/a"
    assert not (tmp_path / "runs/b/targets_eps0.1_pgd20.json").exists()


def test_pool_workers_exit_when_their_parent_is_killed(tmp_path):
    """A parent stopped by SIGKILL (no clean-up of its own) leaves no worker of its pool running."""
    import os
    import signal
    import subprocess
    import time
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        f"sys.path.insert(0, {str(pathlib.Path(certified_targets.__file__).parent)!r})\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from certified_targets import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=exit_with_parent, initargs=(os.getpid(), 0.2))\n"
        "    pids = {pool.submit(os.getpid).result() for _ in range(6)}\n"
        "    [pool.submit(time.sleep, 120) for _ in range(2)]\n"
        "    print(' '.join(map(str, pids)), flush=True)\n"
        "    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert workers and parent.poll() is None

    def alive(pid):
        return os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read()
    assert all(alive(pid) for pid in workers)   # not vacuous: they run while the parent does
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)

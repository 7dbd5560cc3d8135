"""Edges a user hits at the command line: wrong folders, foreign files, missing models, log files."""
import subprocess
import sys

import numpy as np
import pytest

from nemon_np import evaluate, load_model, robustness, train


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_data_dir_that_does_not_exist_is_named(tmp_path, capsys):
    assert train.main(["--data-dir", str(tmp_path / "nowhere"), "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert str(tmp_path / "nowhere") in line and "no such folder" in line
    (tmp_path / "empty").mkdir()
    assert train.main(["--data-dir", str(tmp_path / "empty"), "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert str(tmp_path / "empty") in line and "holds no MNIST" in line


@pytest.mark.parametrize("content", ["pickle", "npy", "text", "npz-of-something-else", "object-array"])
def test_a_file_that_is_not_a_model_says_so_in_one_line(tmp_path, content, capsys):
    path = tmp_path / "model.npz"
    if content == "pickle":
        import pickle
        path.write_bytes(pickle.dumps({"A": 1}))
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.arange(3))
    elif content == "text":
        path.write_text("hello")
    elif content == "npz-of-something-else":
        with open(path, "wb") as f:
            np.savez(f, weights=np.ones(3))
    else:
        with open(path, "wb") as f:
            np.savez(f, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError) as e:
        load_model(path)
    message = str(e.value)
    assert str(path) in message and "not a nemon_np model file" in message
    assert "\n" not in message and "allow_pickle" not in message and "trust" not in message
    for cli in (evaluate, robustness):
        with pytest.raises(SystemExit):
            cli.main([str(tmp_path)])
        line = _error_line(capsys)
        assert "not a nemon_np model file" in line and "allow_pickle" not in line


def test_a_run_folder_without_a_model_names_the_missing_file(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    for cli in (evaluate, robustness):
        with pytest.raises(SystemExit) as e:
            cli.main([str(tmp_path / "run")])
        assert e.value.code == 2
        line = _error_line(capsys)
        assert str(tmp_path / "run" / "model.npz") in line and "not found" in line


def test_threads_on_a_dense_model_or_below_one_is_a_one_line_error(tmp_path, capsys):
    from nemon_np import NEMON
    model = NEMON(4, 3, 2)
    model.metadata["dataset"] = "mnist"
    model.save(tmp_path / "model.npz")
    for cli in (evaluate, robustness):
        for threads, message in (("2", "--threads 2 applies to conv models and stacks only"),
                                 ("0", "--threads must be a positive whole number")):
            with pytest.raises(SystemExit) as e:
                cli.main([str(tmp_path), "--threads", threads])
            assert e.value.code == 2 and message in _error_line(capsys)


def test_a_log_file_gets_epoch_lines_not_progress_bars(shared_data, tmp_path):
    """Without a terminal (output to a file or pipe) there are no carriage-return bar updates."""
    proc = subprocess.run([sys.executable, "-m", "nemon_np.train", "--data-dir", str(shared_data), "--epochs", "2",
                           "--limit-train", "3000", "--hidden", "20", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout + proc.stderr
    assert proc.stdout.count("epoch ") >= 2 and "batch/s" not in proc.stderr


def test_resume_continues_a_stopped_run_to_the_model_of_one_that_went_through(tmp_path, shared_data, capsys):
    """A certified stack run stopped by Ctrl-C after its first epoch and continued with --resume ends
    with the same model file as the run that went through, bit for bit, and its total seconds count both
    processes; resumed once more, the complete run is left as it is."""
    import signal

    flags = ["--dataset", "mnist", "--data-dir", str(shared_data), "--arch", "conv8k4s2p1,relu,nemon30",
             "--weight-init", "ibp", "--limit-train", "4000", "--epochs", "3", "--eps-warmup", "0", "--eps-ramp", "2",
             "--certified-eps", "0.1", "--certify-samples", "50", "--no-progress"]
    assert train.main(flags + ["--out", str(tmp_path / "through")]) == 0
    # A shell that runs the suite in the background starts it with SIGINT ignored, which children
    # inherit; the child gets the default back, as a user's Ctrl-C would find it.
    proc = subprocess.Popen([sys.executable, "-m", "nemon_np.train"] + flags + ["--out", str(tmp_path / "stopped")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("epoch   1"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "--resume" in err, err
    import json
    assert len(json.loads((tmp_path / "stopped" / "metrics.json").read_text())["epochs"]) < 3
    stopped_seconds = sum(r["epoch_seconds"] for r in json.loads((tmp_path / "stopped" / "metrics.json").read_text())
                          ["epochs"])
    resume = ["--resume", str(tmp_path / "stopped"), "--data-dir", str(shared_data), "--no-progress"]
    assert train.main(resume) == 0
    through, resumed = load_model(tmp_path / "through" / "model.npz"), load_model(tmp_path / "stopped" / "model.npz")
    for k, v in through.params().items():
        assert np.array_equal(resumed.params()[k], v), k
    # The total counts the stopped process's epochs too, not only the seconds after the resume.
    metrics = (tmp_path / "stopped" / "metrics.json").read_bytes()
    summary, epochs = json.loads(metrics)["summary"], json.loads(metrics)["epochs"]
    assert summary["total_seconds"] >= sum(r["epoch_seconds"] for r in epochs) >= stopped_seconds > 0
    # Resuming a complete run says so and leaves its files as they are.
    capsys.readouterr()
    assert train.main(resume) == 0
    assert "is complete" in capsys.readouterr().out and (tmp_path / "stopped" / "metrics.json").read_bytes() == metrics


@pytest.mark.parametrize("killed_in", ["_write_training_state", "write_metrics"])
def test_a_run_killed_between_an_epochs_writes_resumes_to_the_run_that_went_through(
        tmp_path, shared_data, monkeypatch, killed_in, capsys):
    """Killed after the second epoch's model.npz was written but not its training state (or after the
    state but not metrics.json), a certified dense run with warm starts resumes from its last complete
    training state and ends with the model of the run that went through, bit for bit: never from one
    epoch's model with another epoch's optimizer."""
    import nemon_np.training as training

    class Killed(BaseException):
        pass

    flags = ["--dataset", "mnist", "--data-dir", str(shared_data), "--hidden", "10", "--limit-train", "500",
             "--epochs", "3", "--certified-eps", "0.1", "--eps-warmup", "0", "--eps-ramp", "1", "--certify-samples",
             "20", "--no-progress"]
    assert train.main(flags + ["--out", str(tmp_path / "through")]) == 0
    real, calls = getattr(training, killed_in), []

    def dies_at_the_second_epoch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args)

    monkeypatch.setattr(training, killed_in, dies_at_the_second_epoch)
    with pytest.raises(Killed):
        train.main(flags + ["--out", str(tmp_path / "stopped")])
    monkeypatch.setattr(training, killed_in, real)
    import json
    assert len(json.loads((tmp_path / "stopped" / "metrics.json").read_text())["epochs"]) == 1
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "stopped"), "--data-dir", str(shared_data), "--no-progress"]) == 0
    assert ("stopped while it wrote" in capsys.readouterr().err) == (killed_in == "write_metrics")
    through, resumed = load_model(tmp_path / "through" / "model.npz"), load_model(tmp_path / "stopped" / "model.npz")
    for k, v in through.params().items():
        assert np.array_equal(resumed.params()[k], v), k
    history = json.loads((tmp_path / "stopped" / "metrics.json").read_text())["epochs"]
    assert [r["train_loss"] for r in history] == [
        r["train_loss"] for r in json.loads((tmp_path / "through" / "metrics.json").read_text())["epochs"]]


def test_resume_with_a_training_flag_names_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path), "--epochs", "5"])
    assert "drop --epochs" in _error_line(capsys)
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path)])
    assert "holds no resumable run" in _error_line(capsys)


def test_resume_keeps_a_run_without_its_floor_where_todays_defaults_have_one(tmp_path):
    """A certified dense run whose settings (resolved when it started) had no diagonal floor resumes
    without one, though --certified-eps now brings min_diagonal 0 by default; a run with one keeps it."""
    import json
    from dataclasses import asdict
    from nemon_np.training import TrainConfig
    for floor, expected in ((None, -np.inf), (-0.5, -0.5)):
        config = asdict(TrainConfig(certified_eps=0.1, hidden=10, min_diagonal=floor).validate())
        config["min_diagonal"] = floor   # as a run written before the default was there stored it
        (tmp_path / "metrics.json").write_text(json.dumps({"config": config, "epochs": [],
                                                           "run": {"dataset": "mnist", "limit_train": 100}}))
        (tmp_path / "model.npz").write_bytes(b"")
        parser = train.build_parser()
        resumed, _, _ = train._resumed_run(parser, parser.parse_args(["--resume", str(tmp_path)]))
        assert resumed.validate().min_diagonal == expected


def test_out_naming_a_run_is_an_error_unless_overwrite(tmp_path, shared_data, capsys):
    """A second run into a folder that holds one stops before touching it; --overwrite replaces it."""
    run = tmp_path / "run"
    flags = ["--data-dir", str(shared_data), "--epochs", "1", "--limit-train", "500", "--hidden", "10",
             "--no-progress", "--out", str(run)]
    assert train.main(flags) == 0
    before = (run / "model.npz").read_bytes()
    with pytest.raises(SystemExit):
        train.main(flags + ["--hidden", "20"])
    line = _error_line(capsys)
    assert str(run) in line and "already holds a run" in line and "--overwrite" in line and "--resume" in line
    assert (run / "model.npz").read_bytes() == before
    assert train.main(flags + ["--hidden", "20", "--overwrite"]) == 0
    assert load_model(run / "model.npz").n_hidden == 20
    with pytest.raises(SystemExit):
        train.main(["--resume", str(run), "--overwrite"])
    assert "give one of them" in _error_line(capsys)


@pytest.mark.parametrize("argv,message", [(["--certified-eps", "2"], "pixel units, in [0, 1]"),
                                          (["--certified-eps", "-0.1"], "must be a finite number >= 0")])
def test_eps_outside_the_pixel_range_is_an_error(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        train.main(argv + ["--out", str(tmp_path / "o")])
    assert message in _error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "epochs must be a positive whole number"),
    (["--max-iter", "0"], "max_iter must be a positive whole number"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--gamma", "1"], "gamma must be finite and < 1"),
    (["--tol", "0"], "tol must be a positive number"),
    (["--kappa", "2"], "kappa must lie in [0, 1]"),
    (["--alpha", "5"], "alpha must lie in (0, 1]"),
    (["--crown-ibp", "2"], "crown_ibp must lie in [0, 1]"),
    (["--grad-clip", "-1"], "grad_clip must be a finite number >= 0"),
    (["--limit-train", "0"], "--limit-train must be >= 1"),
    (["--min-diagonal", "1"], "min_diagonal must be <= 0"),
    (["--model", "conv", "--kernel", "2"], "kernel must be odd")])
def test_numeric_training_flags_are_checked_against_their_meaning(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        train.main(argv + ["--out", str(tmp_path / "o")])
    assert message in _error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tol", ["0", "-1", "nan"])
def test_evaluate_tolerance_must_be_positive(tmp_path, tol, capsys):
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path), "--tol", tol])
    assert "--tol must be a positive number" in _error_line(capsys)


def test_robustness_eps_outside_the_pixel_range_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        robustness.main([str(tmp_path), "--eps", "0.1", "1.5"])
    assert "in [0, 1]; got 0.1 1.5" in _error_line(capsys)


def test_a_sweep_given_training_flags_before_the_separator_says_where_they_go(tmp_path, capsys):
    from nemon_np import sweep
    with pytest.raises(SystemExit):
        sweep.main(["--dataset", "mnist", "--grid", "gamma=0.5,0.9", "--out", str(tmp_path)])
    line = _error_line(capsys)
    assert "--dataset is a training flag: training flags go after --" in line
    with pytest.raises(SystemExit):
        sweep.main(["--bogus", "--out", str(tmp_path)])
    assert "unrecognized arguments: --bogus" in _error_line(capsys)


def test_a_sweep_resumes_a_stopped_run_and_restarts_one_that_never_finished_an_epoch(tmp_path):
    from nemon_np.sweep import _rerun_argv
    from nemon_np.training import TRAINING_STATE
    argv = ["--epochs", "3", "--data-dir", "/d", "--seed", "0", "--out", str(tmp_path), "--no-progress"]
    assert _rerun_argv(argv, tmp_path) == argv + ["--overwrite"]
    (tmp_path / "model.npz").write_bytes(b"")
    (tmp_path / TRAINING_STATE).write_bytes(b"")
    assert _rerun_argv(argv, tmp_path) == ["--resume", str(tmp_path), "--no-progress", "--data-dir", "/d"]


def test_ctrl_c_while_training_is_kept_until_the_next_batch_and_a_second_stops_at_once():
    """The first SIGINT is recorded, not raised where it lands (Python drops an interrupt that lands in
    a destructor, and the run went on); a second one raises at once; the handler is restored after."""
    import os
    import signal
    # A shell that starts the suite in the background has SIGINT ignored; Python's own handler is what
    # a user's Ctrl-C meets, and what the training replaces (an ignored SIGINT stays ignored).
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with train._ctrl_c_between_batches() as stop:
            assert not stop()
            os.kill(os.getpid(), signal.SIGINT)
            assert stop()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                signal.getsignal(signal.SIGINT)   # the handler runs between bytecodes, by here at the latest
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_a_requested_stop_ends_training_before_the_next_batch_with_the_epochs_done_kept():
    from nemon_np.training import TrainConfig, Trainer
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)).astype(np.float32), rng.integers(0, 3, 60)
    trainer = Trainer(TrainConfig(hidden=4, epochs=3, batch_size=20), n_in=5, n_out=3)
    asked = []
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, progress=False, should_stop=lambda: asked.append(1) or len(asked) > 4)
    assert len(asked) == 5 and len(trainer.history) == 1   # 3 batches of epoch 1, then 1 of epoch 2

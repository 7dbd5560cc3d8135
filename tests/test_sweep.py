"""Sweeps on Dask: a real local cluster and a separately started scheduler and worker, resume, failures."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from nemon_np import sweep

TINY = ["--epochs", "1", "--limit-train", "300", "--hidden", "10"]


def _train_args(shared_data):
    return ["--data-dir", str(shared_data)] + TINY


def test_grid_parsing_names_the_bad_item():
    flags = {"gamma", "hidden", "seed", "out"}
    assert sweep.parse_grid(["gamma=0.5,0.9", "--hidden=5"], flags) == {"gamma": ["0.5", "0.9"], "hidden": ["5"]}
    for item, message in (("gamma", "FLAG=VALUE"), ("speed=1", "not a flag"), ("seed=1,2", "--seeds"),
                          ("gamma=", "FLAG=VALUE")):
        with pytest.raises(ValueError, match=message):
            sweep.parse_grid([item], flags)
    runs = sweep.plan_runs({"gamma": ["0.5", "0.9"]}, 2, "/s", ["--epochs", "1"])
    assert [str(r[2]) for r in runs] == ["/s/gamma=0.5/seed=0", "/s/gamma=0.5/seed=1", "/s/gamma=0.9/seed=0",
                                         "/s/gamma=0.9/seed=1"]
    assert runs[3][3] == ["--epochs", "1", "--gamma", "0.9", "--seed", "1", "--out", "/s/gamma=0.9/seed=1",
                          "--no-progress"]


def test_sweep_on_a_local_cluster_summarizes_resumes_and_reports_failures(shared_data, tmp_path):
    from distributed import LocalCluster
    grid = {"gamma": ["0.5", "0.9"], "lr": ["1e-3", "3e-3"]}
    runs = sweep.plan_runs(grid, 2, tmp_path, _train_args(shared_data))
    # Three grid points: two with 2 seeds, one with a single seed (no interval).
    runs = [r for r in runs if r[0]["lr"] == "1e-3" or (r[0]["gamma"] == "0.5" and r[1] == 0)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        results = sweep.run_sweep(runs, cluster=cluster, progress=False)
        assert sorted(s for s, _ in results.values()) == ["done"] * 5
        # Each summary entry is the mean, std and t-interval of the runs' own metrics.json.
        rows = sweep.summarize(runs)
        for row in rows:
            accs = [json.loads((f / "metrics.json").read_text())["summary"]["test_acc"]
                    for p, _, f, _ in runs if p == row["point"]]
            s = row["test_acc"]
            assert s["n"] == len(accs) == row["runs"]
            assert s["mean"] == pytest.approx(np.mean(accs))
            if len(accs) > 1:
                assert s["std"] == pytest.approx(np.std(accs, ddof=1))
                assert s["ci_low"] <= s["mean"] <= s["ci_high"]
        lines = sweep.write_summary(rows, grid, tmp_path)
        assert len([line for line in lines if line.startswith("| 0.")]) == 3
        assert (tmp_path / "summary.png").stat().st_size > 1000
        # Rerun: complete runs are skipped, their files untouched.
        stamp = (runs[0][2] / "metrics.json").stat().st_mtime_ns
        again = sweep.run_sweep(runs, cluster=cluster, progress=False)
        assert all(s == "skipped" for s, _ in again.values())
        assert (runs[0][2] / "metrics.json").stat().st_mtime_ns == stamp
        # A run that became complete after it was queued (another sweep finished it) is skipped too.
        assert sweep.run_training(runs[0][3], str(runs[0][2])) == ("skipped", "")
        assert (runs[0][2] / "metrics.json").stat().st_mtime_ns == stamp
        # A failing run is reported with its error, and the others finish.
        bad = sweep.plan_runs({"gamma": ["1.5", "0.7"]}, 1, tmp_path / "bad", _train_args(shared_data))
        results = sweep.run_sweep(bad, cluster=cluster, progress=False)
    status = {pathlib.Path(k).parent.name: v for k, v in results.items()}
    assert status["gamma=0.7"][0] == "done"
    assert status["gamma=1.5"][0] == "failed" and "gamma" in status["gamma=1.5"][1]
    assert "gamma" in (tmp_path / "bad" / "gamma=1.5" / "seed=0" / "error.txt").read_text()


def test_cli_sends_the_runs_to_a_separately_started_scheduler(shared_data, tmp_path):
    """The 2 x 2 sweep through `dask scheduler` and `dask worker ADDRESS`, started here as a user would."""
    dask = shutil.which("dask", path=os.path.dirname(sys.executable))
    if dask is None:
        pytest.skip("the dask command is not installed beside this Python")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    scheduler = subprocess.Popen([dask, "scheduler", "--port", "0", "--no-dashboard", "--host", "127.0.0.1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    worker = None
    try:
        address, deadline = None, time.time() + 60
        while address is None and time.time() < deadline:
            line = scheduler.stdout.readline()
            match = re.search(r"Scheduler at:\s+(tcp://\S+)", line)
            address = match.group(1) if match else None
        assert address, "the scheduler did not start"
        worker = subprocess.Popen([dask, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        out = tmp_path / "sweep"
        proc = subprocess.run([sys.executable, "-m", "nemon_np.sweep", "--grid", "gamma=0.5,0.9", "--seeds", "2",
                               "--out", str(out), "--scheduler", address, "--"] + _train_args(shared_data),
                              capture_output=True, text=True, timeout=600)
    finally:
        for p in (worker, scheduler):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 run, 0 already complete, 0 failed" in proc.stdout
    assert len(list(out.glob("gamma=*/seed=*/metrics.json"))) == 4
    assert "| 0.5 | 2 |" in (out / "summary.md").read_text()


def test_cli_rejects_what_the_sweep_sets_itself(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--grid", "gamma=0.5", "--out", str(tmp_path), "--", "--seed", "3"])
    assert "--seed after --: set by the sweep itself" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--grid", "nonsense=1", "--out", str(tmp_path)])
    assert "not a flag of nemon_np.train" in capsys.readouterr().err


def _worker_environment():
    from threadpoolctl import threadpool_info
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), blas


def test_local_cluster_workers_have_one_blas_thread_and_glibc_default_trimming(monkeypatch):
    # Dask's own default (MALLOC_TRIM_THRESHOLD_ = 65536) made a training 1.3x slower in a worker.
    from distributed import Client
    from nemon_np.cluster import local_cluster
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with local_cluster(1) as cluster, Client(cluster) as client:
        (trim, blas), = client.run(_worker_environment).values()
    assert trim is None
    assert blas and all(n == 1 for n in blas)

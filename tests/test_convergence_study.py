import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_convergence_quick_run(tmp_path, shared_data):
    out = tmp_path / "conv"
    proc = subprocess.run([sys.executable, str(ROOT / "analysis" / "convergence.py"), "--quick", "--out", str(out),
                           "--data-dir", str(shared_data)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it@1e-06" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    for name, problem in res["problems"].items():
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
        avg = problem["solvers"]["average"]
        assert avg["certified"]
        # The measured contraction of the average iteration never exceeds the bound.
        assert avg["empirical_rate_max"] <= problem["rho_average"] + 1e-9
        # The bound holds at every iteration for the batch's worst sample.
        r = np.array(avg["max_residual"], dtype=float)
        k = np.arange(len(r))
        ok = ~np.isnan(r)
        assert np.all(r[ok] <= r[0] * problem["rho_average"] ** k[ok] * (1 + 1e-9) + 1e-15)
        for method, e in problem["solvers"].items():
            if e["certified"]:
                assert e["iterations"]["1e-06"]["converged"] == 1.0, (name, method)
    assert (out / "contraction.png").stat().st_size > 1000
    assert any("Anderson to 1e-6" in line for line in res["verdict"])

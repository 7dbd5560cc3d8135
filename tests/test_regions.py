import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from nemon_np import mu_2, mu_inf, norm_inf, project_mu_inf
from nemon_np.projection import project_mondeq, project_norm_inf
from nemon_np.regions import (is_well_posed_exact, project_mondeq_cvxpy, project_norm_inf_cvxpy, region_measures,
                              spectral_radius_abs)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", [1, 4, 25])
def test_norm_ball_projection_equals_cvxpy(rng, n):
    A = rng.normal(size=(n, n))
    P = project_norm_inf(A, 0.7)
    np.testing.assert_allclose(P, project_norm_inf_cvxpy(A, 0.7), atol=1e-6, rtol=0)
    assert norm_inf(P) <= 0.7 + 1e-12
    np.testing.assert_array_equal(project_norm_inf(P, 0.7), P)
    P32 = project_norm_inf(A.astype(np.float32), 0.7)
    assert P32.dtype == np.float32 and norm_inf(P32) <= 0.7 + 1e-12


@pytest.mark.parametrize("n", [1, 4, 20])
def test_mondeq_projection_equals_cvxpy_sdp(rng, n):
    A = rng.normal(size=(n, n))
    P = project_mondeq(A, 0.1)
    np.testing.assert_allclose(P, project_mondeq_cvxpy(A, 0.1), atol=1e-6, rtol=0)
    assert mu_2(P) <= 0.9 + 1e-12
    np.testing.assert_allclose(P - P.T, A - A.T, atol=1e-12)          # skew part kept


def test_norm_projection_lies_inside_the_nemon_set_and_is_farther(rng):
    A = rng.normal(size=(30, 30))
    Pn, Pm = project_norm_inf(A, 0.5), project_mu_inf(A, 0.5)
    assert mu_inf(Pn) <= 0.5 + 1e-12                                   # ||A|| <= g  =>  mu(A) <= g
    assert np.linalg.norm(A - Pm) <= np.linalg.norm(A - Pn) + 1e-12  # the larger set is nearer


def test_exact_well_posedness_agrees_with_enumerating_fixed_points(rng):
    """x = relu(Ax + q) has two solutions somewhere when I - A is not a P-matrix."""
    A = np.array([[0.0, 2.0], [2.0, 0.0]])      # I - A has det -3 < 0
    assert not is_well_posed_exact(A)
    q = np.array([-1.0, -1.0])                   # x = 0 and x = (1, 1) both solve it
    for x in (np.zeros(2), np.ones(2)):
        np.testing.assert_allclose(np.maximum(A @ x + q, 0), x)
    for _ in range(50):
        A = 0.3 * rng.normal(size=(4, 4))
        if min(region_measures(A).values()) < 1:     # any certificate
            assert is_well_posed_exact(A)
    with pytest.raises(ValueError, match="max_n"):
        is_well_posed_exact(np.zeros((20, 20)))


def test_region_measures_are_ordered(rng):
    for _ in range(100):
        A = rng.normal(size=(5, 5))
        v = region_measures(A)
        assert v["nemon"] <= v["norm"] + 1e-12
        assert v["weighted"] <= v["nemon"] + 1e-9
        assert v["weighted"] <= v["perron-frobenius"] + 1e-9
        assert v["perron-frobenius"] == pytest.approx(spectral_radius_abs(A))


def test_compare_regions_quick_run(tmp_path, shared_data):
    out = tmp_path / "cr"
    r = subprocess.run([sys.executable, str(ROOT / "analysis" / "compare_regions.py"), "--quick", "--out", str(out),
                        "--data-dir", str(shared_data)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("share", "slices", "distance"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert all(v == 0 for v in res["inclusions"]["violations"].values())
    assert set(res["inclusions"]["counterexamples"]) == {"in NEMON, not in monDEQ", "in monDEQ, not in NEMON"}
    for name, ex in res["inclusions"]["counterexamples"].items():
        A = np.array(ex["A"])
        inside_nemon, inside_mondeq = mu_inf(A) <= res["gamma"], mu_2(A) <= res["gamma"]
        assert inside_nemon != inside_mondeq
    assert max(res["oracle_max_deviation"].values()) < 1e-6
    assert set(res["training"]) == {"nemon", "weighted", "norm", "mondeq", "none"}
    assert res["training"]["mondeq"]["mu_2"] <= res["gamma"] + 1e-9
    assert res["training"]["norm"]["mu_inf"] <= res["gamma"] + 1e-12
    assert "NEMON's region is" in " ".join(res["verdict"])
    assert "MNIST test accuracy" in r.stdout

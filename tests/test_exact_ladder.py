"""The exact-ladder study (analysis/exact_ladder.py) in its quick form: the ladder is ordered, the gap
split adds up, the radii are ordered, every figure is written, and a rerun reuses what was decided."""
import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
LADDER = ("lipschitz", "interval", "crown", "lp", "exact")


def _run(out, shared_data):
    proc = subprocess.run([sys.executable, str(ROOT / "analysis" / "exact_ladder.py"), "--quick", "--out", str(out),
                           "--data-dir", str(shared_data)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc


def test_exact_ladder_quick_study(tmp_path, shared_data):
    out = tmp_path / "ladder"
    res, proc = _run(out, shared_data)
    assert "UNSOUND" not in proc.stdout + proc.stderr
    for kind, s in res["summary"].items():
        c = np.array([s["certified"][name]["mean"] for name in LADDER] + [s["pgd"]["mean"]])
        # crown <= lp <= exact <= PGD and interval <= crown at every eps (lipschitz may exceed interval)
        assert np.all(np.diff(c[1:], axis=0) >= -1e-12), kind
        pgd, exact, unknown = (np.array(v) for v in (s["pgd"]["mean"], s["certified"]["exact"]["mean"],
                                                     s["unknown"]["mean"]))
        for name in ("interval", "crown", "lp"):
            g = s["gap_split"][name]
            total = sum(np.array(g[part]["mean"]) for part in ("certificate", "attack", "unknown"))
            np.testing.assert_allclose(total, pgd - np.array(s["certified"][name]["mean"]), atol=1e-12)
        assert np.all(np.array(s["gap_split"]["crown"]["unknown"]["mean"]) <= unknown + 1e-12)
        r = res["radii"][kind]
        lower, upper, crown, attack = (np.array(r[k]) for k in ("exact_lower", "exact_upper", "crown", "pgd"))
        resolution = res["config"]["radius_resolution"]
        # exact's lower end is a proof and PGD's radius a real attack: lower <= r* <= PGD's; crown's radius
        # is also proved by exact (crown runs first), up to the two bisections' grids
        assert np.all(lower <= attack) and np.all(lower <= upper) and np.all(crown <= lower + resolution)
    assert any(np.any(np.array(s["certified"]["exact"]["mean"]) > 0) for s in res["summary"].values())
    for name in ("ladder", "seconds", "radii"):
        assert (out / f"{name}.png").stat().st_size > 1000
    cached = len(list((out / "exact_cache").rglob("*.npz")))
    assert cached > 0
    again, _ = _run(out, shared_data)   # models and decided images are read back: the same ladder
    for kind in res["summary"]:
        assert again["summary"][kind]["certified"] == res["summary"][kind]["certified"]
    assert len(list((out / "exact_cache").rglob("*.npz"))) == cached

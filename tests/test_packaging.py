"""The package installs as a user installs it: ``pip install .`` (not editable) into a fresh virtual
environment outside the repository, and a wheel builds; the installed tools run there."""
import email
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import nemon_np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("nemon_np", "setup.cfg", "pyproject.toml", "README.md", "CHANGELOG.md")


def _run(argv, **kw):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, argv))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _source_copy(tmp_path):
    """The files a source distribution needs, copied, so that building leaves the clone untouched."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    return src


def _fresh_venv(tmp_path):
    """A new virtual environment whose only view of this one is its installed dependencies (a .pth
    line adds their folder; the editable install's own .pth inside it is not processed there), so
    that nothing is downloaded and nemon_np itself must come from what pip installs."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (pathlib.Path(purelib) / "nemon_np_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python, pathlib.Path(purelib)


def test_pip_install_outside_the_repository_gives_working_tools(tmp_path):
    src = _source_copy(tmp_path)
    python, site = _fresh_venv(tmp_path)
    _run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-build-isolation", src])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([python, "-c", "import nemon_np; print(nemon_np.__file__); print(nemon_np.__version__)"],
                 cwd=elsewhere).split()
    assert pathlib.Path(where[0]).is_relative_to(site) and where[1] == nemon_np.__version__
    usage = _run([python, "-m", "nemon_np.train", "--help"], cwd=elsewhere)
    assert usage.startswith("usage: python -m nemon_np.train") and "--certified-eps" in usage
    assert "usage" in _run([python, "-m", "nemon_np.robustness", "--help"], cwd=elsewhere)


def test_a_wheel_builds_with_the_package_and_its_requirements(tmp_path):
    src = _source_copy(tmp_path)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
          "-w", tmp_path / "dist", src])
    wheels = list((tmp_path / "dist").glob("nemon_np-*.whl"))
    assert len(wheels) == 1 and f"-{nemon_np.__version__}-" in wheels[0].name
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
        modules = {p.name for p in (ROOT / "nemon_np").glob("*.py")}
        assert {f"nemon_np/{m}" for m in modules} <= names
        assert not any(n.startswith("tests/") for n in names)
        meta = email.message_from_string(z.read(f"nemon_np-{nemon_np.__version__}.dist-info/METADATA").decode())
    required = {r.split(">")[0].split("=")[0].split(";")[0].strip().lower() for r in meta.get_all("Requires-Dist")
                if "extra ==" not in r}
    assert {"numpy", "scipy", "numba", "cvxpy", "scikit-learn", "dask"} <= required

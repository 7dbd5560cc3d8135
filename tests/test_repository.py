"""The repository keeps its shape: imports run one way, committed artifacts stay lean."""
import ast
import pathlib

import nemon_np

PACKAGE = pathlib.Path(nemon_np.__file__).parent


def _imports(path):
    """Modules of nemon_np that ``path`` imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nemon_np."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("nemon_np."))
    return found


def test_no_import_cycle():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    graph = {m: _imports(PACKAGE / f"{m}.py") & modules for m in modules}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert graph["loading"] >= {"models", "conv_model"}   # the walk sees real edges


def test_committed_json_is_lean():
    """Only summaries are committed: the JSON under docs/ stays under 200 KB in all (raw traces stay in
    the analysis scripts' --out folders)."""
    docs = PACKAGE.parent / "docs"
    sizes = {p.name: p.stat().st_size for p in docs.rglob("*.json")}
    assert sum(sizes.values()) < 200_000, sizes


def test_style_is_clean():
    """flake8 with the project's settings (setup.cfg: lines of 120) finds nothing in the code."""
    import subprocess
    import sys
    root = PACKAGE.parent
    proc = subprocess.run([sys.executable, "-m", "flake8", "nemon_np", "tests", "analysis", "benchmarks"], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]

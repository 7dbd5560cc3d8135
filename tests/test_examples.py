"""Every code example of the README and of the user guide runs, so that none can rot.

* ``python`` blocks are executed, in order, one namespace a page, in a fresh folder;
* ``console`` blocks run their ``$`` commands in the same folder, training and sweep commands on a
  small part of MNIST (``SMALL``, and for certified training a ramp that fits, appended: argparse
  takes a flag's last value);
* every other ``python -m nemon_np.<tool>``, ``python analysis/<script>.py`` or
  ``python benchmarks/<script>.py`` line is parsed by that tool's own parser (its flags must exist and
  their values be valid), and every ``make <target>`` names a target of the Makefile.

"../shared/data" in an example stands for the real data beside the repository; pages that use it skip
with the reason when it is absent.
"""
import argparse
import importlib
import pathlib
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from conftest import SHARED_DATA

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs" / "guide").glob("*.md"))
SMALL = ["--limit-train", "2000", "--epochs", "2"]
SMALL_RAMP = ["--eps-warmup", "1", "--eps-ramp", "1"]   # certified training: the ramp fits in 2 epochs
SMALL_TOOLS = ("nemon_np.train", "nemon_np.sweep")
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.M | re.S)


def code_blocks(path):
    """[(language, text)] of a Markdown file's fenced blocks, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def commands(text, prompted=False):
    """The shell commands of a block: continuation lines joined, comments removed; with ``prompted``
    only the lines after a ``$`` prompt (a console block's other lines are the commands' output)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()]
    if prompted:
        return [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line]


def with_data(words):
    return [str(SHARED_DATA) if w == "../shared/data" else w for w in words]


def page_id(path):
    return str(path.relative_to(ROOT))


def test_the_pages_have_examples():
    """The collection below is not empty by accident: the pages hold the blocks it runs."""
    langs = [lang for page in PAGES for lang, _ in code_blocks(page)]
    assert langs.count("python") >= 8 and langs.count("console") >= 5
    assert {page.name for page in PAGES} >= {"README.md", "install.md", "train.md", "certify.md", "exact.md",
                                             "sweeps.md", "studies.md", "library.md", "file-format.md"}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_the_examples_of_a_page_run(page, tmp_path, monkeypatch):
    blocks = [(lang, text) for lang, text in code_blocks(page) if lang in ("python", "console")]
    if not blocks:
        pytest.skip(f"{page_id(page)} has no python or console block")
    if any("../shared/data" in text for _, text in blocks) and not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}: {page_id(page)}'s examples use it")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__example__"}
    for lang, text in blocks:
        if lang == "python":
            code = text.replace('"../shared/data"', repr(str(SHARED_DATA)))
            exec(compile(code, f"{page_id(page)} example", "exec"), namespace)
            continue
        for command in commands(text, prompted=True):
            words = with_data(shlex.split(command))
            assert words[:2] == ["python", "-m"], f"{page_id(page)}: a console command that is not a tool: {command}"
            small = SMALL + (SMALL_RAMP if "--certified-eps" in words else []) if words[2] in SMALL_TOOLS else []
            argv = [sys.executable] + words[1:] + small
            done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


class _Parsed(Exception):
    """Raised by the patched parser once a tool's command line parsed: nothing else runs."""


def _parse_only(monkeypatch):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def _other_commands():
    found = []
    for page in PAGES:
        for lang, text in code_blocks(page):
            if lang not in ("python", "console"):
                found += [pytest.param(page, c, id=f"{page_id(page)}: {c[:60]}") for c in commands(text)
                          if re.match(r"(python (-m nemon_np\.|analysis/|benchmarks/)|make )", c)]
    return found


@pytest.mark.parametrize("page, command", _other_commands())
def test_the_other_commands_parse(page, command, monkeypatch, capsys):
    words = shlex.split(command)
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert all(w in targets or "=" in w for w in words[1:]), f"{page_id(page)}: no such make target: {command}"
        return
    _parse_only(monkeypatch)
    monkeypatch.syspath_prepend(str(ROOT))
    try:
        with pytest.raises(_Parsed):
            if words[1] == "-m":
                importlib.import_module(words[2]).main(words[3:])
            else:
                monkeypatch.setattr(sys, "argv", words[1:])
                monkeypatch.syspath_prepend(str((ROOT / words[1]).parent))   # as `python script.py` puts it first
                runpy.run_path(str(ROOT / words[1]), run_name="__main__")
    except SystemExit as e:
        if e.code == 0 and "--help" in words:
            return
        pytest.fail(f"{page_id(page)}: `{command}` does not parse ({e.code}): {capsys.readouterr().err.strip()}")


def test_a_renamed_flag_fails_the_parse(monkeypatch):
    """The check above can fail: a flag the tool does not have is a parse error, not a pass."""
    _parse_only(monkeypatch)
    with pytest.raises(SystemExit):
        importlib.import_module("nemon_np.train").main(["--dataset", "mnist", "--no-such-flag", "1"])

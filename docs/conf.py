"""Sphinx configuration: ``make docs`` builds docs/_build/html with warnings as errors."""
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import nemon_np  # noqa: E402

project = "nemon_np"
release = version = nemon_np.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon", "sphinx.ext.mathjax",
              "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "notes.md"]
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_inherit_docstrings = False   # scikit-learn's inherited docstrings refer to its own glossary
napoleon_google_docstring = False
napoleon_numpy_docstring = True
myst_heading_anchors = 3
html_theme = "alabaster"
# The measured tables in benchmarks.md skip heading levels in places; the text is what matters.
suppress_warnings = ["myst.header", "myst.xref_missing"]


def _escape(text):
    text = text.replace("|", "\\|").replace("*", "\\*")
    return re.sub(r"(\w)_(?=\W|$)", r"\1\\_", text)


def _escape_plain_math(app, what, name, obj, options, lines):
    """The docstrings write formulas as plain text (|x|, K * x, *state, fit's classes_): escape what reST
    would read as markup, outside ``literals``."""
    for i, line in enumerate(lines):
        bullet = re.match(r"\s*\* ", line)   # a list item's marker stays markup
        head, line = (line[:bullet.end()], line[bullet.end():]) if bullet else ("", line)
        parts = line.split("``")
        lines[i] = head + "``".join(p if k % 2 else _escape(p) for k, p in enumerate(parts))


def _skip_foreign(app, what, name, obj, skip, options):
    """Members inherited from scikit-learn keep its docstrings, which refer to its own glossary."""
    module = getattr(obj, "__module__", None) or ""
    return True if what == "class" and module and not module.startswith("nemon_np") else None


def setup(app):
    app.connect("autodoc-process-docstring", _escape_plain_math, priority=100)
    app.connect("autodoc-skip-member", _skip_foreign)

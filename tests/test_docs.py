"""The documentation: every public name is in the API reference, and the site's sources exist."""
import pathlib
import re

import nemon_np

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_the_api_reference_lists_exactly_the_public_names():
    text = (DOCS / "api.rst").read_text()
    public = text.split("Modules")[0]
    listed = re.findall(r"^\s+nemon_np\.(\w+)\s*$", public, flags=re.M)
    assert sorted(listed) == sorted(nemon_np.__all__)
    for module in re.findall(r"^\s+(nemon_np\.\w+)\s*$", text.split("Modules")[1], flags=re.M):
        __import__(module)   # every module the reference documents imports


def test_the_site_includes_the_guide_and_the_benchmarks():
    index = (DOCS / "index.md").read_text()
    assert all(page in index for page in ("guide/index", "api", "benchmarks"))
    guide = (DOCS / "guide" / "index.md").read_text()
    assert all(page in guide for page in ("install", "train", "certify", "exact", "sweeps", "studies", "file-format"))
    assert (DOCS / "benchmarks.md").is_file()

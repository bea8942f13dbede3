"""The course site: myst.yml extends book.yml, and the book's content builds offline (when jupyter-book is here).

tests/test_repository.py checks that book.yml's table of contents lists every notebook in order; the offline build
below checks the same of the site as Jupyter Book 2 resolves it, i.e. through myst.yml's `extends`.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
COLAB = "https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/"


def test_myst_yml_only_extends_book_yml():
    myst = yaml.safe_load((ROOT / "myst.yml").read_text())
    assert myst["version"] == 1 and myst["extends"] == ["book.yml"]
    assert "toc" not in myst.get("project", {}), "the table of contents lives in book.yml only"
    assert "title" not in myst.get("project", {}), "the book's metadata lives in book.yml only"
    # A local template path would give `make book` the offline check's stand-in theme instead of the real one.
    assert myst["site"]["template"] == "book-theme"
    rules = {rule["rule"]: rule["severity"] for rule in myst["project"]["error_rules"]}
    assert rules["reference-target-resolves"] == "error"  # scripts/check_book.py relies on it


def test_colab_links_open_their_own_notebook():
    for path in NOTEBOOKS:
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
        for url in re.findall(r"https://colab\.research\.google\.com/[^\s)\"'>]+", text):
            assert url == COLAB + path.name, f"{path.name} links to {url}, expected {COLAB + path.name}"


@pytest.mark.skipif(
    importlib.util.find_spec("jupyter_book") is None,
    reason="jupyter-book is not installed (the optional `book` extra; `make book-check` installs it)",
)
@pytest.mark.skipif(shutil.which("node") is None, reason="jupyter-book needs Node.js 18+ on PATH")
def test_book_content_builds_offline():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_book.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""Check the course book's content offline: every page builds, every reference, link and formula resolves.

`jupyter-book build --html` (`make book`) downloads its theme, book-theme, on first use, so it needs the network.
The content does not: `jupyter-book build --site` turns every page into the site's JSON under `_build/site/` as soon
as the theme's folder holds a `template.yml`. So this script

1. puts a stand-in theme (a `template.yml` that installs and starts nothing) where Jupyter Book keeps the downloaded
   one, `_build/templates/site/myst/book-theme/`, unless a theme is already there (a real one works as well);
2. runs `jupyter-book build --site --strict`: myst.yml makes an unresolved reference an error, and maths that KaTeX
   cannot typeset or a missing image is one already; any error fails the check;
3. reads what was built: every link to a local file must have reached a page or a copied file (MyST leaves a link
   to a missing file as it is, silently), and the pages must be book.yml's table of contents in order (the README
   first, every notebooks/NN_*.ipynb among them in order), which also proves that myst.yml's `extends: book.yml`
   brought the table of contents in;
4. removes the stand-in again, so that `make book` still downloads the real theme.

The stand-in is generated rather than committed: it must sit inside `_build/` (ignored, removed by `make clean`),
and pointing myst.yml at a committed folder (`site: template: ./path`) would give `make book` the stand-in too.
A stand-in left behind by a killed run carries MARKER; `make book` removes such a folder before it builds.

    python scripts/check_book.py        # make book-check: about 10 s, no network
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
THEME = ROOT / "_build" / "templates" / "site" / "myst" / "book-theme"
SITE = ROOT / "_build" / "site"
MARKER = "stand-in for book-theme written by scripts/check_book.py"
STAND_IN = f"""# {MARKER}: content checks only, no HTML.
jtex: v1
build:
  install: "true"
  start: "true"
files: []
"""


def build_site() -> tuple[int, str]:
    """Run `jupyter-book build --site --strict` in the repository root; return its exit status and output."""
    env = dict(os.environ)
    if shutil.which("node") is None:
        # Without Node.js on PATH jupyter-book asks whether to download one: answer no rather than wait.
        env.setdefault("JB_ALLOW_NODEENV", "no")
    command = [sys.executable, "-m", "jupyter_book", "build", "--site", "--strict"]
    result = subprocess.run(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    return result.returncode, result.stdout + result.stderr


def built_pages() -> list[dict]:
    """The built pages in table-of-contents order, landing page first: each page's JSON as written by the build."""
    config = json.loads((SITE / "config.json").read_text())
    (project,) = config["projects"]
    slugs = [project["index"]] + [page["slug"] for page in project["pages"] if "slug" in page]
    return [json.loads((SITE / "content" / f"{slug}.json").read_text()) for slug in slugs]


def unresolved_links(node: dict) -> list[str]:
    """Links with a relative URL that the build left as written: they point at a file that does not exist."""
    found = []
    if node.get("type") == "link":
        url = node.get("url", "")
        if not urlparse(url).scheme and not url.startswith(("/", "#")):
            found.append(url)
    for child in node.get("children", []):
        found.extend(unresolved_links(child))
    return found


def check_built_site() -> list[str]:
    """Problems in the built site: links to missing files, pages that are not the README then every notebook."""
    problems = []
    pages = built_pages()
    for page in pages:
        for url in unresolved_links(page["mdast"]):
            problems.append(f"{page['location'].lstrip('/')}: the link to {url!r} reaches no page and no file")
    locations = [page["location"].lstrip("/") for page in pages]
    expected = toc_files()
    notebooks = [f"notebooks/{p.name}" for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    if locations != expected or expected[0] != "README.md" or [f for f in expected if f in notebooks] != notebooks:
        problems.append(
            f"the site's pages are {locations}, expected book.yml's table of contents, {expected}, "
            f"with the README first and every notebook in order: {notebooks}"
        )
    return problems


def toc_files() -> list[str]:
    """The files of book.yml's table of contents in order (its `- file: PATH` lines; PyYAML is not needed)."""
    return re.findall(r"^\s*-\s*file:\s*(\S+)\s*$", (ROOT / "book.yml").read_text(), re.MULTILINE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # no options: --help prints the above and stops
    try:
        import jupyter_book  # noqa: F401
    except ImportError:
        print("jupyter-book is not installed here: `make book-check` installs it (pip install -e '.[book]').")
        return 2
    made_theme = not (THEME / "template.yml").exists()
    if made_theme:
        THEME.mkdir(parents=True, exist_ok=True)
        (THEME / "template.yml").write_text(STAND_IN)
    try:
        status, output = build_site()
    finally:
        if made_theme:
            shutil.rmtree(THEME)
            for folder in THEME.parents[:3]:  # myst/, site/, templates/ when empty
                if not any(folder.iterdir()):
                    folder.rmdir()
    errors = [line.strip() for line in output.splitlines() if line.lstrip().startswith("⛔")]
    if status != 0 or errors:
        print(output.rstrip())
        print(f"book check failed: jupyter-book exited with {status} and reported {len(errors)} error(s)")
        return 1
    problems = check_built_site()
    for problem in problems:
        print(f"⛔ {problem}")
    if problems:
        return 1
    pages = len(built_pages())
    print(f"book check passed: {pages} pages built offline into _build/site, no broken reference, link or formula")
    return 0


if __name__ == "__main__":
    sys.exit(main())

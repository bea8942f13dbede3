"""Point the course at another GitHub repository (a fork): rewrite every reference to the repository's address.

The address lives in one place, `project.github` in myst.yml (the book's link to its source). What cannot read it
carries a copy, and tests/test_repository.py keeps every copy equal to it: the clone URL in each notebook's Colab
cell (the cell runs before the course is cloned, so it holds the address itself), each chapter's "Open in Colab"
and "Launch on Binder" links, docs and tests. This script rewrites all of them, in every text file of the checkout
(.ipynb files included: only the address changes, outputs are kept), plus the GitHub Pages sub-path in the README
(`BASE_URL=/REPO`).

    python scripts/retarget.py alice/diffusion-course            rewrite every reference for github.com/alice/...
    python scripts/retarget.py alice/diffusion-course --dry-run  only list the files that would change
    python scripts/retarget.py --binder-links                    put a "Launch on Binder" link after each chapter's
                                                                 "Open in Colab" link (notebooks/NN_*.py and .ipynb)

Then commit the result in the fork; the Colab and Binder links work once the fork is public on GitHub.

A Binder link opens the chapter in JupyterLab on mybinder.org, in an image that repo2docker builds from binder/
(`https://mybinder.org/v2/gh/OWNER/REPO/main?labpath=notebooks%2FNN_name.ipynb`). --binder-links adds the line
under the Colab link in the .py and in the .ipynb's markdown cell alike (the pair stays in sync, outputs are
kept) and leaves a chapter that has one alone.
"""

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "myst.yml"  # the one place: `project: github: https://github.com/OWNER/REPO`
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+")
TEXT_SUFFIXES = {".py", ".ipynb", ".md", ".yml", ".yaml", ".toml", ".cfg", ".txt", ".cjs"}
# Folders never searched: environments, caches and build output.
SKIPPED = {
    ".git",
    ".venv",
    "_build",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".ipynb_checkpoints",
}


def current_slug(root: Path) -> str:
    """OWNER/REPO of the address in myst.yml's `project.github`."""
    text = (root / SOURCE).read_text()
    found = re.search(r"^\s*github:\s*https://github\.com/(" + SLUG.pattern + r")/?\s*$", text, re.MULTILINE)
    if not found:
        raise SystemExit(f"{SOURCE} has no `github: https://github.com/OWNER/REPO` line: nothing to retarget from")
    return found.group(1)


def text_files(root: Path) -> list[Path]:
    """Every file that may carry the address: text files by suffix, outside environments and build folders."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED and not name.endswith(".egg-info")]
        files.extend(Path(folder, name) for name in names if Path(name).suffix in TEXT_SUFFIXES)
    return sorted(files)


def rewrite(text: str, old: str, new: str) -> tuple[str, int]:
    """`text` with github.com/OLD, colab's github/OLD, mybinder's gh/OLD and `BASE_URL=/OLD_REPO` pointed at NEW;
    and the number of references rewritten."""
    hosts = r"(github\.com/|colab\.research\.google\.com/github/|mybinder\.org/v2/gh/)"
    address = re.compile(hosts + re.escape(old) + r"(?![\w.-])")
    text, count = address.subn(lambda match: match.group(1) + new, text)
    pages = re.compile(r"BASE_URL=/" + re.escape(old.split("/")[1]) + r"(?![\w.-])")
    text, pages_count = pages.subn("BASE_URL=/" + new.split("/")[1], text)
    return text, count + pages_count


def binder_url(slug: str, notebook: str) -> str:
    """mybinder.org's address that opens notebooks/NOTEBOOK in JupyterLab, in the image built from binder/."""
    return f"https://mybinder.org/v2/gh/{slug}/main?labpath=notebooks%2F{notebook}"


def with_binder_link(text: str, slug: str, notebook: str, comment: str = "") -> str:
    """`text` with a "Launch on Binder" line after every "Open in Colab" line (`comment` starts both: "# " in a
    jupytext .py) that is not already followed by one."""
    colab = re.compile(rf"^({re.escape(comment)}\[Open in Colab\]\([^)\s]+\))$(?!\n{re.escape(comment)}\[Launch)", re.M)
    link = f"{comment}[Launch on Binder]({binder_url(slug, notebook)})"
    return colab.sub(lambda match: f"{match.group(1)}\n{link}", text)


def add_binder_links(path: Path, slug: str, dry_run: bool = False) -> bool:
    """Put the Binder link under the Colab link of one chapter, a jupytext .py or its .ipynb (only its markdown
    cells change; outputs are kept). True if the file changed (or, with dry_run, would change)."""
    notebook = path.with_suffix(".ipynb").name
    if path.suffix == ".py":
        text = path.read_bytes().decode("utf-8")
        new_text = with_binder_link(text, slug, notebook, comment="# ")
        if new_text != text and not dry_run:
            path.write_bytes(new_text.encode("utf-8"))
        return new_text != text
    import nbformat  # here, not on top: --help and retargeting need no Jupyter package

    content = nbformat.read(path, as_version=4)
    changed = False
    for cell in content.cells:
        if cell.cell_type == "markdown" and "[Open in Colab]" in cell.source:
            source = with_binder_link(cell.source, slug, notebook)
            changed, cell.source = changed or source != cell.source, source
    if changed and not dry_run:
        nbformat.write(content, path)
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slug", nargs="?", metavar="OWNER/REPO", help="the fork's GitHub owner and repository name")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would change, change nothing")
    parser.add_argument(
        "--binder-links", action="store_true", help="add a Binder link under each chapter's Colab link instead"
    )
    args = parser.parse_args()
    if args.binder_links:
        slug = current_slug(ROOT)
        chapters = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
        paths = [p for chapter in chapters for p in (chapter, chapter.with_suffix(".ipynb")) if p.exists()]
        changed = [path for path in paths if add_binder_links(path, slug, args.dry_run)]
        for path in changed:
            print(f"{path.relative_to(ROOT)}: Binder link {'to add' if args.dry_run else 'added'}")
        verb = "would change" if args.dry_run else "changed"
        print(f"Binder links for {slug}: {verb} {len(changed)} of {len(paths)} file(s); the others have theirs")
        return 0
    if args.slug is None:
        parser.error("give OWNER/REPO (or --binder-links)")
    if not SLUG.fullmatch(args.slug):
        parser.error(
            f"expected OWNER/REPO as on GitHub (letters, digits, '-', and '.' or '_' in REPO); got {args.slug!r}"
        )
    old = current_slug(ROOT)
    if args.slug == old:
        print(f"the course already points at {old}: nothing to do")
        return 0
    changed = 0
    for path in text_files(ROOT):
        text = path.read_bytes().decode("utf-8")  # bytes, not read_text: line endings stay as they are
        new_text, count = rewrite(text, old, args.slug)
        if count:
            changed += 1
            print(f"{path.relative_to(ROOT)}: {count} reference(s)")
            if not args.dry_run:
                path.write_bytes(new_text.encode("utf-8"))
    verb = "would change" if args.dry_run else "changed"
    print(f"{old} -> {args.slug}: {verb} {changed} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

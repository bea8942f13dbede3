"""Point the course at another GitHub repository (a fork): rewrite every reference to the repository's address.

The address lives in one place, `project.github` in myst.yml (the book's link to its source). What cannot read it
carries a copy, and tests/test_repository.py keeps every copy equal to it: the clone URL in each notebook's Colab
cell (the cell runs before the course is cloned, so it holds the address itself), each chapter's "Open in Colab"
link, docs and tests. This script rewrites all of them, in every text file of the checkout (.ipynb files included:
only the address changes, outputs are kept), plus the GitHub Pages sub-path in the README (`BASE_URL=/REPO`).

    python scripts/retarget.py alice/diffusion-course            rewrite every reference for github.com/alice/...
    python scripts/retarget.py alice/diffusion-course --dry-run  only list the files that would change

Then commit the result in the fork; the Colab links work once the fork is public on GitHub.
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
    """`text` with github.com/OLD, colab's github/OLD and `BASE_URL=/OLD_REPO` pointed at NEW; and the count."""
    address = re.compile(r"(github\.com/|colab\.research\.google\.com/github/)" + re.escape(old) + r"(?![\w.-])")
    text, count = address.subn(lambda match: match.group(1) + new, text)
    pages = re.compile(r"BASE_URL=/" + re.escape(old.split("/")[1]) + r"(?![\w.-])")
    text, pages_count = pages.subn("BASE_URL=/" + new.split("/")[1], text)
    return text, count + pages_count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slug", metavar="OWNER/REPO", help="the fork's GitHub owner and repository name")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would change, change nothing")
    args = parser.parse_args()
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

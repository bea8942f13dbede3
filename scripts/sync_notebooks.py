"""Keep every notebook in step with its jupytext pair: notebooks/NN_name.py (py:percent) is the source.

python scripts/sync_notebooks.py            rebuild each .ipynb's cells from its .py, keeping the outputs of
                                            cells whose source did not change
python scripts/sync_notebooks.py --check    exit 1, naming the notebook and the first differing cell, if any
                                            pair is out of sync (run by `make test`)
"""

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat
from jupytext.combine import combine_inputs_with_outputs

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def cells_of(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def first_difference(py_path: Path, ipynb_path: Path) -> str | None:
    """A description of the first cell where the two files differ, or None when they agree."""
    if not ipynb_path.exists():
        return f"{ipynb_path.name} is missing"
    source, stored = cells_of(jupytext.read(py_path)), cells_of(nbformat.read(ipynb_path, as_version=4))
    for index, (a, b) in enumerate(zip(source, stored, strict=False)):
        if a != b:
            return f"cell {index} differs ({a[0]} in the .py, {b[0]} in the .ipynb): {a[1][:60]!r}"
    if len(source) != len(stored):
        return f"{len(source)} cells in the .py, {len(stored)} in the .ipynb"
    return None


def sync(py_path: Path) -> None:
    ipynb_path = py_path.with_suffix(".ipynb")
    notebook = jupytext.read(py_path)
    if ipynb_path.exists():
        notebook = combine_inputs_with_outputs(notebook, nbformat.read(ipynb_path, as_version=4))
    notebook.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    nbformat.write(notebook, ipynb_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report pairs that are out of sync")
    args = parser.parse_args()
    pairs = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    orphans = [p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if not p.with_suffix(".py").exists()]
    problems = [f"{name} has no jupytext .py pair" for name in orphans]
    for py_path in pairs:
        if args.check:
            difference = first_difference(py_path, py_path.with_suffix(".ipynb"))
            if difference:
                problems.append(f"{py_path.name} and its .ipynb are out of sync: {difference}")
        else:
            sync(py_path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("run `make sync` (then `make notebooks` to refresh the outputs)", file=sys.stderr)
    else:
        print(f"{len(pairs)} notebook pairs in sync" if args.check else f"synced {len(pairs)} notebooks")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

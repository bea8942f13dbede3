"""Write the student copy of every chapter: each exercise's reference solution replaced by a stub to fill in.

    python scripts/make_student.py                 notebooks/NN_*.ipynb -> student/NN_*.ipynb   (or: make student)
    python scripts/make_student.py --out DIR       somewhere else
    python scripts/make_student.py --check         exit 1 if an exercise has no marked solution or no check after it

In the chapters, the code of each reference solution sits between the nbgrader markers `### BEGIN SOLUTION` and
`### END SOLUTION` in a cell tagged "solution" (and "hide-input", which the book collapses). The student copy keeps
every cell, replaces what lies between the markers with `raise NotImplementedError("Exercise: your code here")`,
drops the outputs of those cells, and keeps the check cell under each exercise, which fails until the student's
code is right. The markers are the ones nbgrader's `ClearSolutions` reads, so an instructor who grades with
nbgrader can use the chapters as its source notebooks; without nbgrader, graders run the student's notebook and
read the "Exercise N: correct" lines the checks print. CI runs the chapters with their reference solutions, so
every solution passes its own check.
"""

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = 'raise NotImplementedError("Exercise: your code here")'


def strip_solution(source: str) -> str:
    """The cell's source with each BEGIN ... END block replaced by the stub (indented like the BEGIN marker)."""
    lines, inside, out = source.splitlines(), False, []
    for number, line in enumerate(lines, start=1):
        if line.strip() == BEGIN:
            if inside:
                raise ValueError(f"line {number}: {BEGIN} inside another solution block")
            inside = True
            out.append(line[: len(line) - len(line.lstrip())] + STUB)
        elif line.strip() == END:
            if not inside:
                raise ValueError(f"line {number}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{BEGIN} without {END}")
    return "\n".join(out)


def exercise_problems(notebook) -> list[str]:
    """What is wrong with a chapter's exercises: a solution cell without markers or tag, or without a check after it
    (a code cell that asserts), or an exercise with no solution cell."""
    problems, cells = [], notebook.cells
    exercises = sum(cell.source.count("**Exercise ") for cell in cells if cell.cell_type == "markdown")
    solutions = [i for i, cell in enumerate(cells) if BEGIN in cell.source]
    if len(solutions) != exercises:
        problems.append(f"{exercises} exercises but {len(solutions)} marked solution cells")
    for i in solutions:
        if "solution" not in cells[i].metadata.get("tags", []):
            problems.append(f"cell {i} holds a solution but is not tagged 'solution'")
        following = cells[i + 1] if i + 1 < len(cells) else None
        if following is None or following.cell_type != "code" or "assert" not in following.source:
            problems.append(f"cell {i}: no check (a code cell with an assert) right after the solution")
    return problems


def student_copy(notebook):
    """A copy with every solution stripped and the outputs of those cells dropped."""
    copy = nbformat.from_dict(notebook)
    for cell in copy.cells:
        if cell.cell_type == "code" and BEGIN in cell.source:
            cell.source = strip_solution(cell.source)
            cell.outputs, cell.execution_count = [], None
    return copy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "student", help="where the student copies go")
    parser.add_argument("--check", action="store_true", help="only check that every exercise is marked")
    args = parser.parse_args()
    failed = False
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        problems = exercise_problems(notebook)
        for problem in problems:
            print(f"{path.name}: {problem}")
        failed |= bool(problems)
        if not args.check and not problems:
            args.out.mkdir(parents=True, exist_ok=True)
            nbformat.write(student_copy(notebook), args.out / path.name)
    if not args.check and not failed:
        print(f"student copies written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Exercises students can attempt (scripts/make_student.py): every exercise has a marked reference solution with a
check right after it, and the student copy holds stubs instead of the solutions."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_student import BEGIN, STUB, exercise_problems, strip_solution, student_copy  # noqa: E402

CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_strip_solution_keeps_the_signature_and_the_setup():
    source = "x = 1\ndef f(a):\n    ### BEGIN SOLUTION\n    return a + x\n    ### END SOLUTION\nprint(f(1))"
    assert strip_solution(source) == f"x = 1\ndef f(a):\n    {STUB}\nprint(f(1))"
    with pytest.raises(ValueError, match="without ### END SOLUTION"):
        strip_solution("### BEGIN SOLUTION\nx = 1")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.stem[:2])
def test_every_exercise_has_a_marked_solution_and_a_check(path):
    notebook = nbformat.read(path, as_version=4)
    assert exercise_problems(notebook) == []
    student = student_copy(notebook)
    solutions = [cell for cell in notebook.cells if BEGIN in cell.source]
    for original, stub in zip(notebook.cells, student.cells, strict=True):
        if original in solutions:
            assert STUB in stub.source and BEGIN not in stub.source and stub.outputs == []
        else:
            assert stub.source == original.source


def test_the_script_writes_every_student_copy(tmp_path):
    done = subprocess.run([sys.executable, "scripts/make_student.py", "--out", str(tmp_path)], cwd=ROOT, text=True)
    assert done.returncode == 0
    assert sorted(path.name for path in tmp_path.glob("*.ipynb")) == [path.name for path in CHAPTERS]

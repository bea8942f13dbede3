"""The repository's promises: the book lists every chapter, every notebook has its pair and its Colab cell."""

from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def toc_files(entries) -> list[str]:
    files = []
    for entry in entries:
        if "file" in entry:
            files.append(entry["file"])
        files.extend(toc_files(entry.get("children", [])))
    return files


def test_book_lists_every_chapter_in_order():
    toc = toc_files(yaml.safe_load((ROOT / "book.yml").read_text())["project"]["toc"])
    chapters = [f for f in toc if f.startswith("notebooks/")]
    assert chapters == [f"notebooks/{p.name}" for p in NOTEBOOKS]
    assert toc[0] == "README.md"


def test_every_notebook_is_paired_and_starts_with_the_colab_cell():
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        assert path.with_suffix(".py").exists(), f"{path.name} has no jupytext .py pair"
        cells = nbformat.read(path, as_version=4).cells
        assert cells[0].cell_type == "code" and '"google.colab" in sys.modules' in cells[0].source, path.name
        assert cells[1].cell_type == "markdown" and cells[1].source.startswith("# Chapter"), path.name
        assert any("Exercise" in c.source for c in cells if c.cell_type == "markdown"), f"{path.name}: no exercises"


def test_notebooks_are_stored_with_outputs():
    for path in NOTEBOOKS:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert all(c.execution_count for c in cells), f"{path.name} has cells stored without running them"
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name} is stored with an error: {errors[0].get('ename')}"


def test_ci_runs_make_test_on_cpu_and_on_a_guarded_gpu_runner():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    cpu, gpu = workflow["jobs"]["cpu"], workflow["jobs"]["gpu"]
    assert any(step.get("run") == "make test" for step in cpu["steps"])
    assert gpu["runs-on"] == ["self-hosted", "gpu"]
    assert "head.repo.full_name == github.repository" in gpu["if"]  # no fork code on the self-hosted runner
    runs = [step.get("run", "") for step in gpu["steps"]]
    assert "torch.cuda.is_available()" in "".join(runs) and runs[-1] == "make test"
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")

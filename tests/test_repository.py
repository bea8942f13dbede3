"""The repository's promises: the book lists every chapter, every notebook has its pair and its Colab cell, the
repository's address has one source, every script answers --help, CI and the Makefile do what the README says."""

import json
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))  # the jupytext pairs: what people edit
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
COLAB_FOLDER = "/content/diffusion-course"  # where the Colab cell clones the course
HELP_SECONDS = 10  # `--help` answers at once; the slowest scripts spend their time importing torch


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


def test_ci_runs_once_per_change_caches_pip_and_runs_the_gpu_profile():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    triggers, jobs = workflow.get("on", workflow.get(True)), workflow["jobs"]  # YAML 1.1 reads `on` as True
    # A pull request from a branch of the repository (push + pull_request) falls into the push's group.
    group = workflow["concurrency"]["group"]
    assert "github.event.pull_request.head.repo.full_name || github.repository" in group
    assert "github.head_ref || github.ref_name" in group
    assert workflow["concurrency"]["cancel-in-progress"]
    setup_python = next(
        step for step in jobs["cpu"]["steps"] if step.get("uses", "").startswith("actions/setup-python")
    )
    assert setup_python["with"]["cache"] == "pip"
    profile = jobs["gpu-profile"]
    assert profile["runs-on"] == ["self-hosted", "gpu"] and "schedule" in triggers and "workflow_dispatch" in triggers
    assert "schedule" in profile["if"] and "workflow_dispatch" in profile["if"]  # never a pull request's code
    assert any(step.get("run") == "make nbval PROFILE=gpu" for step in profile["steps"])
    # Every self-hosted runner label is declared for actionlint; a native actionlint job lints the workflows.
    declared = set(yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"])
    used = {
        label
        for job in jobs.values()
        for label in ([job["runs-on"]] if isinstance(job["runs-on"], str) else job["runs-on"])
    }
    assert used - {"self-hosted", "ubuntu-latest"} <= declared
    assert any("actionlint" in step.get("uses", "") for step in jobs["workflows"]["steps"])


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_lab_installs_the_lab_extra_and_make_test_adds_the_rest():
    def planned(*args: str) -> str:  # what make would run (-n), as if nothing were installed yet (-B)
        result = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, check=True)
        return result.stdout

    lab = planned("setup-lab", "TORCH_INDEX=https://example.invalid/cpu")
    assert '-e ".[lab]"' in lab and ".[dev]" not in lab
    assert '[ -n "https://example.invalid/cpu" ]' in lab and "--index-url https://example.invalid/cpu" in lab
    assert '[ -n "" ]' in planned("setup-lab", "TORCH_INDEX=")  # no index: the torch step is skipped
    if sys.platform == "linux" and shutil.which("nvidia-smi") is None:  # no GPU: the CPU build is tried first
        assert "--index-url https://download.pytorch.org/whl/cpu" in planned("setup-lab")
    dev = planned("setup")
    assert '-e ".[lab]"' in dev and '-e ".[dev]"' in dev
    assert "COURSE_PROFILE=gpu" in planned("nbval", "PROFILE=gpu")


def first_code_cell(path: Path) -> str:
    """The first code cell of a jupytext percent file, without its `# %%` line."""
    cell, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            if inside:
                break
            inside = "[markdown]" not in line
        elif inside:
            cell.append(line)
    return "\n".join(cell).strip() + "\n"


def repository_slug() -> str:
    """OWNER/REPO from myst.yml's `project.github`, the one source of the repository's address."""
    url = yaml.safe_load((ROOT / "myst.yml").read_text())["project"]["github"]
    assert url.startswith("https://github.com/"), url
    return url.removeprefix("https://github.com/").rstrip("/")


def test_every_colab_cell_and_link_uses_the_one_repository_address():
    slug = repository_slug()
    cells = {path.name: first_code_cell(path) for path in SOURCES}
    assert len(set(cells.values())) == 1, "every notebook starts with the same Colab cell"
    for path in SOURCES:
        assert f'repo = "https://github.com/{slug}"' in cells[path.name], path.name
        links = re.findall(r"^# \[Open in Colab\]\((\S+)\)$", path.read_text(), re.MULTILINE)
        assert links == [f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.stem}.ipynb"]
    for path in [
        *SOURCES,
        *NOTEBOOKS,
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "tests").glob("*.py"),
    ]:
        for found in re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)", path.read_text()):
            assert found == slug, f"{path.relative_to(ROOT)} links to {found}, not {slug} (scripts/retarget.py)"


def test_the_colab_cell_run_twice_clones_and_installs_once_and_ends_in_notebooks(tmp_path, monkeypatch):
    course = tmp_path / "content" / "diffusion-course"
    source = first_code_cell(SOURCES[0])
    assert source.count(f'"{COLAB_FOLDER}"') == 1
    source = source.replace(f'"{COLAB_FOLDER}"', repr(str(course)))
    calls, installed = [], []

    def fake_run(command, **kwargs):  # git clone makes the folder; pip show fails until pip install ran
        calls.append(command)
        if command[:2] == ["git", "clone"]:
            (Path(command[-1]) / "notebooks").mkdir(parents=True)
        if "install" in command:
            installed.append(True)
        failed = "show" in command and not installed
        return subprocess.CompletedProcess(command, 1 if failed else 0)

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run starts where the first one left: in notebooks/
        exec(source, {})
        assert Path.cwd() == course / "notebooks"
    assert sum(command[:2] == ["git", "clone"] for command in calls) == 1
    assert sum("install" in command for command in calls) == 1
    assert sys.path.count(str(course)) == 1
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "content",
        "content/diffusion-course",
        "content/diffusion-course/notebooks",
    ]


def test_retarget_points_a_copy_of_the_course_at_a_fork(tmp_path):
    old, new = repository_slug(), "alice/my-course"
    skipped = (".git", ".venv", "_build", "data", "__pycache__", "*.egg-info", "logs", "runs", "node_modules")
    copy = tmp_path / "course"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*skipped, ".pytest_cache", ".ruff_cache"))
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}

    def retarget(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "scripts/retarget.py", *args]
        return subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=60, check=False)

    assert retarget("not a slug").returncode == 2
    result = retarget(new)
    assert result.returncode == 0, result.stdout + result.stderr
    after = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    changed = {p for p in before if before[p] != after[p]}
    # The files holding the address, and the README for its GitHub Pages sub-path (BASE_URL=/REPO): no other.
    assert changed == {p for p in before if old.encode() in before[p]} | {copy / "README.md"}
    assert not [p for p in after if old.encode() in after[p]]
    assert yaml.safe_load((copy / "myst.yml").read_text())["project"]["github"] == f"https://github.com/{new}"
    for path in sorted((copy / "notebooks").glob("[0-9][0-9]_*.py")):
        assert f'repo = "https://github.com/{new}"' in first_code_cell(path), path.name
        assert f"colab.research.google.com/github/{new}/blob/main/notebooks/{path.stem}.ipynb" in path.read_text()
    for path in sorted((copy / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells  # still valid notebooks, outputs kept
        assert f"https://github.com/{new}" in cells[0].source, path.name
        assert json.loads(before[path])["cells"][0].get("outputs") == cells[0].get("outputs")
    assert "BASE_URL=/my-course make book" in (copy / "README.md").read_text()
    again = retarget(new)
    assert again.returncode == 0 and {p: p.read_bytes() for p in after} == after  # twice changes nothing


def changed_files() -> tuple[str, dict[Path, int]]:
    """`git status`, and the modification time of every file where the scripts write (data/, docs/, the .ipynb
    files, _build/): a script that rewrites a file with the same bytes changes the second, not the first. Source
    files are left out of the second on purpose: people edit them while the tests run."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    outputs = [*(ROOT / "data").rglob("*"), *(ROOT / "docs").rglob("*"), *NOTEBOOKS, *(ROOT / "_build").rglob("*")]
    return status, {path: path.stat().st_mtime_ns for path in outputs if path.is_file()}


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
def test_every_script_answers_help_at_once_and_does_nothing_else():
    assert SCRIPTS, "no scripts found"
    for script in SCRIPTS:
        before = changed_files()
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(script), "--help"],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        seconds = time.perf_counter() - start
        name = script.relative_to(ROOT).as_posix()
        assert result.returncode == 0, f"{name} --help exited with {result.returncode}: {result.stderr[-500:]}"
        assert "usage" in result.stdout.lower() or f"python {name}" in result.stdout, f"{name} --help: no usage"
        assert seconds < HELP_SECONDS, f"{name} --help took {seconds:.1f} s (limit {HELP_SECONDS} s)"
        status, times = changed_files()
        assert status == before[0], f"{name} --help changed the working tree:\n{status}"
        touched = [path.relative_to(ROOT).as_posix() for path, mtime in times.items() if mtime != before[1].get(path)]
        assert not touched, f"{name} --help wrote {touched}"

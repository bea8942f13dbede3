"""What the course gives instructors: the site published by a workflow that checks it first, a syllabus whose run
times are the measured ones, Binder / JupyterHub images that install what the course declares, and an instructors'
page whose commands, training times and budgets come from the scripts, the model cards and the profiles."""

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from course_lib.recipes import RECIPES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself needs there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import retarget  # noqa: E402
import syllabus  # noqa: E402
import sync_notebooks  # noqa: E402


def workflow(name: str) -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def test_pages_workflow_checks_the_book_then_deploys_it_from_main():
    pages = workflow("pages.yml")
    triggers = pages.get("on", pages.get(True))  # YAML 1.1 reads `on` as True
    assert triggers["push"] == {"branches": ["main"]} and "workflow_dispatch" in triggers
    assert pages["concurrency"]["group"] == "pages"
    build, deploy = pages["jobs"]["build"], pages["jobs"]["deploy"]
    runs = [step.get("run", "") for step in build["steps"]]
    uses = [step.get("uses", "") for step in build["steps"]]
    # jupyter-book as pyproject.toml's `book` extra names it; the check of `make book-check` before the HTML build.
    assert any("['optional-dependencies']['book']" in run for run in runs)
    book_check = next(i for i, run in enumerate(runs) if run.strip() == "python scripts/check_book.py")
    html = next(i for i, run in enumerate(runs) if "jupyter-book build --html" in run)
    assert book_check < html and 'base_url="/$REPOSITORY_NAME"' in runs[html]
    assert build["steps"][html]["env"]["REPOSITORY_NAME"] == "${{ github.event.repository.name }}"
    assert "$(BIN)/python scripts/check_book.py" in (ROOT / "Makefile").read_text()  # the same check as make's
    upload = next(step for step in build["steps"] if step.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html" and uses.index(upload["uses"]) > html
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["steps"][-1]["uses"].startswith("actions/deploy-pages")
    assert pages["permissions"] == {"contents": "read"}  # only the deploy job may write


# The syllabus: docs/syllabus.yml -> docs/syllabus.md (scripts/syllabus.py), run times from docs/benchmarks.md.


def load_syllabus() -> dict:
    return yaml.safe_load((ROOT / "docs" / "syllabus.yml").read_text())


def test_every_chapter_of_the_book_has_a_syllabus_entry_and_every_entry_a_chapter():
    chapters = syllabus.book_chapters(ROOT)
    assert chapters and all(f"notebooks/{name}.ipynb" in (ROOT / "book.yml").read_text() for name in chapters)
    entries = [entry["notebook"] for entry in load_syllabus()["chapters"]]
    missing = [name for name in chapters if name not in entries]
    assert not missing, (
        f"chapters without a syllabus entry: {missing}. Add one per chapter to docs/syllabus.yml (its header lists "
        f"the fields), then run `python scripts/syllabus.py`"
    )
    assert entries == chapters, f"docs/syllabus.yml lists {entries}, book.yml {chapters}: remove the extra entries"


def test_the_syllabus_is_complete_and_prerequisites_come_first():
    entries = load_syllabus()["chapters"]
    assert syllabus.problems(load_syllabus(), syllabus.book_chapters(ROOT)) == []
    by_number = {syllabus.number(entry): entry for entry in entries}
    for entry in entries:
        assert all(chapter < syllabus.number(entry) for chapter in entry["prerequisites"]), entry["notebook"]
        for key in ("day", "week"):  # no path teaches a chapter before what it builds on
            assert all(by_number[chapter][key] <= entry[key] for chapter in entry["prerequisites"]), entry["notebook"]


def test_the_syllabus_check_reports_what_is_wrong():
    good = load_syllabus()
    chapters = [entry["notebook"] for entry in good["chapters"]]
    assert syllabus.problems(good, [*chapters, "99_new_chapter"]) == [
        "chapter 99_new_chapter is in book.yml but has no entry in docs/syllabus.yml: add one (notebook, title, "
        "prerequisites, objectives, reading_minutes, exercise_minutes, practitioner, day, week)"
    ]
    assert "which book.yml does not list" in syllabus.problems(good, chapters[:-1])[0]
    bad = copy.deepcopy(good)
    bad["chapters"][1]["prerequisites"] = [3]  # chapter 2 needs chapter 3: later
    bad["chapters"][3]["day"] = 1  # chapter 4 on day 1, its prerequisite, chapter 3, on day 2
    bad["chapters"][4]["objectives"] = ["one", "two"]
    bad["chapters"][5]["week"] = 11
    del bad["chapters"][6]["reading_minutes"]
    found = syllabus.problems(bad, chapters)
    assert any("02_noise_schedules: prerequisite 3 is not an earlier chapter" in p for p in found), found
    assert any("04_unet: A one-week intensive teaches its prerequisite, chapter 3, after it" in p for p in found)
    assert any("05_ddim_and_fast_samplers: 2 learning objectives" in p for p in found), found
    assert any("06_latent_diffusion: `week: 11` is outside 1..10" in p for p in found), found
    assert any("07_guidance: `reading_minutes` must be of type int, got None" in p for p in found), found


def test_the_syllabus_page_and_the_instructors_tables_are_what_the_script_renders_now():
    for path, expected in syllabus.rendered(ROOT).items():
        assert (ROOT / path).read_text() == expected, (
            f"{path} is stale: its sources (docs/syllabus.yml, docs/benchmarks.md, data/*.json, "
            "course_lib/profiles.py) changed. Run `python scripts/syllabus.py` and commit the result"
        )
    result = subprocess.run(
        [sys.executable, "scripts/syllabus.py", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def glance_rows(page: str) -> dict[str, list[str]]:
    """The syllabus page's "At a glance" table: {chapter number: its cells}."""
    rows = re.findall(r"^\| \[(\d+)\. [^]]+\]\(#syllabus-\d\d\) \|(.*)\|$", page, re.MULTILINE)
    return {int(n): [cell.strip() for cell in cells.split("|")] for n, cells in rows}


def test_the_run_times_on_the_page_are_those_measured_in_benchmarks():
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    rows = glance_rows((ROOT / "docs" / "syllabus.md").read_text())
    assert sorted(rows) == [syllabus.number(entry) for entry in load_syllabus()["chapters"]]
    for profile, column in (("cpu", 3), ("gpu", 4)):
        begin, end = f"<!-- notebooks:{profile}:begin -->", f"<!-- notebooks:{profile}:end -->"
        section = benchmarks[benchmarks.index(begin) : benchmarks.index(end)] if begin in benchmarks else ""
        measured = {int(n): int(s) for n, s in re.findall(r"^\| (\d\d)_\w+ \| (\d+) \|", section, re.MULTILINE)}
        for chapter, cells in rows.items():
            shown = cells[column]
            if chapter not in measured:
                assert shown == "not measured yet", (profile, chapter, shown)
                continue
            minutes, seconds = re.fullmatch(r"(?:(\d+) min )?(\d+) s", shown).groups()
            assert int(minutes or 0) * 60 + int(seconds) == measured[chapter], (profile, chapter, shown)
    assert "<!-- notebooks:cpu:begin -->" in benchmarks  # the cpu times are measured: the page shows them


BUDGETS_S = {"smoke": 30, "cpu": 360}  # every chapter's run (docs/writing-notebooks.md; issues 15-17)


@pytest.mark.parametrize("profile", BUDGETS_S)
def test_every_notebook_meets_its_budget_as_measured(profile):
    # The table is rewritten by `run_notebooks.py --profile P --report docs/benchmarks.md`: a chapter that grows
    # past the budget fails here as soon as its new time is recorded, not when a reviewer notices.
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    _, times = syllabus.run_times(benchmarks, profile)
    assert len(times) == len(load_syllabus()["chapters"]), sorted(times)
    over = {name: seconds for name, (seconds, _) in times.items() if seconds > BUDGETS_S[profile]}
    assert not over, f"over the {profile} budget of {BUDGETS_S[profile]} s: {over}"


def test_a_timing_row_says_how_busy_the_machine_was(tmp_path, monkeypatch):
    import run_notebooks

    report = tmp_path / "benchmarks.md"
    old_row = "| 01_forward_diffusion | 8 | 2026-12-01 | `python scripts/run_notebooks.py --profile smoke` |"
    report.write_text(
        "<!-- notebooks:smoke:begin -->\nProfile `smoke`, on a test machine:\n\n| notebook | wall time (s) | measured "
        f"| command |\n|---|---:|---|---|\n{old_row}\n<!-- notebooks:smoke:end -->\n"
    )
    run_notebooks.write_report(report, "smoke", [("02_noise_schedules", 12.4, 1.04)], "python x.py")
    text = report.read_text()
    assert "| 01_forward_diffusion | 8 | 2026-12-01 | not recorded | `python scripts/run_notebooks.py" in text
    assert "| 02_noise_schedules | 12 | " in text and " | 1.0 | `python x.py` |" in text
    _, times = syllabus.run_times(text, "smoke")  # the syllabus still reads the rows
    assert times["02_noise_schedules"][0] == 12 and times["01_forward_diffusion"][0] == 8
    assert run_notebooks.cores_busy((100, 1000), (150, 1100)) == pytest.approx(0.5 * os.cpu_count())
    assert run_notebooks.cores_busy(None, (150, 1100)) is None


def test_a_gpu_section_in_benchmarks_appears_on_the_page():
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    first = load_syllabus()["chapters"][0]["notebook"]
    gpu = (
        "\n<!-- notebooks:gpu:begin -->\nProfile `gpu`, on one test GPU:\n\n| notebook | wall time (s) | measured "
        f"| command |\n|---|---:|---|---|\n| {first} | 75 | 2030-01-01 | `...` |\n<!-- notebooks:gpu:end -->\n"
    )
    page = syllabus.render_syllabus(load_syllabus(), benchmarks.replace("<!-- notebooks:gpu:begin -->", "") + gpu)
    rows = glance_rows(page)
    assert rows[1][4] == "1 min 15 s" and rows[2][4] == "not measured yet"
    assert "Run times in the `gpu` profile: measured 2030-01-01 on one test GPU." in page


def test_each_path_adds_up_its_chapters_minutes():
    entries, page = load_syllabus()["chapters"], (ROOT / "docs" / "syllabus.md").read_text()
    every = sum(entry["reading_minutes"] + entry["exercise_minutes"] for entry in entries)
    practitioner = sum(e["reading_minutes"] + e["exercise_minutes"] for e in entries if e["practitioner"])
    assert f"### A one-week intensive: {every / 60:.1f} h" in page
    assert f"### A ten-week term: {every / 60:.1f} h" in page
    assert f"### The practitioner's path: {practitioner / 60:.1f} h" in page
    assert 0 < practitioner < every


# Binder / JupyterHub: binder/ (repo2docker) installs what pyproject.toml and environment.yml do, with CPU torch.


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def test_binder_installs_the_course_with_its_lab_extra_and_the_cpu_build_of_torch():
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
    assert SpecifierSet(pyproject()["requires-python"]).contains("3.11")
    lines = requirement_lines(ROOT / "binder" / "requirements.txt")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    # The course itself, editable (course_lib finds data/ beside it), with the `lab` extra: through the package's own
    # metadata binder installs exactly pyproject.toml's dependencies and that extra, nothing typed twice.
    assert "-e .[lab]" in lines
    assert "lab" in pyproject()["optional-dependencies"]
    # What binder names besides (torch, torchvision, for the CPU index) carries pyproject.toml's range, so pip has
    # nothing to reconcile.
    declared = {Requirement(line).name: Requirement(line).specifier for line in pyproject()["dependencies"]}
    pinned = [Requirement(line) for line in lines if not line.startswith("-")]
    assert {requirement.name for requirement in pinned} == {"torch", "torchvision"}
    for requirement in pinned:
        assert requirement.specifier == declared[requirement.name], (requirement, declared[requirement.name])


def test_environment_yml_installs_the_same_extra_and_the_same_torch_ranges():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip = next(entry["pip"] for entry in environment if isinstance(entry, dict))
    assert pip == ["-e .[lab]"]
    assert "python=3.11" in environment  # binder/runtime.txt's python-3.11
    declared = {Requirement(line).name: Requirement(line).specifier for line in pyproject()["dependencies"]}
    conda = dict(re.fullmatch(r"([\w-]+)(.*)", entry).groups() for entry in environment if isinstance(entry, str))
    assert SpecifierSet(conda["pytorch"]) == declared["torch"]  # conda-forge names torch `pytorch`
    assert SpecifierSet(conda["torchvision"]) == declared["torchvision"]


def test_retarget_rewrites_binder_addresses_too():
    text = "[Launch on Binder](https://mybinder.org/v2/gh/old/course/main?labpath=notebooks%2F01_a.ipynb)"
    assert retarget.rewrite(text, "old/course", "alice/fork") == (text.replace("old/course", "alice/fork"), 1)


def test_every_binder_link_uses_the_one_repository_address():
    slug = yaml.safe_load((ROOT / "myst.yml").read_text())["project"]["github"].removeprefix("https://github.com/")
    files = [*(ROOT / "notebooks").glob("[0-9][0-9]_*.*"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for path in files:
        for found in re.findall(r"mybinder\.org/v2/gh/([\w.-]+/[\w.-]+)", path.read_text()):
            assert found == slug, f"{path.relative_to(ROOT)} launches {found} on Binder, not {slug}"


def test_binder_links_go_under_each_colab_link_and_keep_the_pair_in_sync(tmp_path):
    source = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))[0]
    py, ipynb = tmp_path / source.name, tmp_path / source.with_suffix(".ipynb").name
    # a copy of chapter 1 as it was before it had its link
    py.write_text("".join(line for line in source.read_text().splitlines(True) if "[Launch on Binder]" not in line))
    original = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    for cell in original.cells:
        cell.source = "".join(line for line in cell.source.splitlines(True) if "[Launch on Binder]" not in line)
    nbformat.write(original, ipynb)
    before = nbformat.read(ipynb, as_version=4)
    assert retarget.add_binder_links(py, "alice/fork") and retarget.add_binder_links(ipynb, "alice/fork")
    url = f"https://mybinder.org/v2/gh/alice/fork/main?labpath=notebooks%2F{ipynb.name}"
    lines = py.read_text().splitlines()
    colab = next(i for i, line in enumerate(lines) if line.startswith("# [Open in Colab]("))
    assert lines[colab + 1] == f"# [Launch on Binder]({url})"
    assert py.read_text().count("[Launch on Binder]") == 1
    after = nbformat.read(ipynb, as_version=4)
    assert "[Open in Colab]" in after.cells[1].source and f"\n[Launch on Binder]({url})\n" in after.cells[1].source
    changed = [i for i, (a, b) in enumerate(zip(before.cells, after.cells, strict=True)) if a != b]
    assert changed == [1]  # the title cell only; every output kept
    assert sync_notebooks.first_difference(py, ipynb) is None  # the .py and the .ipynb still agree
    snapshot = py.read_bytes(), ipynb.read_bytes()
    assert not retarget.add_binder_links(py, "alice/fork") and not retarget.add_binder_links(ipynb, "alice/fork")
    assert (py.read_bytes(), ipynb.read_bytes()) == snapshot  # a second run changes nothing


# docs/instructors.md: its generated tables hold what the cards, benchmarks.md and the profiles say.


def table(page: str, key: str) -> list[list[str]]:
    """The rows (cells stripped) of the table between <!-- KEY:begin --> and <!-- KEY:end -->, header left out."""
    section = page[page.index(f"<!-- {key}:begin -->") : page.index(f"<!-- {key}:end -->")]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_the_book_shows_the_syllabus_first_and_the_instructors_page_last():
    toc = re.findall(r"^\s*-\s*file:\s*(\S+)\s*$", (ROOT / "book.yml").read_text(), re.MULTILINE)
    assert toc[:2] == ["README.md", "docs/syllabus.md"] and toc[-1] == "docs/instructors.md"
    assert all((ROOT / path).exists() for path in toc)


def test_a_chapter_uses_a_model_when_it_names_it_not_when_a_variable_shares_its_name():
    """Chapter 15 has a variable `noisy_classifier` (the evaluation classifier left in training mode) and does not
    load chapter 13's noisy classifier; every chapter that calls load_digit_classifier() uses the digit classifier."""
    rows = {row[0].strip("`"): row for row in table((ROOT / "docs" / "instructors.md").read_text(), "models")}
    if "noisy_classifier" in rows:
        assert "15" not in rows["noisy_classifier"][1].split(", ")
    assert {"4", "5", "12"} <= set(rows["digit_classifier"][1].split(", "))


def test_every_trained_model_has_one_command_and_the_time_its_card_recorded():
    rows = {row[0].strip("`"): row for row in table((ROOT / "docs" / "instructors.md").read_text(), "models")}
    cards = {path.stem: json.loads(path.read_text()) for path in (ROOT / "data").glob("*.json")}
    trained = {name: card["training"] for name, card in cards.items() if "wall_minutes" in card.get("training", {})}
    assert set(rows) == set(trained) and {"unet_mnist_eps", "digit_classifier", "vae_mnist"} <= set(rows)
    for name, training in trained.items():
        _, chapters, command, minutes, machine = rows[name]
        assert minutes == f"{training['wall_minutes']} min" and machine.startswith(training["machine"]), name
        command = command.strip("`")
        script = re.search(r"python (scripts/\w+\.py)", command).group(1)
        source = (ROOT / script).read_text()
        for flag in re.findall(r"(--[\w-]+)", command):
            assert f'"{flag}"' in source, f"{name}: {script} has no option {flag}"
        recipe = re.search(r"--recipe (\w+)", command)
        if recipe:
            assert recipe.group(1) in RECIPES, command
            assert command.startswith(f"rm -f data/{name}.json && ")  # a finished card counts as done
        sources = {stem: (ROOT / "notebooks" / f"{stem}.py").read_text() for stem in syllabus.book_chapters(ROOT)}
        marks = [f"load_{name}(", *(f"{q}{name}{q}" for q in "\"'`")]  # its loader, or the name quoted
        named = [str(int(stem[:2])) for stem, text in sources.items() if any(mark in text for mark in marks)]
        assert chapters == (", ".join(named) or "none yet"), name


def test_every_benchmark_row_is_a_command_that_benchmarks_md_records():
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    rows = table((ROOT / "docs" / "instructors.md").read_text(), "benchmarks")
    assert {row[0].strip("`") for row in rows} == set(re.findall(r"<!-- bench:(\w+):begin -->", benchmarks))
    for name, measured, command in rows:
        assert f"Measured {measured} with {command}" in benchmarks, name


def test_the_profile_table_holds_the_cpu_and_gpu_budgets():
    from course_lib.profiles import PROFILES

    rows = {row[0].strip("`"): row for row in table((ROOT / "docs" / "instructors.md").read_text(), "profiles")}
    assert set(rows) == {field for field in vars(PROFILES["cpu"]) if field != "name"}
    assert rows["unet_samples"][2:] == [f"{PROFILES['cpu'].unet_samples:,}", f"{PROFILES['gpu'].unet_samples:,}"]


def test_the_grading_snippet_reports_each_exercise(tmp_path):
    page = (ROOT / "docs" / "instructors.md").read_text()
    snippet = textwrap.dedent(re.search(r"<<'EOF'\n(.*?)\n    EOF\n", page, re.S).group(1))
    chapter = nbformat.read(sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))[0], as_version=4)
    solutions = [i for i, cell in enumerate(chapter.cells) if "solution" in cell.metadata.get("tags", [])]
    check = chapter.cells[solutions[0] + 1]  # as a run with --allow-errors leaves a failed check
    check.outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="wrong", traceback=[])]
    nbformat.write(chapter, tmp_path / "graded.ipynb")
    result = subprocess.run(
        [sys.executable, "-", str(tmp_path / "graded.ipynb")], input=snippet, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["exercise 1: AssertionError: wrong"] + [
        f"exercise {n}: solved" for n in range(2, len(solutions) + 1)
    ]


def test_the_instructors_page_names_the_commands_of_the_issue():
    page = (ROOT / "docs" / "instructors.md").read_text()
    for promise in [
        "make student",
        "python scripts/run_notebooks.py --profile cpu --store --report docs/benchmarks.md 04",
        "make bench",
        "repo2docker --no-run",
        "pip install -r binder/requirements.txt",
        "COURSE_DATA_DIR",
        "COURSE_PROFILE",
        "python scripts/retarget.py --binder-links",
        "python scripts/run_notebooks.py --profile gpu --report docs/benchmarks.md",
    ]:
        assert promise in page, promise


def test_every_chapter_has_its_colab_and_binder_links():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        text = path.read_text()
        assert "[Open in Colab](" in text and "[Launch on Binder](" in text, (
            f"{path.name} lacks its Colab or Binder link: python scripts/retarget.py --binder-links adds the latter"
        )

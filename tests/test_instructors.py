"""What the course gives instructors: the site published by a workflow that checks it first, and a syllabus whose
run times are the measured ones."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import syllabus  # noqa: E402


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
    for entry in entries:
        assert all(chapter < syllabus.number(entry) for chapter in entry["prerequisites"]), entry["notebook"]
        assert all(entry[key] >= other[key] for other in entries if syllabus.number(other) in entry["prerequisites"]
                   for key in ("day", "week")), entry["notebook"]  # fmt: skip


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


def test_the_syllabus_page_is_what_the_script_renders_now():
    expected = syllabus.rendered(ROOT)[Path("docs/syllabus.md")]
    assert (ROOT / "docs" / "syllabus.md").read_text() == expected, (
        "docs/syllabus.md is stale: its sources (docs/syllabus.yml, docs/benchmarks.md) changed. "
        "Run `python scripts/syllabus.py` and commit the result"
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

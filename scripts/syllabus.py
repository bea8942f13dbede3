"""Render the instructors' pages from their sources, so that nothing on them that is measured is typed by hand.

    python scripts/syllabus.py            rewrite docs/syllabus.md and the generated tables of docs/instructors.md
    python scripts/syllabus.py --check    exit 1 if either is not what this script renders now (make lint)

docs/syllabus.md, the book's syllabus page, comes from two sources:
- docs/syllabus.yml: each chapter's title, prerequisites, learning objectives, the minutes a student spends reading
  and on the exercises (estimates), and the three paths through the course, with the day, week and
  practitioner's-path flag of each chapter; the page computes each path's hours from the chapters' minutes;
- docs/benchmarks.md, "Notebook run times": each notebook's measured wall time in the `cpu` and `gpu` profiles,
  between the markers `<!-- notebooks:PROFILE:begin -->` and `<!-- notebooks:PROFILE:end -->` that
  scripts/run_notebooks.py --report writes. A notebook (or a profile) without a row there is "not measured yet".

docs/instructors.md is written by hand except for three tables, each between `<!-- KEY:begin -->` and
`<!-- KEY:end -->`:
- `models`: every model card in data/*.json that records its training: the command that trains the model, the wall
  time and machine the card recorded (`training.wall_minutes`, `training.machine`), and the chapters of book.yml
  whose notebook names the model (`load_digit_classifier` names digit_classifier);
- `benchmarks`: every figure of docs/benchmarks.md written by scripts/bench.py, with the date and the command its
  section records;
- `profiles`: the budgets of the `cpu` and `gpu` run profiles, from course_lib.profiles (values and comments).

The syllabus is checked before anything is written: every chapter of book.yml has an entry and every entry a
chapter, prerequisites point to earlier chapters, each path's day or week exists. After `make notebooks` (new run
times), a retrained model (a new card) or a new benchmark, run this script and commit the pages.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path("docs/syllabus.yml")
PAGE = Path("docs/syllabus.md")
BENCHMARKS = Path("docs/benchmarks.md")
INSTRUCTORS = Path("docs/instructors.md")
PROFILES = ("cpu", "gpu")  # the run times the page shows
NOT_MEASURED = "not measured yet"
FIELDS = {
    "notebook": str,
    "title": str,
    "prerequisites": list,
    "objectives": list,
    "reading_minutes": int,
    "exercise_minutes": int,
    "practitioner": bool,
}
# Trained first: the classifier judges every other model; the fine-tunes and LoRA start from unet_mnist_eps; the
# latent model needs the VAE. The other cards follow in alphabetical order.
TRAIN_FIRST = ("digit_classifier", "unet_mnist_eps", "vae_mnist")
BUDGET_MINUTES = 600  # a ceiling for train_unet.py: training ends at the recipe's last step, usually long before
COMMAND = "python scripts/syllabus.py"


def number(entry: dict) -> int:
    """The chapter number: the notebook's first two digits."""
    return int(entry["notebook"][:2])


def book_chapters(root: Path) -> list[str]:
    """The notebooks book.yml's table of contents lists, in order, as names without folder or suffix."""

    def files(entries: list[dict]) -> list[str]:
        return [f for e in entries for f in ([e["file"]] if "file" in e else []) + files(e.get("children", []))]

    toc = yaml.safe_load((root / "book.yml").read_text())["project"]["toc"]
    return [Path(f).stem for f in files(toc) if re.fullmatch(r"notebooks/\d\d_\w+\.ipynb", f)]


def problems(syllabus: dict, chapters: list[str]) -> list[str]:
    """What is wrong with the syllabus, against the chapters of book.yml: an empty list when nothing is."""
    found = []
    entries = syllabus.get("chapters", [])
    listed = [entry.get("notebook") for entry in entries]
    for name in chapters:
        if name not in listed:
            found.append(
                f"chapter {name} is in book.yml but has no entry in {SOURCE}: add one (notebook, title, "
                f"prerequisites, objectives, reading_minutes, exercise_minutes, practitioner, day, week)"
            )
    for name in listed:
        if name not in chapters:
            found.append(f"{SOURCE} has an entry for {name}, which book.yml does not list: remove it")
    if listed != sorted(listed):
        found.append(f"{SOURCE} lists the chapters out of order: {listed}")
    paths = syllabus.get("paths", [])
    for entry in entries:
        name = entry.get("notebook", "?")
        fields = {**FIELDS, **{path["key"]: int for path in paths if "units" in path}}
        wrong = [field for field, kind in fields.items() if not isinstance(entry.get(field), kind)]
        for field in wrong:
            found.append(f"{name}: `{field}` must be of type {fields[field].__name__}, got {entry.get(field)!r}")
        if wrong:
            continue
        if not 3 <= len(entry["objectives"]) <= 5:
            found.append(f"{name}: {len(entry['objectives'])} learning objectives, expected 3 to 5")
        if min(entry["reading_minutes"], entry["exercise_minutes"]) <= 0:
            found.append(f"{name}: minutes must be positive")
        numbered = [other for other in entries if re.match(r"\d\d_", str(other.get("notebook")))]
        earlier = {number(other): other for other in numbered if number(other) < number(entry)}
        for chapter in entry["prerequisites"]:
            if chapter not in earlier:
                found.append(f"{name}: prerequisite {chapter!r} is not an earlier chapter (earlier: {sorted(earlier)})")
                continue
            for path in paths:
                taught = earlier[chapter].get(path["key"])
                if "units" in path and isinstance(taught, int) and taught > entry[path["key"]]:
                    found.append(f"{name}: {path['title']} teaches its prerequisite, chapter {chapter}, after it")
        for path in paths:
            if "units" in path and not 1 <= entry[path["key"]] <= path["units"]:
                found.append(f"{name}: `{path['key']}: {entry[path['key']]}` is outside 1..{path['units']}")
    return found


def run_times(benchmarks: str, profile: str) -> tuple[str, dict[str, tuple[int, str]]]:
    """From docs/benchmarks.md's section of one profile: its machine line and {notebook: (seconds, date)}."""
    begin, end = f"<!-- notebooks:{profile}:begin -->", f"<!-- notebooks:{profile}:end -->"
    if begin not in benchmarks or end not in benchmarks:
        return "", {}
    section = benchmarks[benchmarks.index(begin) + len(begin) : benchmarks.index(end)]
    machine = re.search(r"^Profile `\w+`, on (.+):$", section, re.MULTILINE)
    rows = re.findall(r"^\| (\d\d_\w+) \| (\d+) \| (\S+) \|", section, re.MULTILINE)
    return (machine.group(1) if machine else ""), {name: (int(s), when) for name, s, when in rows}


def duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60} s"


def hours(minutes: float) -> str:
    return f"{minutes / 60:.1f} h"


def chapter_link(entry: dict) -> str:
    return f"[{number(entry)}. {entry['title']}](#syllabus-{entry['notebook'][:2]})"


def render_syllabus(syllabus: dict, benchmarks: str) -> str:
    """The whole of docs/syllabus.md."""
    entries = syllabus["chapters"]
    measured = {profile: run_times(benchmarks, profile) for profile in PROFILES}

    def run_time(entry: dict, profile: str) -> str:
        found = measured[profile][1].get(entry["notebook"])
        return duration(found[0]) if found else NOT_MEASURED

    def minutes(chosen: list[dict]) -> int:
        return sum(entry["reading_minutes"] + entry["exercise_minutes"] for entry in chosen)

    def cpu_minutes(chosen: list[dict]) -> str:
        times = [measured["cpu"][1].get(entry["notebook"]) for entry in chosen]
        known = sum(found[0] for found in times if found)
        missing = sum(found is None for found in times)
        return f"{known / 60:.0f} min" + (f" ({missing} not measured yet)" if missing else "")

    lines = [
        "---",
        "title: Syllabus",
        "---",
        "",
        f"% Rendered by `{COMMAND}` from {SOURCE} (chapters, objectives, minutes, paths) and {BENCHMARKS}",
        "% (run times). Edit those and rerun the script; `--check` fails while this page is stale.",
        "",
        f"The course has {len(entries)} chapters, one notebook each. For every chapter: the chapters it builds on, "
        "what a student can do after it, the time a student spends on it and how long the notebook itself runs.",
        "",
        f"- **Reading** and **exercises** are the authors' estimates, not measurements ({SOURCE} says how they were "
        "made); the time the notebook's cells compute comes on top.",
        "- **Run time** is measured: one run of the whole notebook in the `cpu` profile (a laptop CPU; the stored "
        "outputs come from it) and in the `gpu` profile (one GPU), as `COURSE_PROFILE` chooses (README, "
        f'"Run profiles"). Each comes from {BENCHMARKS}, "Notebook run times", which gives the command that '
        "measured it and the load the machine was under.",
    ]
    for profile in PROFILES:
        machine, rows = measured[profile]
        if rows:
            dates = sorted({when for _, when in rows.values()})
            span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
            lines.append(f"- Run times in the `{profile}` profile: measured {span} on {machine}.")
        else:
            lines.append(f"- Run times in the `{profile}` profile: {NOT_MEASURED}.")
    lines += [
        "",
        "## At a glance",
        "",
        "| chapter | prerequisites | reading | exercises | run time (cpu) | run time (gpu) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for entry in entries:
        prerequisites = ", ".join(str(chapter) for chapter in entry["prerequisites"]) or "none"
        lines.append(
            f"| {chapter_link(entry)} | {prerequisites} | {entry['reading_minutes']} min "
            f"| {entry['exercise_minutes']} min | {run_time(entry, 'cpu')} | {run_time(entry, 'gpu')} |"
        )
    reading = sum(entry["reading_minutes"] for entry in entries)
    exercises = sum(entry["exercise_minutes"] for entry in entries)
    lines.append(f"| all | | {hours(reading)} | {hours(exercises)} | {cpu_minutes(entries)} | |")
    lines += ["", "## Paths through the course"]
    for path in syllabus["paths"]:
        key = path["key"]
        if "units" in path:
            units = [[entry for entry in entries if entry[key] == unit] for unit in range(1, path["units"] + 1)]
            chosen = [entry for unit in units for entry in unit]
        else:
            chosen = [entry for entry in entries if entry[key]]
        lines += [
            "",
            f"### {path['title']}: {hours(minutes(chosen))}",
            "",
            f"{path['about'].strip()} In all: {hours(minutes(chosen))} of reading and exercises, plus "
            f"{cpu_minutes(chosen)} of notebook run time in the `cpu` profile.",
            "",
        ]
        if "units" in path:
            for index, unit in enumerate(units, start=1):
                taught = "; ".join(chapter_link(entry) for entry in unit) or path["empty"]
                time = f" ({hours(minutes(unit))})" if unit else ""
                lines.append(f"- **{path['unit']} {index}**{time}: {taught}")
        else:
            on_path = {number(entry) for entry in chosen}
            for entry in chosen:
                skipped = [chapter for chapter in entry["prerequisites"] if chapter not in on_path]
                notes = [entry["practitioner_note"]] if entry.get("practitioner_note") else []
                if skipped:
                    chapters = ", ".join(str(chapter) for chapter in skipped)
                    notes.append(f"first read the recap of chapter{'s' * (len(skipped) > 1)} {chapters}")
                note = f": {'; '.join(notes)}" if notes else ""
                lines.append(f"- {chapter_link(entry)} ({minutes([entry])} min){note}")
    lines += ["", "## The chapters"]
    for entry in entries:
        prerequisites = ", ".join(f"[{c}](#syllabus-{c:02d})" for c in entry["prerequisites"]) or "none"
        lines += [
            "",
            f"(syllabus-{entry['notebook'][:2]})=",
            f"### Chapter {number(entry)}: {entry['title']}",
            "",
            f"[The notebook](../notebooks/{entry['notebook']}.ipynb). Prerequisites: {prerequisites}. "
            f"Reading {entry['reading_minutes']} min, exercises {entry['exercise_minutes']} min. "
            f"Run time: {run_time(entry, 'cpu')} (cpu), {run_time(entry, 'gpu')} (gpu).",
            "",
            "After it a student can:",
            "",
            *[f"- {objective}" for objective in entry["objectives"]],
        ]
    return "\n".join(lines) + "\n"


def render_models(root: Path) -> list[str]:
    """The retraining table of docs/instructors.md, from every model card in data/ that records its training."""
    cards = {path.stem: json.loads(path.read_text()) for path in sorted((root / "data").glob("*.json"))}
    cards = {name: card for name, card in cards.items() if "wall_minutes" in card.get("training", {})}
    names = [name for name in TRAIN_FIRST if name in cards] + sorted(set(cards) - set(TRAIN_FIRST))
    sources = {name[:2]: (root / "notebooks" / f"{name}.py").read_text() for name in book_chapters(root)}
    lines = ["| model | chapters | command | wall time | machine (from the card) |", "|---|---|---|---:|---|"]
    for name in names:
        training = cards[name]["training"]
        command = training["command"]
        recipe = re.match(r"python scripts/train_unet\.py --recipe (\w+)", command)
        if recipe:  # the card records "--budget-minutes N (resumed until done), then --export": one command
            command = (
                f"rm -f data/{name}.json && python scripts/train_unet.py --recipe {recipe.group(1)} "
                f"--budget-minutes {BUDGET_MINUTES} --export"
            )
        # the name quoted or backticked, or its own loader called (load_digit_classifier); not a variable sharing it
        named = rf"[\"'`]{name}[\"'`]|load_{name}\("
        chapters = [str(int(n)) for n, text in sources.items() if re.search(named, text)]
        threads = training.get("threads")
        threads = f", {threads} thread{'s' * (threads != 1)}" if threads else ""
        lines.append(
            f"| `{name}` | {', '.join(chapters) or 'none yet'} | `{command}` | {training['wall_minutes']} min "
            f"| {training['machine']}{threads} |"
        )
    return lines


def render_benchmarks(benchmarks: str) -> list[str]:
    """The figures scripts/bench.py wrote into docs/benchmarks.md: name, date and the command each section records."""
    lines = ["| figure | measured | command |", "|---|---|---|"]
    for name, section in re.findall(r"<!-- bench:(\w+):begin -->(.*?)<!-- bench:\1:end -->", benchmarks, re.S):
        found = re.search(r"^Measured (\S+) with `([^`]+)`", section, re.MULTILINE)
        if found:
            lines.append(f"| `{name}` | {found.group(1)} | `{found.group(2)}` |")
    return lines


def budget(value: int | tuple[int, ...]) -> str:
    return ", ".join(map(str, value)) if isinstance(value, tuple) else f"{value:,}"


def render_profiles(root: Path) -> list[str]:
    """The budgets of the cpu and gpu profiles, with what each one counts (the comments of course_lib/profiles.py)."""
    from course_lib.profiles import PROFILES  # here, not on top: torch takes seconds to import (--help)

    source = (root / "course_lib" / "profiles.py").read_text()
    about = dict(re.findall(r"^    (\w+): [^#\n]+#\s*(.+)$", source, re.MULTILINE))
    lines = ["| budget | what it counts | cpu | gpu |", "|---|---|---:|---:|"]
    for field, meaning in about.items():
        cpu, gpu = (getattr(PROFILES[name], field) for name in ("cpu", "gpu"))
        lines.append(f"| `{field}` | {meaning} | {budget(cpu)} | {budget(gpu)} |")
    return lines


def with_section(text: str, key: str, lines: list[str]) -> str:
    """`text` with the lines between `<!-- KEY:begin -->` and `<!-- KEY:end -->` replaced by `lines`."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{INSTRUCTORS} has no {begin} ... {end} section to write the table into")
    return text[: text.index(begin)] + "\n".join([begin, *lines, end]) + text[text.index(end) + len(end) :]


def rendered(root: Path) -> dict[Path, str]:
    """{path: the text this script writes there}, after checking the syllabus against book.yml."""
    syllabus = yaml.safe_load((root / SOURCE).read_text())
    found = problems(syllabus, book_chapters(root))
    if found:
        raise SystemExit("\n".join(found))
    benchmarks = (root / BENCHMARKS).read_text()
    instructors = (root / INSTRUCTORS).read_text()
    for key, lines in [
        ("models", render_models(root)),
        ("benchmarks", render_benchmarks(benchmarks)),
        ("profiles", render_profiles(root)),
    ]:
        instructors = with_section(instructors, key, lines)
    return {PAGE: render_syllabus(syllabus, benchmarks), INSTRUCTORS: instructors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is stale")
    args = parser.parse_args()
    pages = rendered(ROOT)
    stale = [path for path, text in pages.items() if not (ROOT / path).exists() or (ROOT / path).read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is stale (its sources changed): run `{COMMAND}` and commit the result")
        if not stale:
            print(f"{', '.join(map(str, pages))}: up to date")
        return 1 if stale else 0
    for path in stale:
        (ROOT / path).write_text(pages[path])
    print(", ".join(f"{path}: {'rewritten' if path in stale else 'up to date'}" for path in pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())

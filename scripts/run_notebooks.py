"""Execute the notebooks in one run profile, time each one, and optionally store the outputs and the timings.

    python scripts/run_notebooks.py --profile cpu --store --report docs/benchmarks.md    (make notebooks)
    python scripts/run_notebooks.py --profile smoke 03                                    time chapter 3 only

Each notebook is first synced from its jupytext .py pair, then run top to bottom in a fresh kernel of this Python,
from the notebooks/ folder, with COURSE_PROFILE set. --store writes the executed notebook (outputs included) back;
--report updates this profile's table in the given markdown file (between marker comments): the notebooks just
run get new rows, the others keep theirs.
"""

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import replace_section  # noqa: E402
from sync_notebooks import NOTEBOOKS, sync  # noqa: E402


def run(path: Path, profile: str, store: bool) -> float:
    sync(path.with_suffix(".py"))
    notebook = nbformat.read(path, as_version=4)
    os.environ["COURSE_PROFILE"] = profile
    client = NotebookClient(notebook, timeout=None, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if store:
        nbformat.write(notebook, path)
    return seconds


def read_rows(report: Path, profile: str) -> dict[str, str]:
    """The rows of this profile's table already in the report, by notebook: {name: the whole markdown row}."""
    text = report.read_text() if report.exists() else ""
    begin, end = f"<!-- notebooks:{profile}:begin -->", f"<!-- notebooks:{profile}:end -->"
    if begin not in text or end not in text:
        return {}
    section = text[text.index(begin) : text.index(end)].splitlines()
    rows = [line for line in section if line.startswith("| 0") or line.startswith("| 1")]
    return {row.split("|")[1].strip(): row for row in rows if len(row.split("|")) >= 6}


def write_report(report: Path, profile: str, rows: list[tuple[str, float]], command: str) -> None:
    """Rewrite this profile's table: the rows just measured replace theirs, the other notebooks keep their own
    (each row says when and how it was measured, so a table can be completed chapter by chapter)."""
    from course_lib.profiles import describe_machine  # here, not on top: torch takes seconds to import (--help)

    table = read_rows(report, profile)
    for name, seconds in rows:
        table[name] = f"| {name} | {seconds:.0f} | {date.today()} | `{command}` |"
    lines = [
        f"Profile `{profile}`, on {describe_machine()}:",
        "",
        "| notebook | wall time (s) | measured | command |",
        "|---|---:|---|---|",
        *[table[name] for name in sorted(table)],
    ]
    replace_section(report, f"notebooks:{profile}", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter numbers (e.g. 01 03); all when omitted")
    parser.add_argument("--profile", choices=["smoke", "cpu", "gpu"], default="cpu")
    parser.add_argument("--store", action="store_true", help="write the outputs back into the .ipynb files")
    parser.add_argument("--report", type=Path, help="markdown file whose timing table for this profile is rewritten")
    args = parser.parse_args()
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    if args.chapters:
        paths = [p for p in paths if p.name[:2] in args.chapters]
    rows = []
    for path in paths:
        seconds = run(path.with_suffix(".ipynb"), args.profile, args.store)
        rows.append((path.stem, seconds))
        print(f"{path.stem}: {seconds:.1f} s ({args.profile})", flush=True)
    if args.report:
        write_report(args.report, args.profile, rows, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()

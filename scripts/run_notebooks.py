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
    """The notebook's wall time in seconds, from the kernel's start to its last cell."""
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


def busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, in clock ticks, from Linux's /proc/stat; None elsewhere."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    ticks = [int(value) for value in stat.read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return sum(ticks) - idle, sum(ticks)


def cores_busy(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """How many cores were busy on average between two `busy_jiffies` readings (the notebook's own one included)."""
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def read_rows(report: Path, profile: str) -> dict[str, str]:
    """The rows of this profile's table already in the report, by notebook: {name: the whole markdown row}."""
    text = report.read_text() if report.exists() else ""
    begin, end = f"<!-- notebooks:{profile}:begin -->", f"<!-- notebooks:{profile}:end -->"
    if begin not in text or end not in text:
        return {}
    section = text[text.index(begin) : text.index(end)].splitlines()
    rows = [line for line in section if line.startswith("| 0") or line.startswith("| 1")]
    return {row.split("|")[1].strip(): row for row in rows if len(row.split("|")) >= 6}


def write_report(report: Path, profile: str, rows: list[tuple[str, float, float | None]], command: str) -> None:
    """Rewrite this profile's table: the rows just measured replace theirs, the other notebooks keep their own
    (each row says when, how and on how busy a machine it was measured, so a table can be completed chapter by
    chapter). A row from before the busy-cores column gets "not recorded" there."""
    from course_lib.profiles import describe_machine  # here, not on top: torch takes seconds to import (--help)

    table = read_rows(report, profile)
    for name, row in table.items():
        cells = row.split(" | ")
        if len(cells) == 4:  # | name | seconds | date | command |: from before the busy-cores column
            table[name] = " | ".join([*cells[:3], "not recorded", cells[3]])
    for name, seconds, busy in rows:
        busy_cell = "not measured" if busy is None else f"{busy:.1f}"
        table[name] = f"| {name} | {seconds:.0f} | {date.today()} | {busy_cell} | `{command}` |"
    lines = [
        f"Profile `{profile}`, on {describe_machine()}:",
        "",
        f"Cores busy: how many of the machine's {os.cpu_count()} cores were busy on average during the run, the "
        "notebook's own one included (about 1.0: nothing else ran; more: the time was measured beside other work).",
        "",
        "| notebook | wall time (s) | measured | cores busy | command |",
        "|---|---:|---|---:|---|",
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
        before = busy_jiffies()
        seconds = run(path.with_suffix(".ipynb"), args.profile, args.store)
        busy = cores_busy(before, busy_jiffies())  # what else the machine was doing meanwhile
        rows.append((path.stem, seconds, busy))
        beside = "" if busy is None else f"; {busy:.1f} cores busy"
        print(f"{path.stem}: {seconds:.1f} s ({args.profile}{beside})", flush=True)
    if args.report:
        write_report(args.report, args.profile, rows, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()

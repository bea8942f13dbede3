"""Rewrite one marked section of a markdown report (docs/benchmarks.md), leaving the rest of the file alone.

The scripts that measure something import `replace_section`; from the shell, the section's new lines come on
standard input:

    python scripts/report.py docs/benchmarks.md setup < setup.md     the lines between <!-- setup:begin --> and
                                                                     <!-- setup:end --> become those of setup.md
"""

import argparse
import sys
from pathlib import Path


def replace_section(report: Path, key: str, lines: list[str]) -> None:
    """Put `lines` between <!-- KEY:begin --> and <!-- KEY:end --> in `report`, appending the section if new."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    section = "\n".join([begin, *lines, end])
    text = report.read_text() if report.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    report.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="the markdown file, e.g. docs/benchmarks.md")
    parser.add_argument("key", help="the section's marker name, e.g. setup for <!-- setup:begin -->")
    args = parser.parse_args()
    if sys.stdin.isatty():
        parser.error("give the section's new lines on standard input")
    lines = sys.stdin.read().rstrip("\n").splitlines()
    if not lines:
        parser.error("standard input was empty: the section would be erased")
    replace_section(args.report, args.key, lines)
    print(f"{args.report}: section {args.key!r} rewritten ({len(lines)} lines)")


if __name__ == "__main__":
    main()

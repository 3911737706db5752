# Two entry points (see README): `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the local CPU wheel on this machine kind; installing it before the
# package keeps pip from pulling the multi-GB CUDA build to satisfy the package's torch range.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Python trees to lint; benchmarks/ joins once it holds code.
LINT_PATHS := $(wildcard blazefl_fn tests examples benchmarks tools mkdocs_hooks.py)

.PHONY: run test test-quick lint typecheck pytest docs docs-serve compare clean ft-env test-ft bench-ft clean-ft

# pytest workers (pytest-xdist): one per CPU, at most 4. Tests that start Ray share one worker
# (`--dist loadgroup` with their `xdist_group("ray")` mark).
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PARALLEL := -n $(JOBS) --dist loadgroup
# The suite starts hundreds of interpreters (CLI runs, worker processes): they reuse compiled
# bytecode kept under .venv, also where the environment says not to write it beside the source.
PYCACHE := env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$(CURDIR)/$(VENV)/pycache

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

TYPED_PATHS := blazefl_fn examples tools mkdocs_hooks.py

typecheck: $(STAMP)
	$(BIN)/pyright $(TYPED_PATHS)

pytest: $(STAMP)
	$(PYCACHE) $(BIN)/python -m pytest $(PARALLEL) $(PYTEST_ARGS)

# The whole suite: ruff, then pyright beside pytest (its report follows pytest's). pytest
# includes the docs: tests/test_docs.py builds the site with --strict and tests/test_tutorials.py
# runs every tutorial's code.
test: lint
	@$(BIN)/pyright $(TYPED_PATHS) > $(VENV)/pyright.log 2>&1 & \
	typecheck=$$!; \
	$(PYCACHE) $(BIN)/python -m pytest $(PARALLEL) $(PYTEST_ARGS); tests=$$?; \
	wait $$typecheck; types=$$?; \
	echo "pyright:"; cat $(VENV)/pyright.log; \
	test $$tests -eq 0 && test $$types -eq 0

# The edit-run loop, under 2 minutes: the core (keys, trees, records, rounds), the executors
# on small inputs and the aggregator properties, without the slow end-to-end tests.
QUICK := tests/test_keys.py tests/test_streams.py tests/test_tree.py tests/test_round.py \
	tests/test_aggregators.py tests/test_server_transforms.py tests/test_executors.py \
	tests/test_fedavg.py tests/test_client_stages.py tests/test_client_store.py \
	tests/test_stochastic.py tests/test_nonfinite.py tests/test_transforms.py \
	tests/test_checkpoint_integrity.py
test-quick: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(PYCACHE) $(BIN)/python -m pytest $(PARALLEL) -m "not slow" $(QUICK) $(PYTEST_ARGS)

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

# Free-threaded CPython (GIL off); not part of `make test`: the free-threaded torch wheels are
# CUDA builds, about 2.7 GB. `make ft-env` finds or builds a free-threaded CPython (3.13t unless
# one is given) and makes .venv-ft (see tools/ft-env.sh); `make test-ft` runs the concurrency
# tests there and fails if the GIL came on.
FT_VENV := .venv-ft
FT_STAMP := $(FT_VENV)/.installed
FT_TESTS := tests/test_free_threading.py tests/test_threads_stress.py \
	tests/test_executor_matrix.py tests/test_executors.py \
	tests/test_algorithms.py tests/test_stateful_algorithms.py tests/test_distillation.py \
	tests/test_privacy.py tests/test_stochastic.py tests/test_nonfinite.py \
	tests/test_processes_inputs.py tests/test_devices.py tests/test_data_synthetic.py \
	tests/test_client_store.py tests/test_checkpoint_integrity.py tests/test_transforms.py \
	tests/test_vectorized.py tests/test_round.py tests/test_keys.py

$(FT_STAMP): pyproject.toml tools/ft-env.sh
	bash tools/ft-env.sh

ft-env: $(FT_STAMP)

test-ft: $(FT_STAMP)
	$(FT_VENV)/bin/python tools/ft_check.py
	BLAZEFL_FN_REQUIRE_NO_GIL=1 $(FT_VENV)/bin/python -m pytest $(FT_TESTS) $(PYTEST_ARGS)

# The free-threaded interpreter this project built and its venv (several GB).
clean-ft:
	rm -rf $(FT_VENV) .python-ft

# Thread scaling with and without the GIL (docs/benchmarks.md): needs .venv and .venv-ft.
bench-ft: $(STAMP) $(FT_STAMP)
	$(BIN)/python -m benchmarks.free_threading $(ARGS)

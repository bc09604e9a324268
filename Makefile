# qabot: `make demo` runs the pipeline on the embedded default (smoke) through Prefect and MLflow;
# `make test` runs the test suite. Both set everything up themselves on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed on its own first, with pip: the CPU wheel here (a CUDA build on GPU machines:
# TORCH_SPEC=torch). Everything else comes from uv (seconds instead of minutes), pinned by constraints.txt;
# the torch already installed satisfies the project's range, so uv leaves it as it is. Neither compiles every
# module at install time (pip spends 20 s on torch's): Python compiles the ones used, once, on first import.
TORCH_SPEC ?= torch==2.13.0
UV_SPEC ?= uv==0.13.9
export QABOT_HOME ?= $(CURDIR)/.qabot
# Python caches compiled modules (.pyc) next to their sources. uv installs without compiling them and some
# machines set PYTHONDONTWRITEBYTECODE, so every process (CLI, servers, worker, flow runs, test workers) would
# compile transformers, prefect and mlflow again: measured, about a third of `make test`'s CPU time. The
# commands below let Python write the cache on first import, for the modules actually used.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test test-fast lint format up down clean tiny-models

$(BIN)/qabot: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(UV_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check --no-compile "$(TORCH_SPEC)"
	$(BIN)/uv pip install -q --python $(BIN)/python -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/qabot

demo: install
	$(BIN)/qabot demo

# Two xdist workers (one per core, one thread each; tests/conftest.py keeps the shared service stack and
# each expensive fixture on one worker). TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test-fast: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not slow"

# Rebuild the tiny models the package ships (pipeline_lib/tiny_models/) after a change to their recipe.
tiny-models: install
	$(BIN)/python -m pipeline_lib.tiny

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

up: install
	$(BIN)/qabot up

down:
	@if [ -x $(BIN)/qabot ]; then $(BIN)/qabot down; fi

clean: down
	rm -rf $(QABOT_HOME)

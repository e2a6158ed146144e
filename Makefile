# moegraph: set-up, training and tests in one place.
#   make train   create .venv if missing, install, run the default experiment
#   make test    same set-up, then what CI runs: lint, the tests not marked
#                slow, the wheel check (.ci/check_wheel)
#   make test-fast   the tests not marked slow, nothing else
#   make test-slow   the slow tests alone; make test-all: every test
#   make lint    ruff and mypy
# GPU users: create .venv and install your CUDA build of torch into it first;
# the set-up installs TORCH_SPEC only when no torch is importable.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.moegraph-installed
export MOEGRAPH_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup train test test-fast test-slow test-all bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(BIN)/moegraph-train $(ARGS)

# What CI runs (.ci/run): lint, the tests not marked slow, then the wheel
# installed in a fresh venv and its CLI run from another directory.
# pytest exits 5 when it collects no test: make treats that as the failure it is.
test: lint test-fast
	PYTHON=$(BIN)/python .ci/check_wheel

# pytest-xdist: one worker per core (tests pin torch to one thread each);
# modules with an expensive module-scoped fixture stay on one worker
# (xdist_group). `make test-fast XDIST=` runs in one process.
XDIST ?= -n auto --dist loadgroup

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(XDIST) $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

bench: setup
	$(BIN)/python experiments/bench_moe.py

# mypy's files and settings: [tool.mypy] in pyproject.toml
lint: setup
	$(BIN)/ruff check moegraph tests experiments
	$(BIN)/mypy

clean:
	rm -rf $(VENV) outputs multirun lightning_logs .pytest_cache

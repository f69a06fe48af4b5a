# One place that installs and runs everything; CI (.ci/run) goes through these targets.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
export DS_ACCELERATOR ?= cpu
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0
export DO_NOT_TRACK ?= 1

.PHONY: setup test lint bench bench-limit bench-peers bench-holdout demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 is pinned in constraints.txt and installed in the same pip call as the rest,
# so no dependency can pull a CUDA build of torch on a CPU machine.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q --timeout 900 tests

lint: setup
	$(BIN)/ruff check pipeline launch tests benchmarks
	$(BIN)/ruff format --check pipeline launch tests benchmarks

bench: setup
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/preprocess.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train.py

bench-limit: setup
	$(BIN)/python benchmarks/limit.py --jobs 2 --json docs/limit.json --plot docs/limit.png
	$(BIN)/python benchmarks/variography.py --json docs/variography.json
	$(BIN)/python benchmarks/fitted_gp.py --json docs/fitted_gp.json

# held-out sensors of the real networks (docs/holdout.md): ours, none, the fitted GP, IDW
bench-holdout: setup
	$(BIN)/python benchmarks/holdout.py --datasets los_loop aqi36 --json docs/holdout.json

# the peers' extra builds torch-scatter and torch-sparse against the installed torch
# (about 20 min on 2 cores the first time; pip caches the wheels). The protocol of
# docs/peers.md: every model to convergence at its learning rate chosen on validation; the
# GPU peers' runs come from benchmarks/gpu_check.sh run-stage peers_gpu (runs/peers/).
bench-peers: setup
	$(BIN)/pip install -q --no-build-isolation -c constraints.txt -e ".[peers]"
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/peers.py --datasets los_loop aqi36 --jobs 2 \
		--models ours none stid --json docs/peers.json \
		--plot docs/peers.png

demo: setup
	$(BIN)/python launch/demo.py

clean:
	rm -rf runs stores mlruns.db

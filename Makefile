# Kiln: `make demo` and `make test` are the two commands a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
STAMP := $(VENV)/.kiln-installed
PYTEST_ARGS ?=
# `make test` runs the suite on this many pytest-xdist workers, a module per worker at a time (each
# worker has its own session Ray instance); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: install lint format demo test test-quick chaos bench clean

install: $(STAMP)

# Re-install when the dependency list changes; torch/torchvision come from this machine's disk.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# The console's browser tests drive Debian's chromium (Playwright's own browser download is not
	@# used); apt only where chromium is missing and apt is usable (root).
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    || echo "note: no chromium; tests/test_console.py will be skipped"
	@touch $(STAMP)

# The main job end to end: train (2 Ray Train workers), a small tuning sweep, compression of the
# trained model, the last compressed variant served and answering a request over HTTP.
# Human-readable progress goes to the terminal; the JSON results to runs/demo/.
demo: install
	@mkdir -p runs/demo
	$(KILN) train configs/train/digits_cnn.yaml --json > runs/demo/train.json
	$(KILN) tune configs/tune/digits_cnn.yaml tune.num_samples=6 --json > runs/demo/tune.json
	$(KILN) compress configs/compress/digits_cnn.yaml \
	    compress.model=$$($(PY) bench/json_field.py runs/demo/train.json model_uri) \
	    --json > runs/demo/compress.json
	$(KILN) serve start $$($(PY) bench/json_field.py runs/demo/train.json model_uri) \
	    --port 0 --json > runs/demo/serve.json
	@# The trained version serves; the compression's selected variant is rolled out as a gated canary.
	$(PY) bench/demo_request.py runs/demo/serve.json \
	  && $(KILN) rollout start digits-cnn --strategy canary --weight 50 --bake 3s --interval 1s \
	       --gate error_rate\<0.01 --gate p99_ms\<500 \
	       --to $$($(PY) bench/json_field.py runs/demo/compress.json selected --version) \
	  && $(PY) bench/demo_rollout.py runs/demo/serve.json --run-dir runs \
	  && $(KILN) rollout history digits-cnn \
	  && $(KILN) monitor status digits-cnn \
	  && $(KILN) monitor report digits-cnn --out runs/demo/monitor; status=$$?; $(KILN) serve stop; exit $$status

# Lint, format check, types and the layering contract (ARCHITECTURE.md): CI runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Tests run in random order (pytest-randomly; the seed is printed, PYTEST_ARGS=--randomly-seed=N
# replays one order). The 25 slowest tests and the 15 slowest files (conftest) close the report:
# where to cut first to shorten the suite.
test: install
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

# Inner loop: the tests that need neither a Ray instance nor trained models (conftest marks the
# others `ray`), and no long end-to-end test.
test-quick: install
	$(PY) -m pytest tests -m "not slow and not ray" $(PYTEST_ARGS)

# The chaos suite (bench/chaos.py): Kiln's train, tune and serving processes SIGKILLed by pid under
# load, and what each death cost (BENCHMARKS.md, Faults). About 15 minutes on 2 cores;
# CHAOS_ARGS=--bounded is CI's form (the serving faults and the crashing candidate only).
CHAOS_ARGS ?=
chaos: install
	$(PY) bench/chaos.py $(CHAOS_ARGS)

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/submit_overhead.py
	$(PY) bench/tune_efficiency.py
	$(PY) bench/tune_trial_overhead.py

clean:
	rm -rf runs mlruns bench/out .pytest_cache

# Kiln: `make demo` and `make test` are the two commands a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
STAMP := $(VENV)/.kiln-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-quick bench clean

install: $(STAMP)

# Re-install when the dependency list changes; torch/torchvision come from this machine's disk.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(KILN) train configs/train/digits_cnn.yaml

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Inner loop: everything except the long end-to-end tests.
test-quick: install
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/submit_overhead.py

clean:
	rm -rf runs mlruns bench/out .pytest_cache

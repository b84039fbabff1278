# Command 1: `make train` sets everything up (venv, packages, Fashion-MNIST) and trains the default experiment.
# Command 2: `make test` sets everything up, builds the docs strictly, checks the style and runs the whole test suite
# (what CI runs).
# While editing: `make check`, ruff and the in-process tests (51-60 s on 2 cores; `make test` 7.5-8 minutes).
VENV ?= .venv
PYTHON ?= python3
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=

.PHONY: setup data train check docs test bench
setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# Debian's package holds the real Fashion-MNIST; vaelab decompresses it into data/ on first use.
data:
	@test -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz || \
	  { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; }

train: setup
	$(VENV)/bin/vaelab-train $(ARGS)

# The fast tier: the style checks (under a second), then no test that starts a process (marked `shell` by
# tests/conftest.py) and none marked `slow`.
check: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/pytest -q -m "not shell and not slow"

# The MkDocs site (mkdocs.yml, docs/) into site/; --strict fails on a broken link. Not -q: with it, mkdocs 1.6 drops
# the warnings before strict mode counts them, and a broken link passes.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict -d site

test: setup docs
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/pytest -q --durations=15

bench: setup
	$(VENV)/bin/python benchmarks/epoch_time.py --default-run

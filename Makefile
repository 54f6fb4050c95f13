# Two things a new user does: `make serve` and `make test`. Both set up .venv on first use.
# `make lint` is the gate CI runs before the tests: ruff, ruff format, mypy strict, import-linter.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test lint bench

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]' -e './clients/python[cli]'
	touch $@

serve: $(VENV)/.installed
	$(PY) -m server

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy server adapters clients/python/src
	$(VENV)/bin/lint-imports

bench: $(VENV)/.installed
	$(PY) -m benchmarks.zero_shot_throughput --threads 2

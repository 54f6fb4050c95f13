# Two things a new user does: `make serve` and `make test`. Both set up .venv on first use.
# `make lint` is the gate CI runs before the tests: ruff, ruff format, mypy strict, import-linter.
# The runtime dependencies come from requirements/runtime.lock through deploy/scripts/install.sh, the same
# script and lock the Docker image installs from; `make serve` installs only those (no dev extra).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: serve test lint bench lock

$(VENV)/.runtime: requirements/runtime.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	PYTHON=$(PY) PIP_QUIET=1 deploy/scripts/install.sh deps
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime clients/python/pyproject.toml
	$(PY) -m pip install -q -e '.[dev]' -e './clients/python[cli]'
	touch $@

serve: $(VENV)/.runtime
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

# Re-resolve the runtime lock from pyproject.toml's dependencies and its postgres and video extras (Linux x86_64, CPython 3.11: the image's),
# with every file's hash. Commit the result; the image and `make` install exactly it.
lock: $(VENV)/.installed
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra postgres --extra video --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--generate-hashes --no-header --index-url https://pypi.org/simple -o requirements/runtime.lock

# The two commands: `make run` and `make test`. Both bootstrap .venv first (`make install`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run migrate test lint bench bench-gpu clean

install: $(STAMP)

# Reinstalls only when the build's configuration changes; a second `make install` is instant.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

migrate: install
	$(VENV)/bin/alembic upgrade head

run: migrate
	$(VENV)/bin/mnist-service run

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Not part of `make test`: measures against baselines and writes docs/benchmarks.md (needs wrk).
bench: install
	$(PY) -m benchmarks

# On a machine with a CUDA card: writes docs/benchmarks-gpu.md.
bench-gpu: install
	$(PY) -m benchmarks.gpu

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache tests/artifacts

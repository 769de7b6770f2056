# The two commands: `make run` and `make test`. Both bootstrap .venv first (`make install`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run migrate test lint lock bench bench-gpu clean clean-data

install: $(STAMP)

# Reinstalls only when the build's configuration changes; a second `make install` is instant.
# The versions are constraints.txt's (what the suite last passed with).
$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Resolves pyproject.toml's ranges afresh in a venv of its own and rewrites constraints.txt
# (its header kept); PyTorch and the libraries that come with its build (PLATFORM_BUILDS, which
# tests/test_constraints.py reads too) are not pinned. Run it with the Python that CI and the
# image use: make lock PYTHON=python3.11.
LOCK_VENV := .lock-venv
PLATFORM_BUILDS := ^(torch|torchvision|triton|nvidia-[a-z0-9_.-]+|cuda-[a-z0-9_.-]+)==
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet -e '.[dev]'
	grep '^#' constraints.txt > constraints.txt.new
	$(LOCK_VENV)/bin/pip freeze --exclude-editable \
	  | grep -v -i -E '$(PLATFORM_BUILDS)' >> constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

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

# What the build and the tools made; not ./var, which holds `make run`'s database and every
# trained model (`make clean-data` removes those, on purpose only).
clean:
	rm -rf $(VENV) $(LOCK_VENV) constraints.txt.new .pytest_cache .mypy_cache .ruff_cache \
	  tests/artifacts

clean-data:
	rm -rf var

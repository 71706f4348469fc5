# `make run` and `make test` install whatever is missing (scripts/setup.sh), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export VENV

.PHONY: setup run test test-unit lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m cluster.cli demo

test: setup
	$(PY) -m pytest tests -m "not isolated" $(PYTEST_ARGS)
	$(PY) -m pytest tests -m isolated $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache

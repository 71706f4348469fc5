# `make run` and `make test` install whatever is missing (scripts/setup.sh), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export VENV

.PHONY: setup run test test-unit test-integration test-e2e test-long lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m cluster.cli demo

# Three tiers (their times on 2 cores are in the README); `make test` runs them all, and is what CI runs. The
# integration tests marked `isolated` (each starts its own Ray or cluster) run in a pytest process apart. The
# tests marked `long` (whole jobs under injected faults, multi-node clusters, benchmark smoke runs: about 25
# minutes together) run with `make test-long`, before a release and after changing what they cover.
test: test-unit test-integration test-e2e

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration -m "not isolated and not long" $(PYTEST_ARGS)
	$(PY) -m pytest tests/integration -m "isolated and not long" $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest tests/e2e tests/faults -m "not long" $(PYTEST_ARGS)

test-long: setup
	$(PY) -m pytest tests/integration -m "isolated and long" $(PYTEST_ARGS)
	$(PY) -m pytest tests/e2e tests/faults -m long $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache

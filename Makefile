# The commands a user runs. Every target installs what it needs first (bin/setup).
.PHONY: setup test test-fast test-oldest check demo demo-cluster ui bench clean

VENV := .venv
BIN := $(VENV)/bin
DEMO_HOME := $(CURDIR)/.dagster_home

setup:
	@bin/setup

## make test: the whole test suite (PostgreSQL, SMTP, dbt and worker tests included).
test: setup
	$(BIN)/python -m pytest

## make test-fast: the quick tier for the edit-test loop (no PostgreSQL, dbt, Dagster runs or
## extra processes; about two minutes).
test-fast: setup
	$(BIN)/python -m pytest -m "not postgres and not dbt and not multiprocess and not dagster and not workers and not smtp" -q

## make test-oldest: the quick tier against the oldest supported Dagster release (.venv-oldest).
test-oldest: setup
	@bin/setup-oldest
	.venv-oldest/bin/python -m pytest -m "not postgres and not dbt and not multiprocess and not dagster and not workers and not smtp" -q -p no:cacheprovider

## make check: lint, format and type checks.
check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## make demo: the example project's main job for two days (dagster job execute), then a report.
demo: setup
	@mkdir -p $(DEMO_HOME)
	@cp -n example_project/dagster.yaml $(DEMO_HOME)/dagster.yaml 2>/dev/null || true
	DAGSTER_HOME=$(DEMO_HOME) $(BIN)/python -m example_project.demo 2025-01-14 2025-01-15

## make ui: the Dagster UI on http://127.0.0.1:3000 with the example project loaded.
ui: setup
	@mkdir -p $(DEMO_HOME)
	@cp -n example_project/dagster.yaml $(DEMO_HOME)/dagster.yaml 2>/dev/null || true
	DAGSTER_HOME=$(DEMO_HOME) $(BIN)/dagster dev -m example_project -h 127.0.0.1 -p 3000

## make demo-cluster: the example on Celery workers (throwaway PostgreSQL and Redis, two workers,
## the daemon), a backfill of every day, a report of where each step ran; stops all it started.
demo-cluster: setup
	$(BIN)/python -m example_project.cluster

## make bench: every bench/ script.
bench: setup
	@for script in bench/*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(DEMO_HOME) .venv-oldest .pytest_cache .ruff_cache .mypy_cache .hypothesis

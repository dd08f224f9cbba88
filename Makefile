# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run stop test bench clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; idempotent and quick otherwise.
$(STAMP): pyproject.toml
	@scripts/ensure-system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# Prefect keeps its state beside the embedded services unless told otherwise.
export PREFECT_HOME ?= $(CURDIR)/.local/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
# the sample application's models, for the drift check after every apply
export MIGRATE_MODELS ?= dbcore.models:MODELS
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

## Start (or reuse) the embedded PostgreSQL + S3 under .local/, then the `migrate` flow:
## plan, lint, backup, rehearsal on a copy, apply, post-checks.
run: setup
	$(BIN)/python -m dbcore.services up
	$(BIN)/python flows/migrate.py --env local

## Stop what `make run` left running.
stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m dbcore.services down; else echo "nothing to stop"; fi

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/backup.py

clean: stop
	rm -rf .local

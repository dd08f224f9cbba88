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

## Start (or reuse) the embedded PostgreSQL + S3 under .local/ and apply pending migrations.
run: setup
	$(BIN)/python -m dbcore.services up
	$(BIN)/dbmigrate apply

## Stop what `make run` left running.
stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m dbcore.services down; else echo "nothing to stop"; fi

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/backup.py

clean: stop
	rm -rf .local

# slimta_tx: `make run` starts the edge, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LISTEN ?= tcp:2525:interface=127.0.0.1
MAILDIR ?= ./var/maildir

.PHONY: run test services lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	mkdir -p $(MAILDIR)
	$(BIN)/twistd -n slimta --listen $(LISTEN) --maildir $(MAILDIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check slimta_tx tests twisted bench
	$(BIN)/ruff format --check slimta_tx tests twisted bench

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# System packages and local services the end-to-end tests drive (idempotent).
services:
	./.ci/services

test: services lint typecheck pytest

bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var dist build twisted/plugins/dropin.cache

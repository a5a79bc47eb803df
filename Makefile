# slimta_tx: `make run` starts the edge, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LISTEN ?= tcp:2525:interface=127.0.0.1
MAILDIR ?= ./var/maildir

.PHONY: run test services lint typecheck pytest trial docs news test-lowest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The C accelerator of the DATA decoder is compiled by the install (hatch_build.py); a change to
# its source reinstalls. Here a failed compile is an error, not a silent pure-Python fallback.
BUILD_INPUTS := pyproject.toml hatch_build.py slimta_tx/_speedups.c
export SLIMTA_TX_REQUIRE_SPEEDUPS ?= 1

$(VENV)/.installed-run: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench,docs]'
	touch $@ $(VENV)/.installed-run $(VENV)/.installed-docs

$(VENV)/.installed-docs: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	mkdir -p $(MAILDIR)
	$(BIN)/twistd -n --pidfile= slimta --listen $(LISTEN) --maildir $(MAILDIR)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check slimta_tx tests twisted bench examples docs/conf.py docs/_ext hatch_build.py .ci
	$(BIN)/ruff format --check slimta_tx tests twisted bench examples docs/conf.py docs/_ext hatch_build.py .ci

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# The decoder's own suites run a second time without the C accelerator, so the pure-Python
# decoder (used where no compiler was available) stays tested on its own.
DECODER_TESTS := tests/test_data.py tests/test_smuggling.py tests/test_chunking.py

pytest: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	SLIMTA_TX_PURE_PYTHON=1 $(BIN)/python -m pytest -q $(DECODER_TESTS)

# The trial tests users can copy (examples/test_*.py), run as users run them.
trial: $(VENV)/.installed-test
	$(BIN)/trial --temp-directory=$(VENV)/_trial_temp examples/test_*.py

# The docs site (docs/_build/html) and the man page, with warnings as errors: a broken link or
# cross-reference, a page in no toctree, an unknown code language fail. The man page is also
# copied to docs/man/, which the wheel installs (under CI a stale copy there is an error).
SPHINXBUILD = $(BIN)/sphinx-build -W --keep-going -E -q
docs: $(VENV)/.installed-docs
	$(SPHINXBUILD) -b html docs docs/_build/html
	$(SPHINXBUILD) -b man docs docs/_build/man
	$(BIN)/python docs/_ext/manpage.py docs/_build/man/twistd-slimta.1 docs/man/twistd-slimta.1

# System packages and local services the end-to-end tests drive (idempotent).
services:
	./.ci/services

# A change to slimta_tx/ on a branch comes with a news fragment (compared with main).
news:
	$(PYTHON) .ci/check_newsfragment.py

test: services lint news typecheck pytest trial docs

# The oldest versions pyproject.toml allows, in a venv of their own: every ">=X" (build system,
# dependencies, every extra) pinned to "==X" by .ci/lowest_constraints.py, then `make lint
# typecheck` and the suite on them. `make test` tests the newest. The packaging test is left out
# here: it builds a wheel and installs it with the newest dependencies from the index. The oldest
# releases of some (zope.interface 5.0) have no wheel for newer Pythons: wheel and setuptools
# build them from source without build isolation.
LOWEST := .venv-lowest
LOWEST_TESTS ?= --ignore=tests/test_packaging.py

$(LOWEST)/.installed: $(BUILD_INPUTS) .ci/lowest_constraints.py
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(PYTHON) .ci/lowest_constraints.py >$(LOWEST)/constraints.txt
	$(LOWEST)/bin/python -m pip install --quiet -c $(LOWEST)/constraints.txt pip hatchling wheel setuptools
	$(LOWEST)/bin/python -m pip install --quiet --no-build-isolation \
	  -c $(LOWEST)/constraints.txt -e ".[$$($(PYTHON) .ci/lowest_constraints.py --extras)]"
	$(LOWEST)/bin/python -m pip list --format=freeze >$(LOWEST)/installed.txt
	touch $@ $(LOWEST)/.installed-test $(LOWEST)/.installed-run

test-lowest: $(LOWEST)/.installed
	$(MAKE) lint typecheck VENV=$(LOWEST)
	$(LOWEST)/bin/python -m pytest -q $(LOWEST_TESTS) $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(LOWEST) var dist build docs/_build twisted/plugins/dropin.cache slimta_tx/_speedups*.so

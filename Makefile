# One task runner for people and CI. Everything runs from a local virtualenv (.venv).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHELL  := bash
.SHELLFLAGS := -eo pipefail -c
# pip warns once per package about an index folder in some machines' pip configuration that does
# not exist ("Location … is ignored"): that is the machine's, not ours, and is kept off the screen.
# setuptools' editable build warns about the checkout's folders (PYTHONWARNINGS=ignore, build only).
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: install serve test check lint typecheck format fuzz faults mutation bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | { $(QUIET_PIP); }
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e ".[dev]" 2>&1 | { $(QUIET_PIP); }
	touch $(STAMP)

install: $(STAMP)          ## create .venv and install scribe-events with its dev tools

serve: $(STAMP)            ## run the service on the embedded defaults (SQLite, in-process broker)
	$(BIN)/scribe-events serve

lint: $(STAMP)
	$(BIN)/ruff check scribe_events cli tests
	$(BIN)/ruff format --check scribe_events cli tests

typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format scribe_events cli tests
	$(BIN)/ruff check --fix scribe_events cli tests

test: $(STAMP)             ## lint, type-check and run the whole test suite
	$(MAKE) lint typecheck
	$(BIN)/pytest

fuzz: $(STAMP)             ## long schemathesis + hypothesis runs (the tests marked slow); a few minutes
	$(BIN)/pytest -m slow tests/test_openapi_fuzz.py tests/test_properties.py

faults: $(STAMP)           ## the fault suite with its heavy variants (3 instances, 200 clients); a few minutes
	$(BIN)/pytest -m 'slow or not slow' -s tests/faults

# Mutation testing of the core modules (configured in pyproject's [tool.mutmut]); long: run one
# module at a time, e.g. make mutation MUTANTS='scribe_events.hub.*'; then .venv/bin/mutmut results.
MUTANTS ?=
mutation: $(STAMP)         ## mutmut on hub, store, publisher and broker (MUTANTS= a name glob)
	$(BIN)/mutmut run $(MUTANTS)

bench: $(STAMP)            ## every scenario beside Nchan, the rows of BENCHMARKS.md (about 15 minutes); see benchmarks/README.md
	$(BIN)/python benchmarks/sidebyside.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants *.egg-info

# Entry points. `make run` and `make test` install everything they need first.
#   make run                        the default (quick) sweep for VARIANT (default: preln)
#   make run VARIANT=postln,preln   several variants, one sweep
#   make test                       lint + the whole test suite
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
# The light way: on these machines torch==2.13.0 resolves to a local CPU wheel. Installing it
# before the project means pyproject's `torch>=2.6` range is already met and no CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0
VARIANT ?= preln
BIN := $(VENV)/bin

.PHONY: setup run test lint collect clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/python -m suite +variant=$(VARIANT)

test: setup lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

collect: setup
	$(BIN)/python -m suite.collect

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

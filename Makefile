# Entry points. `make run` and `make test` install everything they need first.
#   make run                        the default (quick) sweep for VARIANT (default: preln)
#   make run VARIANT=postln,preln   several variants, one sweep
#   make test                       lint + the whole test suite
#   make report                     HTML report of everything run so far -> reports/stability.html
#   make bench                      training-step benchmarks -> .benchmarks/step.json
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
# The light way: on these machines torch==2.13.0 resolves to a local CPU wheel. Installing it
# before the project means pyproject's `torch>=2.6` range is already met and no CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0
VARIANT ?= preln
BIN := $(VENV)/bin

.PHONY: setup browser run test lint collect report bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/python -m suite +variant=$(VARIANT)

# The report's browser test drives Debian's chromium; install it where we can (root + apt),
# otherwise that one test is skipped locally (never in CI, where it must run).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium/chromedriver not installed; the browser test will be skipped"; fi

# The Ray tests (tests/test_ray.py) are opt-in: with SUITE_RAY=1 (CI sets it) `make test` first
# installs the ray extra, pinned in pyproject.toml; a plain `make test` never installs Ray. If pip
# cannot install it, the Ray tests are skipped and say why.
RAY_EXTRA := $(if $(filter 1,$(SUITE_RAY)),$(VENV)/.installed-ray)

$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev,ray]' && touch $@ || \
		echo "note: the ray extra could not be installed; the Ray tests will be skipped"

# TORCH_SPEC reaches the wheel test (tests/test_wheel.py), which installs the suite's wheel into a
# fresh venv: the same torch as this one, never a CUDA build pulled by accident.
# Two pytest workers (pytest-xdist), each taking whole test files, so that a module's cluster
# fixture (SLURM, Ray) stays in one worker: on CI's two cores about 1.5x faster than one.
TEST_WORKERS ?= 2
test: setup browser lint $(RAY_EXTRA)
	TORCH_SPEC="$(TORCH_SPEC)" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check .

collect: setup
	$(BIN)/python -m suite.collect

report: setup
	$(BIN)/python -m suite.report

# Training-step benchmarks (pytest-benchmark); the report folds them into its throughput figure.
bench: setup
	$(BIN)/python -m pytest benchmarks/test_training_step.py --benchmark-enable \
		--benchmark-min-rounds=15 --benchmark-max-time=2 --benchmark-json=.benchmarks/step.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

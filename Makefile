# Two entry points on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint clean

$(BIN)/hyperfields: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch; a bare `torch` requirement could pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/hyperfields

demo: setup
	$(BIN)/python scripts/make_demo_data.py demo/photos
	$(BIN)/hyperfields train --config configs/tiny.yaml --images demo/photos --output demo/run

# Every test; the 15 slowest are listed at the end.
test: setup
	$(BIN)/python -m pytest -q --durations=15

# Leaves out the tests marked slow (over about 10 seconds each).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo .pytest_cache

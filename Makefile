# leakaudit — set-up and checks. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch/torchvision pair that installs from this machine's local files (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test test-all lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/leakaudit demo -o demo-out --force

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

bench: venv
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf demo-out .pytest_cache build *.egg-info

lint: venv
	$(BIN)/ruff check leakaudit attacks metrics recipes tests examples
	$(BIN)/mypy

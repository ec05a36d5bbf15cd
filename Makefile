# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test deps python-deps system-deps bench clean-sandbox

run: deps
	$(BIN)/python scripts/sandbox.py

test: deps
	$(BIN)/python -m pytest

deps: python-deps system-deps

python-deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

system-deps:
	scripts/install-system-deps.sh

bench: deps
	$(BIN)/python bench/load_time.py

clean-sandbox:
	rm -rf .sandbox

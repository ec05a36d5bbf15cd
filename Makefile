# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test deps python-deps system-deps kube-binaries bench clean-sandbox

run: deps
	$(BIN)/python scripts/sandbox.py

test: deps
	$(BIN)/python -m pytest

deps: python-deps system-deps kube-binaries

python-deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

system-deps:
	scripts/install-system-deps.sh

# kube-apiserver, kube-controller-manager and kubectl built from Debian's source,
# cached outside the clone (the first run builds them: about 9 CPU-minutes).
kube-binaries:
	scripts/install-kube-apiserver.sh >/dev/null

bench: deps
	$(BIN)/python bench/load_time.py

clean-sandbox:
	rm -rf .sandbox

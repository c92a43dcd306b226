# The README's two set-up commands: `make demo` and `make test`. Both work on a fresh machine with
# only Python installed (as root where Debian packages are needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test peers lint clean

## demo: install the node (no torch) and run the demo on the embedded defaults
demo: $(VENV)/.runtime
	$(BIN)/petriage demo

## test: install the DICOM peers and every Python dependency, then run the whole suite
test: peers $(VENV)/.dev
	$(BIN)/python -m pytest

$(VENV)/.created:
	scripts/make-venv.sh "$(PYTHON)" "$(VENV)"
	touch $@

$(VENV)/.runtime: pyproject.toml $(VENV)/.created
	$(BIN)/python -m pip install --quiet --editable .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.created
	$(BIN)/python -m pip install --quiet --editable '.[train,dev]'
	touch $@ $(VENV)/.runtime

peers:
	scripts/install-peers.sh

lint: $(VENV)/.dev
	$(BIN)/ruff check node training onnx_export tests benchmarks

clean:
	rm -rf $(VENV) var .pytest_cache

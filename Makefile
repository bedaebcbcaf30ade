# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torchvision from PyPI only imports beside the torch it was built with; this pair runs on
# the CPU here (a CUDA build). GPU users install their own matching pair first.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PAIR)
	$(BIN)/pip install -q -e ".[offline]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/loupe demo

test: install-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf .loupe-demo .pytest_cache

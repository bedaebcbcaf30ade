# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torchvision from PyPI only imports beside the torch it was built with; this pair runs on
# the CPU here (a CUDA build). GPU users install their own matching pair first.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
# Which FAISS build: cpu (faiss-cpu) or gpu (faiss-gpu-cu12, CUDA 12). One only: both install
# the same `faiss` module. `make install FAISS=gpu` on a CUDA 12 machine.
FAISS ?= cpu

.PHONY: demo test install install-dev browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PAIR)
	$(BIN)/pip install -q -e ".[$(FAISS),offline]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[$(FAISS),dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/loupe demo

# The browser tests drive Debian's chromium; install it where apt-get can (root), else they are
# skipped with a reason (under CI=true a missing browser fails them instead).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium and chromium-driver are not installed: browser tests will be skipped"; fi; \
	fi

test: install-dev browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf .loupe-demo .pytest_cache

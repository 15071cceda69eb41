# Two commands do all the set-up on a fresh machine:
#   make quickstart   # create/reuse .venv, install, run the main job on the embedded default model
#   make test         # create/reuse .venv, install with dev extras, ruff + pytest
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install install-dev quickstart test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch makes pip fetch a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

quickstart: install
	$(BIN)/posttrain run recipes/grpo_drift.yaml

lint: install-dev
	$(BIN)/ruff check .

# --require-kernels (tests/conftest.py): the Triton kernel tests fail instead of skipping when triton is
# installed but its mode was frozen wrong before they ran (e.g. a module importing peft collected first).
test: install-dev lint
	$(BIN)/python -m pytest -q --require-kernels

clean:
	rm -rf $(VENV) build *.egg-info

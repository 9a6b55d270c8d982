# The README's two commands. Both create .venv if it is missing and install what they need into it;
# nothing is taken from the machine beyond a Python 3 interpreter.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pyproject.toml states ranges; the exact PyTorch build is pinned here.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# OpenMP threads that spin while waiting starve each other on a small or shared machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PINS) -e '.[data]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PINS) -e '.[test]'
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(BIN)/pale demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache runs

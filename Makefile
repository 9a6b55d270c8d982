# The README's two commands. Both create .venv if it is missing and install what they need into it;
# nothing is taken from the machine beyond a Python 3 interpreter.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pyproject.toml states ranges; the exact PyTorch build is pinned here.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# The tests' many tiny steps share the cores with pytest's subprocesses: OpenMP threads that spin while
# waiting would starve them. (`pale demo` chooses its own policy from the cores' load.)
TEST_ENV := OMP_WAIT_POLICY=$(or $(OMP_WAIT_POLICY),PASSIVE)

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
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-test
	$(TEST_ENV) $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache runs

# Mutation testing (docs/reliability.md): slow (hours on 2 shared cores), so not part of `make test`
# or CI. Mutants of the model file, pale.io, and the engine's checkpoint and resume functions; each
# runs only the tests that executed its function. Fewer: make mutation MUTANTS='pale.io.*'
MUTANTS ?= pale.models.pale_transformer.* pale.io.* \
	pale.train.engine.x_rng_state__* pale.train.engine.x_set_rng_state__* \
	pale.train.engine.x?Trainer?_save__* pale.train.engine.x?Trainer?_export_weights__* \
	pale.train.engine.x?Trainer?_load_resume__* pale.train.engine.x?Trainer?_interrupted__*
MUTATION_JOBS ?= 2

.PHONY: mutation

$(VENV)/.installed-mutation: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PINS) -e '.[mutation]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-demo

mutation: $(VENV)/.installed-mutation
	$(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/mutmut results

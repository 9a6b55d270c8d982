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

# Mutation testing (docs/testing.md): slow, so not part of `make test` or CI. Each mutant runs
# only the tests that executed its function. The default scope: the model's computational core, the
# file, image, device and checkpoint modules (MUTANTS_FILES) and the engine's checkpoint/resume
# functions; add the model's constructors and helpers with: make mutation 'MUTANTS=$(MUTANTS_ALL)'
MODEL := pale.models.pale_transformer
MUTANTS_FILES := pale.files.* pale.images.* pale.device.* pale.checkpoint.*
MUTANTS_MODEL_CORE := \
	$(foreach f,padded_length group_rows ungroup_rows real_key_mask split_heads merge_heads \
		attend_in_groups attention_weights group_lines ungroup_lines _branch_grid group_branches \
		ungroup_branches ps_attention_one_call resample_pos_embed attention_layout block_direction \
		two_branch_macs row_groups_macs,$(MODEL).x_$(f)__*) \
	$(foreach m,SeparableProjection?forward GroupedAttention?attend GroupedAttention?forward PSAttention?group \
		PSAttention?ungroup PSAttention?attend ConvPosEnc?forward ConvPatchMerging?forward PaleBlock?forward \
		PaleStage?forward PaleTransformer?_embed PaleTransformer?forward_features PaleTransformer?forward_head \
		PaleTransformer?forward PaleTransformer?forward_intermediates,$(MODEL).x?$(m)__*)
MUTANTS_ENGINE := pale.train.runtime.x_rng_state__* pale.train.runtime.x_set_rng_state__* \
	pale.train.checkpoints.x_save_checkpoint__* pale.train.checkpoints.x_restore_checkpoint__* \
	pale.train.checkpoints.x_better_weights__* \
	$(foreach m,_export_weights _interrupted,pale.train.trainer.x?Trainer?$(m)__*)
MUTANTS ?= $(MUTANTS_MODEL_CORE) $(MUTANTS_FILES) $(MUTANTS_ENGINE)
MUTANTS_ALL := $(MODEL).* $(MUTANTS_FILES) $(MUTANTS_ENGINE)
MUTATION_JOBS ?= 1

.PHONY: mutation

$(VENV)/.installed-mutation: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PINS) -e '.[mutation]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-demo

mutation: $(VENV)/.installed-mutation
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
		$(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(foreach m,$(MUTANTS),'$(m)')
	$(BIN)/mutmut results

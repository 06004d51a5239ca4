#!/usr/bin/env bash
# Pretrain or fine-tune Qwen3 / Qwen3-MoE: Pai-Megatron-Patch's launcher, same 27 arguments.
# Arguments, MP_* variables and examples: examples/qwen3/README.md. Runs from any directory;
# without a GPU it runs on CPU (gloo) with MP_NPROC processes (default 1).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/toolkits/common.sh"

expect_27_arguments "$@"

# Every argument is checked (and named in errors) before torchrun starts.
exec "$PYTHON" -m megatron_patch.training.launch "$@"

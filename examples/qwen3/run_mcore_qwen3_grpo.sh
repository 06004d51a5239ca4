#!/usr/bin/env bash
# GRPO for Qwen3 / Qwen3-MoE: the 27 arguments of run_mcore_qwen3.sh with RL meanings, plus
# MP_GRPO_* variables (docs/rl.md; python -m megatron_patch.rl --help). Runs from any directory;
# without a GPU it runs on CPU (gloo) with MP_NPROC processes (default 1).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/toolkits/common.sh"

expect_27_arguments "$@"

# Every argument is checked (and named in errors) before torchrun starts.
exec "$PYTHON" -m megatron_patch.rl.launch "$@"

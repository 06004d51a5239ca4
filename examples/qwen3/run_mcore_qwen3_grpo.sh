#!/usr/bin/env bash
# GRPO for Qwen3 / Qwen3-MoE: the 27 arguments of run_mcore_qwen3.sh with RL meanings, plus
# MP_GRPO_* variables (docs/rl.md; python -m megatron_patch.rl --help). Runs from any directory;
# without a GPU it runs on CPU (gloo) with MP_NPROC processes (default 1).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/toolkits/common.sh"

USAGE="usage: $0 ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP ETP EP SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH"
if [[ $# -ne 27 ]]; then
  echo "$USAGE" >&2
  echo "error: expected 27 arguments, got $#" >&2
  exit 2
fi

# Every argument is checked (and named in errors) before torchrun starts.
exec "$PYTHON" -m megatron_patch.rl.launch "$@"

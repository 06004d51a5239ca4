#!/usr/bin/env bash
# CMMLU / C-Eval with lm-evaluation-harness, offline, on an HF model or a torch_dist checkpoint.
#   run_eval.sh MODEL_PATH DATA_DIR TASKS [options of python -m megatron_patch.evaluation --help]
# TASKS: cmmlu, ceval-valid (or ceval), or subject tasks (cmmlu_agronomy,...), comma-separated.
# A torch_dist model over several processes (TP/PP/EP): MP_NPROC=N run_eval.sh ... --tensor-model-parallel-size N
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/toolkits/common.sh"

if [[ $# -lt 3 ]]; then
  echo "usage: $0 MODEL_PATH DATA_DIR TASKS [options]" >&2
  echo "error: expected at least 3 arguments, got $#" >&2
  exit 2
fi
if [[ "${MP_NPROC:-1}" -gt 1 ]]; then
  exec "$PYTHON" -m megatron_patch.torchrun --standalone --nproc_per_node="$MP_NPROC" -m megatron_patch.evaluation "$@"
fi
exec "$PYTHON" -m megatron_patch.evaluation "$@"

#!/usr/bin/env bash
# HF safetensors <-> Megatron-Core torch_dist for Qwen3 / Qwen3-MoE (Pai-Megatron-Patch argument order).
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: run_8xH20.sh MODEL_SIZE LOAD_DIR SAVE_DIR MG2HF USE_CUDA PR [HF_DIR]
  MODEL_SIZE  a preset (0.6B 1.7B 4B 8B 14B 32B A3B A22B) or auto (read config.json)
  LOAD_DIR    HF model dir (MG2HF=false) or torch_dist save dir (MG2HF=true)
  SAVE_DIR    output dir (must be empty or absent)
  MG2HF       true: torch_dist -> HF; false: HF -> torch_dist
  USE_CUDA    true: one process per GPU and --verify on GPU; false: CPU (conversion itself is CPU either way)
  PR          fp32 | bf16 | fp16 (dtype of the written weights)
  HF_DIR      with MG2HF=true: HF dir whose config/tokenizer files to copy (optional)
env: WORLD_SIZE (nodes), RANK (node rank), MASTER_ADDR, MASTER_PORT, PROC_PER_NODE,
     MODEL_PARALLEL_ARGS, CONVERT_ARGS (extra flags, e.g. "--verify --force")
USAGE
}

if [[ $# -lt 6 || $# -gt 7 ]]; then usage; exit 2; fi
MODEL_SIZE=$1
LOAD_DIR=$2
SAVE_DIR=$3
MG2HF=$4
USE_CUDA=$5
PR=$6
HF_DIR=${7:-}

source "$(dirname "${BASH_SOURCE[0]}")/../../../common.sh"

args=(--model-size "$MODEL_SIZE" --load-dir "$LOAD_DIR" --save-dir "$SAVE_DIR" --precision "$PR")
case "$MG2HF" in
  true) args+=(--mg2hf) ;;
  false) ;;
  *) echo "MG2HF must be true or false, got '$MG2HF'" >&2; usage; exit 2 ;;
esac
case "$USE_CUDA" in
  true) args+=(--use-cuda); default_procs=${KUBERNETES_CONTAINER_RESOURCE_GPU:-8} ;;
  false) default_procs=1 ;;
  *) echo "USE_CUDA must be true or false, got '$USE_CUDA'" >&2; usage; exit 2 ;;
esac
if [[ -n "$HF_DIR" ]]; then args+=(--hf-dir "$HF_DIR"); fi
# torch_dist does not depend on the layout; the parallel sizes are accepted for Pai compatibility.
read -r -a model_parallel <<< "${MODEL_PARALLEL_ARGS:-}"
read -r -a extra <<< "${CONVERT_ARGS:-}"

NNODES=${WORLD_SIZE:-1}
NODE_RANK=${RANK:-0}
PROC_PER_NODE=${PROC_PER_NODE:-$default_procs}
if [[ "$NNODES" == 1 && "$PROC_PER_NODE" == 1 ]]; then
  # One process: no launcher, so a bad input stays one line with exit status 2.
  unset RANK WORLD_SIZE
  exec "$PYTHON" -m megatron_patch.convert "${args[@]}" "${model_parallel[@]}" "${extra[@]}"
fi
launch=(-m megatron_patch.torchrun --nproc_per_node "$PROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK")
if [[ "$NNODES" == 1 ]]; then
  launch+=(--standalone)
else
  launch+=(--master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-6000}")
fi
# torchrun sets RANK/WORLD_SIZE for its processes; the node-level values must not leak into them.
unset RANK WORLD_SIZE
exec "$PYTHON" "${launch[@]}" -m megatron_patch.convert "${args[@]}" "${model_parallel[@]}" "${extra[@]}"

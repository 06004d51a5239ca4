#!/usr/bin/env bash
# JSONL documents -> Megatron-Core indexed dataset (PREFIX.bin/.idx) with the Qwen3 tokenizer.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: run_make_pretraining_dataset_megatron.sh INPUT TOKENIZER_DIR OUTPUT_PREFIX [JSON_KEY] [WORKERS]
  INPUT          a .jsonl/.json file, or a directory of them
  TOKENIZER_DIR  HF model or tokenizer directory (Qwen3)
  OUTPUT_PREFIX  writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx (use it as DATASET_PATH for training)
  JSON_KEY       field with the document text (default: text)
  WORKERS        tokenizer processes (default: 1)
env: EXTRA_ARGS (e.g. "--skip-bad-lines")
USAGE
}

if [[ $# -lt 3 || $# -gt 5 ]]; then usage; exit 2; fi
INPUT=$1
TOKENIZER_DIR=$2
OUTPUT_PREFIX=$3
JSON_KEY=${4:-text}
WORKERS=${5:-1}

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
collect_inputs "$INPUT"
read -r -a extra <<< "${EXTRA_ARGS:-}"
exec "$PYTHON" -m megatron_patch.data.build_pretrain --input "${inputs[@]}" --tokenizer "$TOKENIZER_DIR" \
  --output-prefix "$OUTPUT_PREFIX" --json-key "$JSON_KEY" --workers "$WORKERS" "${extra[@]}"

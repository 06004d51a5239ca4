#!/usr/bin/env bash
# SFT JSON(L) (Alpaca / ShareGPT / messages) -> Megatron indexed datasets of tokens + loss masks.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: run_build_idxmap_sft_dataset.sh INPUT TOKENIZER SEQ_LEN OUTPUT_PREFIX HF_DIR [PACKING]
  INPUT          a .jsonl/.json file, or a directory of them
  TOKENIZER      Qwen3Tokenizer (the only tokenizer this kit builds data for)
  SEQ_LEN        training sequence length
  OUTPUT_PREFIX  writes OUTPUT_PREFIX.bin/.idx and OUTPUT_PREFIX_loss_mask.bin/.idx
  HF_DIR         HF model or tokenizer directory
  PACKING        true: pack samples into SEQ_LEN (first-fit-decreasing); false (default)
env: EXTRA_ARGS (e.g. "--overlong skip --no-enable-thinking --last-turn-only --skip-bad-lines")
USAGE
}

if [[ $# -lt 5 || $# -gt 6 ]]; then usage; exit 2; fi
INPUT=$1
TOKENIZER=$2
SEQ_LEN=$3
OUTPUT_PREFIX=$4
HF_DIR=$5
PACKING=${6:-false}

if [[ "$TOKENIZER" != "Qwen3Tokenizer" ]]; then
  echo "error: TOKENIZER must be Qwen3Tokenizer, got '$TOKENIZER'" >&2; exit 2
fi
case "$PACKING" in
  true) packing=(--packing) ;;
  false) packing=() ;;
  *) echo "error: PACKING must be true or false, got '$PACKING'" >&2; exit 2 ;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
collect_inputs "$INPUT"
read -r -a extra <<< "${EXTRA_ARGS:-}"
exec "$PYTHON" -m megatron_patch.data.build_sft --input "${inputs[@]}" --tokenizer "$HF_DIR" \
  --seq-length "$SEQ_LEN" --output-prefix "$OUTPUT_PREFIX" "${packing[@]}" "${extra[@]}"

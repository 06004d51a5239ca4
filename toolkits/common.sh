# Shared by the toolkit scripts (sourced, not run). Sets REPO_ROOT, PYTHON and PYTHONPATH.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# PYTHON if set; else the activated virtualenv's; else the default lane's .venv, the Python 3.12
# lane's .venv-py312, or python3 (see the Makefile's lanes).
if [[ -z "${PYTHON:-}" ]]; then
  for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$REPO_ROOT/.venv/bin/python" \
                   "$REPO_ROOT/.venv-py312/bin/python"; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then PYTHON=$candidate; break; fi
  done
  PYTHON=${PYTHON:-python3}
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# collect_inputs PATH: the array `inputs` = PATH, or the .jsonl/.json files directly in directory PATH.
collect_inputs() {
  if [[ -d "$1" ]]; then
    mapfile -t inputs < <(find "$1" -maxdepth 1 -type f \( -name '*.jsonl' -o -name '*.json' \) | sort)
    if [[ ${#inputs[@]} -eq 0 ]]; then echo "error: no .jsonl/.json files in $1" >&2; exit 2; fi
  else
    inputs=("$1")
  fi
}

# expect_27_arguments "$@": Pai's 27 positional arguments, or the usage line and exit status 2.
expect_27_arguments() {
  if [[ $# -ne 27 ]]; then
    echo "usage: $0 ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP ETP EP SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH" >&2
    echo "error: expected 27 arguments, got $#" >&2
    exit 2
  fi
}

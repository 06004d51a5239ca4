# Shared by the toolkit scripts (sourced, not run). Sets REPO_ROOT, PYTHON and PYTHONPATH.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x "$REPO_ROOT/.venv/bin/python" ]] && echo "$REPO_ROOT/.venv/bin/python" || echo python3)}
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

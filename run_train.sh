#!/usr/bin/env bash
# The training job: ./run_train.sh --data_dir out/ --model_dir runs/r1 [flags]  (= python -m model.train; --help)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
[ -x "$PY" ] || { echo "run_train.sh: $PY not found; run 'make setup' first (or set PYTHON)" >&2; exit 1; }
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m model.train "$@"

#!/usr/bin/env bash
# The fold driver: ./run_folds.sh --data_dir out/ --out runs/cv [--folds 0,1,2,3,4] [--ids_csv ...] [--tta N]
# [any run_train.sh flag]  (= python -m model.cv; --help). `make folds` runs it on the demo's data.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
[ -x "$PY" ] || { echo "run_folds.sh: $PY not found; run 'make setup' first (or set PYTHON)" >&2; exit 1; }
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m model.cv "$@"

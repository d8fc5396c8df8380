#!/usr/bin/env bash
# The training job: ./run_train.sh --data_dir out/ --model_dir runs/r1 [flags]  (= python -m model.train; --help)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m model.train "$@"

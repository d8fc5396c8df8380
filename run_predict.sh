#!/usr/bin/env bash
# Batch prediction on Beam: test shards + exported models -> submission (DirectRunner or Dataflow). See --help.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || { echo "run_predict.sh: $py not found; run 'make setup' first (or set PYTHON)" >&2; exit 1; }
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$py" -m pipelines.batch_predict "$@"

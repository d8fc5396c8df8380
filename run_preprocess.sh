#!/usr/bin/env bash
# The preprocessing job: label files + stain images -> fold-tagged TFRecord shards. See --help.
# Thin wrapper of `hpa-preprocess` (python -m pipelines.preprocess): works from a fresh clone too.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || { echo "run_preprocess.sh: $py not found; run 'make setup' first (or set PYTHON)" >&2; exit 1; }
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # no cd: relative paths are the caller's
exec "$py" -m pipelines.preprocess "$@"

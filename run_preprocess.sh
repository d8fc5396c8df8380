#!/usr/bin/env bash
# The preprocessing job: label files + stain images -> fold-tagged TFRecord shards. See --help.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || { echo "run_preprocess.sh: $py not found; run 'make setup' first (or set PYTHON)" >&2; exit 1; }
cd "$here"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$py" -m pipelines.preprocess "$@"

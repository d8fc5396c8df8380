#!/usr/bin/env bash
# The download job: atlas Ids of a label file -> {Id}_{stain} images in one folder + a report. See --help.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || { echo "run_download.sh: $py not found; run 'make setup' first (or set PYTHON)" >&2; exit 1; }
cd "$here"
exec "$py" -m pipelines.download "$@"

#!/usr/bin/env bash
# The multi-fold run (`make folds`): the demo with one model per fold (DEMO_FOLDS, default all five), their
# pooled out-of-fold predictions for the thresholds and evaluation, and their ensemble for the prediction.
# Reuses the demo's synthetic data and shards when they were made with the same settings. See --help.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "${1:-}" in
  -h | --help)
    cat <<'USAGE'
usage: ./run_folds.sh [--help]     (make folds)

The demo (./run_demo.sh) trained once per held-out fold: DEMO_FOLDS models ["0 1 2 3 4"], thresholds tuned
on their pooled out-of-fold validation predictions, the test part predicted by their ensemble (probabilities
averaged over test-time augmentation, then over the models). Outputs go to DEMO_RUN_DIR [$DEMO_DIR/folds];
the data in $DEMO_DIR is reused when made with the same settings (DEMO_REUSE_DATA [1]). Every other
setting is the demo's: see ./run_demo.sh --help (DEMO_DIR, DEMO_SAMPLES, DEMO_IMAGE_SIZE, DEMO_EPOCHS, ...).
USAGE
    exit 0
    ;;
  "") ;;
  *) echo "run_folds.sh: unknown argument '$1' (settings are environment variables; see --help)" >&2; exit 2 ;;
esac
DIR="${DEMO_DIR:-$HERE/demo}"
export DEMO_DIR="$DIR"
export DEMO_RUN_DIR="${DEMO_RUN_DIR:-$DIR/folds}"
export DEMO_FOLDS="${DEMO_FOLDS:-0 1 2 3 4}"
export DEMO_REUSE_DATA="${DEMO_REUSE_DATA:-1}"
exec "$HERE/run_demo.sh"

#!/usr/bin/env bash
# The demo, the project's main job (`make demo`): synthetic data with a held-out test part -> preprocessing
# (Beam) -> training (CPU-sized model) -> thresholds and evaluation report -> prediction with test-time
# augmentation -> the prediction scored against the test part's hidden answers -> a gallery of the test
# predictions (images with Grad-CAM heat maps, per class: best hits, worst misses). Every step is the plain
# command a user would type. Run with --help for the settings.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ./run_demo.sh [--help]     (make demo)

Runs the whole pipeline on a synthetic dataset and prints the held-out macro F1 and where the report,
plots, submission and image gallery are. Settings come from environment variables (defaults in brackets):

  DEMO_DIR           where everything goes [./demo]
  DEMO_RUN_DIR       models, report and submission of this run [$DEMO_DIR/run]
  DEMO_SAMPLES       labeled synthetic samples [2500]
  DEMO_TEST_SAMPLES  held-out unlabeled samples, answers kept apart [500]
  DEMO_IMAGE_SIZE    image side in pixels [64]
  DEMO_NUM_FOLDS     cross-validation folds of the preprocessing job [5]
  DEMO_FOLDS         folds to hold out, one model each; several = the fold driver (run_folds.sh): pooled
                     thresholds and an ensemble [0; make folds: 0 1 2 3 4]
  DEMO_EPOCHS        training epochs per model (early stopping may end sooner) [40]
  DEMO_BATCH_SIZE    training batch size [32]
  DEMO_LR            initial learning rate (x0.3 after 3 epochs without progress) [0.003]
  DEMO_TTA           test-time augmentation transforms: 1, 2, 4 or 8 [8]
  DEMO_SEED          seed of data, folds and training [0]
  DEMO_REUSE_DATA    1: keep synthetic data and shards made with the same settings [0]
  DEMO_PYTHON        interpreter [./.venv/bin/python]

Outputs: $DEMO_DIR/synthetic (images, train.csv, sample_submission.csv, test_labels.csv),
$DEMO_DIR/data (shards, manifest), $DEMO_RUN_DIR/fold{k} (models, history plots), $DEMO_RUN_DIR/eval
(report.md, report.json, per_class_f1.png, thresholds.json), $DEMO_RUN_DIR/submission.csv,
$DEMO_RUN_DIR/score.json, $DEMO_RUN_DIR/gallery (report.html, the run's report for a browser; per class
the sheets of the test samples scored highest and the worst misses, with Grad-CAM heat maps) and
$DEMO_RUN_DIR/timings.tsv.
EOF
}
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "") ;;
  *) echo "run_demo.sh: unknown argument '$1' (settings are environment variables; see --help)" >&2; exit 2 ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"
PY="${DEMO_PYTHON:-$HERE/.venv/bin/python}"
[ -x "$PY" ] || { echo "run_demo.sh: $PY not found; run 'make setup' first (or set DEMO_PYTHON)" >&2; exit 1; }
export PYTHON="$PY"  # used by run_preprocess.sh and run_train.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

DIR="${DEMO_DIR:-$HERE/demo}"
RUN="${DEMO_RUN_DIR:-$DIR/run}"
SAMPLES="${DEMO_SAMPLES:-2500}"
TEST_SAMPLES="${DEMO_TEST_SAMPLES:-500}"
IMAGE_SIZE="${DEMO_IMAGE_SIZE:-64}"
NUM_FOLDS="${DEMO_NUM_FOLDS:-5}"
FOLDS="${DEMO_FOLDS:-0}"
EPOCHS="${DEMO_EPOCHS:-40}"
BATCH_SIZE="${DEMO_BATCH_SIZE:-32}"
LR="${DEMO_LR:-0.003}"
TTA="${DEMO_TTA:-8}"
SEED="${DEMO_SEED:-0}"
REUSE="${DEMO_REUSE_DATA:-0}"

RAW="$DIR/synthetic"
DATA="$DIR/data"
EVAL="$RUN/eval"
SUBMISSION="$RUN/submission.csv"
GALLERY="$RUN/gallery"
TIMINGS="$RUN/timings.tsv"
read -r -a FOLD_LIST <<<"$FOLDS"
[ "${#FOLD_LIST[@]}" -ge 1 ] || { echo "run_demo.sh: DEMO_FOLDS is empty" >&2; exit 2; }
MODEL_DIRS=()
for k in "${FOLD_LIST[@]}"; do MODEL_DIRS+=("$RUN/fold$k"); done

DATA_STAMP="samples=$SAMPLES test=$TEST_SAMPLES size=$IMAGE_SIZE folds=$NUM_FOLDS seed=$SEED"
REUSING=0
if [ "$REUSE" = 1 ] && [ -f "$DATA/manifest.json" ] && [ -f "$DATA/stamp.txt" ] \
  && [ "$(cat "$DATA/stamp.txt")" = "$DATA_STAMP" ]; then
  REUSING=1
fi

mkdir -p "$RUN"
printf 'step\tseconds\n' >"$TIMINGS"
T_ALL=$(date +%s)
T_STEP=$T_ALL
STEP=0
NSTEPS=$((7 - REUSING))
[ "${#FOLD_LIST[@]}" -gt 1 ] && NSTEPS=$((5 - REUSING))  # training, evaluation and prediction in one step
step() {  # step NAME "what it does": prints a header and starts the step's clock
  STEP=$((STEP + 1))
  echo
  echo "=== [$STEP/$NSTEPS] $1: $2 ==="
  STEP_NAME="$1"
  T_STEP=$(date +%s)
}
done_step() {
  local dt=$(($(date +%s) - T_STEP))
  printf '%s\t%d\n' "$STEP_NAME" "$dt" >>"$TIMINGS"
  echo "--- ${STEP_NAME}: ${dt} s"
}
show() {  # prints a command, then runs it
  echo "+ $*"
  "$@"
}

if [ "$REUSING" = 1 ]; then
  step reuse-data "synthetic dataset and preprocessing: reusing $DATA ($DATA_STAMP)"
  done_step
else
  step generate "synthetic dataset: $SAMPLES labeled + $TEST_SAMPLES held-out samples at ${IMAGE_SIZE} px -> $RAW"
  show "$PY" -m pipelines.synthetic --output_dir "$RAW" --num_samples "$SAMPLES" \
    --test_samples "$TEST_SAMPLES" --image_size "$IMAGE_SIZE" --seed "$SEED" --overwrite
  done_step

  step preprocess "preprocessing (Beam): train/ and test/ -> fold-tagged TFRecord shards in $DATA"
  show ./run_preprocess.sh \
    --labels_csv "$RAW/train.csv" --input_dir "$RAW/train" --source train \
    --labels_csv "$RAW/sample_submission.csv" --input_dir "$RAW/test" --source test \
    --output_dir "$DATA" --num_folds "$NUM_FOLDS" --seed "$SEED" --overwrite
  echo "$DATA_STAMP" >"$DATA/stamp.txt"
  done_step
fi

TRAIN_FLAGS=(--backbone small --weights none --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --cache memory
  --learning_rate "$LR" --lr_patience 3 --lr_factor 0.3 --early_stopping_patience 6 --val_tta "$TTA"
  --seed "$SEED")
if [ "${#FOLD_LIST[@]}" -gt 1 ]; then
  # Several folds: the fold driver trains one model per fold, tunes the thresholds on their pooled
  # out-of-fold predictions (-> $EVAL) and predicts the test part with their ensemble (-> $SUBMISSION).
  step folds "one model per fold (${FOLD_LIST[*]}), pooled thresholds, ensemble of ${#MODEL_DIRS[@]} model(s) -> $RUN"
  show ./run_folds.sh --data_dir "$DATA" --out "$RUN" --folds "$(IFS=,; echo "${FOLD_LIST[*]}")" \
    --ids_csv "$RAW/sample_submission.csv" --tta "$TTA" --overwrite "${TRAIN_FLAGS[@]}"
  done_step
else
  k="${FOLD_LIST[0]}"
  step "train-fold$k" "training: fold $k held out -> $RUN/fold$k"
  show ./run_train.sh --data_dir "$DATA" --model_dir "$RUN/fold$k" --val_fold "$k" "${TRAIN_FLAGS[@]}" --overwrite
  done_step

  step evaluate "thresholds and evaluation report on the validation predictions -> $EVAL"
  show "$PY" -m model.evaluate --model_dir "${MODEL_DIRS[@]}" --out "$EVAL"
  done_step

  step predict "prediction of the held-out test part (TTA $TTA, ${#MODEL_DIRS[@]} model(s)) -> $SUBMISSION"
  show "$PY" -m model.predict --data_dir "$DATA" --model_dir "${MODEL_DIRS[@]}" \
    --ids_csv "$RAW/sample_submission.csv" --out "$SUBMISSION" --tta "$TTA" \
    --probabilities "$RUN/test_probabilities.npz"
  done_step
fi

step score "scoring the submission against the hidden answers ($RAW/test_labels.csv)"
show "$PY" -m model.score --submission "$SUBMISSION" --answers "$RAW/test_labels.csv" --out "$RUN/score.json"
done_step

step gallery "gallery of the test predictions, labeled by the hidden answers, with Grad-CAM heat maps -> $GALLERY"
show "$PY" -m model.inspect --model_dir "${MODEL_DIRS[@]}" --data_dir "$DATA" --test \
  --answers "$RAW/test_labels.csv" --probabilities "$RUN/test_probabilities.npz" --out "$GALLERY"
done_step

TOTAL=$(($(date +%s) - T_ALL))
printf 'total\t%d\n' "$TOTAL" >>"$TIMINGS"
MACRO=$("$PY" -c 'import json, sys; print("%.4f" % json.load(open(sys.argv[1]))["macro_f1"])' "$RUN/score.json")
echo
echo "=== done in ${TOTAL} s ==="
column -t -s $'\t' "$TIMINGS" 2>/dev/null || cat "$TIMINGS"
echo
echo "held-out macro F1: $MACRO  ($TEST_SAMPLES test samples, ${#MODEL_DIRS[@]} model(s), TTA $TTA)"
echo "evaluation report: $EVAL/report.md  (per-class F1 plot: $EVAL/per_class_f1.png)"
for d in "${MODEL_DIRS[@]}"; do echo "training curves:   $d/plots.png"; done
echo "submission:        $SUBMISSION  (probabilities: $RUN/test_probabilities.npz)"
echo "test scores:       $RUN/score.json"
echo "run report:        $GALLERY/report.html  (open in a browser: settings, curves, per-class figures and images)"
echo "gallery sheets:    $GALLERY/class_*.png  (per class: test samples scored highest, worst misses)"

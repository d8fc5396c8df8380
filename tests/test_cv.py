"""Tests of model/cv.py, the fold driver: a kill and rerun on 2 tiny folds, its outputs, bad inputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import schemas
from model import config, cv, evaluate, predict, rundir
from model import thresholds as thr
from tests.fixtures import WAIT_CEILING, sigkill_when, wait_gone
from tests.test_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TEST = 6
TRAIN_FLAGS = ["--preset", "cpu-small", "--backbone", "small", "--weights", "none", "--small_filters", "4"]
TRAIN_FLAGS += ["--batch_size", "4"]
TRAIN_FLAGS += ["--epochs", "2", "--steps_per_epoch", "60", "--seed", "0", "--verbose", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two folds of 8 labeled samples and 6 test samples, 16 px, written directly (fast)."""
    root = str(tmp_path_factory.mktemp("cvdata"))
    samples = write_dataset(root, per_fold=(8, 8), num_test=NUM_TEST)
    ids_csv = os.path.join(root, "sample_submission.csv")
    test_ids = sorted((i for i, s in samples.items() if s["fold"] == schemas.UNLABELED_FOLD), reverse=True)
    with open(ids_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([schemas.CSV_ID, schemas.CSV_PREDICTED])
        w.writerows((i, "0") for i in test_ids)
    return root, ids_csv, test_ids


def _cmd(data_dir, out, ids_csv, *extra):
    args = ["--data_dir", data_dir, "--out", out, "--ids_csv", ids_csv, "--tta", "2", *TRAIN_FLAGS, *extra]
    return [sys.executable, "-m", "model.cv", *args]


def test_kill_then_rerun_skips_the_finished_fold_resumes_the_other_and_ensembles(data, tmp_path):
    data_dir, ids_csv, test_ids = data
    out = str(tmp_path / "cv")
    cmd = _cmd(data_dir, out, ids_csv)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    fold0, fold1 = cv.fold_dir(out, 0), cv.fold_dir(out, 1)

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    children = []
    killed = sigkill_when(
        proc,
        lambda: cv.fold_status(fold0) == cv.FINISHED and rundir.backup_epoch(fold1) == 1,
        children=children,
    )
    first = proc.stdout.read().decode()
    assert killed and proc.returncode == -signal.SIGKILL, first[-3000:]
    assert (
        "fold 1/2 (validation fold 0): training" in first
        and "fold 2/2 (validation fold 1): training" in first
    )
    assert children and wait_gone(children)  # the fold's subprocess dies with the driver ...
    assert cv.fold_status(fold1) == cv.INTERRUPTED and rundir.backup_epoch(fold1) == 1  # ... mid-epoch 2
    fold0_model = os.path.getmtime(os.path.join(fold0, config.MODEL_FILE))

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3 * WAIT_CEILING)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "fold 1/2 (validation fold 0): skipped (finished)" in second.stdout
    assert "fold 2/2 (validation fold 1): resumed after epoch 1" in second.stdout
    assert "Epoch 2/2" in second.stdout and "Epoch 1/2" not in second.stdout  # one epoch trained, in fold 1
    assert os.path.getmtime(os.path.join(fold0, config.MODEL_FILE)) == fold0_model
    assert cv.fold_status(fold1) == cv.FINISHED

    # The thresholds: what model.evaluate makes of the same dirs' pooled out-of-fold predictions.
    again = str(tmp_path / "eval_again")
    report = evaluate.run([fold0, fold1], again, write_model_dirs=False)
    ours = thr.load_thresholds(os.path.join(out, cv.EVAL_DIR, config.THRESHOLDS_FILE))
    ref = thr.load_thresholds(os.path.join(again, config.THRESHOLDS_FILE))
    np.testing.assert_array_equal(ours.values, ref.values)
    assert ours.num_samples == 16
    with open(os.path.join(out, cv.SUMMARY_JSON)) as f:
        summary = json.load(f)
    pooled = summary["pooled"]
    assert pooled["macro_f1_cross_fitted"] == report["summary"]["tuned_cross_fitted"]["macro_f1"]
    assert pooled["macro_f1_pooled_thresholds"] == report["summary"]["tuned_in_sample"]["macro_f1"]
    assert [(r["fold"], r["status"], r["epochs"], r["val_samples"]) for r in summary["folds"]] == [
        (0, "skipped (finished)", 2, 8),
        (1, "resumed", 2, 8),
    ]
    for row, d in zip(summary["folds"], (fold0, fold1), strict=True):
        p = evaluate.load_val_predictions(d)
        expected = thr.score_predictions(p.labels, thr.apply_thresholds(p.scores, ours.values)).macro_f1
        assert row["macro_f1_pooled_thresholds"] == expected
    with open(os.path.join(out, cv.SUMMARY_TSV)) as f:
        tsv = list(csv.DictReader(f, delimiter="\t"))
    assert [r["fold"] for r in tsv] == ["0", "1", "pooled"]
    assert f"{pooled['macro_f1_cross_fitted']:.4f}" in second.stdout

    # The submission: the Id list's order, and the ensemble's probabilities = the mean of each model's.
    with open(os.path.join(out, cv.SUBMISSION_FILE), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r[schemas.CSV_ID] for r in rows] == test_ids
    with np.load(os.path.join(out, cv.TEST_PROBABILITIES_FILE)) as z:
        ensemble = z[predict.PROB_SCORES]
    singles = []
    for d in (fold0, fold1):
        probs = str(tmp_path / f"{os.path.basename(d)}.npz")
        predict.run(
            predict.PredictConfig(
                data_dir=data_dir,
                model_dirs=(d,),
                out=str(tmp_path / "single.csv"),
                ids_csv=ids_csv,
                tta=2,
                probabilities=probs,
            )
        )
        with np.load(probs) as z:
            singles.append(z[predict.PROB_SCORES])
    np.testing.assert_allclose(ensemble, np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(singles[0], singles[1])  # two different models went into the average


def _fail(argv, capsys, tmp_path) -> str:
    assert cv.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpa-folds: error: ") and "\n" not in err, err
    assert not any(n.startswith("fold") for n in os.listdir(tmp_path)), "written before the error"
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--folds", "0,2"], "fold 2 is not in the manifest"),
        (["--folds", ""], "--folds is empty"),
        (["--folds", "0,0"], "repeats a fold"),
        (["--model_dir", "x"], "--model_dir: set by the fold driver"),
        (["--val_fold", "1"], "--val_fold: set by the fold driver"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--epcohs", "1"], "--epcohs (did you mean --epochs?)"),
        (["--epochs", "many"], "bad training flag"),
        (["--val_tta", "8"], "--tta 2 and --val_tta 8 differ"),
        (["--image_size", "32"], "--image_size 32 does not match"),
        (["--weights", "imagenet"], "the small backbone has no ImageNet weights: use --weights none"),
        (["--strategy", "multiworker"], "--strategy multiworker needs TF_CONFIG"),
        (["--preset", "top-densenet121-512"], "(the preset top-densenet121-512 sets --warmup_epochs 2; pass"),
        (
            ["--preset", "top-densenet121-512", "--warmup_epochs", "0"],
            "the preset top-densenet121-512 sets --image_size 512",
        ),
    ],
)
def test_bad_flags_are_one_line_errors_before_any_training(data, tmp_path, capsys, extra, message):
    data_dir, ids_csv, _ = data
    argv = _cmd(data_dir, str(tmp_path), ids_csv, *extra)[3:]
    assert message in _fail(argv, capsys, tmp_path)


def test_bad_test_sets_and_changed_settings_are_errors_before_any_training(data, tmp_path, capsys):
    data_dir, ids_csv, _ = data
    out = str(tmp_path)
    other = str(tmp_path.parent / f"{tmp_path.name}_other_size")
    write_dataset(other, per_fold=(2,), size=24, num_test=2)
    err = _fail(_cmd(data_dir, out, ids_csv, "--test_data_dir", other)[3:], capsys, tmp_path)
    assert "holds 24x24 images but the training set" in err and "16x16" in err
    no_test = str(tmp_path.parent / f"{tmp_path.name}_no_test")
    write_dataset(no_test, per_fold=(2, 2), size=16)
    assert "holds no test shards" in _fail(_cmd(no_test, out, ids_csv)[3:], capsys, tmp_path)
    missing = os.path.join(out, "missing.csv")
    assert "--ids_csv" in _fail(_cmd(data_dir, out, missing)[3:], capsys, tmp_path)

    # A fold dir holding a run with other settings: an error naming the difference, unless --overwrite.
    args, passthrough = cv.build_parser().parse_known_args(_cmd(data_dir, out, ids_csv)[3:])
    cfg = cv.plan(args, passthrough).configs[1]
    other_run = cv.fold_dir(out, 1)
    os.makedirs(other_run)
    changed = rundir.config_json(dataclasses.replace(cfg, epochs=5))
    with open(os.path.join(other_run, config.CONFIG_FILE), "w") as f:
        f.write(changed)
    assert cv.main(_cmd(data_dir, out, ids_csv)[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a run with other settings (epochs: 5 -> 2)" in err and "\n" not in err
    args, passthrough = cv.build_parser().parse_known_args(_cmd(data_dir, out, ids_csv, "--overwrite")[3:])
    assert cv.plan(args, passthrough).folds == [0, 1]  # --overwrite: no complaint, both folds retrained


def test_default_folds_are_the_manifests_folds_with_records():
    manifest = {
        schemas.MANIFEST_NUM_FOLDS: 4,
        schemas.MANIFEST_WRITTEN: {"0": 3, "1": 0, "2": 5, "3": 1, schemas.written_key(-1): 7},
    }
    assert cv.parse_folds(None, manifest, "d") == [0, 2, 3]
    assert cv.parse_folds(" 3, 0", manifest, "d") == [3, 0]
    with pytest.raises(config.ConfigError, match="fold 1 of d holds no records"):
        cv.parse_folds("1", manifest, "d")
    with pytest.raises(config.ConfigError, match="expected comma-separated"):
        cv.parse_folds("0-3", manifest, "d")


def test_help_and_the_wrapper():
    out = subprocess.run(
        [os.path.join(ROOT, "run_folds.sh"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "--data_dir" in out.stdout and "hpa-train flag" in out.stdout

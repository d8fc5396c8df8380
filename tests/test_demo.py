"""A tiny end-to-end run of the demo (run_demo.sh), with one fold and with several (through run_folds.sh).

Checks that every step runs and leaves well-formed outputs, not the F1 (a 1-epoch model on 40 samples at
32 px learns nothing worth scoring).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess

import numpy as np
import pytest

import schemas
from model import config, evaluate, inspect, predict, report
from model import thresholds as thr
from pipelines import synthetic
from schemas import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "DEMO_SAMPLES": "40",
    "DEMO_TEST_SAMPLES": "10",
    "DEMO_IMAGE_SIZE": "32",
    "DEMO_EPOCHS": "1",
    "DEMO_BATCH_SIZE": "8",
    "DEMO_TTA": "2",
}


def _run(script: str, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(
        [os.path.join(ROOT, script)],
        env={**os.environ, **TINY, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if console.NOISE.search(line)]
    assert not noise, f"{script}: library start-up lines reached the console:\n" + "\n".join(noise[:20])
    return proc.stdout


def _rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_run(demo_dir: str, run_dir: str, folds: list[int], stdout: str) -> None:
    raw = os.path.join(demo_dir, "synthetic")
    for k in folds:
        model_dir = os.path.join(run_dir, f"fold{k}")
        for name in (
            config.MODEL_FILE,
            config.VAL_PREDICTIONS_FILE,
            config.PLOTS_FILE,
            config.THRESHOLDS_FILE,
        ):
            assert os.path.exists(os.path.join(model_dir, name)), (model_dir, name)
    eval_dir = os.path.join(run_dir, "eval")
    for name in (evaluate.REPORT_JSON_FILE, evaluate.REPORT_MD_FILE, evaluate.F1_PLOT_FILE):
        assert os.path.getsize(os.path.join(eval_dir, name)) > 0, name
    fit = thr.load_thresholds(os.path.join(eval_dir, config.THRESHOLDS_FILE))
    assert fit.num_samples == sum(
        len(np.load(os.path.join(run_dir, f"fold{k}", config.VAL_PREDICTIONS_FILE))["ids"]) for k in folds
    )  # pooled over the folds' validation predictions

    # The submission: the sample submission's Ids in its order, valid class lists, at least one label each.
    wanted = [r[schemas.CSV_ID] for r in _rows(os.path.join(raw, synthetic.SUBMISSION_CSV))]
    rows = _rows(os.path.join(run_dir, "submission.csv"))
    assert list(rows[0]) == [schemas.CSV_ID, schemas.CSV_PREDICTED]
    assert [r[schemas.CSV_ID] for r in rows] == wanted
    for r in rows:
        labels = [int(c) for c in r[schemas.CSV_PREDICTED].split()]
        assert labels and all(0 <= c < schemas.NUM_CLASSES for c in labels)
    with np.load(os.path.join(run_dir, "test_probabilities.npz")) as z:
        assert z[predict.PROB_IDS].tolist() == wanted
        scores = z[predict.PROB_SCORES]
    assert scores.shape == (len(wanted), schemas.NUM_CLASSES)
    assert np.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1

    # The score, against the hidden answers; the summary names it and every output.
    with open(os.path.join(run_dir, "score.json")) as f:
        result = json.load(f)
    assert result["num_samples"] == len(wanted) and 0.0 <= result["macro_f1"] <= 1.0
    assert f"held-out macro F1: {result['macro_f1']:.4f}" in stdout
    # The gallery of the test predictions, labeled by the hidden answers: the report, the index and a sheet
    # for every class with a sample to show.
    gallery = os.path.join(run_dir, "gallery")
    sheets = {f for f in os.listdir(gallery) if f.endswith(".png")}
    assert sheets and sheets <= {inspect.sheet_name(c) for c in range(schemas.NUM_CLASSES)}
    index = open(os.path.join(gallery, inspect.INDEX_FILE)).read()
    assert "held-out" in index and f"{len(wanted)} samples" in index
    page = open(os.path.join(gallery, report.REPORT_FILE)).read()
    assert "held-out" in page and all(f'href="{name}"' in page for name in sheets)
    for path in (
        os.path.join(eval_dir, evaluate.REPORT_MD_FILE),
        os.path.join(run_dir, "submission.csv"),
        os.path.join(gallery, report.REPORT_FILE),
    ):
        assert path in stdout
    steps = [r["step"] for r in _rows_tsv(os.path.join(run_dir, "timings.tsv"))]
    trained = ["folds"] if len(folds) > 1 else [f"train-fold{k}" for k in folds]  # several: the fold driver
    assert steps[-1] == "total" and [s for s in steps if s.startswith(("train-fold", "folds"))] == trained


def _rows_tsv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    demo_dir = str(tmp_path_factory.mktemp("demo"))
    stdout = _run("run_demo.sh", {"DEMO_DIR": demo_dir})
    return demo_dir, stdout


def test_demo_runs_every_step(demo):
    demo_dir, stdout = demo
    steps = ["synthetic dataset", "preprocessing", "training", "thresholds", "prediction", "scoring"]
    for header in [*steps, "gallery"]:
        assert header in stdout, header
    _check_run(demo_dir, os.path.join(demo_dir, "run"), [0], stdout)
    manifest = schemas.read_manifest(os.path.join(demo_dir, "data"))
    written = manifest[schemas.MANIFEST_WRITTEN]
    assert written[schemas.written_key(schemas.UNLABELED_FOLD)] == int(TINY["DEMO_TEST_SAMPLES"])
    assert sum(v for k, v in written.items() if k != schemas.written_key(-1)) == int(TINY["DEMO_SAMPLES"])


def test_multi_fold_run_reuses_the_data_and_ensembles(demo):
    demo_dir, _ = demo
    before = os.path.getmtime(os.path.join(demo_dir, "data", schemas.MANIFEST_FILE))
    env = {"DEMO_DIR": demo_dir, "DEMO_FOLDS": "1 2", "DEMO_RUN_DIR": os.path.join(demo_dir, "folds")}
    stdout = _run("run_demo.sh", {**env, "DEMO_REUSE_DATA": "1"})
    assert "reusing" in stdout
    assert os.path.getmtime(os.path.join(demo_dir, "data", schemas.MANIFEST_FILE)) == before
    assert "2 model(s)" in stdout and "run_folds.sh --data_dir" in stdout
    assert "pooled out-of-fold macro F1" in stdout  # the fold driver's summary
    _check_run(demo_dir, os.path.join(demo_dir, "folds"), [1, 2], stdout)


def test_help_and_bad_arguments():
    path = os.path.join(ROOT, "run_demo.sh")
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "DEMO_DIR" in out.stdout
    bad = subprocess.run([path, "--epochs", "3"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr

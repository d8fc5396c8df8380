"""The evaluation job: reading and pooling val_predictions.npz, thresholds.json, the report, errors."""

import json
import os

import numpy as np
import pytest

import schemas
from bench import thresholds as bench_thresholds
from model import evaluate
from model import thresholds as thr


def _predictions(n=240, seed=0, prefix="s", signal=0.35):
    rng = np.random.default_rng(seed)
    share = np.linspace(0.35, 0.02, schemas.NUM_CLASSES)
    labels = (rng.random((n, schemas.NUM_CLASSES)) < share).astype(np.int64)
    scores = np.clip(signal * labels + rng.random(labels.shape) * (1 - signal), 0, 1).astype(np.float32)
    ids = np.array([f"{prefix}{i:04d}" for i in range(n)])
    return ids, labels, scores


def _write(model_dir, ids, labels, scores, override=None):
    os.makedirs(model_dir, exist_ok=True)
    arrays = {
        evaluate.VAL_IDS: ids,
        evaluate.VAL_LABELS: labels,
        evaluate.VAL_SCORES: scores,
        **(override or {}),
    }
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(os.path.join(model_dir, evaluate.VAL_PREDICTIONS_FILE), **arrays)
    return str(model_dir)


def _fold_dirs(tmp_path, folds=3):
    return [_write(tmp_path / f"fold{k}", *_predictions(seed=k, prefix=f"f{k}_")) for k in range(folds)]


def test_single_dir_writes_everything_there(tmp_path):
    d = _write(tmp_path / "m", *_predictions())
    assert evaluate.main(["--model_dir", d]) == 0
    for name in (evaluate.THRESHOLDS_FILE, evaluate.REPORT_JSON_FILE, evaluate.REPORT_MD_FILE):
        assert os.path.getsize(os.path.join(d, name)) > 0
    with open(os.path.join(d, evaluate.F1_PLOT_FILE), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(os.path.join(d, evaluate.REPORT_JSON_FILE)))
    assert [r["name"] for r in report["classes"]] == list(schemas.CLASS_NAMES)
    assert set(report["summary"]) == {"base_threshold", "tuned_cross_fitted", "tuned_in_sample"}
    md = open(os.path.join(d, evaluate.REPORT_MD_FILE)).read()
    assert schemas.CLASS_NAMES[27] in md and evaluate.F1_PLOT_FILE in md


def test_report_figures_match_the_core_functions(tmp_path):
    dirs = _fold_dirs(tmp_path)
    out = str(tmp_path / "eval")
    config = evaluate.EvalConfig(thresholds=thr.ThresholdConfig(min_positives=20), cv_splits=4, seed=3)
    report = evaluate.run(dirs, out, config)
    pooled = evaluate.pool_predictions([evaluate.load_val_predictions(d) for d in dirs])
    assert report["num_samples"] == len(pooled.ids) == 720
    saved = thr.load_thresholds(os.path.join(out, evaluate.THRESHOLDS_FILE))
    expected = thr.fit_thresholds(pooled.labels, pooled.scores, config.thresholds)
    np.testing.assert_array_equal(saved.values, expected.values)
    assert saved.rules == expected.rules and "rate" in saved.rules
    in_sample = thr.score_predictions(pooled.labels, thr.apply_thresholds(pooled.scores, saved.values))
    assert report["summary"]["tuned_in_sample"]["macro_f1"] == pytest.approx(in_sample.macro_f1)
    crossed = thr.cross_fit(pooled.labels, pooled.scores, config.thresholds, n_splits=4, seed=3).scores
    assert report["summary"]["tuned_cross_fitted"]["macro_f1"] == pytest.approx(crossed.macro_f1)
    np.testing.assert_allclose([r["recall"] for r in report["classes"]], crossed.recall)
    base = thr.score_predictions(pooled.labels, (pooled.scores >= 0.5).astype(int))
    assert report["summary"]["base_threshold"]["micro_f1"] == pytest.approx(base.micro_f1)
    assert [r["threshold"] for r in report["classes"]] == saved.values.tolist()
    assert [r["support"] for r in report["classes"]] == pooled.labels.sum(axis=0).tolist()


def test_pooled_thresholds_go_into_every_model_dir(tmp_path):
    dirs = _fold_dirs(tmp_path)
    out = str(tmp_path / "eval")
    evaluate.run(dirs, out)
    texts = {open(os.path.join(d, evaluate.THRESHOLDS_FILE)).read() for d in [*dirs, out]}
    assert len(texts) == 1
    assert json.loads(texts.pop())["sources"] == [
        os.path.join(d, evaluate.VAL_PREDICTIONS_FILE) for d in dirs
    ]
    other = str(tmp_path / "eval2")
    fresh = [_write(tmp_path / f"g{k}", *_predictions(seed=9 + k, prefix=f"g{k}_")) for k in range(2)]
    evaluate.run(fresh, other, write_model_dirs=False)
    assert not any(os.path.exists(os.path.join(d, evaluate.THRESHOLDS_FILE)) for d in fresh)
    assert os.path.exists(os.path.join(other, evaluate.THRESHOLDS_FILE))


@pytest.mark.parametrize("seed", range(3))
def test_in_sample_figure_is_optimistic_on_noise(seed):
    # Scores without signal: tuning on the scored samples fits noise; cross-fitting stays near chance, the
    # F1 of predicting every sample positive (2 * support / (n + support)).
    rng = np.random.default_rng(seed)
    labels = (rng.random((200, schemas.NUM_CLASSES)) < 0.05).astype(int)
    scores = rng.random(labels.shape)
    config = evaluate.EvalConfig(thresholds=thr.ThresholdConfig(rare_rule="fit"))
    s = evaluate.evaluate_predictions(labels, scores, config)[0]["summary"]
    support = labels.sum(axis=0)
    chance = np.mean(2 * support / (len(labels) + support))
    assert s["tuned_in_sample"]["macro_f1"] > s["tuned_cross_fitted"]["macro_f1"] + 0.03
    assert s["tuned_cross_fitted"]["macro_f1"] < chance + 0.02


def test_training_job_dtypes_are_read(tmp_path):
    # model.model.predict_with_ids gives float32 labels and scores; ids may also come as bytes.
    ids, labels, scores = _predictions(n=20)
    d = _write(tmp_path / "m", ids.astype("S"), labels.astype(np.float32), scores)
    got = evaluate.load_val_predictions(d)
    assert got.ids.tolist() == ids.tolist()
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_allclose(got.scores, scores)


@pytest.mark.parametrize(
    "override, message",
    [
        ({evaluate.VAL_SCORES: None}, "lacks the arrays"),
        ({evaluate.VAL_LABELS: np.zeros((20, 27))}, "shape"),
        ({evaluate.VAL_SCORES: np.zeros((19, schemas.NUM_CLASSES))}, "shape"),
        ({evaluate.VAL_LABELS: np.full((20, schemas.NUM_CLASSES), 2)}, "only 0 and 1"),
        ({evaluate.VAL_SCORES: np.full((20, schemas.NUM_CLASSES), 3.0)}, "sigmoid"),
        ({evaluate.VAL_IDS: np.array(["a"] * 20)}, "repeated Ids"),
        ({evaluate.VAL_IDS: np.array([object()] * 20, dtype=object)}, "str array"),
    ],
)
def test_bad_predictions_are_rejected(tmp_path, override, message):
    d = _write(tmp_path / "m", *_predictions(n=20), override)
    with pytest.raises(ValueError, match=message):
        evaluate.load_val_predictions(d)


def test_cli_errors(tmp_path, capsys):
    assert evaluate.main(["--model_dir", str(tmp_path / "nothing")]) == 2
    assert "val_predictions.npz not found" in capsys.readouterr().err
    a = _write(tmp_path / "a", *_predictions(n=30, prefix="x"))
    b = _write(tmp_path / "b", *_predictions(n=30, prefix="x", seed=1))
    assert evaluate.main(["--model_dir", a, b]) == 2
    assert "give --out" in capsys.readouterr().err
    assert evaluate.main(["--model_dir", a, b, "--out", str(tmp_path / "o")]) == 2
    assert "out-of-fold" in capsys.readouterr().err
    assert evaluate.main(["--model_dir", a, "--cv_splits", "1"]) == 2
    assert "cv_splits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    assert e.value.code == 0
    assert "--model_dir" in capsys.readouterr().out


def test_remote_paths_go_through_gfile():
    tf = pytest.importorskip("tensorflow")
    d = "ram://evaluate_test/fold0"
    tf.io.gfile.makedirs(d)
    ids, labels, scores = _predictions(n=60)
    import io

    buf = io.BytesIO()
    np.savez(buf, **{evaluate.VAL_IDS: ids, evaluate.VAL_LABELS: labels, evaluate.VAL_SCORES: scores})
    with tf.io.gfile.GFile(f"{d}/{evaluate.VAL_PREDICTIONS_FILE}", "wb") as f:
        f.write(buf.getvalue())
    evaluate.run([d], "ram://evaluate_test/out")
    assert tf.io.gfile.exists(f"ram://evaluate_test/out/{evaluate.F1_PLOT_FILE}")
    fit = thr.load_thresholds(f"{d}/{evaluate.THRESHOLDS_FILE}")
    assert fit.values.shape == (schemas.NUM_CLASSES,)


def test_bench_val_predictions_part(tmp_path, capsys):
    dirs = _fold_dirs(tmp_path, folds=2)
    npz = os.path.join(dirs[1], evaluate.VAL_PREDICTIONS_FILE)
    assert bench_thresholds.main(["--val_predictions", dirs[0], npz, "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "480 samples from 2 file(s)" in out
    for row in (
        "one threshold 0.5",
        "in-sample",
        "fit (no rare rule), cross-fitted",
        "rate, < 10",
        "shrink, < 10",
    ):
        assert row in out
    assert bench_thresholds.main(["--val_predictions", str(tmp_path / "missing")]) == 2

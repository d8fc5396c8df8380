"""Tests of model/predict.py and model/score.py: TTA, ensembles, the submission file, bad input."""

from __future__ import annotations

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score

import schemas
from model import data as data_lib
from model import model as model_lib
from model import predict
from model import score as score_lib
from model import thresholds as thr
from model.config import (
    THRESHOLDS_FILE,
    ModelConfig,
)
from model.model import build_model
from tests import fixtures
from tests.fixtures import png_bytes, stain_array, write_labels_csv

SIZE = 16
NUM_TEST = 11


# --- fixtures: records, model dirs and thresholds written directly (fast) --------------------------------


def _image(seed: int, size: int = SIZE) -> np.ndarray:
    return np.stack([stain_array(seed * 10 + k, size) for k in range(schemas.NUM_STAINS)], axis=-1)


def write_test_set(root: str, ids, size: int = SIZE, sizes=None, schema_version=schemas.SCHEMA_VERSION):
    """Writes unlabeled records (two test shards) and a manifest; returns {id: uint8 image}."""
    os.makedirs(os.path.join(root, schemas.TFRECORD_DIR), exist_ok=True)
    images = {}
    writers = [
        tf.io.TFRecordWriter(os.path.join(root, schemas.TFRECORD_DIR, schemas.shard_name(-1, s, 2)))
        for s in range(2)
    ]
    for j, sid in enumerate(ids):
        side = sizes[j] if sizes else size
        image = _image(1000 + j, side)
        images[sid] = image
        sample = schemas.Sample(
            id=sid,
            images={s: png_bytes(image[:, :, k]) for k, s in enumerate(schemas.STAINS)},
            height=side,
            width=side,
            labels=np.zeros(schemas.NUM_CLASSES, np.int64),
            fold=schemas.UNLABELED_FOLD,
            source="test",
        )
        writers[j % 2].write(schemas.to_example(sample).SerializeToString())
    for w in writers:
        w.close()
    manifest = {
        schemas.MANIFEST_SCHEMA_VERSION: schema_version,
        schemas.MANIFEST_IMAGE_SIZE: [size, size],
        schemas.MANIFEST_NUM_FOLDS: 5,
        schemas.MANIFEST_WRITTEN: {schemas.written_key(schemas.UNLABELED_FOLD): len(ids)},
        schemas.MANIFEST_STAIN_STATS: {"mean": [60.0] * 4, "std": [50.0] * 4},
    }
    with open(os.path.join(root, schemas.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)
    return images


def write_model_dir(path: str, seed: int, size: int = SIZE, thresholds=None) -> keras.Model:
    """A model dir as the training job (model.keras, config.json) and model.evaluate (thresholds) leave it."""
    keras.utils.set_random_seed(seed)
    mcfg = ModelConfig(backbone="small", weights="none", small_filters=4)
    model = build_model(mcfg, [60.0] * 4, [50.0] * 4)
    fixtures.write_model_dir(path, model, mcfg, size, thresholds)
    return model


save_thresholds = fixtures.save_thresholds


def _ids(n: int = NUM_TEST) -> list[str]:
    # Ids whose sorted order differs from the writing order, to catch order mix-ups.
    return [f"t{(7 * i) % n:03d}-{i}" for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A test set, two model dirs with the same thresholds, and the probabilities each model gives."""
    root = tmp_path_factory.mktemp("predict")
    data_dir = str(root / "data")
    ids = _ids()
    images = write_test_set(data_dir, ids)
    rng = np.random.default_rng(0)
    thresholds = rng.uniform(0.3, 0.7, schemas.NUM_CLASSES)
    dirs = [str(root / f"fold{k}") for k in range(2)]
    models = [write_model_dir(d, seed=k, thresholds=thresholds) for k, d in enumerate(dirs)]
    return {"root": root, "data_dir": data_dir, "ids": ids, "images": images, "dirs": dirs, "models": models}


def _run(setup, tmp_path, **kw) -> dict:
    cfg = dict(
        data_dir=setup["data_dir"],
        model_dirs=tuple(setup["dirs"][:1]),
        out=str(tmp_path / "submission.csv"),
        tta=1,
        batch_size=4,
    )
    cfg.update(kw)
    return predict.run(predict.PredictConfig(**cfg), log=lambda msg: None)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# --- TTA -------------------------------------------------------------------------------------------------


def _np_dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """Reference: k % 4 counter-clockwise quarter turns, then a left-right flip when k >= 4."""
    x = np.rot90(x, k % 4, axes=(-3, -2))
    return x[..., :, ::-1, :] if k >= 4 else x


@pytest.mark.parametrize("n", predict.TTA_CHOICES)
def test_tta_transforms_form_a_group_with_identity_first(n):
    ks = predict.tta_transforms(n)
    assert len(ks) == n and len(set(ks)) == n and ks[0] == 0
    x = _image(3)
    orbit = {_np_dihedral(x, k).tobytes() for k in ks}
    assert len(orbit) == n  # distinct images for an image without symmetry
    for j in ks:  # closed under composition: averaging over it is invariant to any of its transforms
        assert {_np_dihedral(_np_dihedral(x, j), k).tobytes() for k in ks} == orbit
    for k in ks:  # the transforms are model.data.dihedral's
        np.testing.assert_array_equal(data_lib.dihedral(tf.constant(x), k).numpy(), _np_dihedral(x, k))


def test_tta_transforms_rejects_other_counts():
    with pytest.raises(predict.PredictError, match="one of"):
        predict.tta_transforms(3)


def _symmetric(x: np.ndarray) -> np.ndarray:
    """The mean of the 8 dihedral images of x: invariant under all of them (exactly, after rounding)."""
    total = sum(_np_dihedral(x.astype(np.int64), k) for k in range(8))
    return (total // 8).astype(np.uint8)


def test_tta_of_a_symmetric_image_is_the_plain_prediction(setup):
    model = setup["models"][0]
    sym = _symmetric(_image(5))[None]
    for k in range(8):
        np.testing.assert_array_equal(_np_dihedral(sym, k), sym)
    plain = np.asarray(model.predict_on_batch(sym), np.float64)
    for n in predict.TTA_CHOICES:
        np.testing.assert_allclose(
            model_lib.tta_average(model.predict_on_batch, tf.constant(sym), predict.tta_transforms(n)),
            plain,
            rtol=0,
            atol=1e-6,
        )


def test_tta_of_an_asymmetric_image_averages_its_transforms(setup):
    model = setup["models"][0]
    x = _image(6)[None]
    plain = np.asarray(model.predict_on_batch(x), np.float64)
    eight = model_lib.tta_average(model.predict_on_batch, tf.constant(x), predict.tta_transforms(8))
    assert np.abs(eight - plain).max() > 1e-4  # the model is not invariant: TTA changes something
    manual = np.mean([model.predict_on_batch(_np_dihedral(x, k).copy()) for k in range(8)], axis=0)
    np.testing.assert_allclose(eight, manual, atol=1e-6)
    # Invariance of the 8-transform average: a rotated, flipped input gives the same averaged prediction.
    turned = model_lib.tta_average(
        model.predict_on_batch, tf.constant(_np_dihedral(x, 5).copy()), predict.tta_transforms(8)
    )
    np.testing.assert_allclose(turned, eight, atol=1e-6)


# --- the submission --------------------------------------------------------------------------------------


def test_submission_follows_the_id_list_and_thresholds(setup, tmp_path):
    wanted = list(reversed(setup["ids"]))
    ids_csv = str(tmp_path / "sample_submission.csv")
    write_labels_csv(ids_csv, [(i, "0") for i in wanted], header=(schemas.CSV_ID, schemas.CSV_PREDICTED))
    probs = str(tmp_path / "probs.npz")
    summary = _run(setup, tmp_path, ids_csv=ids_csv, probabilities=probs, tta=2, empty="none")
    rows = _read_csv(summary["submission"])
    assert rows[0] == [schemas.CSV_ID, schemas.CSV_PREDICTED]
    assert [r[0] for r in rows[1:]] == wanted
    z = _npz(probs)
    assert z[predict.PROB_IDS].tolist() == wanted
    assert z[predict.PROB_CLASS_NAMES].tolist() == list(schemas.CLASS_NAMES)
    # Probabilities are the model's TTA-2 average of each Id's own image.
    model = setup["models"][0]
    images = np.stack([setup["images"][i] for i in wanted])
    expected = model_lib.tta_average(model.predict_on_batch, tf.constant(images), (0, 4))
    np.testing.assert_allclose(z[predict.PROB_SCORES], expected, atol=1e-5)
    # Predicted = space-separated sorted class indices of the scores at or above their thresholds.
    t = thr.load_thresholds(os.path.join(setup["dirs"][0], THRESHOLDS_FILE)).values
    for (_sid, predicted), p in zip(rows[1:], z[predict.PROB_SCORES], strict=True):
        assert predicted == " ".join(str(c) for c in np.flatnonzero(p >= t))
        if predicted:
            assert all(0 <= int(c) < schemas.NUM_CLASSES for c in predicted.split(" "))


@pytest.mark.parametrize("empty", predict.EMPTY_RULES)
def test_rows_without_a_passing_class(setup, tmp_path, empty):
    high = str(tmp_path / "high.json")
    save_thresholds(high, 1.5)  # nothing passes
    probs = str(tmp_path / "p.csv")
    summary = _run(setup, tmp_path, thresholds=high, empty=empty, probabilities=probs)
    rows = _read_csv(summary["submission"])[1:]
    prob_rows = _read_csv(probs)
    assert prob_rows[0] == [schemas.CSV_ID, *schemas.CLASS_NAMES]
    if empty == "none":
        assert all(r[1] == "" for r in rows) and summary["empty_rows"] == len(rows)
    else:
        for r, p in zip(rows, prob_rows[1:], strict=True):
            assert r[1] == str(int(np.argmax([float(v) for v in p[1:]])))
        assert summary["empty_rows"] == 0


def test_without_id_list_every_record_sorted_by_id(setup, tmp_path):
    rows = _read_csv(_run(setup, tmp_path)["submission"])[1:]
    assert [r[0] for r in rows] == sorted(setup["ids"])


def test_ensemble_averages_the_models(setup, tmp_path):
    out = {}
    for name, dirs in (("a", setup["dirs"][:1]), ("b", setup["dirs"][1:]), ("ab", setup["dirs"])):
        path = str(tmp_path / f"{name}.npz")
        _run(setup, tmp_path, model_dirs=tuple(dirs), probabilities=path, tta=4)
        out[name] = _npz(path)[predict.PROB_SCORES].astype(np.float64)
    assert np.abs(out["a"] - out["b"]).max() > 1e-4
    np.testing.assert_allclose(out["ab"], (out["a"] + out["b"]) / 2, atol=1e-5)


@pytest.mark.parametrize("rule", predict.ENSEMBLE_RULES)
def test_ensemble_thresholds_rate_matches_the_models_decision_rate(setup, tmp_path, monkeypatch, rule):
    monkeypatch.setattr(predict, "MIN_RATE_SAMPLES", 1)  # the fixture holds 11 records
    single = {}
    for k, d in enumerate(setup["dirs"]):
        path = str(tmp_path / f"m{k}.npz")
        _run(setup, tmp_path, model_dirs=(d,), probabilities=path, tta=2)
        single[k] = _npz(path)
    probs = str(tmp_path / "ens.npz")
    dirs = tuple(setup["dirs"])
    summary = _run(
        setup, tmp_path, model_dirs=dirs, probabilities=probs, tta=2, empty="none", ensemble_thresholds=rule
    )
    assert summary["ensemble_thresholds"] == rule
    ids = _npz(probs)[predict.PROB_IDS].tolist()
    members = np.stack(
        [predict.order_by_ids(z[predict.PROB_IDS], z[predict.PROB_SCORES], ids) for z in single.values()]
    ).astype(np.float64)
    tuned = thr.load_thresholds(os.path.join(setup["dirs"][0], THRESHOLDS_FILE)).values
    used = thr.ensemble_thresholds(tuned, members) if rule == "rate" else tuned
    rows = {r[0]: r[1] for r in _read_csv(summary["submission"])[1:]}
    average = members.mean(axis=0)
    for sid, p in zip(ids, average, strict=True):
        got = {int(c) for c in rows[sid].split()}
        clear = np.abs(p - used) > 1e-5  # the job's float32 scores differ from these by rounding
        assert {int(c) for c in np.flatnonzero(clear & (p >= used))} == got - set(np.flatnonzero(~clear))
    if rule == "rate":  # each class keeps the single models' share of positive decisions (to one record)
        share_single = (members >= tuned).mean(axis=(0, 1))
        share_ensemble = (average >= used).mean(axis=0)
        assert np.abs(share_ensemble - share_single).max() <= 0.5 / len(ids) + 1e-9


def test_extra_records_are_reported_and_kept_in_probabilities(setup, tmp_path):
    wanted = setup["ids"][:4]
    ids_csv = str(tmp_path / "ids.csv")
    write_labels_csv(ids_csv, [(i, "0") for i in wanted], header=(schemas.CSV_ID, schemas.CSV_PREDICTED))
    messages = []
    probs = str(tmp_path / "p.npz")
    cfg = predict.PredictConfig(
        data_dir=setup["data_dir"],
        model_dirs=tuple(setup["dirs"][:1]),
        out=str(tmp_path / "s.csv"),
        ids_csv=ids_csv,
        tta=1,
        probabilities=probs,
    )
    summary = predict.run(cfg, log=messages.append)
    assert summary["not_in_id_list"] == NUM_TEST - 4
    assert any("not in" in m and str(NUM_TEST - 4) in m for m in messages)
    assert [r[0] for r in _read_csv(cfg.out)[1:]] == wanted
    assert sorted(_npz(probs)[predict.PROB_IDS].tolist()) == sorted(setup["ids"])


def test_format_submission_pure():
    preds = np.zeros((3, schemas.NUM_CLASSES), np.int8)
    preds[0, [0, 25]] = 1
    preds[2, 27] = 1
    text = predict.format_submission(["b", "a", "c"], preds)
    assert text == f"{schemas.CSV_ID},{schemas.CSV_PREDICTED}\nb,0 25\na,\nc,27\n"
    with pytest.raises(predict.PredictError):
        predict.format_submission(["a"], preds)


# --- bad input -------------------------------------------------------------------------------------------


def test_model_dir_without_thresholds(setup, tmp_path):
    bare = str(tmp_path / "bare")
    write_model_dir(bare, seed=3)
    with pytest.raises(predict.PredictError, match=f"no {THRESHOLDS_FILE}.*hpa-evaluate"):
        _run(setup, tmp_path, model_dirs=(bare,))
    # An explicit file is enough.
    explicit = str(tmp_path / "t.json")
    save_thresholds(explicit, 0.5)
    assert _run(setup, tmp_path, model_dirs=(bare,), thresholds=explicit)["rows"] == NUM_TEST


def test_model_dirs_with_different_thresholds(setup, tmp_path):
    other = str(tmp_path / "other")
    write_model_dir(other, seed=4, thresholds=0.42)
    with pytest.raises(predict.PredictError, match="different thresholds.*pooled"):
        _run(setup, tmp_path, model_dirs=(setup["dirs"][0], other))
    explicit = os.path.join(setup["dirs"][0], THRESHOLDS_FILE)
    assert _run(setup, tmp_path, model_dirs=(setup["dirs"][0], other), thresholds=explicit)["rows"]


def test_not_a_model_dir(setup, tmp_path):
    with pytest.raises(predict.PredictError, match="finished training run"):
        _run(setup, tmp_path, model_dirs=(str(tmp_path),))


def test_wrong_image_size(setup, tmp_path):
    big = str(tmp_path / "big")
    write_model_dir(big, seed=5, size=2 * SIZE, thresholds=0.5)
    with pytest.raises(predict.PredictError, match=f"{SIZE}x{SIZE} images.*{2 * SIZE}x{2 * SIZE}"):
        _run(setup, tmp_path, model_dirs=(big,))


def test_records_of_another_size_than_the_manifest(setup, tmp_path):
    mixed = str(tmp_path / "mixed")
    write_test_set(mixed, ["a", "b", "c"], sizes=[SIZE, SIZE + 4, SIZE])
    with pytest.raises(predict.PredictError, match="image size"):
        _run(setup, tmp_path, data_dir=mixed)


def test_other_schema_version(setup, tmp_path):
    old = str(tmp_path / "old")
    write_test_set(old, ["a", "b"], schema_version=schemas.SCHEMA_VERSION + 1)
    with pytest.raises(predict.PredictError, match="schema version"):
        _run(setup, tmp_path, data_dir=old)


def test_not_preprocessed_or_no_test_shards(setup, tmp_path):
    with pytest.raises(predict.PredictError, match="preprocessing"):
        _run(setup, tmp_path, data_dir=str(tmp_path / "nothing"))
    labeled_only = str(tmp_path / "labeled")
    write_test_set(labeled_only, ["a"])
    for f in tf.io.gfile.glob(schemas.shard_pattern(labeled_only, schemas.UNLABELED_FOLD)):
        head, name = os.path.split(f)
        new = name.replace(schemas.shard_prefix(schemas.UNLABELED_FOLD), schemas.shard_prefix(0), 1)
        os.rename(f, os.path.join(head, new))
    with pytest.raises(predict.PredictError, match="no unlabeled"):
        _run(setup, tmp_path, data_dir=labeled_only)


def test_ids_missing_from_the_shards_are_rejected_rows(setup, tmp_path):
    ids_csv = str(tmp_path / "ids.csv")
    write_labels_csv(
        ids_csv,
        [(i, "0") for i in ["ghost1", *setup["ids"], "ghost2"]],
        header=(schemas.CSV_ID, schemas.CSV_PREDICTED),
    )
    with open(os.path.join(setup["data_dir"], schemas.REJECTED_FILE), "w") as f:
        f.write(f"{schemas.CSV_ID},reason,detail,source\nghost2,missing_stain,no yellow,test\n")
    try:
        summary = _run(setup, tmp_path, ids_csv=ids_csv)
    finally:
        os.remove(os.path.join(setup["data_dir"], schemas.REJECTED_FILE))
    assert (summary["rows"], summary["rejected"]) == (NUM_TEST, 2)
    assert [r[0] for r in _read_csv(tmp_path / "submission.csv")[1:]] == setup["ids"]
    rejected = _read_csv(tmp_path / "submission.rejected.csv")
    assert rejected[0] == list(schemas.REJECTED_COLUMNS)
    assert [r[:2] for r in rejected[1:]] == [["ghost1", predict.NO_RECORD], ["ghost2", "missing_stain"]]
    assert "no yellow" in rejected[2][2] and "preprocessing" in rejected[2][2]
    # Nothing to predict: an error, the reasons in rejected.csv and no submission.
    only_ghosts = str(tmp_path / "ghosts.csv")
    write_labels_csv(only_ghosts, [("ghost1", "0")], header=(schemas.CSV_ID, schemas.CSV_PREDICTED))
    out = str(tmp_path / "none" / "submission.csv")
    with pytest.raises(predict.PredictError, match="none of the 1 listed Id"):
        _run(setup, tmp_path, ids_csv=only_ghosts, out=out)
    assert not os.path.exists(out) and os.path.exists(tmp_path / "none" / "submission.rejected.csv")
    # The submission may not sit beside the preprocessing job's own rejected.csv.
    with pytest.raises(predict.PredictError, match="lies in --data_dir"):
        _run(setup, tmp_path, out=os.path.join(setup["data_dir"], "submission.csv"))


def test_bad_id_lists(tmp_path):
    dup = str(tmp_path / "dup.csv")
    write_labels_csv(
        dup, [("a", "0"), ("b", "0"), ("a", "0")], header=(schemas.CSV_ID, schemas.CSV_PREDICTED)
    )
    with pytest.raises(predict.PredictError, match="repeats Ids.*'a'"):
        predict.read_id_list(dup)
    nocol = str(tmp_path / "nocol.csv")
    write_labels_csv(nocol, [("a", "0")], header=("Name", schemas.CSV_PREDICTED))
    with pytest.raises(predict.PredictError, match="column"):
        predict.read_id_list(nocol)
    with pytest.raises(predict.PredictError, match="no such file"):
        predict.read_id_list(str(tmp_path / "absent.csv"))


def test_order_by_ids_rejects_repeated_records():
    with pytest.raises(predict.PredictError, match="records repeat"):
        predict.order_by_ids(["a", "a"], np.zeros((2, 3)), ["a"])


def test_bad_flags():
    with pytest.raises(predict.PredictError, match="tta"):
        predict.PredictConfig(data_dir="d", model_dirs=("m",), out="o", tta=3)
    with pytest.raises(predict.PredictError, match="twice"):
        predict.PredictConfig(data_dir="d", model_dirs=("m", "m"), out="o")
    with pytest.raises(predict.PredictError, match="npz or .csv"):
        predict.PredictConfig(data_dir="d", model_dirs=("m",), out="o", probabilities="p.txt")


def test_main_help_and_error_status(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0 and "--tta" in capsys.readouterr().out
    code = predict.main(
        ["--data_dir", setup["data_dir"], "--model_dir", str(tmp_path), "--out", str(tmp_path / "s.csv")]
    )
    assert code == 2 and capsys.readouterr().err.startswith("hpa-predict: error: ")


# --- scoring ---------------------------------------------------------------------------------------------


def _table(rows):
    return {sid: schemas.labels_to_multi_hot(labels) for sid, labels in rows}


def test_score_matches_sklearn_macro_f1():
    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(60)]
    y = (rng.random((60, schemas.NUM_CLASSES)) < 0.1).astype(int)
    p = np.where(rng.random(y.shape) < 0.8, y, 1 - y)
    answers = {i: r for i, r in zip(ids, y, strict=True)}
    predicted = {i: r for i, r in zip(reversed(ids), p[::-1], strict=True)}  # order must not matter
    result = score_lib.score_tables(predicted, answers)
    assert result["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert result["micro_f1"] == pytest.approx(f1_score(y, p, average="micro", zero_division=0))
    assert [c["support"] for c in result["classes"]] == y.sum(axis=0).tolist()


def test_score_files_and_errors(tmp_path):
    answers = str(tmp_path / "answers.csv")
    write_labels_csv(answers, [("a", "0 1"), ("b", "2"), ("c", "")])
    sub = str(tmp_path / "sub.csv")
    write_labels_csv(sub, [("b", "2"), ("a", "0"), ("c", "")], header=(schemas.CSV_ID, schemas.CSV_PREDICTED))
    result = score_lib.score_files(sub, answers)
    f1 = np.zeros(schemas.NUM_CLASSES)
    f1[[0, 2]] = 1.0  # class 1: one positive, not predicted -> 0
    assert result["macro_f1"] == pytest.approx(f1.mean())
    missing = str(tmp_path / "missing.csv")
    write_labels_csv(missing, [("a", "0")], header=(schemas.CSV_ID, schemas.CSV_PREDICTED))
    with pytest.raises(score_lib.ScoreError, match="differ in Ids"):
        score_lib.score_files(missing, answers)
    bad = str(tmp_path / "bad.csv")
    write_labels_csv(
        bad, [("a", "0 99"), ("b", "2"), ("c", "")], header=(schemas.CSV_ID, schemas.CSV_PREDICTED)
    )
    with pytest.raises(score_lib.ScoreError, match="line 2"):
        score_lib.score_files(bad, answers)
    with pytest.raises(score_lib.ScoreError, match="missing column"):
        score_lib.score_files(answers, answers)  # answers have no Predicted column
    assert score_lib.main(["--submission", sub, "--answers", answers, "--out", str(tmp_path / "s.json")]) == 0
    assert json.load(open(tmp_path / "s.json"))["num_samples"] == 3

"""Tests of model/inspect.py: tile selection, the gallery files, Grad-CAM localisation, bad input.

The Grad-CAM test trains the small model for a few seconds on images where class 0 is a bright green blob
at a random place (with a red blob elsewhere as a distractor) and checks that the heat map of class 0 peaks
on the green blob far more often than chance.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import schemas
from model import inspect as insp
from model import report
from model.config import (
    MODEL_FILE,
    ModelConfig,
)
from model.model import build_model
from tests import fixtures
from tests.fixtures import png_bytes

SIZE = 64
RADIUS = 4
NEAR = 16  # px: two cells of the small backbone's 8x8 map of a 64 px image
CLASS = 0  # the class drawn as a green blob
GREEN, RED = schemas.STAINS.index("green"), schemas.STAINS.index("red")
MEAN, STD = [20.0] * schemas.NUM_STAINS, [40.0] * schemas.NUM_STAINS


def _blob_images(n: int, rng: np.random.Generator, positive: np.ndarray):
    """Noisy images; a red blob everywhere, a green blob where `positive`. Returns (images, green centres)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = rng.integers(0, 25, size=(n, SIZE, SIZE, schemas.NUM_STAINS)).astype(np.uint8)
    centres = np.full((n, 2), -1)
    lo, hi = RADIUS + 2, SIZE - RADIUS - 2
    for i in range(n):
        ry, rx = rng.integers(lo, hi, 2)
        images[i, :, :, RED][(yy - ry) ** 2 + (xx - rx) ** 2 <= RADIUS**2] = 230
        if positive[i]:
            while True:  # blobs far apart: a peak near one is not near the other
                gy, gx = rng.integers(lo, hi, 2)
                if (gy - ry) ** 2 + (gx - rx) ** 2 > (2 * NEAR) ** 2:
                    break
            images[i, :, :, GREEN][(yy - gy) ** 2 + (xx - gx) ** 2 <= RADIUS**2] = 230
            centres[i] = (gy, gx)
    return images, centres


def _labels(positive: np.ndarray) -> np.ndarray:
    y = np.zeros((len(positive), schemas.NUM_CLASSES), np.float32)
    y[:, CLASS] = positive
    return y


def _write_records(root: str, images, labels, fold: int, prefix: str) -> list[str]:
    os.makedirs(os.path.join(root, schemas.TFRECORD_DIR), exist_ok=True)
    ids = [f"{prefix}{i:03d}" for i in range(len(images))]
    writers = [
        tf.io.TFRecordWriter(os.path.join(root, schemas.TFRECORD_DIR, schemas.shard_name(fold, s, 2)))
        for s in range(2)
    ]
    for j, (sid, image, y) in enumerate(zip(ids, images, labels)):
        sample = schemas.Sample(
            id=sid,
            images={s: png_bytes(np.ascontiguousarray(image[:, :, k])) for k, s in enumerate(schemas.STAINS)},
            height=SIZE,
            width=SIZE,
            labels=np.asarray(y, np.int64) if fold != schemas.UNLABELED_FOLD else np.zeros(28, np.int64),
            fold=fold,
            source="train",
        )
        writers[j % 2].write(schemas.to_example(sample).SerializeToString())
    for w in writers:
        w.close()
    return ids


def _write_manifest(root: str, size: int = SIZE) -> None:
    manifest = {
        schemas.MANIFEST_SCHEMA_VERSION: schemas.SCHEMA_VERSION,
        schemas.MANIFEST_IMAGE_SIZE: [size, size],
        schemas.MANIFEST_NUM_FOLDS: 5,
        schemas.MANIFEST_WRITTEN: {},
        schemas.MANIFEST_STAIN_STATS: {"mean": MEAN, "std": STD},
    }
    with open(os.path.join(root, schemas.MANIFEST_FILE), "w") as f:
        json.dump(manifest, f)


def _write_model_dir(path: str, model: keras.Model, size: int = SIZE, thresholds=None) -> None:
    mcfg = ModelConfig(backbone="small", weights="none", small_filters=8)
    fixtures.write_model_dir(path, model, mcfg, size, thresholds)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The small model trained a few seconds on green-blob images; a dataset and a model dir around it."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    positive = rng.random(192) < 0.5
    images, _ = _blob_images(len(positive), rng, positive)
    model = build_model(ModelConfig(backbone="small", weights="none", small_filters=8), MEAN, STD)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    # Small batches: enough steps for the batch-norm statistics to settle, which Grad-CAM reads.
    model.fit(images, _labels(positive), batch_size=8, epochs=12, verbose=0)

    root = tmp_path_factory.mktemp("inspect")
    data_dir = str(root / "data")
    eval_pos = rng.random(40) < 0.5
    eval_images, _ = _blob_images(len(eval_pos), rng, eval_pos)
    _write_records(data_dir, eval_images, _labels(eval_pos), fold=0, prefix="v")
    test_ids = _write_records(
        data_dir, eval_images[:10], _labels(eval_pos[:10]), schemas.UNLABELED_FOLD, prefix="t"
    )
    _write_manifest(data_dir)
    model_dir = str(root / "run")
    _write_model_dir(model_dir, model, thresholds=0.4)
    answers = str(root / "test_labels.csv")  # the test part's labels, as the synthetic generator writes
    with open(answers, "w") as f:
        f.write(f"{schemas.CSV_ID},{schemas.CSV_TARGET}\n")
        f.writelines(f"{sid},{CLASS if pos else CLASS + 1}\n" for sid, pos in zip(test_ids, eval_pos))
    return {
        "model": model,
        "rng": rng,
        "root": root,
        "data_dir": data_dir,
        "model_dir": model_dir,
        "answers": answers,
        "test_positive": eval_pos[:10],
    }


def test_grad_cam_peaks_where_the_class_pattern_was_drawn(trained):
    model, rng = trained["model"], trained["rng"]
    n = 24
    images, centres = _blob_images(n, rng, np.ones(n, bool))
    negatives, _ = _blob_images(n, rng, np.zeros(n, bool))
    scores = model.predict_on_batch(np.concatenate([images, negatives]))[:, CLASS]
    # The model has learned the class (else the localisation below would test nothing).
    assert scores[:n].min() > scores[n:].max() or np.mean(scores[:n][:, None] > scores[n:][None]) > 0.95

    cams, peaks = insp.grad_cam(model, images, [CLASS] * n)
    assert cams.shape == (n, SIZE, SIZE) and np.all(peaks > 0)
    assert cams.min() >= 0 and np.allclose(cams.reshape(n, -1).max(axis=1), 1.0)
    at = np.array([np.unravel_index(np.argmax(c), c.shape) for c in cams])
    # The backbone's map is 8x8 cells of 8 px: "near" is within two cells of the blob's centre.
    near = np.hypot(*(at - centres).T) <= NEAR
    # Chance: how often a peak placed at random lands that near (about pi * 16^2 / 64^2 ~ 0.2).
    random_at = rng.integers(0, SIZE, size=(100 * n, 2))
    chance = (np.hypot(*(random_at - np.repeat(centres, 100, axis=0)).T) <= NEAR).mean()
    assert chance < 0.3
    assert near.mean() >= 0.75, f"peaks {at.tolist()} vs green blobs {centres.tolist()}"
    # The heat map is higher on the blob than off it in (nearly) every image.
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    on = np.array([c[m].mean() for c, m in zip(cams, disc <= RADIUS**2)])
    off = np.array([c[~m].mean() for c, m in zip(cams, disc <= RADIUS**2)])
    assert (on > off).mean() >= 0.9

    # The red blob, the distractor, is not where class 0's heat map peaks.
    red = images[..., RED].astype(float)
    red_at = np.array([np.unravel_index(np.argmax(r), r.shape) for r in red])
    assert (np.hypot(*(at - red_at).T) <= NEAR).mean() <= 0.2


def test_gallery_files(trained, tmp_path, capsys):
    out = str(tmp_path / "gallery")
    status = insp.main(
        [
            "--model_dir",
            trained["model_dir"],
            "--data_dir",
            trained["data_dir"],
            "--out",
            out,
            "--per_class",
            "3",
        ]
    )
    assert status == 0
    sheets = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    # A class with no sample to show (class 5: no positive, nothing predicted) gets no blank sheet.
    assert CLASS != 5 and insp.sheet_name(CLASS) in sheets and insp.sheet_name(5) not in sheets
    index = open(os.path.join(out, insp.INDEX_FILE)).read()
    assert sorted(set(re.findall(r'href="([^"]+)"', index))) == sorted(sheets + [report.REPORT_FILE])
    assert schemas.CLASS_NAMES[CLASS] in index and "fold 0" in index and "F1" in index
    row5 = re.search(r"<tr><td>5</td>(.*?)</tr>", index).group(1)
    assert "0.000" not in row5.split("</td>", 4)[-1] and report.UNDEFINED in row5  # undefined, not 0
    from PIL import Image

    for name in sheets:  # sized to their content: as wide as the longest row of tiles
        with Image.open(os.path.join(out, name)) as sheet:
            assert 2 * 2 * 160 <= sheet.size[0] <= 3 * (2 * 160 + 18) and sheet.size[1] < 1200
    page = open(os.path.join(out, report.REPORT_FILE)).read()
    assert page.count('aria-label="precision-recall curve"') == schemas.NUM_CLASSES
    assert "microtubules" in page and "Grad-CAM" in page and "data:image/png;base64," in page
    assert "..." not in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    log = capsys.readouterr().out
    assert f"wrote {len(sheets)} sheets" in log and report.REPORT_FILE in log


def test_gallery_of_test_shards_and_ensemble(trained, tmp_path):
    second = str(tmp_path / "run2")
    shutil.copytree(trained["model_dir"], second)
    out = str(tmp_path / "g")
    summary = insp.run(
        insp.InspectConfig(
            model_dirs=(trained["model_dir"], second), data_dir=trained["data_dir"], out=out, test=True
        ),
        log=lambda m: None,
    )
    assert summary["records"] == 10 and summary["macro_f1"] is None
    index = open(os.path.join(out, insp.INDEX_FILE)).read()
    assert "test shards" in index and "first model only" in index


def test_gallery_of_test_shards_with_answers(trained, tmp_path, capsys):
    """--answers labels the test part: three rows per sheet and an F1 table of held-out samples."""
    out = str(tmp_path / "g")
    args = ["--model_dir", trained["model_dir"], "--data_dir", trained["data_dir"], "--out", out, "--test"]
    assert insp.main([*args, "--answers", trained["answers"], "--per_class", "2"]) == 0
    index = open(os.path.join(out, insp.INDEX_FILE)).read()
    assert "test shards" in index and "held-out" in index and "F1" in index
    support = re.search(rf"<td>{CLASS}</td><td>[^<]*</td><td>.*?</td><td>[^<]*</td><td>(\d+)</td>", index)
    assert support and int(support.group(1)) == int(trained["test_positive"].sum())

    # Bad input, each one line and exit 2: answers without --test, a test Id without an answer.
    assert insp.main([*args[:-1], "--answers", trained["answers"]]) == 2
    assert "--test" in capsys.readouterr().err
    partial = tmp_path / "partial.csv"
    partial.write_text("".join(open(trained["answers"]).readlines()[:-1]))
    assert insp.main([*args, "--answers", str(partial), "--out", str(tmp_path / "g2")]) == 2
    err = capsys.readouterr().err
    assert "no row for 1 of the 10" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "g2")


def test_gallery_from_given_probabilities(trained, tmp_path, capsys):
    """--probabilities: the scores shown are the file's (model.predict's), not scored again."""
    from model import predict

    ids = [f"t{i:03d}" for i in range(10)]
    scores = np.zeros((10, schemas.NUM_CLASSES), np.float32)
    scores[:, 7] = 0.9  # a class the model never learned: only given scores can predict it everywhere
    npz = str(tmp_path / "p.npz")
    np.savez(npz, **{predict.PROB_IDS: np.array(ids), predict.PROB_SCORES: scores})
    out = str(tmp_path / "g")
    args = ["--model_dir", trained["model_dir"], "--data_dir", trained["data_dir"], "--test"]
    assert insp.main([*args, "--answers", trained["answers"], "--probabilities", npz, "--out", out]) == 0
    index = open(os.path.join(out, insp.INDEX_FILE)).read()
    assert "Scores from" in index
    row = r"<td>7</td><td>[^<]*</td><td>.*?</td><td>[^<]*</td><td>\d+</td><td>(\d+)</td>"  # predicted
    predicted = re.search(row, index)
    assert predicted and int(predicted.group(1)) == 10

    np.savez(npz, **{predict.PROB_IDS: np.array(["t000", "nope"]), predict.PROB_SCORES: scores[:2] + 0.95})
    assert insp.main([*args, "--probabilities", npz, "--out", str(tmp_path / "g2")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1


def test_select_tiles_rows():
    rng = np.random.default_rng(1)
    labels = (rng.random((50, 4)) < 0.4).astype(np.int8)
    scores = rng.random((50, 4))
    t = np.array([0.5, 0.3, 0.7, 0.5])
    for sel in insp.select_tiles(labels, scores, t, per_class=5):
        c, s, y = sel.class_index, scores[:, sel.class_index], labels[:, sel.class_index] > 0
        tp, fp, fn = sel.rows["tp"], sel.rows["fp"], sel.rows["fn"]
        assert np.all(y[tp]) and np.all(s[tp] >= t[c]) and np.all(np.diff(s[tp]) <= 0)
        assert np.all(~y[fp]) and np.all(s[fp] >= t[c]) and np.all(np.diff(s[fp]) <= 0)
        assert np.all(y[fn]) and np.all(s[fn] < t[c]) and np.all(np.diff(s[fn]) >= 0)
        # the worst ones: nothing left out is more extreme
        others_fp = np.setdiff1d(np.flatnonzero(~y & (s >= t[c])), fp)
        assert len(fp) == min(5, len(fp) + len(others_fp))
        if len(others_fp):
            assert s[others_fp].max() <= s[fp].min()
        others_fn = np.setdiff1d(np.flatnonzero(y & (s < t[c])), fn)
        if len(others_fn):
            assert s[others_fn].min() >= s[fn].max()
    top = insp.select_tiles(labels, scores, t, per_class=3, labeled=False)
    assert [list(sel.rows) for sel in top] == [["top"]] * 4
    assert np.array_equal(top[2].rows["top"], np.argsort(-scores[:, 2])[:3])


def test_atlas_composite_adds_yellow_to_red_and_green():
    image = np.zeros((1, 1, schemas.NUM_STAINS), np.uint8)
    image[0, 0] = [10, 20, 30, 200]  # STAINS order: red, green, blue, yellow
    assert insp.atlas_composite(image)[0, 0].tolist() == [210, 220, 30]
    image[0, 0, schemas.STAINS.index("yellow")] = 250
    assert insp.atlas_composite(image)[0, 0].tolist() == [255, 255, 30]


def test_bad_input(trained, tmp_path, capsys):
    base = ["--data_dir", trained["data_dir"], "--out", str(tmp_path / "g")]
    no_model = tmp_path / "empty"
    no_model.mkdir()
    assert insp.main(["--model_dir", str(no_model), *base]) == 2
    assert MODEL_FILE in capsys.readouterr().err

    assert insp.main(["--model_dir", trained["model_dir"], *base, "--fold", "3"]) == 2
    err = capsys.readouterr().err
    assert "fold 3" in err and len(err.strip().splitlines()) == 1

    other = str(tmp_path / "other")
    _write_model_dir(other, trained["model"], size=32)
    assert insp.main(["--model_dir", trained["model_dir"], other, *base]) == 2
    err = capsys.readouterr().err
    assert "different image sizes" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "g")


def test_tile_text_is_cut_and_any_character_drawn():
    image = np.zeros((8, 8, schemas.NUM_STAINS), np.uint8)
    tile = insp._tile(image, np.zeros((8, 8)), ["Id-\u00e9\u20ac\u2026 " * 30, "x"])
    assert tile.size[0] == 2 * 160 + 6


def test_unreadable_model_file(trained, tmp_path, capsys):
    broken = str(tmp_path / "broken")
    shutil.copytree(trained["model_dir"], broken)
    with open(os.path.join(broken, MODEL_FILE), "wb") as f:
        f.write(b"not a keras file")
    args = ["--model_dir", broken, "--data_dir", trained["data_dir"], "--out", str(tmp_path / "g")]
    assert insp.main(args) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and len(err.strip().splitlines()) == 1

"""Tests of pipelines/batch_predict.py: the Beam job gives model.predict's submission and probabilities."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest

import schemas
from model import model as model_lib
from model import predict
from model.config import EXPORT_DIR, THRESHOLDS_FILE
from pipelines import batch_predict
from tests.fixtures import png_bytes, stain_array, write_labels_csv
from tests.test_predict import _ids, write_model_dir, write_test_set

SIZE = 16
NUM_TEST = 11


def _model_dir(path: str, seed: int, thresholds, size: int = SIZE) -> str:
    """A model dir as the training job leaves it (model.keras, config.json, export/) with thresholds."""
    model = write_model_dir(path, seed=seed, size=size, thresholds=thresholds)
    model_lib.export_serving(model, os.path.join(path, EXPORT_DIR), size)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A test set of 11 records, two exported model dirs sharing thresholds, and an Id list of 9 of them."""
    root = tmp_path_factory.mktemp("batch_predict")
    data_dir = str(root / "data")
    ids = _ids(NUM_TEST)
    images = write_test_set(data_dir, ids, size=SIZE)
    thresholds = np.random.default_rng(1).uniform(0.4, 0.6, schemas.NUM_CLASSES)
    dirs = [_model_dir(str(root / f"fold{k}"), k, thresholds) for k in range(2)]
    listed = [ids[i] for i in (5, 0, 9, 3, 1, 10, 7, 2, 4)]  # not the records' order, two records unlisted
    ids_csv = str(root / "sample_submission.csv")
    write_labels_csv(ids_csv, [(i, "0") for i in listed], header=(schemas.CSV_ID, schemas.CSV_PREDICTED))
    return {
        "root": root,
        "data_dir": data_dir,
        "ids": ids,
        "dirs": dirs,
        "ids_csv": ids_csv,
        "images": images,
        "thr": thresholds,
    }


def _argv(setup, out_dir, *extra, dirs=None):
    return [
        "--data_dir",
        setup["data_dir"],
        "--model_dir",
        *(dirs or setup["dirs"]),
        "--out",
        str(out_dir / "submission.csv"),
        "--batch_size",
        "4",
        "--progress_seconds",
        "0.5",
        *extra,
    ]


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("listed", [True, False], ids=["ids_csv", "all_records"])
def test_beam_job_gives_model_predicts_submission_and_probabilities(setup, tmp_path, listed):
    extra = ["--tta", "4", *(["--ids_csv", setup["ids_csv"]] if listed else [])]
    ref_dir, beam_dir = tmp_path / "ref", tmp_path / "beam"
    ref_summary = predict.run(
        predict.PredictConfig(
            data_dir=setup["data_dir"],
            model_dirs=tuple(setup["dirs"]),
            out=str(ref_dir / "submission.csv"),
            ids_csv=setup["ids_csv"] if listed else None,
            tta=4,
            probabilities=str(ref_dir / "probs.npz"),
            batch_size=3,
        ),
        log=lambda msg: None,
    )
    lines = []
    summary = batch_predict.run(
        _argv(setup, beam_dir, *extra, "--probabilities", str(beam_dir / "probs.npz")), log=lines.append
    )

    assert _read(beam_dir / "submission.csv") == _read(ref_dir / "submission.csv")
    ref, got = _npz(ref_dir / "probs.npz"), _npz(beam_dir / "probs.npz")
    assert got[predict.PROB_IDS].tolist() == ref[predict.PROB_IDS].tolist()
    assert sorted(got[predict.PROB_IDS].tolist()) == sorted(setup["ids"])  # every record accounted for
    np.testing.assert_allclose(got[predict.PROB_SCORES], ref[predict.PROB_SCORES], rtol=0, atol=1e-5)
    assert got[predict.PROB_CLASS_NAMES].tolist() == list(schemas.CLASS_NAMES)
    for key in ("rows", "records", "not_in_id_list", "empty_rows", "tta"):
        assert summary[key] == ref_summary[key], key
    assert summary["not_in_id_list"] == (2 if listed else 0)
    # The models differ, and averaging them and their transforms is what both jobs did.
    assert not np.allclose(got[predict.PROB_SCORES][:, 0], got[predict.PROB_SCORES][0, 0])
    assert any("wrote" in line for line in lines)
    assert sorted(os.listdir(beam_dir)) == [
        "probs.npz",
        "submission.csv",
        "submission.rejected.csv",
    ]  # no work folder
    assert _read_rows(beam_dir / "submission.rejected.csv") == [list(schemas.REJECTED_COLUMNS)]


def _read_rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_listed_ids_without_a_record_go_to_rejected_csv_with_their_reason(setup, tmp_path):
    data_dir = str(tmp_path / "data")
    ids = ["a", "b", "c"]
    write_test_set(data_dir, ids, size=SIZE)
    with open(os.path.join(data_dir, schemas.REJECTED_FILE), "w", newline="") as f:
        csv.writer(f).writerows(
            [schemas.REJECTED_COLUMNS, ["gone", "corrupt_image", "red cannot be read", "t"]]
        )
    ids_csv = str(tmp_path / "ids.csv")
    write_labels_csv(ids_csv, [(i, "0") for i in ("c", "gone", "a", "absent")], header=(schemas.CSV_ID,))
    out_dir = tmp_path / "out"
    argv = _argv(setup, out_dir, "--tta", "1", "--ids_csv", ids_csv, dirs=setup["dirs"][:1])
    argv[1] = data_dir
    summary = batch_predict.run(argv, log=lambda msg: None)

    rows = _read_rows(out_dir / "submission.csv")
    assert [r[0] for r in rows] == [schemas.CSV_ID, "c", "a"]
    assert _read_rows(out_dir / "submission.rejected.csv") == [
        list(schemas.REJECTED_COLUMNS),
        ["gone", "corrupt_image", "rejected by preprocessing: red cannot be read", data_dir],
        ["absent", "no_record", f"no record in {data_dir}", data_dir],
    ]
    assert (summary["rows"], summary["rejected"], summary["not_in_id_list"]) == (2, 2, 1)


def test_no_predictable_listed_id_stops_the_job_and_writes_nothing(setup, tmp_path, capsys):
    ids_csv = str(tmp_path / "ids.csv")
    write_labels_csv(ids_csv, [("absent-id", "0")], header=(schemas.CSV_ID,))
    out_dir = tmp_path / "out"
    code = batch_predict.main(_argv(setup, out_dir, "--tta", "1", "--ids_csv", ids_csv))
    err = capsys.readouterr().err
    assert code == 2
    assert "none of the 1 listed Id(s) could be predicted" in err and "absent-id: no_record" in err
    assert not out_dir.exists() or os.listdir(out_dir) == []


def test_a_model_dir_without_thresholds_is_refused_before_any_work(setup, tmp_path, capsys):
    bare = str(tmp_path / "bare")
    shutil.copytree(setup["dirs"][1], bare)
    os.remove(os.path.join(bare, THRESHOLDS_FILE))
    code = batch_predict.main(_argv(setup, tmp_path / "out", dirs=[setup["dirs"][0], bare]))
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bare} has no {THRESHOLDS_FILE}" in err
    assert len(err.strip().splitlines()) == 1


def test_models_of_different_image_sizes_are_refused(setup, tmp_path, capsys):
    other = str(tmp_path / "big")
    write_model_dir(other, seed=4, size=2 * SIZE, thresholds=setup["thr"])
    code = batch_predict.main(_argv(setup, tmp_path / "out", dirs=[setup["dirs"][0], other]))
    err = capsys.readouterr().err
    assert code == 2
    assert "different image sizes" in err and f"{other}: {2 * SIZE}" in err


def test_records_of_another_size_stop_the_job(setup, tmp_path, capsys):
    data_dir = str(tmp_path / "mixed")
    ids = ["a", "b", "c"]
    write_test_set(data_dir, ids, size=SIZE, sizes=[SIZE, 2 * SIZE, SIZE])
    argv = _argv(setup, tmp_path / "out", "--tta", "1", dirs=setup["dirs"][:1])
    argv[1] = data_dir
    code = batch_predict.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "1 record(s) could not be scored" in err and "b: other_image_size: 32x32" in err
    assert not (tmp_path / "out" / "submission.csv").exists()


def _write_folder(folder, images: dict) -> None:
    """Each image's four stains as `{Id}_{stain}.png` files."""
    os.makedirs(folder, exist_ok=True)
    for sid, image in images.items():
        for k, stain in enumerate(schemas.STAINS):
            with open(os.path.join(folder, f"{sid}_{stain}.png"), "wb") as f:
                f.write(png_bytes(image[:, :, k]))


def test_an_image_folder_gives_the_shards_predictions_and_lists_every_rejected_id(setup, tmp_path):
    folder = tmp_path / "images"
    _write_folder(folder, setup["images"])
    big = np.stack([stain_array(90 + k, 2 * SIZE) for k in range(schemas.NUM_STAINS)], axis=-1)
    _write_folder(folder, {"big": big})  # resized to the models' size
    _write_folder(folder, {"three": big[:SIZE, :SIZE]})
    os.remove(folder / "three_yellow.png")  # a missing stain
    _write_folder(folder, {"mixed": big[:SIZE, :SIZE]})
    with open(folder / "mixed_green.png", "wb") as f:  # a stain of another size
        f.write(png_bytes(big[:, :, 1]))
    listed = ["absent", *setup["ids"][::-1], "three", "big", "mixed"]
    ids_csv = str(tmp_path / "ids.csv")
    write_labels_csv(ids_csv, [(i, "0") for i in listed], header=(schemas.CSV_ID,))

    out = tmp_path / "folder"
    argv = _argv(setup, out, "--tta", "2", "--ids_csv", ids_csv, "--probabilities", str(out / "p.npz"))
    argv[0] = "--input_dir"
    argv[1] = str(folder)
    summary = batch_predict.run(argv, log=lambda msg: None)
    ref = tmp_path / "ref"
    batch_predict.run(_argv(setup, ref, "--tta", "2", "--probabilities", str(ref / "p.npz")), log=lambda m: 0)

    got, want = _npz(out / "p.npz"), _npz(ref / "p.npz")
    index = {sid: k for k, sid in enumerate(got[predict.PROB_IDS].tolist())}
    rows = [index[sid] for sid in want[predict.PROB_IDS].tolist()]
    np.testing.assert_allclose(got[predict.PROB_SCORES][rows], want[predict.PROB_SCORES], rtol=0, atol=1e-5)
    submission = _read_rows(out / "submission.csv")
    assert [r[0] for r in submission[1:]] == [*setup["ids"][::-1], "big"]
    ref_rows = dict(map(tuple, _read_rows(ref / "submission.csv")[1:]))
    assert all(ref_rows[sid] == pred for sid, pred in submission[1:-1])
    rejected = _read_rows(out / "submission.rejected.csv")
    assert [(r[0], r[1]) for r in rejected[1:]] == [
        ("absent", "missing_stain"),
        ("three", "missing_stain"),
        ("mixed", "size_mismatch"),
    ]
    assert "yellow" in rejected[2][2] and rejected[1][3] == str(folder)
    assert summary["rows"] + summary["rejected"] == len(listed)  # every listed Id accounted for

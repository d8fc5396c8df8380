"""Tests of model/image_folder.py and `model.predict --input_dir`: the folder path against the shard path."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import schemas
from model import data as data_lib
from model import fileio, image_folder, predict
from model.config import DataConfig
from pipelines import preprocess
from schemas import labels as labels_lib
from schemas import stains as stains_lib
from tests import fixtures
from tests.test_predict import _npz as _npz_dict
from tests.test_predict import _read_csv as _read
from tests.test_predict import save_thresholds, write_model_dir

SIZE = 16  # the models' image size
GOOD_IDS = ["p3", "p1", "jpg_gray", "jpg_colour", "tif", "deep16", "big_png", "big_jpg"]
BAD_IDS = {"three": "missing_stain", "mixed": "size_mismatch", "broken": "corrupt_image"}
ABSENT_IDS = {"ghost": "missing_stain", "bad..id": "bad_id"}  # listed, no file (or an unsafe Id)


def _save(folder, sid: str, stain: str, pixels: np.ndarray, fmt: str = "PNG", ext: str = "png", mode=None):
    Image.fromarray(pixels, mode).save(os.path.join(folder, f"{sid}_{stain}.{ext}"), format=fmt)


def _write_folder(folder: str) -> None:
    """Samples the shard path accepts in every form it converts, and samples it rejects."""
    os.makedirs(folder, exist_ok=True)
    fixtures.write_sample_images(folder, "p3", seed=3, size=SIZE)
    fixtures.write_sample_images(folder, "p1", seed=1, size=SIZE)
    fixtures.write_sample_images(folder, "jpg_gray", seed=4, size=SIZE, ext="jpg")  # stored as it is
    fixtures.write_sample_images(folder, "tif", seed=5, size=SIZE, ext="tif")
    fixtures.write_sample_images(folder, "big_png", seed=6, size=2 * SIZE + 8)  # resized (box filter)
    fixtures.write_sample_images(folder, "big_jpg", seed=7, size=3 * SIZE, ext="jpg")
    fixtures.write_sample_images(folder, "jpg_colour", seed=8, size=SIZE)
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[..., 1] = fixtures.stain_array(80, SIZE)  # the atlas' colour-coded green stain, as a JPEG
    rgb[..., 0] = fixtures.stain_array(81, SIZE) // 4
    _save(folder, "jpg_colour", "green", rgb, "JPEG", "jpg")
    fixtures.write_sample_images(folder, "deep16", seed=9, size=SIZE)
    deep = (fixtures.stain_array(90, SIZE).astype(np.uint16) * 257 + 100).astype(np.uint16)
    os.remove(os.path.join(folder, "deep16_blue.png"))
    _save(folder, "deep16", "blue", deep, mode="I;16")
    fixtures.write_sample_images(folder, "three", seed=10, size=SIZE)
    os.remove(os.path.join(folder, "three_yellow.png"))
    fixtures.write_sample_images(folder, "mixed", seed=11, size=SIZE)
    _save(folder, "mixed", "red", fixtures.stain_array(110, SIZE + 4))
    fixtures.write_sample_images(folder, "broken", seed=12, size=SIZE)
    path = os.path.join(folder, "broken_green.png")
    with open(path, "rb") as f:
        head = f.read()[:60]
    with open(path, "wb") as f:
        f.write(head)


def _write_ids(path: str, ids) -> str:
    fixtures.write_labels_csv(path, [(i, "0") for i in ids], header=(schemas.CSV_ID, schemas.CSV_PREDICTED))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An image folder, its shards from the preprocessing job (--image_size SIZE), two model dirs."""
    root = tmp_path_factory.mktemp("folder")
    folder = str(root / "images")
    _write_folder(folder)
    listed = [GOOD_IDS[0], *BAD_IDS, *GOOD_IDS[1:], *ABSENT_IDS]
    ids_csv = _write_ids(str(root / "ids.csv"), listed)
    data_dir = str(root / "shards")
    preprocess.run(
        ["--labels_csv", ids_csv, "--input_dir", folder, "--output_dir", data_dir, "--image_size", str(SIZE)]
        + ["--duplicates", "off", "--direct_num_workers", "1", "--progress_seconds", "60"]
    )
    thresholds = np.random.default_rng(1).uniform(0.3, 0.7, schemas.NUM_CLASSES)
    dirs = [str(root / f"fold{k}") for k in range(2)]
    for k, d in enumerate(dirs):
        write_model_dir(d, seed=10 + k, thresholds=thresholds)
    return {
        "root": root,
        "folder": folder,
        "ids_csv": ids_csv,
        "listed": listed,
        "data_dir": data_dir,
        "dirs": dirs,
    }


def _run(world, out_dir, log=None, **kw) -> dict:
    cfg = dict(model_dirs=tuple(world["dirs"]), tta=2, batch_size=3, ids_csv=world["ids_csv"])
    cfg.update(out=os.path.join(out_dir, "submission.csv"), probabilities=os.path.join(out_dir, "p.npz"))
    cfg.update(kw)
    return predict.run(predict.PredictConfig(**cfg), log=log or (lambda msg: None))


def _npz(path):
    z = _npz_dict(path)
    return z[predict.PROB_IDS].tolist(), z[predict.PROB_SCORES].astype(np.float64)


def _plan(world, ids=None) -> image_folder.FolderPlan:
    return image_folder.plan_folder(image_folder.list_stain_files(world["folder"]), world["folder"], ids)


def _pillow(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_folder_feeds_the_shard_paths_arrays(world):
    shards = data_lib.make_eval_dataset(
        world["data_dir"], [schemas.UNLABELED_FOLD], DataConfig(image_size=SIZE, batch_size=64), with_ids=True
    )
    want = {i.decode(): x for images, _, ids in shards for x, i in zip(images.numpy(), ids.numpy())}
    rejected: list = []
    plan = _plan(world, world["listed"])
    got = {}
    for images, labels, ids in image_folder.make_dataset(plan.samples, SIZE, 3, rejected):
        assert images.dtype == np.uint8 and not labels.numpy().any()
        got.update((i.decode(), x) for x, i in zip(images.numpy(), ids.numpy()))
    assert sorted(got) == sorted(want) == sorted(GOOD_IDS)
    for sid in GOOD_IDS:
        assert got[sid].shape == (SIZE, SIZE, schemas.NUM_STAINS)
        np.testing.assert_array_equal(got[sid], want[sid], err_msg=sid)
    assert sorted(r[:2] for r in rejected) == sorted(
        (i, "corrupt_image" if i == "broken" else "size_mismatch") for i in ("broken", "mixed")
    )
    # The gray JPEG is why TensorFlow decodes stored JPEGs: Pillow's pixels differ from the shard path's.
    (jpg,) = [s for s in plan.samples if s.id == "jpg_gray"]
    assert not np.array_equal(image_folder.read_sample(jpg, SIZE, decode_jpeg=_pillow), want["jpg_gray"])


def test_folder_and_shard_predictions_and_submissions_agree(world, tmp_path):
    os.makedirs(tmp_path / "f")
    os.makedirs(tmp_path / "s")
    folder = _run(world, str(tmp_path / "f"), input_dir=world["folder"])
    shards = _run(world, str(tmp_path / "s"), data_dir=world["data_dir"])
    ids_f, scores_f = _npz(tmp_path / "f" / "p.npz")
    ids_s, scores_s = _npz(tmp_path / "s" / "p.npz")
    assert ids_f == ids_s == [i for i in world["listed"] if i in GOOD_IDS]  # the Id list's order
    np.testing.assert_allclose(scores_f, scores_s, atol=1e-5, rtol=0)
    assert scores_f.std(axis=0).max() > 1e-3  # the models tell the samples apart: the check means something
    assert _read(tmp_path / "f" / "submission.csv") == _read(tmp_path / "s" / "submission.csv")
    # Every listed Id is predicted or rejected, with the same reason on both paths.
    rej_f = {r[0]: r[1] for r in _read(tmp_path / "f" / "submission.rejected.csv")[1:]}
    rej_s = {r[0]: r[1] for r in _read(tmp_path / "s" / "submission.rejected.csv")[1:]}
    assert rej_f == rej_s == {**BAD_IDS, **ABSENT_IDS}
    assert (folder["rows"], folder["rejected"]) == (shards["rows"], shards["rejected"]) == (8, 5)
    rows = [r[0] for r in _read(tmp_path / "f" / "submission.csv")[1:]]
    assert sorted(rows + list(rej_f)) == sorted(world["listed"])


def test_without_id_list_every_id_with_a_file(world, tmp_path):
    summary = _run(world, str(tmp_path), input_dir=world["folder"], ids_csv=None)
    rows = [r[0] for r in _read(tmp_path / "submission.csv")[1:]]
    assert rows == sorted(GOOD_IDS)
    rejected = _read(tmp_path / "submission.rejected.csv")
    assert rejected[0] == list(schemas.REJECTED_COLUMNS)
    assert {r[0]: r[1] for r in rejected[1:]} == BAD_IDS
    assert "yellow" in {r[0]: r[2] for r in rejected[1:]}["three"]
    assert summary["rows"] + summary["rejected"] == len(GOOD_IDS) + len(BAD_IDS)


def test_unlisted_images_are_reported(world, tmp_path):
    ids_csv = _write_ids(str(tmp_path / "few.csv"), ["p1", "tif"])
    logs: list[str] = []
    summary = _run(world, str(tmp_path), logs.append, input_dir=world["folder"], ids_csv=ids_csv, tta=1)
    assert summary["rows"] == 2
    assert any("not in" in m and "not predicted" in m for m in logs)
    assert any("2 of 2 listed Ids predicted, 0 rejected, " in m for m in logs)


def test_whole_run_problems_stop_with_one_line(world, tmp_path):
    def run(**kw):
        cfg = dict(
            input_dir=world["folder"], model_dirs=tuple(world["dirs"][:1]), out=str(tmp_path / "s.csv")
        )
        cfg.update(kw)
        return predict.run(predict.PredictConfig(**cfg), log=lambda msg: None)

    with pytest.raises(predict.PredictError, match="no such folder"):
        run(input_dir=str(tmp_path / "absent"))
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(predict.PredictError, match="no stain images"):
        run(input_dir=str(tmp_path / "empty"))
    bare = str(tmp_path / "bare")
    write_model_dir(bare, seed=3)
    with pytest.raises(predict.PredictError, match="no thresholds.json"):
        run(model_dirs=(bare,))
    big = str(tmp_path / "big")
    write_model_dir(big, seed=4, size=2 * SIZE)
    save_thresholds(os.path.join(big, "thresholds.json"), 0.5)
    with pytest.raises(predict.PredictError, match="different image sizes"):
        run(model_dirs=(world["dirs"][0], big), thresholds=os.path.join(big, "thresholds.json"))
    only_bad = _write_ids(str(tmp_path / "bad.csv"), ["three", "ghost"])
    with pytest.raises(predict.PredictError, match="none of the 2 listed Id"):
        run(ids_csv=only_bad)
    assert {r[0] for r in _read(tmp_path / "s.rejected.csv")[1:]} == {"three", "ghost"}
    assert not os.path.exists(tmp_path / "s.csv")  # no submission on error
    with pytest.raises(predict.PredictError, match="either --data_dir"):
        predict.PredictConfig(data_dir="d", input_dir="i", model_dirs=("m",), out="o")


def test_main_input_dir_flags(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0 and "--input_dir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        predict.main(["--data_dir", "d", "--input_dir", "i", "--model_dir", "m", "--out", "o"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    code = predict.main(
        [
            "--input_dir",
            str(tmp_path / "absent"),
            "--model_dir",
            world["dirs"][0],
            "--out",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hpa-predict: error: ") and err.count("\n") == 1


def test_remote_folder_through_gfile(world, tmp_path):
    """A URL folder goes through model.fileio (tf.io.gfile); TensorFlow's ram:// file system stands in."""
    remote = "ram://hpa-folder-test/images"
    for name in os.listdir(world["folder"]):
        with open(os.path.join(world["folder"], name), "rb") as f:
            fileio.write_bytes(f"{remote}/{name}", f.read())
    try:
        os.makedirs(tmp_path / "r")
        os.makedirs(tmp_path / "l")
        one = tuple(world["dirs"][:1])
        _run(world, str(tmp_path / "r"), input_dir=remote, tta=1, model_dirs=one)
        _run(world, str(tmp_path / "l"), input_dir=world["folder"], tta=1, model_dirs=one)
    finally:
        fileio.rmtree("ram://hpa-folder-test")
    ids_r, scores_r = _npz(tmp_path / "r" / "p.npz")
    ids_l, scores_l = _npz(tmp_path / "l" / "p.npz")
    assert ids_r == ids_l and np.array_equal(scores_r, scores_l)
    rej = _read(tmp_path / "r" / "submission.rejected.csv")[1:]
    assert {r[0] for r in rej} == {*BAD_IDS, *ABSENT_IDS} and all(r[3] == remote for r in rej)


_NAMES = st.sampled_from(["a", "b", "c", "a.b", "x-1", "../e", ""])


@settings(max_examples=60, deadline=None)
@given(
    files=st.dictionaries(_NAMES.filter(bool), st.sets(st.sampled_from(schemas.STAINS)), max_size=5),
    listed=st.none() | st.lists(_NAMES, unique=True, max_size=6),
)
def test_plan_accounts_for_every_id(files, listed):
    by_id = {
        sid: {s: [(".png", f"d/{sid}_{s}.png")] for s in stains} for sid, stains in files.items() if stains
    }
    if not by_id:
        with pytest.raises(image_folder.FolderError):
            image_folder.plan_folder(by_id, "d", listed)
        return
    plan = image_folder.plan_folder(by_id, "d", listed)
    wanted = sorted(by_id) if listed is None else listed
    read = [s.id for s in plan.samples]
    assert sorted(read + [r[0] for r in plan.rejected]) == sorted(wanted)  # each Id exactly once
    assert read == [i for i in wanted if i in read]  # in the list's order
    for _, reason, _ in plan.rejected:
        assert reason in (stains_lib.MISSING_STAIN, labels_lib.BAD_ID)
    assert set(plan.unlisted) == set(by_id) - set(wanted)


def test_listing_prefers_the_preprocessing_jobs_format(tmp_path):
    fixtures.write_sample_images(str(tmp_path), "a", seed=1, ext="tif")
    fixtures.write_sample_images(str(tmp_path), "a", seed=2, ext="png")
    (tmp_path / "a_green.txt").write_text("x")
    (tmp_path / "b_purple.png").write_bytes(b"x")
    files = image_folder.list_stain_files(str(tmp_path))
    assert list(files) == ["a"] and len(files["a"]["red"]) == 2
    (sample,) = image_folder.plan_folder(files, str(tmp_path)).samples
    assert all(p.endswith(".png") for p in sample.paths)

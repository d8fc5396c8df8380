"""The preprocessing job (pipelines.preprocess) on small generated datasets, DirectRunner."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import random
import shutil

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

import schemas
from pipelines import preprocess
from pipelines.transforms import folds as folds_tf
from pipelines.transforms import rows as rows_tf
from pipelines.transforms import shards as shards_tf
from pipelines.transforms import stats as stats_tf
from pipelines.transforms.samples import Candidate
from schemas import labels, stains
from tests import fixtures

IN_PROCESS = ["--direct_num_workers", "1"]  # faster start for tests; one test runs the multi-process default


def _run(csv_path, input_dir, out, *extra):
    return preprocess.run(
        [
            "--labels_csv",
            csv_path,
            "--input_dir",
            input_dir,
            "--output_dir",
            out,
            "--progress_seconds",
            "1",
            *IN_PROCESS,
            *extra,
        ]
    )


def _read_records(out: str) -> dict[str, schemas.Sample]:
    samples = {}
    for path in sorted(glob.glob(os.path.join(out, schemas.TFRECORD_DIR, "*"))):
        for raw in tf.data.TFRecordDataset(path):
            s = schemas.example_to_sample(raw.numpy())
            assert s.id not in samples, f"{s.id} written twice"
            samples[s.id] = s
    return samples


def _rejected(out: str) -> dict[str, str]:
    with open(os.path.join(out, schemas.REJECTED_FILE)) as f:
        return {r[schemas.CSV_ID]: r[schemas.REJECTED_REASON] for r in csv.DictReader(f)}


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode else Image.fromarray(arr).save(
        buf, format="PNG"
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A dataset with 20 good samples and one sample of every kind of bad input, run through the job once."""
    root = str(tmp_path_factory.mktemp("dirty"))
    csv_path, image_dir, good = fixtures.make_dataset(root, num_samples=20, size=16)
    rows = [(sid, " ".join(map(str, labs))) for sid, labs in good.items()]

    def add(sid, target="1", writer=None):
        fixtures.write_sample_images(image_dir, sid, seed=len(rows) + 100, size=16)
        if writer:
            writer()
        rows.append((sid, target))

    def put(sid, stain, data):
        with open(os.path.join(image_dir, f"{sid}_{stain}.png"), "wb") as f:
            f.write(data)

    add("missing", writer=lambda: os.remove(os.path.join(image_dir, "missing_yellow.png")))
    add("empty", writer=lambda: put("empty", "red", b""))
    add("truncated", writer=lambda: put("truncated", "green", _png(fixtures.stain_array(1, 16))[:60]))
    add("corrupt", writer=lambda: put("corrupt", "blue", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20))
    add("sizes", writer=lambda: put("sizes", "blue", _png(fixtures.stain_array(1, 24))))
    rgb = np.stack([fixtures.stain_array(2, 16)] * 3, axis=-1)
    add("rgb", writer=lambda: put("rgb", "red", _png(rgb, "RGB")))
    add(
        "deep",
        writer=lambda: put(
            "deep", "green", _png(fixtures.stain_array(3, 16).astype(np.uint16) * 257, "I;16")
        ),
    )
    add("outofrange", target="28")
    add("malformed", target="1;2")
    add("notarget", target="")
    add("dup_same", target="4")
    rows.append(("dup_same", "4"))
    add("dup_conflict", target="5")
    rows.append(("dup_conflict", "6"))
    # hostile Ids: files exist where they point, outside the input folder; the job must not open them
    outside = os.path.join(root, "outside")
    fixtures.write_sample_images(outside, "x", seed=1, size=16)
    for sid in ("../outside/x", "/etc/x", "a/b"):
        rows.append((sid, "1"))
    fixtures.write_sample_images(image_dir, "unlisted", seed=999, size=16)
    with open(os.path.join(image_dir, "notes.txt"), "w") as f:
        f.write("not an image")
    fixtures.write_labels_csv(csv_path, rows)
    out = os.path.join(root, "out")
    _run(csv_path, image_dir, out, "--num_folds", "3")
    return dict(root=root, csv=csv_path, images=image_dir, out=out, rows=rows, good=good)


EXPECTED_REJECTIONS = {
    "missing": stains.MISSING_STAIN,
    "empty": stains.EMPTY_IMAGE,
    "truncated": stains.CORRUPT_IMAGE,
    "corrupt": stains.CORRUPT_IMAGE,
    "sizes": stains.SIZE_MISMATCH,
    "outofrange": labels.LABEL_OUT_OF_RANGE,
    "malformed": labels.MALFORMED_TARGET,
    "notarget": labels.MALFORMED_TARGET,
    "../outside/x": labels.BAD_ID,
    "/etc/x": labels.BAD_ID,
    "a/b": labels.BAD_ID,
}


def test_every_row_accounted_for(dirty):
    manifest = json.load(open(os.path.join(dirty["out"], schemas.MANIFEST_FILE)))
    records = _read_records(dirty["out"])
    with open(os.path.join(dirty["out"], schemas.REJECTED_FILE)) as f:
        rejected_rows = list(csv.DictReader(f))
    assert manifest["input_rows"] == len(dirty["rows"])
    assert manifest["written"] == len(records)
    assert manifest["rejected"] == len(rejected_rows)
    assert len(records) + len(rejected_rows) == len(dirty["rows"])
    assert sum(manifest[schemas.MANIFEST_WRITTEN].values()) == len(records)


def test_rejections_have_reasons(dirty):
    rejected = _rejected(dirty["out"])
    for sid, reason in EXPECTED_REJECTIONS.items():
        assert rejected.get(sid) == reason, sid
    assert rejected["dup_conflict"] == labels.DUPLICATE_ID
    with open(os.path.join(dirty["out"], schemas.REJECTED_FILE)) as f:
        rows = list(csv.DictReader(f))
    assert sum(r[schemas.CSV_ID] == "dup_conflict" for r in rows) == 2  # both conflicting rows rejected
    assert sum(r[schemas.CSV_ID] == "dup_same" for r in rows) == 1  # one of two identical rows kept
    assert all(r[schemas.REJECTED_DETAIL] for r in rows)
    manifest = json.load(open(os.path.join(dirty["out"], schemas.MANIFEST_FILE)))
    assert manifest["rejected_per_reason"][stains.CORRUPT_IMAGE] == 2
    assert manifest["unlisted_images"] == {"train": 1}
    assert manifest["unlisted_examples"] == ["unlisted"]


def test_records_round_trip_source_bytes(dirty):
    records = _read_records(dirty["out"])
    expected_ids = set(dirty["good"]) | {"rgb", "deep", "dup_same"}
    assert set(records) == expected_ids
    manifest = json.load(open(os.path.join(dirty["out"], schemas.MANIFEST_FILE)))
    assert manifest["converted_stains"] == {"16bit": 1, "rgb": 1}
    for sid, labs in dirty["good"].items():
        rec = records[sid]
        assert schemas.multi_hot_to_labels(rec.labels) == labs
        assert (rec.height, rec.width, rec.source) == (16, 16, "train")
        for stain in schemas.STAINS:  # PNG bytes kept untouched
            with open(os.path.join(dirty["images"], f"{sid}_{stain}.png"), "rb") as f:
                assert rec.images[stain] == f.read()
    deep = records["deep"]
    green = tf.io.decode_png(deep.images["green"]).numpy()[..., 0]
    np.testing.assert_array_equal(green, fixtures.stain_array(3, 16))


def test_folds_in_records_match_files_and_manifest(dirty):
    records = _read_records(dirty["out"])
    by_file = {}
    for path in glob.glob(os.path.join(dirty["out"], schemas.TFRECORD_DIR, "*")):
        name = os.path.basename(path)
        for raw in tf.data.TFRecordDataset(path):
            by_file[schemas.example_to_sample(raw.numpy()).id] = name
    manifest = json.load(open(os.path.join(dirty["out"], schemas.MANIFEST_FILE)))
    counts = {}
    for sid, rec in records.items():
        assert 0 <= rec.fold < 3
        assert by_file[sid].startswith(schemas.shard_prefix(rec.fold) + "-")
        counts[schemas.written_key(rec.fold)] = counts.get(schemas.written_key(rec.fold), 0) + 1
    assert counts == manifest[schemas.MANIFEST_WRITTEN]
    assert sorted(manifest["shards"]) == sorted(set(by_file.values()))
    per_class = np.zeros((3, schemas.NUM_CLASSES), int)
    for rec in records.values():
        per_class[rec.fold] += rec.labels
    assert per_class.tolist() == [manifest["class_counts_per_fold"][str(k)] for k in range(3)]
    assert set(manifest["fold_quality"]) >= {"LD", "LPD"}


def test_stain_stats_from_tf_transform(dirty):
    records = _read_records(dirty["out"])
    pixels = np.stack(
        [
            np.stack(
                [tf.io.decode_image(r.images[s], channels=1).numpy()[..., 0] for s in schemas.STAINS], -1
            )
            for r in records.values()
        ]
    ).astype(np.float64)
    manifest = schemas.read_manifest(dirty["out"])
    stats = manifest[schemas.MANIFEST_STAIN_STATS]
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=(0, 1, 2)), rtol=1e-3)
    assert stats_tf.read_stain_stats(os.path.join(dirty["out"], schemas.TRANSFORM_DIR)) == stats
    assert not os.path.exists(os.path.join(dirty["out"], preprocess.INCOMPLETE_DIR))


def test_existing_output_refused_then_overwrite_is_byte_identical_whatever_row_order(dirty, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(dirty["csv"], dirty["images"], dirty["out"])
    out2 = str(tmp_path / "out2")
    shutil.copytree(dirty["out"], out2)
    shuffled = str(tmp_path / "train.csv")  # same name: the source name comes from it
    rows = list(dirty["rows"])
    random.Random(7).shuffle(rows)
    fixtures.write_labels_csv(shuffled, rows)
    _run(shuffled, dirty["images"], out2, "--num_folds", "3", "--overwrite")
    names = sorted(os.listdir(os.path.join(dirty["out"], schemas.TFRECORD_DIR)))
    assert names == sorted(os.listdir(os.path.join(out2, schemas.TFRECORD_DIR)))
    for name in names:
        with (
            open(os.path.join(dirty["out"], schemas.TFRECORD_DIR, name), "rb") as a,
            open(os.path.join(out2, schemas.TFRECORD_DIR, name), "rb") as b,
        ):
            assert a.read() == b.read(), name


@pytest.mark.parametrize(
    "content, match",
    [("", "empty"), ("Name,Target\na,1\n", "no `Id`"), ("Id,Whatever\na,1\n", "neither")],
)
def test_bad_label_file_fails_before_work(tmp_path, content, match):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(content)
    (tmp_path / "train").mkdir()
    with pytest.raises(labels.LabelFileError, match=match):
        _run(str(csv_path), str(tmp_path / "train"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wrong_paths_give_clear_errors(tmp_path):
    csv_path, image_dir, _ = fixtures.make_dataset(str(tmp_path), num_samples=5)
    with pytest.raises(labels.LabelFileError, match="cannot read"):
        _run(str(tmp_path / "nope.csv"), image_dir, str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="holds no files"):
        _run(csv_path, str(tmp_path / "no_such_dir"), str(tmp_path / "out"))
    assert (
        preprocess.main(
            [
                "--labels_csv",
                csv_path,
                "--input_dir",
                str(tmp_path / "x"),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )


def test_mixed_sizes_fail_without_publishing(tmp_path):
    csv_path, image_dir, _ = fixtures.make_dataset(str(tmp_path), num_samples=6, size=16)
    fixtures.write_sample_images(image_dir, "s0000", seed=5, size=24)  # one sample of another size
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--image_size"):
        _run(csv_path, image_dir, str(out), "--num_folds", "2")
    assert not (out / schemas.MANIFEST_FILE).exists() and not (out / schemas.TFRECORD_DIR).exists()


def test_multiple_sources_resized_unlabeled_and_multiprocess(tmp_path):
    """Competition PNGs + an external JPEG/TIFF set of another size + an unlabeled set, resized, 2 workers."""
    csv_a, dir_a, labs_a = fixtures.make_dataset(str(tmp_path / "a"), num_samples=8, size=16, prefix="a")
    csv_b, dir_b, labs_b = fixtures.make_dataset(
        str(tmp_path / "b"), num_samples=4, size=32, prefix="b", ext="tif"
    )
    fixtures.write_sample_images(dir_b, "b0000", seed=3, size=32, ext="jpg")  # a JPEG next to the TIFF
    test_dir = str(tmp_path / "t" / "test")
    for i in range(3):
        fixtures.write_sample_images(test_dir, f"t{i}", seed=50 + i, size=16)
    csv_t = str(tmp_path / "t" / "sample_submission.csv")
    fixtures.write_labels_csv(
        csv_t, [(f"t{i}", "0") for i in range(3)], header=(schemas.CSV_ID, schemas.CSV_PREDICTED)
    )
    out = str(tmp_path / "out")
    preprocess.run(
        [
            "--labels_csv",
            csv_a,
            "--input_dir",
            dir_a,
            "--labels_csv",
            csv_b,
            "--input_dir",
            dir_b,
            "--labels_csv",
            csv_t,
            "--input_dir",
            test_dir,
            "--source",
            "train",
            "--source",
            "hpav18",
            "--source",
            "test",
            "--output_dir",
            out,
            "--image_size",
            "8",
            "--num_folds",
            "2",
            "--direct_num_workers",
            "2",
            "--direct_running_mode",
            "multi_processing",
        ]
    )
    records = _read_records(out)
    assert {r.source for r in records.values()} == {"train", "hpav18", "test"}
    assert len(records) == 15
    for r in records.values():
        assert (r.height, r.width) == (8, 8)
        assert (r.fold == schemas.UNLABELED_FOLD) == (r.source == "test")
    assert os.listdir(os.path.join(out, schemas.TFRECORD_DIR)).count("test-00000-of-00001.tfrecord") == 1
    image = schemas.decode_stains(
        schemas.parse_example(tf.constant(schemas.to_example(records["b0001"]).SerializeToString())), 8
    )
    assert image.shape == (8, 8, 4)
    manifest = schemas.read_manifest(out)
    assert manifest[schemas.MANIFEST_IMAGE_SIZE] == [8, 8]
    assert manifest[schemas.MANIFEST_WRITTEN]["test"] == 3


def test_plan_fold_shards_balances_bytes_and_keeps_id_order():
    cands = [Candidate("s", f"id{i:03d}", (0,), True, ("p",) * 4, 100 + (i % 7) * 10) for i in range(100)]
    random.Random(0).shuffle(cands)
    shards = shards_tf.plan_fold_shards(1, cands, shard_bytes=2000, num_shards=None)
    assert len(shards) == round(sum(c.num_bytes for c in cands) / 2000)
    flat = [s.id for sh in shards for s in sh.samples]
    assert flat == sorted(c.id for c in cands)
    sizes = [sum(s.num_bytes for s in sh.samples) for sh in shards]
    assert max(sizes) - min(sizes) <= 2 * 160
    assert [sh.name for sh in shards][0] == schemas.shard_name(1, 0, len(shards))
    assert len(shards_tf.plan_fold_shards(1, cands[:3], 1, num_shards=10)) == 3


def test_compute_folds_independent_of_order_and_groups_kept_together():
    rng = np.random.default_rng(0)
    cands = []
    for i in range(60):
        labs = tuple(sorted(set(rng.choice(6, size=rng.integers(1, 3), replace=False).tolist())))
        cands.append(Candidate("s", f"id{i:02d}", labs, True, ("p",) * 4, 1))
    groups = {f"id{i:02d}": f"g{i // 3}" for i in range(30)}
    a = folds_tf.compute_folds(cands, 3, seed=1, order=2, groups=groups)
    b = folds_tf.compute_folds(list(reversed(cands)), 3, seed=1, order=2, groups=groups)
    assert a == b and len(a) == 60
    for g in range(10):
        assert len({a[f"id{i:02d}"] for i in range(3 * g, 3 * g + 3)}) == 1


def test_check_rows_transform():
    rows = [labels.LabelRow("train", "/in", 2, "ok", "1 2"), labels.LabelRow("train", "/in", 3, "../x", "1")]
    with test_pipeline.TestPipeline() as p:
        out = p | beam.Create(rows) | rows_tf.CheckRows()
        assert_that(
            out.valid, equal_to([labels.CheckedRow("train", "/in", "ok", (1, 2), True)]), label="Valid"
        )
        assert_that(
            out.rejected | beam.Map(lambda r: (r[0], r[1])),
            equal_to([("../x", labels.BAD_ID)]),
            label="Rejected",
        )

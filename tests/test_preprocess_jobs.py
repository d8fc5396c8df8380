"""The preprocessing job's early checks, near-duplicate groups and --publish_only, through the Beam job."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import schemas
from pipelines import preprocess, publish
from tests import fixtures
from tests.test_preprocess import IN_PROCESS, _read_records

SIZE = 32


def _args(csv_path, image_dir, out, *extra):
    return [
        "--labels_csv",
        csv_path,
        "--input_dir",
        image_dir,
        "--output_dir",
        out,
        "--num_folds",
        "3",
        "--progress_seconds",
        "1",
        *IN_PROCESS,
        *extra,
    ]


def _write_copy(image_dir, new_id, arrays, rng, jpeg=False):
    """Writes a near-copy of a sample: +-1 intensity noise, or JPEG q 90."""
    for stain, arr in arrays.items():
        if jpeg:
            Image.fromarray(arr).save(os.path.join(image_dir, f"{new_id}_{stain}.jpg"), quality=90)
        else:
            noisy = np.clip(arr.astype(np.int16) + rng.integers(-1, 2, arr.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(os.path.join(image_dir, f"{new_id}_{stain}.png"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """24 distinct training samples + 6 near-copies of training samples + a test set with one copy of a
    training sample and one distinct sample; the job run with --duplicates group, report and off, each with
    an Id pattern (s0005-s0007 share a key) and a groups file (s0001 and s0003)."""
    root = str(tmp_path_factory.mktemp("planted"))
    csv_path, image_dir, labels = fixtures.make_dataset(root, num_samples=24, size=SIZE)
    rng = np.random.default_rng(0)
    rows = [(sid, " ".join(map(str, labs))) for sid, labs in labels.items()]
    pairs = []
    for k, i in enumerate(range(0, 24, 4)):
        original = f"s{i:04d}"
        arrays = {
            s: np.asarray(Image.open(os.path.join(image_dir, f"{original}_{s}.png"))) for s in schemas.STAINS
        }
        copy = f"copy{k}"
        _write_copy(image_dir, copy, arrays, rng, jpeg=k % 2 == 1)
        rows.append((copy, " ".join(map(str, labels[original]))))  # the same labels, as real duplicates have
        pairs.append((original, copy))
    fixtures.write_labels_csv(csv_path, rows)
    test_dir = os.path.join(root, "test")
    arrays = {s: np.asarray(Image.open(os.path.join(image_dir, f"s0002_{s}.png"))) for s in schemas.STAINS}
    os.makedirs(test_dir)
    _write_copy(test_dir, "t0", arrays, rng)
    fixtures.write_sample_images(test_dir, "t1", seed=777, size=SIZE)
    test_csv = os.path.join(root, "sample_submission.csv")
    fixtures.write_labels_csv(
        test_csv, [("t0", "0"), ("t1", "0")], header=(schemas.CSV_ID, schemas.CSV_PREDICTED)
    )
    groups_csv = os.path.join(root, "groups.csv")
    with open(groups_csv, "w") as f:
        f.write("Id,Group\ns0001,g\ns0003,g\n")
    fixed = ["--group_id_pattern", r"^(s000)[5-7]", "--groups_csv", groups_csv]
    outs = {}
    for mode in ("group", "report", "off"):
        out = os.path.join(root, f"out-{mode}")
        preprocess.run(
            _args(
                csv_path,
                image_dir,
                out,
                "--labels_csv",
                test_csv,
                "--input_dir",
                test_dir,
                "--duplicates",
                mode,
                *fixed,
            )
        )
        outs[mode] = out
    return dict(outs=outs, pairs=pairs, csv=csv_path, images=image_dir)


def _duplicates(out):
    with open(os.path.join(out, schemas.DUPLICATES_FILE)) as f:
        rows = list(csv.DictReader(f))
    groups = {}
    for r in rows:
        groups.setdefault(r[schemas.DUPLICATES_GROUP], set()).add(
            (r[schemas.CSV_ID], r[schemas.REJECTED_SOURCE])
        )
    return groups


def test_planted_duplicates_share_a_fold_and_are_listed(planted):
    out = planted["outs"]["group"]
    folds = {sid: r.fold for sid, r in _read_records(out).items()}
    for original, copy in planted["pairs"]:
        assert folds[original] == folds[copy], (original, copy)
    groups = _duplicates(out)
    members = [{sid for sid, _ in g} for g in groups.values()]
    for original, copy in planted["pairs"]:
        assert {original, copy} in members
    assert {"s0002", "t0"} in members  # the test sample that copies a training sample, with both Ids
    assert ("t0", "sample_submission") in set().union(*groups.values())
    assert {"s0001", "s0003"} in members and {"s0005", "s0006", "s0007"} in members
    assert len(members) == len(planted["pairs"]) + 3  # no false match among the distinct samples
    assert folds["s0001"] == folds["s0003"] and folds["s0005"] == folds["s0006"] == folds["s0007"]
    d = schemas.read_manifest(out)["duplicates"]
    assert d["groups"] == 9 and d["samples_in_groups"] == 19
    assert d["groups_across_sources"] == 1
    assert d["unlabeled_matching_labeled"] == 1
    assert d["unlabeled_matching_labeled_examples"] == [["t0", ["s0002"]]]


def test_report_lists_the_same_groups_and_leaves_folds_as_off(planted):
    outs = planted["outs"]
    assert _duplicates(outs["report"]) == _duplicates(outs["group"])
    report = {sid: r.fold for sid, r in _read_records(outs["report"]).items()}
    off = {sid: r.fold for sid, r in _read_records(outs["off"]).items()}
    assert report == off
    # without grouping, the planted pairs are not all kept together (so the group test above can fail)
    assert not all(off[a] == off[b] for a, b in planted["pairs"])
    # off: only the Id pattern and the groups file, which shape the folds in every mode
    members = sorted(sorted(sid for sid, _ in g) for g in _duplicates(outs["off"]).values())
    assert members == [["s0001", "s0003"], ["s0005", "s0006", "s0007"]]
    assert off["s0001"] == off["s0003"] and off["s0005"] == off["s0006"] == off["s0007"]


def test_mixed_sizes_stop_before_any_shard_with_sizes_and_ids(tmp_path, capsys):
    csv_path, image_dir, _ = fixtures.make_dataset(str(tmp_path), num_samples=6, size=16)
    fixtures.write_sample_images(image_dir, "s0003", seed=5, size=24)
    fixtures.write_sample_images(image_dir, "s0004", seed=6, size=24, ext="jpg")
    os.remove(os.path.join(image_dir, "s0004_red.png"))  # the JPEG set replaces it
    for stain in schemas.STAINS:
        if os.path.exists(os.path.join(image_dir, f"s0004_{stain}.png")):
            os.remove(os.path.join(image_dir, f"s0004_{stain}.png"))
    out = tmp_path / "out"
    code = preprocess.main(_args(csv_path, image_dir, str(out)))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert (
        "16x16 (4 samples, e.g. s0000, s0001, s0002)" in err and "24x24 (2 samples, e.g. s0003, s0004)" in err
    )
    assert "--image_size" in err
    assert not (out / schemas.MANIFEST_FILE).exists()
    work = out / publish.INCOMPLETE_DIR
    assert not (work / schemas.TFRECORD_DIR).exists() or not os.listdir(work / schemas.TFRECORD_DIR)


@pytest.mark.parametrize(
    "content, where",
    [
        (b"Id,Target\na,1\nb\r,2\n", "line 3"),  # a stray carriage return inside a line
        (b'Id,Target\na,1\n"b,2\nc,3\n', "line 4"),  # a quote never closed
        (b"Id,Target\na,1\nb,2,3\n", "line 3"),  # a row with more columns than the header
        (b"Id,Target\na,1\nb,\xff\n", "line 3"),  # not UTF-8
    ],
)
def test_malformed_label_file_is_one_line_exit_2(tmp_path, capsys, content, where):
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(content)
    fixtures.write_sample_images(str(tmp_path / "train"), "a", seed=1)
    code = preprocess.main(
        [
            "--labels_csv",
            str(csv_path),
            "--input_dir",
            str(tmp_path / "train"),
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(csv_path) in err and where in err, err
    assert not (tmp_path / "out").exists()


class _Died(Exception):
    """Stands for the launcher dying between the job and publishing."""


def test_publish_only_finishes_a_job_whose_launcher_died(tmp_path, monkeypatch, capsys):
    csv_path, image_dir, labels = fixtures.make_dataset(str(tmp_path / "data"), num_samples=9, size=16)
    out = str(tmp_path / "out")
    args = _args(csv_path, image_dir, out)

    def die(*a, **k):
        raise _Died()

    with monkeypatch.context() as m:
        m.setattr(preprocess, "_finish", die)
        with pytest.raises(_Died):
            preprocess.run(args)
    work = os.path.join(out, publish.INCOMPLETE_DIR)
    assert not os.path.exists(os.path.join(out, schemas.MANIFEST_FILE))
    assert publish.missing_parts(work) == []

    # a partial copy is refused, whatever the flag
    partial = str(tmp_path / "partial")
    shutil.copytree(out, partial)
    pwork = os.path.join(partial, publish.INCOMPLETE_DIR)
    shard = sorted(os.listdir(os.path.join(pwork, schemas.TFRECORD_DIR)))[0]
    os.remove(os.path.join(pwork, schemas.TFRECORD_DIR, shard))
    assert preprocess.main(_args(csv_path, image_dir, partial, "--publish_only")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not a finished job" in err and shard in err and "nothing published" in err
    assert not os.path.exists(os.path.join(partial, schemas.MANIFEST_FILE))
    # another command's output is refused too
    with pytest.raises(publish.PublishError, match="num_folds"):
        preprocess.run(_args(csv_path, image_dir, out, "--publish_only", "--num_folds", "4"))

    # a rerun of the same command finds the finished job and publishes it without running it again
    rerun = str(tmp_path / "rerun")
    shutil.copytree(out, rerun)
    with monkeypatch.context() as m:
        m.setattr(preprocess.beam, "Pipeline", lambda *a, **k: pytest.fail("the job ran again"))
        assert preprocess.run(_args(csv_path, image_dir, rerun)) is None
    assert schemas.read_manifest(rerun)["written"] == 9

    assert preprocess.run(args + ["--publish_only"]) is None
    manifest = schemas.read_manifest(out)
    assert manifest["written"] == 9 and not os.path.exists(work)
    assert {sid: schemas.multi_hot_to_labels(r.labels) for sid, r in _read_records(out).items()} == labels


def test_a_group_too_large_for_the_folds_stops_the_job_unless_allowed(tmp_path, capsys):
    """12 samples in 3 folds allow groups of 12 // (2 x 3) = 2; a groups file joining 4 stops the job."""
    csv_path, image_dir, _ = fixtures.make_dataset(str(tmp_path), num_samples=12, size=SIZE)
    groups_csv = str(tmp_path / "groups.csv")
    with open(groups_csv, "w") as f:
        f.write("Id,Group\n" + "".join(f"s{i:04d},big\n" for i in range(4)))
    out = str(tmp_path / "out")
    argv = _args(csv_path, image_dir, out, "--groups_csv", groups_csv, "--duplicates", "off")
    assert preprocess.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a group of 4 labeled samples is larger than 2" in err and "s0000, s0001, s0002, s0003" in err
    assert not os.path.exists(os.path.join(out, schemas.MANIFEST_FILE))
    written = [f for _, _, names in os.walk(publish.work_dir(out)) for f in names if f.endswith(".tfrecord")]
    assert not written

    preprocess.run(argv + ["--max_group_size", "4"])
    manifest = schemas.read_manifest(out)
    assert manifest["duplicates"]["largest_groups"][0] == {"size": 4, "ids": [f"s{i:04d}" for i in range(4)]}
    assert sum(manifest["fold_sizes"]) == 12 and max(manifest["fold_sizes"]) >= 4

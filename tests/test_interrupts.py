"""Interrupt anything, rerun the same command, lose nothing (docs/interrupts.md).

All-or-nothing writes, two-slot backups with a corrupt one, publishing killed between any two steps, rerun
identity by data rather than path spelling, directory locks, and the one-line interrupt message.
"""

from __future__ import annotations

import os

import pytest

import schemas
from model import callbacks as callbacks_lib
from model import fileio, rundir, train
from schemas import atomic
from tests.test_data import write_dataset

SMALL = ["--backbone", "small", "--weights", "none", "--verbose", "0", "--batch_size", "4"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("written"))
    write_dataset(root, per_fold=(8, 8, 8))
    return root


def _tmp_leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if atomic.TMP_MARK in n]


def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "submission.csv")
    fileio.write_text(path, "old\n")

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        fileio.write_text(path, "new but cut short\n")
    monkeypatch.undo()
    assert open(path).read() == "old\n" and _tmp_leftovers(tmp_path) == []

    def save_half(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fileio.save_file(str(tmp_path / "model.keras"), save_half)
    assert not os.path.exists(tmp_path / "model.keras") and _tmp_leftovers(tmp_path) == []


class _StopAt(callbacks_lib.keras.callbacks.Callback):
    """Stands for a kill: raises at the start of an epoch (after the previous epoch's backup)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_a_corrupt_newest_backup_falls_back_to_the_previous_one(written, tmp_path, monkeypatch, capsys):
    model_dir = str(tmp_path / "run")
    argv = ["--data_dir", written, "--model_dir", model_dir, *SMALL, "--epochs", "3"]
    argv += ["--steps_per_epoch", "2"]
    make = callbacks_lib.make_callbacks
    monkeypatch.setattr(callbacks_lib, "make_callbacks", lambda *a, **k: [*make(*a, **k), _StopAt(2)])
    with pytest.raises(KeyboardInterrupt):
        train.run(argv)
    monkeypatch.setattr(callbacks_lib, "make_callbacks", make)
    backup = os.path.join(model_dir, train.BACKUP_DIR)
    names = sorted(os.listdir(backup))
    assert names == [
        "epoch-0001.json",
        "epoch-0001.weights.h5",
        "epoch-0002.json",
        "epoch-0002.weights.h5",
        rundir.BACKUP_METADATA,
    ]
    assert rundir.backup_epoch(model_dir) == 2
    newest = os.path.join(backup, "epoch-0002.weights.h5")
    with open(newest, "r+b") as f:  # a save cut short: the file truncated under its final name
        f.truncate(os.path.getsize(newest) // 2)
    assert rundir.backup_epoch(model_dir) == 1

    capsys.readouterr()
    summary = train.run(argv)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "unusable" in line]
    assert len(notes) == 1 and "after epoch 2" in notes[0] and "after epoch 1" in notes[0], out
    assert "resuming" in out and "Traceback" not in out
    assert summary["epochs"] == 3 and [int(r["epoch"]) for r in summary["history"]] == [0, 1, 2]
    assert not os.path.exists(backup) and os.path.exists(os.path.join(model_dir, train.MODEL_FILE))
    assert _tmp_leftovers(model_dir) == []


def test_no_whole_backup_starts_over_instead_of_failing_forever(tmp_path):
    backup = tmp_path / "run" / train.BACKUP_DIR
    os.makedirs(backup)
    (backup / "epoch-0001.weights.h5").write_bytes(b"not a weights file")  # no record: cut short
    found = rundir.find_backup(str(tmp_path / "run"))
    assert found.epoch == 0 and found.weights is None and "cut short" in found.damaged[0]
    assert "starting from epoch 0" in rundir.backup_notes(str(tmp_path / "run"))[0]


# ---------------------------------------------------------------------------------------------------------
# Publishing killed between any two steps.


def _files(root) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root (the manifest without its wall time)."""
    import json

    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            with open(path, "rb") as f:
                data = f.read()
            if rel == schemas.MANIFEST_FILE:
                manifest = json.loads(data)
                manifest.pop("wall_time_s")
                data = json.dumps(manifest, sort_keys=True).encode()
            found[rel] = data
    return found


def _looks_complete_only_when_whole(out) -> None:
    """A manifest in out/ stands only beside every shard, the transform output and rejected.csv it names."""
    import json

    path = os.path.join(out, schemas.MANIFEST_FILE)
    if not os.path.exists(path):
        return
    manifest = json.load(open(path))
    for shard in manifest["shards"]:
        assert os.path.exists(os.path.join(out, schemas.TFRECORD_DIR, shard)), shard
    assert os.listdir(os.path.join(out, schemas.TRANSFORM_DIR))
    assert os.path.exists(os.path.join(out, schemas.REJECTED_FILE))


class _Killed(BaseException):
    """Stands for a kill between two steps."""


def _kill_if(condition: bool) -> None:
    if condition:
        raise _Killed()


def test_publishing_killed_between_any_two_steps_leaves_a_whole_dataset_and_a_rerun_finishes(
    tmp_path, monkeypatch
):
    import shutil

    from pipelines import preprocess, publish
    from tests import fixtures
    from tests.test_preprocess import IN_PROCESS

    csv_path, image_dir, _ = fixtures.make_dataset(str(tmp_path / "data"), num_samples=9, size=16)
    base = ["--labels_csv", csv_path, "--input_dir", image_dir, "--num_folds", "3", *IN_PROCESS]
    staged = str(tmp_path / "staged")
    preprocess.run([*base, "--output_dir", staged, "--seed", "0"])  # the old dataset A
    new = [*base, "--output_dir", staged, "--seed", "1", "--overwrite"]  # B replaces it
    with monkeypatch.context() as m:
        m.setattr(publish, "finish_publication", lambda *a: _kill_if(True))
        with pytest.raises(_Killed):
            preprocess.run(new)  # B's job finished, its publication not begun

    def rerun(out, **kill):
        argv = [*base, "--output_dir", out, "--seed", "1", "--overwrite"]
        with monkeypatch.context() as m:
            m.setattr(preprocess.beam, "Pipeline", lambda *a, **k: pytest.fail("the job ran again"))
            if kill:
                m.setattr(
                    publish, "_after", lambda step: step == kill["at"] and (_ for _ in ()).throw(_Killed())
                )
            preprocess.run(argv)

    steps = []
    reference = str(tmp_path / "reference")
    shutil.copytree(staged, reference)
    with monkeypatch.context() as m:
        m.setattr(publish, "_after", steps.append)
        rerun(reference)
    want = _files(reference)
    assert len(steps) == 12 and not os.path.exists(os.path.join(reference, publish.PREVIOUS_DIR)), steps
    for k, step in enumerate(steps):
        out = str(tmp_path / f"kill{k}")
        shutil.copytree(staged, out)
        with pytest.raises(_Killed):
            rerun(out, at=step)
        _looks_complete_only_when_whole(out)
        rerun(out)  # the same command, again: it finishes the publication
        assert _files(out) == want, step

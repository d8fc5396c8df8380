"""Interrupt anything, rerun the same command, lose nothing (docs/interrupts.md).

All-or-nothing writes, two-slot backups with a corrupt one, publishing killed between any two steps, rerun
identity by data rather than path spelling, directory locks, and the one-line interrupt message.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

import schemas
from model import callbacks as callbacks_lib
from model import fileio, rundir, train
from schemas import atomic, locks
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


def test_a_corrupt_newest_backup_falls_back_to_the_previous_one(tmp_path):
    import keras
    import numpy as np

    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        m.compile(optimizer="adam", loss="mse")
        return m

    x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")
    seen = {}

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch + 1] = [w.copy() for w in self.model.get_weights()]
            if epoch == 1:
                raise KeyboardInterrupt  # a kill after the backup of epoch 2 (the backup runs first)

    work = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        model().fit(x, y, epochs=4, verbose=0, callbacks=[callbacks_lib.TwoSlotBackup(work), Stop()])
    backup = os.path.join(work, train.BACKUP_DIR)
    assert sorted(os.listdir(backup)) == [
        "epoch-0001.json",
        "epoch-0001.weights.h5",
        "epoch-0002.json",
        "epoch-0002.weights.h5",
        rundir.BACKUP_METADATA,
    ]
    assert rundir.backup_epoch(work) == 2 and rundir.backup_notes(work) == []
    newest = os.path.join(backup, "epoch-0002.weights.h5")
    with open(newest, "r+b") as f:  # cut short under its final name (a disk fault; renames prevent kills)
        f.truncate(os.path.getsize(newest) // 2)
    assert rundir.backup_epoch(work) == 1
    (note,) = rundir.backup_notes(work)
    assert "after epoch 2 is unusable" in note and "resuming from the backup after epoch 1" in note

    restored = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            restored["weights"] = self.model.get_weights()

    m = model()
    history = m.fit(x, y, epochs=4, verbose=0, callbacks=[callbacks_lib.TwoSlotBackup(work), Probe()])
    assert history.epoch == [1, 2, 3]  # epoch 2 (index 1) again, from epoch 1's backup
    assert all(np.array_equal(a, b) for a, b in zip(restored["weights"], seen[1], strict=True))
    assert sorted(n for n in os.listdir(backup) if n.endswith(".h5")) == [
        "epoch-0003.weights.h5",
        "epoch-0004.weights.h5",
    ]  # two slots kept
    assert _tmp_leftovers(backup) == []


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
                manifest.pop("wall_time_s", None)
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


def _fake_dataset(root, tag: str, shards: int) -> dict:
    """A published-dataset layout with `tag` in every file; returns its manifest."""
    names = [f"fold0-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
    for name in names:
        fileio.write_text(os.path.join(root, schemas.TFRECORD_DIR, name), f"{tag} {name}")
    fileio.write_text(os.path.join(root, schemas.TRANSFORM_DIR, "transform_fn", "saved_model.pb"), tag)
    fileio.write_text(os.path.join(root, schemas.REJECTED_FILE), f"{tag} rejected")
    fileio.write_text(os.path.join(root, schemas.DUPLICATES_FILE), f"{tag} duplicates")
    return {"shards": names, "tag": tag}


def test_publishing_killed_between_any_two_steps_leaves_a_whole_dataset_and_a_rerun_finishes(
    tmp_path, monkeypatch
):
    import json
    import shutil

    from pipelines import publish

    staged = str(tmp_path / "staged")
    old = _fake_dataset(staged, "A", 3)
    fileio.write_text(os.path.join(staged, schemas.MANIFEST_FILE), json.dumps(old))
    new = _fake_dataset(publish.work_dir(staged), "B", 2)  # other shard names and counts
    extra = (schemas.DUPLICATES_FILE,)
    reference = str(tmp_path / "reference")
    shutil.copytree(staged, reference)
    steps = []
    monkeypatch.setattr(publish, "_after", steps.append)
    publish.publish(reference, publish.work_dir(reference), new, extra)
    want = _files(reference)
    assert sorted(want) == sorted(
        [
            schemas.MANIFEST_FILE,
            schemas.REJECTED_FILE,
            schemas.DUPLICATES_FILE,
            "transform_output/transform_fn/saved_model.pb",
        ]
        + [f"{schemas.TFRECORD_DIR}/{n}" for n in new["shards"]]
    )
    assert len(steps) == 12, steps
    for k, step in enumerate(steps):
        out = str(tmp_path / f"kill{k}")
        shutil.copytree(staged, out)
        monkeypatch.setattr(publish, "_after", lambda s, at=step: _kill_if(s == at))
        with pytest.raises(_Killed):
            publish.publish(out, publish.work_dir(out), new, extra)
        _looks_complete_only_when_whole(out)
        tags = {data.split(b" ")[0] for data in _files(out).values() if not data.startswith(b"{")}
        assert b"B" in tags  # the new dataset is never lost (the old one is until the manifest is written)
        monkeypatch.setattr(publish, "_after", lambda s: None)
        assert publish.read_journal(publish.work_dir(out)) is not None
        publish.finish_publication(out, publish.work_dir(out))  # what a rerun does first
        assert _files(out) == want, step


def test_preprocess_killed_while_publishing_then_the_same_command_finishes(tmp_path, monkeypatch):
    from pipelines import preprocess, publish
    from tests import fixtures
    from tests.test_preprocess import IN_PROCESS

    csv_path, image_dir, _ = fixtures.make_dataset(str(tmp_path / "data"), num_samples=6, size=16)
    out = str(tmp_path / "out")
    argv = ["--labels_csv", csv_path, "--input_dir", image_dir, "--num_folds", "2", *IN_PROCESS]
    argv += ["--output_dir", out]
    with monkeypatch.context() as m:
        m.setattr(publish, "_after", lambda s: _kill_if(s == f"in:{schemas.TFRECORD_DIR}"))
        with pytest.raises(_Killed):
            preprocess.run(argv)
    assert not os.path.exists(os.path.join(out, schemas.MANIFEST_FILE))
    relative = os.path.relpath(out)  # spelt another way: the same command
    with monkeypatch.context() as m:
        m.setattr(preprocess.beam, "Pipeline", lambda *a, **k: pytest.fail("the job ran again"))
        assert preprocess.run([*argv[:-1], relative + "/"]) is None
        assert schemas.read_manifest(out)["written"] == 6
        assert preprocess.run([*argv[:-1], relative]) is None  # finished: nothing to do, exit 0
    _looks_complete_only_when_whole(out)
    assert not os.path.exists(publish.work_dir(out))


# ---------------------------------------------------------------------------------------------------------
# Rerun identity: paths by what they point to, data by its manifest; --overwrite after an interruption.


def _train_config(data_dir, model_dir):
    from model.config import DataConfig, TrainConfig

    return TrainConfig(data_dir=data_dir, model_dir=model_dir, data=DataConfig(image_size=16))


def _fake_backup(model_dir, epoch: int) -> None:
    slot, _ = rundir.backup_slot(epoch)
    fileio.write_bytes(os.path.join(model_dir, train.BACKUP_DIR, slot), b"weights")
    rundir.record_backup(model_dir, epoch)


def test_a_run_is_found_again_by_resolved_paths_and_by_its_datas_manifest(tmp_path, monkeypatch):
    from model.config import ConfigError

    monkeypatch.chdir(tmp_path)
    os.makedirs("data")
    os.symlink("data", "link")
    absolute = _train_config(str(tmp_path / "data"), str(tmp_path / "run"))
    run = {rundir.DATASET_ID: "abc"}
    assert rundir.prepare_model_dir(absolute, False, run) == 0
    _fake_backup(absolute.model_dir, 1)
    for data_dir, model_dir in (("data", "run"), ("./data/", "run/"), ("link", "./run")):
        respelt = _train_config(data_dir, model_dir)
        assert rundir.prepare_model_dir(respelt, False, run) == 1  # resumes, no "other settings"
    moved = _train_config(str(tmp_path / "moved"), "run")  # the data folder moved: same manifest, same run
    assert rundir.prepare_model_dir(moved, False, run) == 1
    with pytest.raises(ConfigError, match="other data than the run trained on"):  # other data, same path
        rundir.prepare_model_dir(moved, False, {rundir.DATASET_ID: "other"})


def test_overwrite_rerun_after_an_interruption_resumes_its_own_run(tmp_path):
    cfg = _train_config(str(tmp_path / "data"), str(tmp_path / "run"))
    run = {rundir.DATASET_ID: "abc"}
    rundir.prepare_model_dir(cfg, False, run)
    _fake_backup(cfg.model_dir, 2)  # an old run, interrupted; not begun by --overwrite
    assert rundir.prepare_model_dir(cfg, True, run) == 0  # --overwrite replaces it
    assert not os.path.exists(os.path.join(cfg.model_dir, train.BACKUP_DIR))
    _fake_backup(cfg.model_dir, 1)  # the --overwrite run, interrupted after epoch 1
    assert rundir.prepare_model_dir(cfg, True, run) == 1  # the same command again: resumes
    assert rundir.prepare_model_dir(cfg, False, run) == 1  # so does it without the flag


def test_fold_driver_overwrite_rerun_keeps_the_folds_it_began(tmp_path, monkeypatch):
    import argparse

    from model import cv

    monkeypatch.chdir(tmp_path)
    plan = cv.Plan(["--epochs", "2"], [0, 1, 2], {}, None)

    def args(data_dir, overwrite=True):
        return argparse.Namespace(data_dir=data_dir, out="cv", ids_csv=None, overwrite=overwrite)

    os.makedirs("data")
    assert cv.folds_to_replace(args("data"), plan) == {0, 1, 2}  # nothing recorded: replace all
    cv._write_driver_record("cv", args("data"), plan, {0, 1}, finished=False)  # killed during fold 1
    assert cv.folds_to_replace(args(str(tmp_path / "data") + "/"), plan) == {2}  # same command, respelt
    other = cv.Plan(["--epochs", "3"], [0, 1, 2], {}, None)
    assert cv.folds_to_replace(args("data"), other) == {0, 1, 2}  # another command: replace all
    cv._write_driver_record("cv", args("data"), plan, {0, 1, 2}, finished=True)
    assert cv.folds_to_replace(args("data"), plan) == {0, 1, 2}  # finished before: replace all
    assert cv.folds_to_replace(args("data", overwrite=False), plan) == set()


# ---------------------------------------------------------------------------------------------------------
# Locks and signals.


def test_a_second_process_on_a_directory_stops_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys

    from schemas import locks

    target = str(tmp_path / "out")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from schemas import locks; locks.acquire({target!r}, 'hpa-x'); print(1, flush=True); input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert holder.stdout.readline().strip() == b"1"
        with pytest.raises(locks.Locked, match=rf"in use by hpa-x .*pid {holder.pid}, since "):
            locks.acquire(target, "hpa-y")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(os.path.join(target, locks.LOCK_FILE))  # a killed process leaves its lock ...
    lines = []
    locks.acquire(target, "hpa-y", lines.append)  # ... which the next one takes over
    assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "taking over" in lines[0]
    locks.release(target)
    assert not os.path.exists(os.path.join(target, locks.LOCK_FILE))


def test_sigint_and_sigterm_end_a_command_with_one_line_and_130_or_143(capsys, monkeypatch):
    import signal

    from schemas import cli

    stopped = []
    monkeypatch.setattr(cli, "stop_children", lambda: stopped.append(1))  # not pytest's own children

    @cli.command("hpa-x")
    def main(argv=None):
        cli.set_stage(lambda: "epoch 4 of fold 2 (folds 0, 1 finished)")
        if argv == ["term"]:
            os.kill(os.getpid(), signal.SIGTERM)
        if argv == ["wrapped"]:  # TensorFlow turns an interrupt inside a tf.data step into its own error
            cli._received.append(signal.SIGINT)
            raise RuntimeError("a library's error around the KeyboardInterrupt")
        raise KeyboardInterrupt

    assert main(["int"]) == 130
    err = capsys.readouterr().err
    assert err == (
        "hpa-x: interrupted during epoch 4 of fold 2 (folds 0, 1 finished); "
        "rerun the same command to resume\n"
    )
    assert main(["term"]) == 143
    assert capsys.readouterr().err.count("\n") == 1
    assert stopped == [1]  # the handler stopped the command's child processes first
    assert main(["wrapped"]) == 130 and "interrupted during" in capsys.readouterr().err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    assert main(["int"]) == 130
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv(cli.CHILD_ENV, "1")  # a child of the fold driver leaves the line to its parent
    monkeypatch.delenv(cli.TRACEBACK_ENV)
    assert main(["int"]) == 130 and capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------------------
# hpa-download's exit status.


def test_download_exits_1_when_a_stain_file_is_missing_unless_allowed_and_names_a_refused_connection(
    tmp_path, capsys
):
    import socket

    import urllib3

    from pipelines import download
    from tests import fixtures
    from tests.image_server import ImageServer, status

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        urllib3.PoolManager(retries=False).request("GET", f"http://127.0.0.1:{port}/x", timeout=2)
    except urllib3.exceptions.HTTPError as e:
        assert download._describe_error(e).startswith("connection refused"), download._describe_error(e)

    csv_path = str(tmp_path / "ids.csv")
    fixtures.write_labels_csv(csv_path, [("60_A1_1", "0")])
    out = str(tmp_path / "out")
    with ImageServer() as server:
        server.add_sample("60_A1_1", seed=0)
        server.routes[server.path("60_A1_1", "blue")] = [status(404)]
        argv = ["--labels_csv", csv_path, "--output_dir", out, "--base_url", server.base_url]
        argv += ["--direct_num_workers", "1", "--retries", "0", "--progress_seconds", "30"]
        assert download.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("hpa-download: error: 1 stain file(s) could not be fetched (1 not_found")
    summary = {"by_status": {download.DOWNLOADED: 3, download.NOT_FOUND: 1}, "report": "r"}
    assert download.not_fetched_error({**summary, "allow_failed": 1}) is None  # --allow_failed 1: exit 0
    assert "1 not_found" in download.not_fetched_error({**summary, "allow_failed": 0})


# ---------------------------------------------------------------------------------------------------------
# A slice of the campaign (bench/chaos.py): the download job killed twice (SIGKILL, SIGINT) and rerun.


@pytest.mark.slow
def test_chaos_slice_download_killed_and_rerun_ends_identical(tmp_path, capsys):
    from bench import chaos

    code = chaos.main(["--jobs", "download", "--kills", "2", "--seed", "3", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| download |")]
    assert code == 0, out
    cells = [c.strip() for c in row[0].split("|")[1:-1]]
    # kills, recovered, identical, close, looks complete but is not, stuck, lost, SIGINTs, of them clean
    assert cells[2:11] == ["2", "2", "2", "0", "0", "0", "0", "1", "1"], out


def test_the_processes_a_command_started_are_found_to_be_stopped_with_it():
    import subprocess
    import time

    from schemas import cli

    shell = subprocess.Popen(["sh", "-c", "sleep 30; echo done"])  # sh, and sleep below it
    try:
        deadline = time.time() + 10
        while time.time() < deadline and len(cli._descendants(shell.pid)) < 1:
            time.sleep(0.05)
        (sleeper,) = cli._descendants(shell.pid)
        assert {shell.pid, sleeper} <= set(cli._descendants(os.getpid()))
    finally:
        for pid in cli._descendants(shell.pid):
            os.kill(pid, 9)
        shell.kill()
        shell.wait()


def test_a_transform_output_cut_short_is_not_published(tmp_path):
    import json

    from pipelines import publish
    from pipelines.transforms.summary import SUMMARY_FILE

    work = str(tmp_path / publish.INCOMPLETE_DIR)
    manifest = _fake_dataset(work, "B", 2)
    fileio.write_text(os.path.join(work, SUMMARY_FILE), json.dumps({"shards": manifest["shards"]}))
    fileio.write_text(os.path.join(work, schemas.TRANSFORM_DIR, "transformed_metadata", "schema.pbtxt"), "")
    assert publish.missing_parts(work) == []
    os.remove(os.path.join(work, schemas.TRANSFORM_DIR, "transform_fn", "saved_model.pb"))  # killed there
    assert publish.missing_parts(work) == [f"{schemas.TRANSFORM_DIR}/transform_fn/saved_model.pb"]


def test_the_same_command_on_its_finished_run_has_nothing_to_do(tmp_path):
    cfg = _train_config(str(tmp_path / "data"), str(tmp_path / "run"))
    rundir.prepare_model_dir(cfg, False, {rundir.DATASET_ID: "abc"})
    fileio.write_bytes(os.path.join(cfg.model_dir, train.MODEL_FILE), b"model")  # finished: no backup left
    with pytest.raises(rundir.AlreadyFinished, match="nothing to do"):  # hpa-train exits 0 with that line
        rundir.prepare_model_dir(cfg, False, {rundir.DATASET_ID: "abc"})


# ---------------------------------------------------------------------------------------------------------
# Workers killed between two backups: they agree on an epoch every one of them holds.


def _agree_in_threads(slots_per_worker: list[set[int]]) -> list[int]:
    """Runs `devices.agree_on_epoch` in one thread per worker, their proposals gathered at a barrier (the
    all-reduce of a cluster: every worker sees every proposal of the same round)."""
    import threading

    from model import devices

    n = len(slots_per_worker)
    barrier = threading.Barrier(n)
    rounds: list[list[int | None]] = []
    lock = threading.Lock()
    results: list[int | None] = [None] * n

    def newest_at_most(slots, bound):
        return max((e for e in slots if bound is None or e <= bound), default=0)

    def worker(i):
        slots = slots_per_worker[i]
        seen = {"round": 0}

        def epochs_of_all(mine):
            r = seen["round"]
            with lock:
                if len(rounds) <= r:
                    rounds.append([None] * n)
                rounds[r][i] = mine
            barrier.wait(timeout=30)
            proposals = list(rounds[r])
            barrier.wait(timeout=30)  # every worker has read this round before the next one is written
            seen["round"] += 1
            return proposals

        results[i] = devices.agree_on_epoch(
            newest_at_most(slots, None), lambda b: newest_at_most(slots, b), epochs_of_all
        )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize(
    "slots, agreed",
    [
        ([{2, 3}, {2, 3}], 3),  # in step: the newest
        ([{2, 3}, {1, 2}], 2),  # worker 1 killed before its epoch-3 backup: both resume after epoch 2
        ([{1}, set()], 0),  # the campaign's stuck case: worker 1 had no backup yet: both start over
        ([{3}, {1, 2}, {2, 3}], 0),  # worker 0's slot 2 is damaged: no epoch every worker holds
        ([{4, 5}, {4, 5}, {3, 4}], 4),
    ],
)
def test_workers_one_backup_apart_agree_on_the_newest_epoch_they_all_hold(slots, agreed):
    assert _agree_in_threads(slots) == [agreed] * len(slots)


def test_find_backup_passes_over_slots_after_the_agreed_epoch(tmp_path):
    run = str(tmp_path / "run")
    _fake_backup(run, 2)
    _fake_backup(run, 3)
    assert rundir.find_backup(run).epoch == 3
    found = rundir.find_backup(run, at_most=2)
    assert found.epoch == 2 and found.weights.endswith(rundir.backup_slot(2)[0]) and not found.damaged
    assert rundir.find_backup(run, at_most=1) is None  # nothing that early: start over
    assert rundir.backup_epoch(run, verify=True, at_most=5) == 3


def test_a_worker_rerun_on_the_chiefs_finished_run_has_nothing_to_do(tmp_path):
    """The campaign's second stuck case: a worker interrupted once the chief had finished was refused with
    exit 2 on every rerun; the same command now ends with nothing to do (exit 0), another run is refused."""
    from model.config import ConfigError

    cfg = _train_config(str(tmp_path / "data"), str(tmp_path / "run"))
    rundir.prepare_model_dir(cfg, False, {})
    fileio.write_bytes(os.path.join(cfg.model_dir, train.MODEL_FILE), b"model")  # finished: no backup dir
    locks.release_all()
    worker = rundir.worker_dir(cfg.model_dir, "worker-1")
    with pytest.raises(rundir.AlreadyFinished, match="nothing to do"):
        rundir.prepare_worker_dir(cfg, worker, overwrite=False)
    locks.release_all()
    other = dataclasses.replace(cfg, epochs=cfg.epochs + 1)
    with pytest.raises(ConfigError, match="holds a finished run") as e:
        rundir.prepare_worker_dir(other, worker, overwrite=False)
    assert not isinstance(e.value, rundir.AlreadyFinished)
    locks.release_all()

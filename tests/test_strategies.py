"""Training under tf.distribute strategies on a CPU: logical CPU replicas, and worker processes on loopback.

Each run is a subprocess (the CPU split and MultiWorkerMirroredStrategy must come before TensorFlow sets up
its devices), bounded by a timeout that kills it. The validation predictions of every strategy are checked
against the saved model applied under the default strategy, one row per validation record.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import keras
import numpy as np
import pytest

import schemas
from model import model as _model_lib  # noqa: F401 - registers the custom layers for loading
from model import rundir
from model.config import (
    BACKUP_DIR,
    CONFIG_FILE,
    EXPORT_DIR,
    HISTORY_FILE,
    MODEL_FILE,
    RUN_SECTION,
    VAL_PREDICTIONS_FILE,
)
from tests import loopback
from tests.test_data import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--backbone", "small", "--weights", "none", "--small_filters", "4", "--verbose", "2"]
TIMEOUT = 600  # seconds for one training run (polled; a cluster stops at once when a worker fails)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 folds, 16 px; the validation fold (7 records) ends with a partial batch of 3 at batch size 4."""
    root = str(tmp_path_factory.mktemp("strategies"))
    samples = write_dataset(root, per_fold=(7, 8, 8))
    return root, samples


def _cmd(data_dir: str, model_dir: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "model.train",
        "--data_dir",
        data_dir,
        "--model_dir",
        model_dir,
        *SMALL,
        *extra,
    ]


_start, _env = loopback.start, loopback.env  # test_callbacks.py imports these names


def _finish(procs, timeout: float) -> list[str]:
    """Waits for every process (stopping all once one fails or `timeout` passes); returns their logs."""
    return [o.log for o in loopback.finish(procs, timeout)]


def _check_outputs(model_dir: str, samples: dict, strategy: str, replicas: int, tta: int = 1) -> dict:
    """The chief's outputs are complete; val_predictions.npz = model.keras under the default strategy."""
    for name in (CONFIG_FILE, MODEL_FILE, EXPORT_DIR, VAL_PREDICTIONS_FILE, HISTORY_FILE):
        assert os.path.exists(os.path.join(model_dir, name)), name
    assert not os.path.exists(os.path.join(model_dir, BACKUP_DIR))
    with open(os.path.join(model_dir, CONFIG_FILE)) as f:
        run = json.load(f)[RUN_SECTION]
    assert run["strategy"] == strategy and run["replicas"] == replicas
    assert run["jit_compile"] is False and run["precision"] == "float32"

    val = {sid: s for sid, s in samples.items() if s["fold"] == 0}
    npz = np.load(os.path.join(model_dir, VAL_PREDICTIONS_FILE))
    assert npz["scores"].shape == (len(val), schemas.NUM_CLASSES)  # one row per record, whatever the replicas
    assert sorted(npz["ids"].tolist()) == sorted(val)
    model = keras.saving.load_model(os.path.join(model_dir, MODEL_FILE), compile=False)
    images = np.stack([val[sid]["image"] for sid in npz["ids"].tolist()])
    expected = model.predict_on_batch(images)
    if tta == 2:  # the mean over the image and its left-right mirror
        expected = (expected + model.predict_on_batch(images[:, :, ::-1])) / 2
    np.testing.assert_allclose(npz["scores"], expected, rtol=1e-4, atol=1e-5)
    for sid, y in zip(npz["ids"].tolist(), npz["labels"], strict=True):
        np.testing.assert_array_equal(y, val[sid]["labels"])
    return run


def test_mirrored_over_two_cpu_replicas_end_to_end(dataset, tmp_path):
    data_dir, samples = dataset
    model_dir = str(tmp_path / "mirrored")
    cmd = _cmd(data_dir, model_dir, "--strategy", "mirrored", "--cpu_replicas", "2")
    cmd += ["--epochs", "1", "--steps_per_epoch", "2", "--batch_size", "4", "--val_tta", "2"]
    (log,) = _finish([loopback.start(cmd, loopback.env(), str(tmp_path / "mirrored.log"))], TIMEOUT)
    assert "MirroredStrategy (2 replica(s)" in log, log[-3000:]
    run = _check_outputs(model_dir, samples, "MirroredStrategy", 2, tta=2)
    compiled = keras.saving.load_model(os.path.join(model_dir, MODEL_FILE))
    assert int(compiled.optimizer.iterations.numpy()) == 2  # the optimizer state came along
    assert run["devices"] == [
        "/job:localhost/replica:0/task:0/device:CPU:0",
        "/job:localhost/replica:0/task:0/device:CPU:1",
    ]


@pytest.mark.slow
def test_two_workers_on_loopback_train_and_only_the_chief_writes(dataset, tmp_path):
    data_dir, samples = dataset
    dirs = [str(tmp_path / f"host{i}") for i in range(2)]  # as on two machines without a shared disk
    procs = []
    for i, conf in enumerate(loopback.cluster_configs(loopback.free_ports(2))):
        cmd = _cmd(data_dir, dirs[i], "--cpu_replicas", "1", "--epochs", "2", "--steps_per_epoch", "3")
        procs.append(
            loopback.start(cmd + ["--batch_size", "4"], loopback.env(conf), str(tmp_path / f"w{i}.log"))
        )
    logs = _finish(procs, TIMEOUT)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    run = _check_outputs(dirs[0], samples, "MultiWorkerMirroredStrategy", 2)
    assert run["workers"] == 2 and run["task"] == "worker_0"
    # The other worker wrote only into its own dir, and kept its backup for a restart.
    assert os.listdir(dirs[1]) == [rundir.WORKERS_DIR]
    own = rundir.worker_dir(dirs[1], "worker_1")
    assert rundir.backup_epoch(own) == 2
    assert len(rundir.read_history(os.path.join(own, HISTORY_FILE))) == 2
    assert len(rundir.read_history(os.path.join(dirs[0], HISTORY_FILE))) == 2


@pytest.mark.slow
def test_two_workers_killed_after_epoch_one_resume_with_the_same_commands(dataset, tmp_path):
    data_dir, samples = dataset
    model_dir = str(tmp_path / "shared")  # one directory for both, as on gs://
    work_dirs = [model_dir, rundir.worker_dir(model_dir, "worker_1")]
    confs = loopback.cluster_configs(loopback.free_ports(2))
    cmds = [
        _cmd(data_dir, model_dir, "--cpu_replicas", "1", "--epochs", "2", "--steps_per_epoch", "30")
        + ["--batch_size", "4"]
        for _ in confs
    ]
    procs = [
        loopback.start(c, loopback.env(conf), str(tmp_path / f"first{i}.log"))
        for i, (c, conf) in enumerate(zip(cmds, confs))
    ]
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if all(rundir.backup_epoch(d) == 1 for d in work_dirs):
                for p in procs:
                    p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        logs = _finish(procs, 30)
    for p, log in zip(procs, logs):
        assert p.returncode == -signal.SIGKILL, f"not killed mid-training:\n{log[-4000:]}"
    first_rows = [rundir.read_history(os.path.join(d, HISTORY_FILE)) for d in work_dirs]
    assert [len(r) for r in first_rows] == [1, 1]

    procs = [
        loopback.start(c, loopback.env(conf), str(tmp_path / f"second{i}.log"))
        for i, (c, conf) in enumerate(zip(cmds, confs))
    ]
    logs = _finish(procs, TIMEOUT)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
        assert "after epoch 1 (backup found)" in log and "Epoch 1/2" not in log and "Epoch 2/2" in log
    for d, before in zip(work_dirs, first_rows):
        rows = rundir.read_history(os.path.join(d, HISTORY_FILE))
        assert [int(r["epoch"]) for r in rows] == [0, 1] and rows[0] == before[0]
    _check_outputs(model_dir, samples, "MultiWorkerMirroredStrategy", 2)

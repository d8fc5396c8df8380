"""Tests of model/callbacks.py: weight averaging (--ema) and resume of the schedule and the average."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from model import batchnorm, rundir, train
from model import callbacks as callbacks_lib
from model.config import BEST_WEIGHTS, WARMUP_START_FACTOR, DataConfig
from model.data import make_eval_dataset
from tests.fixtures import sigkill_when
from tests.test_data import write_dataset
from tests.test_strategies import _check_outputs, _cmd, _env, _finish, _start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--backbone", "small", "--weights", "none", "--small_filters", "4", "--verbose", "0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ema"))
    return root, write_dataset(root, per_fold=(7, 8, 8))


def _history(model_dir: str) -> list[dict[str, str]]:
    with open(os.path.join(model_dir, train.HISTORY_FILE)) as f:
        return list(csv.DictReader(f))


def _trainable(model) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in model.trainable_variables]


def _averages(model) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in model.optimizer._model_variables_moving_average]


def _cosine_rates(lr: float, epochs: int, warmup_epochs: int, spe: int) -> list[float]:
    """The rate of each epoch's last step, straight from Keras' CosineDecay with its warm-up."""
    schedule = keras.optimizers.schedules.CosineDecay(
        lr * WARMUP_START_FACTOR,
        (epochs - warmup_epochs) * spe,
        alpha=1e-7 / lr,
        warmup_target=lr,
        warmup_steps=warmup_epochs * spe,
    )
    return [float(schedule((e + 1) * spe - 1)) for e in range(epochs)]


def test_ema_weights_are_validated_checkpointed_and_exported(dataset, tmp_path):
    data_dir, samples = dataset
    flags = ["--data_dir", data_dir, *SMALL, "--epochs", "1", "--batch_size", "4", "--learning_rate", "0.01"]
    flags += ["--seed", "3", "--deterministic"]
    # Raw weights after the first step (a run of one step), then a run of two steps with a 0.5 average.
    one = str(tmp_path / "one")
    train.run(flags + ["--model_dir", one, "--steps_per_epoch", "1"])
    w1 = _trainable(keras.saving.load_model(os.path.join(one, train.MODEL_FILE)))
    ema = str(tmp_path / "ema")
    train.run(flags + ["--model_dir", ema, "--steps_per_epoch", "2", "--ema", "--ema_momentum", "0.5"])
    exported = keras.saving.load_model(os.path.join(ema, train.MODEL_FILE))
    averaged = _trainable(exported)
    assert exported.optimizer.use_ema and int(exported.optimizer.iterations.numpy()) == 2
    for a, b in zip(_averages(exported), averaged, strict=True):  # model.keras: weights = their average
        np.testing.assert_array_equal(a, b)
    # The best checkpoint holds the average as the weights, and the raw weights in the average's place.
    exported.load_weights(os.path.join(ema, BEST_WEIGHTS))
    w2 = _averages(exported)
    for a, c in zip(averaged, _trainable(exported), strict=True):
        np.testing.assert_array_equal(a, c)
    # Keras' average: the first step's weights, then 0.5 old + 0.5 new.
    for a, x, y in zip(averaged, w1, w2, strict=True):
        np.testing.assert_allclose(a, 0.5 * x + 0.5 * y, rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(a - y).max()) for a, y in zip(averaged, w2, strict=True)) > 1e-4  # not the raw

    # Validation ran on the average: history's val_loss is the exported model's loss on the fold.
    val = sorted(sid for sid, s in samples.items() if s["fold"] == 0)
    images = np.stack([samples[s]["image"] for s in val])
    labels = np.stack([samples[s]["labels"] for s in val]).astype("float32")
    exported = keras.saving.load_model(os.path.join(ema, train.MODEL_FILE))
    loss = exported.evaluate(images, labels, batch_size=4, verbose=0, return_dict=True)["loss"]
    assert float(_history(ema)[0]["val_loss"]) == pytest.approx(loss, rel=1e-4)
    npz = np.load(os.path.join(ema, train.VAL_PREDICTIONS_FILE))
    by_id = dict(zip(npz["ids"].tolist(), npz["scores"], strict=True))
    scores = np.stack([by_id[s] for s in val])
    np.testing.assert_allclose(scores, exported.predict_on_batch(images), rtol=1e-4, atol=1e-5)


def test_sigkill_then_rerun_keeps_the_schedule_position_and_the_average(dataset, tmp_path, monkeypatch):
    data_dir, _ = dataset
    model_dir = str(tmp_path / "run")
    spe, lr = 40, 0.003
    argv = ["--data_dir", data_dir, "--model_dir", model_dir, *SMALL, "--epochs", "3", "--batch_size", "4"]
    argv += ["--steps_per_epoch", str(spe), "--learning_rate", str(lr), "--lr_schedule", "cosine"]
    argv += ["--warmup_epochs", "1", "--ema", "--ema_momentum", "0.9"]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "model.train", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sigkill_when(proc, lambda: rundir.backup_epoch(model_dir) == 1)
    out = proc.stdout.read().decode()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-training:\n{out[-3000:]}"
    first_best = str(tmp_path / "epoch1.weights.h5")  # the average after epoch 1, as weights
    shutil.copy(os.path.join(model_dir, BEST_WEIGHTS), first_best)

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if not seen:
                optimizer = self.model.optimizer
                seen["iterations"] = int(optimizer.iterations.numpy())
                seen["rate"] = float(optimizer.learning_rate.numpy())
                seen["average"] = _averages(self.model)
                seen["weights"] = _trainable(self.model)
                seen["statistics"] = batchnorm.statistics(self.model)

    make = callbacks_lib.make_callbacks
    monkeypatch.setattr(callbacks_lib, "make_callbacks", lambda *a, **k: [*make(*a, **k), Probe()])
    train.run(argv)

    assert seen["iterations"] == spe  # the schedule continues from the backup's step ...
    assert seen["rate"] == pytest.approx(lr, rel=1e-5)  # ... at the end of the warm-up
    rates = _cosine_rates(lr, 3, 1, spe)
    np.testing.assert_allclose([float(r["learning_rate"]) for r in _history(model_dir)], rates, rtol=1e-5)
    reference = keras.saving.load_model(os.path.join(model_dir, train.MODEL_FILE))
    reference.load_weights(first_best)
    for avg, ema1 in zip(seen["average"], _trainable(reference), strict=True):
        np.testing.assert_allclose(avg, ema1, rtol=1e-5, atol=1e-7)  # the average came back ...
    assert any(
        not np.allclose(a, w) for a, w in zip(seen["average"], seen["weights"], strict=True)
    )  # ... apart
    # The backup held the raw weights' BatchNorm statistics, not those recomputed for the average.
    averaged = batchnorm.statistics(reference)
    assert any(not np.allclose(a, r) for a, r in zip(averaged, seen["statistics"], strict=True))


def test_ema_with_cosine_under_mirrored_over_two_cpu_replicas(dataset, tmp_path):
    data_dir, samples = dataset
    model_dir = str(tmp_path / "mirrored")
    cmd = _cmd(data_dir, model_dir, "--strategy", "mirrored", "--cpu_replicas", "2", "--epochs", "2")
    cmd += [
        "--steps_per_epoch",
        "2",
        "--batch_size",
        "4",
        "--learning_rate",
        "0.01",
        "--lr_schedule",
        "cosine",
    ]
    cmd += ["--warmup_epochs", "1", "--ema", "--no_augment"]
    (log,) = _finish([_start(cmd, _env(), str(tmp_path / "mirrored.log"))], 240)
    assert "MirroredStrategy (2 replica(s)" in log, log[-3000:]
    _check_outputs(model_dir, samples, "MirroredStrategy", 2)  # val_predictions.npz = model.keras
    rates = [float(r["learning_rate"]) for r in _history(model_dir)]
    np.testing.assert_allclose(rates, _cosine_rates(0.01, 2, 1, 2), rtol=1e-5)
    exported = keras.saving.load_model(os.path.join(model_dir, train.MODEL_FILE))
    assert exported.optimizer.use_ema and int(exported.optimizer.iterations.numpy()) == 4
    # BatchNorm statistics recomputed under the strategy for the average: 16 training samples in batches of
    # the per-replica 2, in every replica's copy; model.keras holds what the same recompute gives here.
    assert log.count("layers recomputed over 8 batches (16 samples)") == 2, log[-3000:]
    saved = batchnorm.statistics(exported)
    batchnorm.recompute(exported, make_eval_dataset(data_dir, [1, 2], DataConfig(batch_size=2)))
    for x, y in zip(saved, batchnorm.statistics(exported), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_plateau_says_a_reduction_in_one_line_with_readable_rates(capsys):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="mse")
    cb = callbacks_lib.PlateauAfterWarmup(1, monitor="val_loss", factor=0.3, patience=2, verbose=0)
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, loss in enumerate([1.0, 0.5, 0.6, 0.7, 0.8]):  # epoch 0 is warm-up; no progress after 0.5
        cb.on_epoch_end(epoch, {"val_loss": loss})
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["Epoch 4: learning rate 0.003 -> 0.0009 (val_loss did not improve for 2 epochs)"]
    assert float(np.array(model.optimizer.learning_rate)) == pytest.approx(0.0009)

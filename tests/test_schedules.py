"""Tests of model/schedules.py and the training job's --lr_schedule / --warmup_epochs flags."""

from __future__ import annotations

import csv
import json
import os

import keras
import numpy as np
import pytest

from model import schedules, train
from model.callbacks import LEARNING_RATE
from model.config import CONFIG_FILE, WARMUP_START_FACTOR, ConfigError, TrainConfig
from tests.test_data import write_dataset

SMALL = ["--backbone", "small", "--weights", "none", "--small_filters", "4", "--verbose", "0"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sched"))
    write_dataset(root, per_fold=(6, 8, 8))
    return root


def _rates(model_dir: str) -> list[float]:
    with open(os.path.join(model_dir, train.HISTORY_FILE)) as f:
        return [float(r[LEARNING_RATE]) for r in csv.DictReader(f)]


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(data_dir="d", model_dir="m", **kw)


def _values(schedule, steps) -> np.ndarray:
    return np.array([float(keras.ops.convert_to_numpy(schedule(s))) for s in steps])


def test_schedules_are_the_keras_ones_with_a_linear_warmup():
    spe, lr = 5, 0.01
    steps = range(0, 40)
    cosine = schedules.learning_rate(_cfg(lr_schedule="cosine", epochs=8, learning_rate=lr, min_lr=1e-4), spe)
    direct = keras.optimizers.schedules.CosineDecay(lr, 8 * spe, alpha=1e-2)
    np.testing.assert_allclose(_values(cosine, steps), _values(direct, steps), rtol=1e-6)

    warm = schedules.learning_rate(
        _cfg(lr_schedule="cosine", epochs=8, warmup_epochs=2, learning_rate=lr), spe
    )
    v = _values(warm, steps)
    start = lr * WARMUP_START_FACTOR
    np.testing.assert_allclose(v[:10], start + (lr - start) * np.arange(10) / 10, rtol=1e-5)  # linear
    assert v[10] == pytest.approx(lr) and np.all(np.diff(v[10:]) < 0)  # then cosine down

    # step: x factor from the first step of each listed epoch, after a linear warm-up.
    cfg = _cfg(
        lr_schedule="step", epochs=8, warmup_epochs=1, lr_steps=(3, 6), lr_factor=0.5, learning_rate=lr
    )
    v = _values(schedules.learning_rate(cfg, spe), steps)
    np.testing.assert_allclose(v[:5], start + (lr - start) * np.arange(5) / 5, rtol=1e-5)
    expected = [lr * 0.5 ** sum(s >= e * spe for e in (3, 6)) for s in steps[5:]]
    np.testing.assert_allclose(v[5:], expected, rtol=1e-6)
    # The warm-up a plateau run applies step by step is the same line.
    plateau = _cfg(epochs=8, warmup_epochs=1, learning_rate=lr)
    np.testing.assert_allclose(
        _values(schedules.warmup_schedule(plateau, spe), range(7)), v[:5].tolist() + [lr] * 2
    )
    assert schedules.learning_rate(plateau, spe) == lr and schedules.warmup_schedule(_cfg(), spe) is None

    # The joined schedule survives a save / load (model.keras holds the optimizer).
    sched = schedules.learning_rate(cfg, spe)
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(sched))
    np.testing.assert_allclose(_values(again, steps), _values(sched, steps))


def test_default_steps_and_bad_schedule_settings():
    assert _cfg(lr_schedule="step", epochs=30).lr_steps == (15, 22)
    assert _cfg(lr_schedule="step", epochs=30, lr_steps=[10, 20]).lr_steps == (10, 20)  # a JSON list
    with pytest.raises(ConfigError, match="--warmup_epochs 3 leaves no epoch .* less than --epochs 3"):
        _cfg(epochs=3, warmup_epochs=3)
    with pytest.raises(ConfigError, match="each step must come after the warm-up"):
        _cfg(lr_schedule="step", epochs=10, warmup_epochs=2, lr_steps=(2, 5))
    with pytest.raises(ConfigError, match="before the last epoch"):
        _cfg(lr_schedule="step", epochs=10, lr_steps=(5, 10))
    with pytest.raises(ConfigError, match="increasing"):
        _cfg(lr_schedule="step", epochs=10, lr_steps=(6, 5))
    with pytest.raises(ConfigError, match="--lr_steps is for --lr_schedule step"):
        _cfg(lr_schedule="cosine", lr_steps=(5,))
    with pytest.raises(ConfigError, match="no epoch between"):
        _cfg(lr_schedule="step", epochs=2, warmup_epochs=1)
    with pytest.raises(ConfigError, match="cosine's end"):
        _cfg(lr_schedule="cosine", learning_rate=1e-3, min_lr=1e-3)


def test_bad_schedule_flags_exit_2_with_one_line_before_training(written, tmp_path, capsys):
    model_dir = str(tmp_path / "m")
    base = ["--data_dir", written, "--model_dir", model_dir, *SMALL]
    for flags, message in (
        (["--epochs", "2", "--warmup_epochs", "2"], "error: --warmup_epochs 2 leaves no epoch"),
        (["--lr_schedule", "step", "--epochs", "4", "--lr_steps", "4"], "error: --lr_steps 4: each step"),
    ):
        assert train.main(base + flags) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not os.path.exists(model_dir)


def test_rates_in_history_per_epoch_and_a_preset_in_config_json(written, tmp_path):
    lr = 0.003  # cpu-small's, with its lr_factor 0.3
    start = lr * WARMUP_START_FACTOR
    run = ["--data_dir", written, *SMALL, "--steps_per_epoch", "2", "--batch_size", "4"]
    # step with a warm-up: history's rate is the one of each epoch's last step; default step at epoch 2.
    step_dir = str(tmp_path / "step")
    train.run(
        run
        + ["--model_dir", step_dir, "--preset", "cpu-small", "--epochs", "3"]
        + ["--lr_schedule", "step", "--warmup_epochs", "1"]
    )
    np.testing.assert_allclose(_rates(step_dir), [start + (lr - start) / 2, lr, lr * 0.3], rtol=1e-5)
    with open(os.path.join(step_dir, CONFIG_FILE)) as f:
        saved = json.load(f)
    assert saved["preset"] == "cpu-small" and saved["lr_steps"] == [2]
    assert (saved["learning_rate"], saved["lr_factor"], saved["val_tta"]) == (lr, 0.3, 8)  # from the preset
    assert (saved["epochs"], saved["lr_schedule"], saved["data"]["batch_size"]) == (3, "step", 4)  # given
    # plateau with a warm-up: the rate rises step by step, then belongs to ReduceLROnPlateau.
    plateau_dir = str(tmp_path / "plateau")
    train.run(
        run
        + ["--model_dir", plateau_dir, "--learning_rate", str(lr), "--epochs", "2", "--warmup_epochs", "1"]
    )
    np.testing.assert_allclose(_rates(plateau_dir), [start + (lr - start) / 2, lr], rtol=1e-5)

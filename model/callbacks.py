"""The training job's Keras callbacks, and the small ones it adds to Keras' own.

Order of a run's callbacks at each epoch's end (`make_callbacks`): the learning rate logged, ReduceLROnPlateau
(`plateau` only), EarlyStopping, the replay of both on resume, [EMA weights swapped in] ModelCheckpoint of the
best epoch [swapped back out], CSVLogger, TensorBoard, and BackupAndRestore last, so that an epoch counts as
done only once every other callback has handled it and the backup holds the raw weights with their average.

With `--ema` the optimizer keeps an exponential moving average of the weights (`use_ema`);
`keras.callbacks.SwapEMAWeights` puts it in the model for each validation, and `SwapEMAAtEpochEnd` around
ModelCheckpoint, so validation loss, early stopping, the plateau and the best checkpoint all see the average
(`model/keras_compat.py`'s `ema_around_checkpoint`: that order, and why).
"""

from __future__ import annotations

import importlib.util

import keras

from model import fileio, keras_compat
from model.config import (
    BACKUP_DIR,
    BEST_WEIGHTS,
    HISTORY_FILE,
    LOGS_DIR,
    LR_PLATEAU,
    TrainConfig,
)
from model.schedules import warmup_schedule, warmup_steps

MONITOR = "val_loss"
LEARNING_RATE = "learning_rate"  # history.csv's column: the rate of the epoch's last step


class PlateauAfterWarmup(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that ignores the warm-up epochs (the rate is still rising; no best value yet)."""

    def __init__(self, warmup_epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.warmup_epochs = warmup_epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.warmup_epochs:
            super().on_epoch_end(epoch, logs)


class LinearWarmup(keras.callbacks.Callback):
    """Sets a `plateau` run's rate from a Keras warm-up schedule before each step of the warm-up.

    The step is read from `optimizer.iterations` at the first batch (after BackupAndRestore restored it), so a
    resumed run continues the warm-up; after it the rate belongs to ReduceLROnPlateau.
    """

    def __init__(self, schedule, steps: int):
        super().__init__()
        self.schedule = schedule
        self.steps = steps
        self._step: int | None = None

    def on_train_begin(self, logs=None):
        self._step = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._step is None:
            self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if self._step <= self.steps:  # step == steps sets the target rate itself
            self.model.optimizer.learning_rate = float(keras.ops.convert_to_numpy(self.schedule(self._step)))
            self._step += 1


class LogLearningRate(keras.callbacks.Callback):
    """Adds LEARNING_RATE to each epoch's logs: the rate the epoch's last optimizer step used."""

    def __init__(self, schedule=None):
        super().__init__()
        self.schedule = schedule  # None: the optimizer holds a rate (plateau), not a schedule

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        optimizer = self.model.optimizer
        if self.schedule is None:
            rate = optimizer.learning_rate
        else:
            rate = self.schedule(keras.ops.convert_to_numpy(optimizer.iterations) - 1)
        logs[LEARNING_RATE] = float(keras.ops.convert_to_numpy(rate))


def _replay_callback(rows: list[dict[str, str]], keep_lr: bool):
    """A callback restoring ReduceLROnPlateau / EarlyStopping counters from the logged epochs on resume."""

    class ReplayPlateauState(keras.callbacks.Callback):
        def __init__(self, targets):
            super().__init__()
            self.targets = targets

        def on_train_begin(self, logs=None):
            if not rows:
                return
            optimizer = self.model.optimizer
            lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate)) if keep_lr else None
            for cb in self.targets:
                verbose, cb.verbose = cb.verbose, 0
                for row in rows:
                    cb.on_epoch_end(int(row["epoch"]), {MONITOR: float(row[MONITOR])})
                cb.verbose = verbose
            if keep_lr:
                optimizer.learning_rate = lr  # BackupAndRestore (after this callback) restores the true value

    return ReplayPlateauState


def make_callbacks(
    cfg: TrainConfig,
    work_dir: str,
    history_rows: list[dict[str, str]],
    steps_per_epoch: int,
    schedule=None,
    warn=print,
) -> list:
    """The Keras callbacks of a run, in the order they must see each epoch's end.

    Args:
      cfg: the run's config.
      work_dir: where checkpoints, backup, history and logs go.
      history_rows: the epochs already logged (a resumed run), replayed into the plateau and early stopping.
      steps_per_epoch: optimizer steps per epoch (the warm-up's length).
      schedule: the optimizer's learning-rate schedule (None for `plateau`).
      warn: prints a warning line.
    """
    early = keras.callbacks.EarlyStopping(monitor=MONITOR, patience=cfg.early_stopping_patience, verbose=1)
    callbacks: list = [LogLearningRate(schedule)]
    replayed: list = []
    if cfg.lr_schedule == LR_PLATEAU:
        reduce_lr = PlateauAfterWarmup(
            cfg.warmup_epochs,
            monitor=MONITOR,
            factor=cfg.lr_factor,
            patience=cfg.lr_patience,
            min_lr=cfg.min_lr,
            verbose=1,
        )
        callbacks.append(reduce_lr)
        replayed.append(reduce_lr)
        warm = warmup_schedule(cfg, steps_per_epoch)
        if warm is not None:
            callbacks.append(LinearWarmup(warm, warmup_steps(cfg, steps_per_epoch)))
    replayed.append(early)
    callbacks += [early, _replay_callback(history_rows, cfg.lr_schedule == LR_PLATEAU)(replayed)]
    best_so_far = min((float(r[MONITOR]) for r in history_rows), default=None)
    checkpoint = keras.callbacks.ModelCheckpoint(
        fileio.join(work_dir, BEST_WEIGHTS),
        monitor=MONITOR,
        save_best_only=True,
        save_weights_only=True,
        initial_value_threshold=best_so_far,
    )
    if cfg.ema:
        callbacks += keras_compat.ema_around_checkpoint(checkpoint)  # the order the average needs
    else:
        callbacks.append(checkpoint)
    callbacks.append(keras.callbacks.CSVLogger(fileio.join(work_dir, HISTORY_FILE), append=True))
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(fileio.join(work_dir, LOGS_DIR), profile_batch=0))
    else:
        warn(
            "warning: the tensorboard package is not installed: no TensorBoard logs (pip install tensorboard)"
        )
    # Last, so an epoch counts as done only once every other callback has handled it.
    callbacks.append(
        keras.callbacks.BackupAndRestore(fileio.join(work_dir, BACKUP_DIR), delete_checkpoint=False)
    )
    return callbacks

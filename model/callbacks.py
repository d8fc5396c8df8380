"""The training job's Keras callbacks, and the small ones it adds to Keras' own.

Order of a run's callbacks at each epoch's end (`make_callbacks`): the learning rate logged, ReduceLROnPlateau
(`plateau` only), EarlyStopping, the replay of both on resume, [EMA weights swapped in] ModelCheckpoint of the
best epoch [swapped back out], CSVLogger, TensorBoard, and BackupAndRestore last, so that an epoch counts as
done only once every other callback has handled it and the backup holds the raw weights with their average.

With `--ema` the optimizer keeps an exponential moving average of the weights (`use_ema`);
`keras.callbacks.SwapEMAWeights` puts it in the model for each validation, and `SwapEMAAtEpochEnd` around
ModelCheckpoint, so validation loss, early stopping, the plateau and the best checkpoint all see the average
(`model/keras_compat.py`'s `ema_around_checkpoint`: that order, and why), with BatchNorm statistics
recomputed for it (`model/batchnorm.py`, `--ema_bn_batches`).
"""

from __future__ import annotations

import importlib.util

import keras
import numpy as np

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
from schemas import cli

MONITOR = "val_loss"
LEARNING_RATE = "learning_rate"  # history.csv's column: the rate of the epoch's last step


class PlateauAfterWarmup(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau that ignores the warm-up epochs (the rate is still rising; no best value yet)."""

    def __init__(self, warmup_epochs: int, **kwargs):
        super().__init__(**kwargs)
        self.warmup_epochs = warmup_epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.warmup_epochs:
            before = float(np.array(self.model.optimizer.learning_rate))
            super().on_epoch_end(epoch, logs)
            after = float(np.array(self.model.optimizer.learning_rate))
            if after < before:  # Keras' own message (verbose=1) prints the rate's float32 digits
                print(
                    f"Epoch {epoch + 1}: learning rate {before:.3g} -> {after:.3g} ({self.monitor} did not "
                    f"improve for {self.patience} epochs)",
                    flush=True,
                )


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


class InterruptStage(keras.callbacks.Callback):
    """Keeps the command's interrupt line current: `interrupted during epoch 4 of 30` (schemas/cli.py)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        cli.set_stage(f"epoch {epoch + 1} of {self.epochs}")

    def on_train_end(self, logs=None):
        cli.set_stage("writing the outputs")


class AtomicBestCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint whose weight file is written beside its name and renamed in (never half-written).

    Overrides Keras' private `_save_model` (with its `_get_file_path`, `_should_save_model`).
    """

    def __init__(self, *args, **kwargs):
        keras_compat.check_version("AtomicBestCheckpoint")
        super().__init__(*args, **kwargs)

    def _save_model(self, epoch, batch, logs):
        logs = logs or {}
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):
            fileio.save_file(
                filepath, lambda tmp: self.model.save_weights(tmp, overwrite=True), suffix=".weights.h5"
            )


RNG_STATES = "rng_states"  # a backup record's states of the model's random generators, in variable order


def _rng_variables(model) -> list:
    """The states of the model's `keras.random.SeedGenerator`s (augmentation, dropout).

    Keras' weight files leave them out, so a resumed run would draw its first epoch's transforms again;
    the backup keeps them so that a resumed `--deterministic` run equals the uninterrupted one.
    """
    return [v for v in model.variables if "seed_generator_state" in v.path]


class TwoSlotBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose backup survives a kill at any instant of its save (docs/interrupts.md).

    Each epoch's weights and optimizer state go to their own slot (`epoch-N.weights.h5`, written beside and
    renamed in), then its record (size, SHA-256) and Keras' `training_metadata.json`; the slot before it is
    kept until the next one is whole. On resume the newest whole slot is loaded (`rundir.find_backup`): one
    cut short or corrupt falls back to the previous one, which the job reports in one line. The record also
    holds the random generators' states, which Keras' weight files leave out.
    """

    def __init__(self, work_dir: str, resume_epoch: int | None = None):
        """resume_epoch: the epoch the run resumes from (None: the newest whole backup); later slots are
        passed over (the workers of a multi-worker run agree on an epoch they all hold)."""
        keras_compat.check_version("TwoSlotBackup (Keras' private _load_model, _save_model)")
        super().__init__(fileio.join(work_dir, BACKUP_DIR), delete_checkpoint=False)
        self.work_dir = work_dir
        self.resume_epoch = resume_epoch

    def _load_model(self):
        from model import rundir

        found = rundir.find_backup(self.work_dir, at_most=self.resume_epoch)
        if found is None or found.weights is None:
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(fileio.local_copy(found.weights))
        states = rundir.read_backup_record(found.weights).get(RNG_STATES)
        variables = _rng_variables(self.model)
        if states is not None and len(states) == len(variables):
            for variable, state in zip(variables, states, strict=True):
                variable.assign(keras.ops.convert_to_tensor(state, dtype=variable.dtype))
        self.model._initial_epoch = found.epoch  # what Keras' own BackupAndRestore sets  # noqa: SLF001

    def _save_model(self):
        from model import rundir

        fileio.makedirs(self.backup_dir)
        weights = fileio.join(self.backup_dir, rundir.backup_slot(self._current_epoch)[0])
        fileio.save_file(
            weights, lambda tmp: self.model.save_weights(tmp, overwrite=True), suffix=".weights.h5"
        )
        states = [keras.ops.convert_to_numpy(v).tolist() for v in _rng_variables(self.model)]
        rundir.record_backup(self.work_dir, self._current_epoch, {RNG_STATES: states})


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
    bn_batches=None,
    resume_epoch: int | None = None,
) -> list:
    """The Keras callbacks of a run, in the order they must see each epoch's end.

    Args:
      cfg: the run's config.
      work_dir: where checkpoints, backup, history and logs go.
      history_rows: the epochs already logged (a resumed run), replayed into the plateau and early stopping.
      steps_per_epoch: optimizer steps per epoch (the warm-up's length).
      schedule: the optimizer's learning-rate schedule (None for `plateau`).
      warn: prints a line (a warning; the BatchNorm recompute's progress).
      bn_batches: with `cfg.ema`, the training batches over which BatchNorm's statistics are recomputed for
        the averaged weights (`model/batchnorm.py`); None: the raw weights' statistics are used with them.
      resume_epoch: the backup epoch the run resumes from (None: the newest whole one; see TwoSlotBackup).
    """
    early = keras.callbacks.EarlyStopping(monitor=MONITOR, patience=cfg.early_stopping_patience, verbose=1)
    callbacks: list = [InterruptStage(cfg.epochs), LogLearningRate(schedule)]
    replayed: list = []
    if cfg.lr_schedule == LR_PLATEAU:
        reduce_lr = PlateauAfterWarmup(
            cfg.warmup_epochs,
            monitor=MONITOR,
            factor=cfg.lr_factor,
            patience=cfg.lr_patience,
            min_lr=cfg.min_lr,
            verbose=0,  # PlateauAfterWarmup says it in one line
        )
        callbacks.append(reduce_lr)
        replayed.append(reduce_lr)
        warm = warmup_schedule(cfg, steps_per_epoch)
        if warm is not None:
            callbacks.append(LinearWarmup(warm, warmup_steps(cfg, steps_per_epoch)))
    replayed.append(early)
    callbacks += [early, _replay_callback(history_rows, cfg.lr_schedule == LR_PLATEAU)(replayed)]
    best_so_far = min((float(r[MONITOR]) for r in history_rows), default=None)
    checkpoint = AtomicBestCheckpoint(
        fileio.join(work_dir, BEST_WEIGHTS),
        monitor=MONITOR,
        save_best_only=True,
        save_weights_only=True,
        initial_value_threshold=best_so_far,
    )
    if cfg.ema:
        from model import batchnorm

        averaged = None if bn_batches is None else batchnorm.AveragedStatistics(bn_batches, warn).callbacks()
        callbacks += keras_compat.ema_around_checkpoint(checkpoint, averaged)  # the order the average needs
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
    callbacks.append(TwoSlotBackup(work_dir, resume_epoch))
    return callbacks

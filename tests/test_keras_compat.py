"""Tests of model/keras_compat.py: each patch of Keras' private API is still needed on the installed Keras.

Each `..._still_...` test runs the unpatched Keras behaviour and asserts that it still fails or misbehaves, so
it fails once upstream fixes the bug (then drop the patch); next to it, the patched behaviour works. Tiny
models on one CPU device; the multi-device and multi-worker runs are in tests/test_strategies.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from model import keras_compat


def _tiny_model(use_ema: bool = False):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.SGD(0.1, use_ema=use_ema, ema_momentum=0.5)
    metrics = [keras.metrics.MeanAbsoluteError()]
    # Eager steps: no tracing, a few seconds for the whole module; the patched paths run the same way.
    model.compile(optimizer=optimizer, loss="mse", metrics=metrics, run_eagerly=True)
    return model


def _data():
    x = np.random.default_rng(0).uniform(size=(8, 3)).astype("float32")
    y = np.random.default_rng(1).uniform(size=(8, 2)).astype("float32")
    return x, y


def _averages(model) -> list[np.ndarray]:
    return [np.array(v) for v in model.optimizer._model_variables_moving_average]


def _weights(model) -> list[np.ndarray]:
    return [np.array(v) for v in model.trainable_variables]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(u, v) for u, v in zip(a, b, strict=True))


def test_the_installed_keras_is_a_checked_one_and_another_fails_loudly():
    keras_compat.check_version("any patch")  # the installed (pinned) Keras is the checked one
    with pytest.raises(keras_compat.KerasVersionError, match=r"build_before_fit .* not on Keras 3\.99\.0"):
        keras_compat.check_version("build_before_fit", "3.99.0")


def _mirrored_fit(patched: bool) -> None:
    """Two epochs under MirroredStrategy, validating on records of unknown cardinality (as from files)."""
    strategy = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    x, y = _data()
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()
    val = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(4).cache()
    with strategy.scope():
        model = _tiny_model()
    if patched:
        keras_compat.build_before_fit(model, train, strategy)
    model.fit(train, epochs=2, steps_per_epoch=2, validation_data=val, validation_steps=2, verbose=0)


def test_mirrored_fit_still_stops_at_the_second_validation_without_build_before_fit():
    with pytest.raises(StopIteration):
        _mirrored_fit(patched=False)
    _mirrored_fit(patched=True)


def test_multi_worker_step_logs_still_fail_to_reduce_without_scalar_mean_across_workers(monkeypatch):
    from keras.src.backend.tensorflow import trainer as tf_trainer

    # The multi-worker branch of Keras' reduction, taken here on one device: a real cluster needs two
    # processes (tests/test_strategies.py trains one).
    monkeypatch.setattr(tf_trainer, "_collective_all_reduce_multi_worker", lambda strategy: True)
    original = tf_trainer.reduce_per_replica
    strategy = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    logs = {"loss": strategy.run(lambda: tf.constant(2.0))}
    with pytest.raises(ValueError, match="Invalid reduction dimension 0 for input with 0 dimensions"):
        tf_trainer.reduce_per_replica(logs, strategy, "auto")
    with keras_compat.scalar_mean_across_workers(True):
        reduced = tf_trainer.reduce_per_replica(logs, strategy, "auto")
    assert float(reduced["loss"]) == 2.0
    assert tf_trainer.reduce_per_replica is original  # restored on leaving


class _Probe(keras.callbacks.Callback):
    """Records the model's weights at the last step's end and at the epoch's end."""

    def __init__(self):
        super().__init__()
        self.last_step = self.epoch_end = None

    def on_train_batch_end(self, batch, logs=None):
        self.last_step = _weights(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_end = _weights(self.model)


def test_swap_on_epoch_still_leaves_the_average_in_the_model_at_the_epoch_end():
    x, y = _data()
    model = _tiny_model(use_ema=True)
    probe = _Probe()  # where BackupAndRestore would stand
    swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[swap, probe], verbose=0)
    assert not _same(probe.epoch_end, probe.last_step)  # a backup would save the average as the weights

    model = _tiny_model(use_ema=True)
    inside, after = _Probe(), _Probe()
    callbacks = [*keras_compat.ema_around_checkpoint(inside), after]
    model.fit(x, y, batch_size=4, epochs=1, callbacks=callbacks, verbose=0)
    assert not _same(inside.epoch_end, inside.last_step)  # the checkpoint sees the average ...
    assert _same(after.epoch_end, after.last_step)  # ... and every callback after it the raw weights


def test_loading_weights_still_leaves_the_optimizer_average_stale():
    x, y = _data()
    model = _tiny_model(use_ema=True)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    model.set_weights([w + 1.0 for w in model.get_weights()])  # as load_weights of the best checkpoint
    assert not _same(_averages(model), _weights(model))  # Keras keeps the old average
    keras_compat.average_into_optimizer(model)
    assert _same(_averages(model), _weights(model))

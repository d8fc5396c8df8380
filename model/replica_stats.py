"""BatchNormalization's moving statistics made the same on every replica (several GPUs, several workers).

Keras 3 creates BatchNormalization's `moving_mean` and `moving_variance` without a tf.distribute aggregation,
so under MirroredStrategy and MultiWorkerMirroredStrategy each replica updates its own copy from its own part
of the batch: after the first training step the replicas hold different statistics (seen on two loopback
workers, tests/test_workers.py; tf.keras 2 averaged them on read). Validation then scored each replica's
share of the records with that replica's statistics (a mixture of models), and the saved model kept the
first replica's alone.

`AverageReplicaStatistics` sets every replica's statistics to their mean over all replicas (one all-reduce of
a few vectors per BatchNormalization layer) before each validation and at an epoch's end when no validation
came after its last step: the validated, checkpointed and saved model is then one model, the same on every
worker. Training steps are unchanged (in training BatchNormalization normalises with the batch's own
statistics); only what the moving averages summarise is averaged, as tf.keras 2 did.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def moving_statistics(model: keras.Model) -> list:
    """The moving mean and variance of every BatchNormalization layer that trains (`batchnorm.layers_of`: a
    frozen one never updates them)."""
    from model import batchnorm

    return batchnorm.moving_variables(batchnorm.layers_of(model))


def averager(strategy, variables: list):
    """A function that sets each variable, on every replica of `strategy`, to its mean over the replicas."""
    values = [v.value for v in variables]  # the tf.Variables (per-replica copies) behind Keras' variables

    @tf.function
    def average():
        def per_replica():
            context = tf.distribute.get_replica_context()
            local = [tf.identity(v) for v in values]  # this replica's copy
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN, local)
            for v, mean in zip(values, means, strict=True):
                v.assign(mean)

        strategy.run(per_replica)

    return average


class AverageReplicaStatistics(keras.callbacks.Callback):
    """Averages BatchNormalization's moving statistics over the replicas before each validation, and at an
    epoch's end when steps were trained since the last average. Put it first: the callbacks that save
    weights at an epoch's end then see the averaged statistics."""

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy
        self._average = None
        self._stale = False

    def on_train_begin(self, logs=None):
        variables = moving_statistics(self.model)
        self._average = averager(self.strategy, variables) if variables else None

    def on_epoch_begin(self, epoch, logs=None):
        self._stale = True

    def on_test_begin(self, logs=None):
        self._sync()

    def on_epoch_end(self, epoch, logs=None):
        self._sync()

    def _sync(self):
        if self._stale and self._average is not None:
            self._average()
        self._stale = False

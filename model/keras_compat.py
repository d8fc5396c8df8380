"""Every use of Keras' private API in the project, each a workaround of a Keras 3 behaviour, in one place.

Each patch names the upstream issue (or describes the bug where none was found), calls `check_version` so that
it fails loudly on a Keras it was not checked against, and has a test in tests/test_keras_compat.py that shows
the unpatched behaviour still fails on the installed Keras (that test fails once upstream fixes the bug; the
patch can then go).

  build_before_fit             `_maybe_symbolic_build` replaced: fit under a tf.distribute strategy
  scalar_mean_across_workers   `keras.src.backend.tensorflow.trainer.reduce_per_replica` swapped during fit
  SwapEMAAtEpochEnd            `SwapEMAWeights._swap_variables`: the average in the model around one callback
  ema_around_checkpoint        the callback order the EMA wiring depends on
  average_into_optimizer       `SwapEMAWeights._finalize_ema_values`: the average re-seeded from the weights

To move to another Keras version: run tests/test_keras_compat.py (and test_strategies.py, test_callbacks.py)
on it; for each patch whose test now fails, upstream fixed the bug: drop the patch. Then add the version to
CHECKED_KERAS.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras

CHECKED_KERAS: tuple[str, ...] = ("3.15.1",)  # the versions every patch below was checked against


class KerasVersionError(RuntimeError):
    """A patch of Keras' private API runs on a Keras version it was not checked against."""


def check_version(patch: str, version: str | None = None) -> None:
    """Stops a patch of Keras' private API on a Keras version it was not checked against.

    Raises:
      KerasVersionError: names the patch, the version and what to do.
    """
    version = keras.__version__ if version is None else version
    if version not in CHECKED_KERAS:
        raise KerasVersionError(
            f"model/keras_compat.py: {patch} patches Keras' private API and was checked on Keras "
            f"{', '.join(CHECKED_KERAS)} only, not on Keras {version}: run tests/test_keras_compat.py on "
            "this version, drop the patches upstream has fixed, then add the version to CHECKED_KERAS "
            "(or install the pinned Keras: pip install -c constraints.txt -e .)"
        )


# ---------------------------------------------------------------------------------------------------------
# fit under a tf.distribute strategy.


def build_before_fit(model, dataset, strategy) -> None:
    """Builds the model's metrics, loss and optimizer state from the dataset's element spec, once, for good.

    Keras 3's TensorFlow trainer (`_maybe_symbolic_build`, called by fit and by each validation's evaluate
    under a strategy) builds them from a first batch pulled from the iterator:
    - under MultiWorkerMirroredStrategy it averages that batch with `strategy.reduce`, which fails across
      workers ("Attempt to convert a value (PerReplica...)"): Keras 3 and MultiWorkerMirroredStrategy,
      keras-team/keras#20585;
    - under MirroredStrategy, with a validation dataset of unknown cardinality (records read from files) and
      `validation_steps`, the second epoch's validation pulls that batch from the cached, exhausted
      validation iterator and fit stops with StopIteration. No upstream issue found (searched the Keras and
      TensorFlow issues for `_maybe_symbolic_build`, StopIteration, MirroredStrategy, validation, second
      epoch); tests/test_keras_compat.py reproduces it with one device.
    The element spec gives the same shapes without a collective op and without touching the iterators; the
    model's `_maybe_symbolic_build` then does nothing.
    """
    check_version("build_before_fit")
    with strategy.scope():
        model._symbolic_build(data_batch=dataset.element_spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


@contextlib.contextmanager
def scalar_mean_across_workers(active: bool) -> Iterator[None]:
    """Within: Keras' step results under MultiWorkerMirroredStrategy are the mean over all replicas.

    Keras 3's TensorFlow trainer averages each step's per-replica logs in multi-worker mode with
    `strategy.reduce("MEAN", v, axis=0)`, which fails on the scalar losses and metrics ("Invalid
    reduction dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388, keras-team/keras#20585);
    `axis=None` is the mean over replicas. The module global `reduce_per_replica` of Keras' TensorFlow trainer
    is swapped for one doing that, and restored on leaving. Epoch logs, which the callbacks act on, come from
    the metrics' variables summed over every worker, not from these values.
    """
    if not active:
        yield
        return
    check_version("scalar_mean_across_workers")
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean"):
            return original(values, strategy, reduction)
        return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)

    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original


# ---------------------------------------------------------------------------------------------------------
# The optimizer's weight average (use_ema).


class SwapEMAAtEpochEnd(keras.callbacks.SwapEMAWeights):
    """Swaps the model's weights with the optimizer's average at each epoch's end (a pair brackets others).

    Keras' `SwapEMAWeights(swap_on_epoch=True)` (keras-team/keras#18978, from keras-team/keras#18949) puts the
    average in the model at an epoch's end and leaves it there until the next epoch begins, so a
    BackupAndRestore after it saves the two swapped (the average as the weights); two of these keep the swap
    around the callbacks between them only. Uses the private `_swap_variables`.
    """

    def __init__(self):
        check_version("SwapEMAAtEpochEnd")
        super().__init__()

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        self._swap_variables()

    def on_test_begin(self, logs=None):
        pass

    def on_test_end(self, logs=None):
        pass

    def on_predict_begin(self, logs=None):
        pass

    def on_predict_end(self, logs=None):
        pass


def ema_around_checkpoint(checkpoint, batchnorm: tuple | None = None) -> list:
    """The EMA callbacks and `checkpoint` in the one order that works; put them before BackupAndRestore.

    Keras calls the callbacks in list order, and the EMA wiring depends on it:
    1. `SwapEMAWeights()` swaps the average in for each validation and back out after it, so validation loss
       (and the plateau and early stopping that read it) sees the average;
    2. a `SwapEMAAtEpochEnd` puts the average in the model at the epoch's end,
    3. `checkpoint` (ModelCheckpoint) saves it as the best weights,
    4. a second `SwapEMAAtEpochEnd` puts the raw weights back,
    so that every later callback, BackupAndRestore above all, sees the raw weights with their average.

    `batchnorm`: the (validation, before checkpoint, after checkpoint) callbacks of
    `model.batchnorm.AveragedStatistics`, or None. The first comes after 1 (its statistics are recomputed
    from the averaged weights, which must be in the model by then), the second between 2 and 3, the third
    after 4.
    """
    if batchnorm is None:
        return [keras.callbacks.SwapEMAWeights(), SwapEMAAtEpochEnd(), checkpoint, SwapEMAAtEpochEnd()]
    at_validation, before, after = batchnorm
    return [
        keras.callbacks.SwapEMAWeights(),
        at_validation,
        SwapEMAAtEpochEnd(),
        before,
        checkpoint,
        SwapEMAAtEpochEnd(),
        after,
    ]


def average_into_optimizer(model) -> None:
    """Sets the optimizer's weight average to the model's weights (after loading averaged weights).

    Keras has no public way to set the average: `model.load_weights` leaves it at its old values and
    `optimizer.finalize_variable_values` copies the other way (average into the weights); see
    keras-team/keras#18949 on the EMA API. The private `SwapEMAWeights._finalize_ema_values` does it, under
    a strategy too.
    """
    check_version("average_into_optimizer")
    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap._finalize_ema_values()

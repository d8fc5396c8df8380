"""BatchNorm statistics for averaged weights (the idea of torch's SWA `update_bn`, written for Keras).

Keras' weight average (`use_ema`) covers the trainable variables only: BatchNormalization's moving mean and
variance are non-trainable, so after the average is swapped in they still describe the activations of the
last raw weights, not those of the averaged ones. `recompute` gives the averaged weights their own: a forward
pass in training mode over a few training batches, each BatchNormalization layer normalising with its batch's
statistics, and its moving mean and variance set to the mean over the batches of those per-batch statistics
(a cumulative average: batch k enters with momentum k / (k + 1), the first batch's statistics first).

Nothing else changes: no gradient is taken (no trainable variable moves) and the states of the model's
random generators (augmentation, dropout), which the training mode advances, are put back.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import keras
import numpy as np

SAMPLES = 2048  # the default number of samples (every training sample when fewer): see `default_batches`


def default_batches(train_samples: int, batch_size: int, samples: int = SAMPLES) -> int:
    """Batches of `batch_size` covering about `samples` training samples (all of them when fewer).

    A channel's mean over ~2,000 images is within about 2% of the images' spread of it (1 / sqrt(2048));
    torch's `update_bn` takes a whole epoch, which would cost a third of an epoch's training at every
    validation.
    """
    return max(1, -(-min(train_samples, samples) // max(1, batch_size)))


def layers_of(model) -> list:
    """The model's BatchNormalization layers whose statistics training updates (nested models included).

    A frozen layer (`trainable=False`) normalises with its moving statistics in training mode too: its
    statistics and its weights are not trained, so they are left as they are.
    """
    found, seen = [], set()

    def walk(parent):
        for layer in getattr(parent, "layers", []):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
                found.append(layer)
            walk(layer)  # a nested model (the backbone)

    walk(model)
    return found


def moving_variables(layers) -> list:
    """The moving mean and variance variables of each layer, in order (mean, variance, mean, ...)."""
    return [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]


def statistics(model) -> list[np.ndarray]:
    """The moving mean and variance of each of `layers_of(model)`, in that order (mean, variance, ...)."""
    return [np.array(keras.ops.convert_to_numpy(v), np.float32) for v in moving_variables(layers_of(model))]


def set_statistics(model, values: list[np.ndarray]) -> None:
    """Assigns `statistics(model)`-ordered values to the moving means and variances."""
    variables = moving_variables(layers_of(model))
    if len(variables) != len(values):
        raise ValueError(f"expected {len(variables)} arrays of BatchNorm statistics, got {len(values)}")
    for variable, value in zip(variables, values, strict=True):
        variable.assign(np.asarray(value, np.float32))


def _random_states(model) -> list:
    return [v for v in model.variables if "seed_generator_state" in v.path]


class Recompute:
    """Recomputes a model's BatchNorm statistics for the weights in it; traces its forward pass once."""

    def __init__(self, model):
        self.model = model
        self._forward = None
        self._traced_for: tuple[int, ...] = ()  # the layers the forward pass was traced with

    def _batch_statistics(self, images, layers):
        """One training-mode pass; every layer's batch mean and variance (its moving ones), as one vector."""
        self.model(images, training=True)
        parts = moving_variables(layers)
        return keras.ops.concatenate([keras.ops.reshape(keras.ops.cast(v, "float32"), (-1,)) for v in parts])

    def __call__(self, batches: Iterable, say: Callable[[str], None] | None = None) -> int:
        """Sets the moving statistics of `layers_of(model)` to the mean of their per-batch statistics.

        Args:
          batches: image batches (or (images, ...) tuples) as the model takes them in training.
          say: prints the one progress line (None: silent).

        Returns:
          the number of batches used (0: no batch or no such layer, nothing changed).
        """
        import tensorflow as tf

        model = self.model
        layers = layers_of(model)
        if not layers:
            return 0
        momenta = [layer.momentum for layer in layers]
        states = [(v, keras.ops.convert_to_numpy(v)) for v in _random_states(model)]
        before = statistics(model)
        total = np.zeros(sum(v.size for v in before), np.float64)
        start, count, samples = time.monotonic(), 0, 0
        try:
            for layer in layers:
                layer.momentum = 0.0  # a training-mode call leaves its batch's statistics in the layer
            if self._traced_for != tuple(map(id, layers)):  # traced with momentum 0, set again each call
                self._traced_for = tuple(map(id, layers))
                self._forward = tf.function(
                    lambda x: self._batch_statistics(x, layers), jit_compile=False, reduce_retracing=True
                )
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                total += self._forward(images).numpy()  # / count: the running mean, momentum k / (k + 1)
                count += 1
                samples += int(images.shape[0])
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum
            for variable, state in states:
                variable.assign(state)
        if count:
            ends = np.cumsum([v.size for v in before])[:-1]
            means = np.split(total / count, ends)
            set_statistics(model, [m.reshape(v.shape) for m, v in zip(means, before, strict=True)])
        if say is not None:
            say(
                f"BatchNorm statistics of the averaged weights: {len(layers)} layers recomputed over {count} "
                f"batches ({samples} samples) in {time.monotonic() - start:.1f} s"
            )
        return count


def recompute(model, batches: Iterable, say: Callable[[str], None] | None = None) -> int:
    """`Recompute(model)(batches, say)` once (see `Recompute`)."""
    return Recompute(model)(batches, say)


class AveragedStatistics:
    """The BatchNorm statistics of the averaged weights, in the model whenever the average is (`--ema`).

    `put_in` saves the raw weights' statistics and puts the average's in, recomputing them once per optimizer
    step (validation and the checkpoint of an epoch share one recompute); `take_out` restores the raw ones, so
    that training, and the backup, go on with the statistics of the raw weights. `callbacks` gives the three
    Keras callbacks that `keras_compat.ema_around_checkpoint` places around Keras' weight swaps.
    """

    def __init__(self, batches: Iterable, say: Callable[[str], None] | None = print):
        self.batches = batches
        self.say = say
        self.seconds: list[float] = []  # the cost of each recompute (the run's log says it too)
        self._recompute: Recompute | None = None
        self._raw: list[np.ndarray] | None = None
        self._averaged: tuple[int, list[np.ndarray]] | None = None  # (optimizer step, statistics)

    def put_in(self, model) -> None:
        if self._raw is not None:
            return
        self._raw = statistics(model)
        step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        if self._averaged is not None and self._averaged[0] == step:
            set_statistics(model, self._averaged[1])
            return
        if self._recompute is None or self._recompute.model is not model:
            self._recompute = Recompute(model)
        start = time.monotonic()
        self._recompute(self.batches, self.say)
        self.seconds.append(time.monotonic() - start)
        self._averaged = (step, statistics(model))

    def take_out(self, model) -> None:
        if self._raw is not None:
            set_statistics(model, self._raw)
            self._raw = None

    def callbacks(self) -> tuple:
        """(for each validation, before the best checkpoint, after it): put the list's order in place."""
        return _AtValidation(self), _AtEpochEnd(self, put_in=True), _AtEpochEnd(self, put_in=False)


class _AtValidation(keras.callbacks.Callback):
    """The average's statistics in for each validation (after Keras' SwapEMAWeights put the average in)."""

    def __init__(self, averaged: AveragedStatistics):
        super().__init__()
        self.averaged = averaged

    def on_test_begin(self, logs=None):
        self.averaged.put_in(self.model)

    def on_test_end(self, logs=None):
        self.averaged.take_out(self.model)


class _AtEpochEnd(keras.callbacks.Callback):
    """The average's statistics in (put_in) or out at an epoch's end: a pair brackets the checkpoint."""

    def __init__(self, averaged: AveragedStatistics, put_in: bool):
        super().__init__()
        self.averaged = averaged
        self.put_in = put_in

    def on_epoch_end(self, epoch, logs=None):
        if self.put_in:
            self.averaged.put_in(self.model)
        else:
            self.averaged.take_out(self.model)

"""model/replica_stats.py in one process; the averaging itself runs over logical CPU replicas
(test_replicas.py) and two loopback workers (test_workers.py)."""

from __future__ import annotations

import keras

from model import replica_stats


def test_moving_statistics_of_nested_and_frozen_batchnorm_layers():
    inner = keras.Sequential(
        [keras.layers.Dense(3), keras.layers.BatchNormalization(name="inner_bn")], name="inner"
    )
    frozen = keras.layers.BatchNormalization(name="frozen_bn")
    frozen.trainable = False  # never updates its statistics: nothing to average
    inputs = keras.Input((2,))
    x = keras.layers.BatchNormalization(name="top_bn")(inputs)
    outputs = frozen(inner(x))
    model = keras.Model(inputs, outputs)
    paths = [v.path for v in replica_stats.moving_statistics(model)]
    assert paths == [
        "top_bn/moving_mean",
        "top_bn/moving_variance",
        "inner/inner_bn/moving_mean",
        "inner/inner_bn/moving_variance",
    ]

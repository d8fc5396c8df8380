"""The augmentation layer stays on a GPU: every op of its training graph has a GPU kernel for the dtypes it
uses, and no such kernel keeps an image-sized tensor in host memory (model/gpu_kernels.py reads TensorFlow's
kernel registry, whose GPU kernels are registered in the pip build even on a machine without a GPU).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from model import augment
from model.gpu_kernels import gpu_problems

SHAPE = (2, 16, 16, 4)  # an image-sized tensor has at least 16 x 16 elements
def _graph(layer):
    fn = tf.function(lambda x: layer(x, training=True))
    return fn.get_concrete_function(tf.TensorSpec(SHAPE, tf.uint8)).graph


def test_every_op_of_the_augmentation_layer_has_a_device_memory_gpu_kernel(monkeypatch):
    monkeypatch.setattr(augment, "word_dtype", lambda: tf.float32)  # what a GPU host traces
    layer = augment.StainAugmentation(crop_size=8, intensity_jitter=0.1, seed=0)  # every branch
    graph = _graph(layer)
    types = {op.type for op in graph.get_operations()}
    assert {"ReverseV2", "Transpose", "SelectV2", "GatherV2", "Bitcast"} <= types  # the pixel moves are there
    assert gpu_problems(graph, SHAPE[1] * SHAPE[2]) == []

    # The check can fail: the int32 word (the CPU's) would run ReverseV2's host-memory GPU kernel.
    monkeypatch.setattr(augment, "word_dtype", lambda: tf.int32)
    problems = gpu_problems(_graph(augment.StainAugmentation(seed=0)), SHAPE[1] * SHAPE[2])
    assert problems and all(p.startswith("ReverseV2") for p in problems), problems


def test_the_float32_word_moves_every_byte_pattern_unchanged(monkeypatch):
    monkeypatch.setattr(augment, "word_dtype", lambda: tf.float32)
    # All 2**32 words cannot be listed; every byte value in every stain, and the NaN / infinity patterns.
    values = tf.range(256, dtype=tf.int32)
    grid = tf.stack([values, tf.roll(values, 1, 0), tf.roll(values, 7, 0), tf.roll(values, 100, 0)], -1)
    specials = tf.constant(
        [[0, 0, 0xC0, 0x7F], [1, 0, 0x80, 0x7F], [0xFF, 0xFF, 0xFF, 0xFF], [0, 0, 0x80, 0xFF]], tf.int32
    )
    pixels = tf.cast(tf.concat([grid, specials], 0), tf.uint8)  # [260, 4]
    images = tf.reshape(tf.tile(pixels, [4 * 260, 1]), [4, 260, 260, 4])  # every pattern in every position
    layer = augment.StainAugmentation(seed=1)
    words = images.numpy().view("<u4").reshape(4, -1)
    for _ in range(2):
        out = layer(images, training=True).numpy()
        assert not (out == images.numpy()).all()  # something moved
        np.testing.assert_array_equal(np.sort(out.view("<u4").reshape(4, -1), axis=1), np.sort(words, axis=1))


def test_the_lovasz_gradient_keeps_only_small_tensors_on_the_host():
    # Its int32 sort indices [B, classes] do run on host-memory GPU kernels (Neg, ...): small copies.
    from model import losses

    loss = losses.make_loss("focal_lovasz")

    def grad(y, p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            value = loss(y, p)
        return tape.gradient(value, p)

    spec = tf.TensorSpec([None, 28], tf.float32)
    graph = tf.function(grad).get_concrete_function(spec, spec).graph
    assert "BroadcastGradientArgs" in {op.type for op in graph.get_operations()}  # int32 shapes on the host
    assert gpu_problems(graph, 16 * 16) == []

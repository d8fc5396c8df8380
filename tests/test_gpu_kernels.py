"""The augmentation layer stays on a GPU: every op of its training graph has a GPU kernel for the dtypes it
uses, and no such kernel keeps an image-sized tensor in host memory.

Checked against TensorFlow's kernel registry (the GPU kernels are registered in the pip build even on a
machine without a GPU): `get_registered_kernels_for_op` gives each kernel's type constraints and its
`host_memory_arg`s, the arguments a GPU kernel reads or writes in host memory (the batch would cross the bus).
Kernels registered for DEVICE_DEFAULT (variable reads, some int32 shape ops) run on every device, a GPU too.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import kernels

from model import augment

SHAPE = (2, 16, 16, 4)  # an image-sized tensor has at least 16 x 16 elements
NO_KERNEL_NEEDED = {"Placeholder", "Const", "NoOp", "Identity", "VarHandleOp"}


def _arg_tensors(op, args, tensors) -> dict[str, list]:
    """{argument name: its tensors} for an op's input or output arguments (list arguments expanded)."""
    out, i = {}, 0
    for arg in args:
        if arg.number_attr:
            n = op.get_attr(arg.number_attr)
        elif arg.type_list_attr:
            n = len(op.get_attr(arg.type_list_attr))
        else:
            n = 1
        out[arg.name] = list(tensors[i : i + n])
        i += n
    return out


def _matches(kernel, op) -> bool:
    for c in kernel.constraint:
        try:
            value = op.get_attr(c.name)
        except ValueError:
            return False
        if tf.as_dtype(value).as_datatype_enum not in c.allowed_values.list.type:
            return False
    return True


def gpu_problems(graph, image_elements: int) -> list[str]:
    """Ops without a GPU kernel for their dtypes, or whose GPU kernel keeps image-sized data on the host."""
    problems = []
    for op in graph.get_operations():
        if op.type in NO_KERNEL_NEEDED:
            continue
        gpu = [
            k
            for k in kernels.get_registered_kernels_for_op(op.type).kernel
            if k.device_type in ("GPU", "DEFAULT")
        ]
        found = [k for k in gpu if _matches(k, op)]
        if not found:
            problems.append(f"{op.type} ({op.name}): no GPU kernel for its dtypes")
            continue
        args = _arg_tensors(op, op.op_def.input_arg, op.inputs)
        args.update(_arg_tensors(op, op.op_def.output_arg, op.outputs))
        for name in found[0].host_memory_arg:
            for t in args.get(name, []):
                if t.shape.is_fully_defined() and t.shape.num_elements() < image_elements:
                    continue
                problems.append(
                    f"{op.type} ({op.name}): GPU kernel keeps {name} {t.shape} {t.dtype.name} on host"
                )
    return problems


def _graph(layer):
    fn = tf.function(lambda x: layer(x, training=True))
    return fn.get_concrete_function(tf.TensorSpec(SHAPE, tf.uint8)).graph


def test_every_op_of_the_augmentation_layer_has_a_device_memory_gpu_kernel(monkeypatch):
    monkeypatch.setattr(augment, "word_dtype", lambda: tf.float32)  # what a GPU host traces
    layer = augment.StainAugmentation(crop_size=8, intensity_jitter=0.1, seed=0)
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

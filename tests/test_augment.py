"""Tests of model/augment.py: the on-device augmentation layer (per sample, seeded, identity at inference)."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import schemas
from model import augment
from model import data as data_lib
from model import model as model_lib
from model.config import DataConfig, ModelConfig
from tests.test_data import dihedral_np

SIZE = 12


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, schemas.NUM_STAINS), dtype=np.uint8)


def _which_transform(out: np.ndarray, image: np.ndarray) -> int:
    matches = [k for k in range(data_lib.NUM_DIHEDRAL) if np.array_equal(out, dihedral_np(image, k))]
    assert len(matches) == 1, "not one of the 8 symmetries of the stored image"
    return matches[0]


def test_transforms_are_drawn_per_sample_and_are_exactly_the_dihedral_set_of_tta():
    image = _image()
    layer = augment.StainAugmentation(seed=3)
    batch = np.repeat(image[None], 64, axis=0)
    out = keras.ops.convert_to_numpy(layer(batch, training=True))
    assert out.dtype == np.uint8 and out.shape == batch.shape
    drawn = [_which_transform(o, image) for o in out]
    assert set(drawn) == set(range(data_lib.NUM_DIHEDRAL))  # all 8 reachable, within one batch
    # data.dihedral (test-time augmentation) produces the same 8 images as the layer's coin flips.
    tta = {data_lib.dihedral(tf.constant(image), k).numpy().tobytes() for k in range(8)}
    assert {o.tobytes() for o in out} == tta
    again = keras.ops.convert_to_numpy(layer(batch, training=True))
    assert [_which_transform(o, image) for o in again] != drawn  # a new draw every step
    # Other dtypes / channel counts take the unpacked path: the same transforms.
    floats = keras.ops.convert_to_numpy(layer(batch[..., :3].astype(np.float32), training=True))
    assert all(_which_transform(o, image[..., :3].astype(np.float32)) >= 0 for o in floats)


def test_identity_at_inference_and_same_seed_same_draws():
    batch = np.stack([_image(i) for i in range(8)])
    layer = augment.StainAugmentation(crop_size=6, intensity_jitter=0.2, seed=1)
    for training in (False, None):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(batch, training=training)), batch)
    a = augment.StainAugmentation(seed=5)(batch, training=True)
    b = augment.StainAugmentation(seed=5)(batch, training=True)
    c = augment.StainAugmentation(seed=6)(batch, training=True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert augment.from_data_config(DataConfig(augment=False)) is None


def test_crop_per_sample_windows_and_jitter_keeps_uint8_per_stain():
    image = _image()
    batch = np.repeat(image[None], 32, axis=0)
    cropped = keras.ops.convert_to_numpy(
        augment.StainAugmentation(dihedral=False, crop_size=5, seed=0)(batch, training=True)
    )
    assert cropped.shape == (32, 5, 5, schemas.NUM_STAINS)
    windows = {
        image[y : y + 5, x : x + 5].tobytes(): (y, x) for y in range(SIZE - 4) for x in range(SIZE - 4)
    }
    offsets = [windows.get(c.tobytes()) for c in cropped]
    assert None not in offsets and len(set(offsets)) > 5  # each sample its own window

    jitter = augment.StainAugmentation(dihedral=False, intensity_jitter=0.3, seed=0)
    flat = np.full((16, 4, 4, schemas.NUM_STAINS), 200, np.uint8)
    out = keras.ops.convert_to_numpy(jitter(flat, training=True))
    assert out.dtype == np.uint8 and 140 <= out.min() and out.max() <= 255
    per_stain = out[:, 0, 0, :]
    assert (out == per_stain[:, None, None, :]).all()  # one factor per sample and stain
    assert len({tuple(p) for p in per_stain}) == 16


def test_layer_is_saved_in_model_keras_and_export_is_unchanged(tmp_path):
    mean, std = [10.0] * 4, [5.0] * 4
    cfg = ModelConfig(backbone="small", weights="none", small_filters=4)
    layer = augment.from_data_config(DataConfig(crop_size=8, intensity_jitter=0.1, seed=2))
    model = model_lib.build_model(cfg, mean, std, augmentation=layer)
    plain = model_lib.build_model(cfg, mean, std)
    for src in plain.layers:  # the same weights without the augmentation layer
        if src.weights:
            src.set_weights(model.get_layer(src.name).get_weights())
    images = np.stack([_image(i) for i in range(3)])
    expected = plain.predict_on_batch(images)
    np.testing.assert_allclose(model.predict_on_batch(images), expected, rtol=1e-5, atol=1e-6)

    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    got = reloaded.get_layer(augment.AUGMENTATION_NAME)
    assert isinstance(got, augment.StainAugmentation)
    assert (got.crop_size, got.intensity_jitter, got.seed, got.dihedral) == (8, 0.1, 2, True)
    np.testing.assert_allclose(reloaded.predict_on_batch(images), expected, rtol=1e-5, atol=1e-6)

    export = os.path.join(tmp_path, "export")
    model_lib.export_serving(model, export, SIZE)
    records = []
    for i, img in enumerate(images):
        sample = schemas.Sample(
            id=f"x{i}",
            images={s: tf.io.encode_png(img[:, :, k : k + 1]).numpy() for k, s in enumerate(schemas.STAINS)},
            height=SIZE,
            width=SIZE,
            labels=np.zeros(schemas.NUM_CLASSES, np.int64),
            fold=0,
            source="train",
        )
        records.append(schemas.to_example(sample).SerializeToString())
    served = tf.saved_model.load(export).signatures[model_lib.SERVING_SIGNATURE](
        **{model_lib.SERVING_INPUT: tf.constant(records)}
    )
    np.testing.assert_allclose(served[model_lib.PROBABILITIES].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert model(images, training=True).shape == (3, schemas.NUM_CLASSES)  # trains on 8 px crops


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop_size"):
        augment.StainAugmentation(crop_size=0)
    with pytest.raises(ValueError, match="intensity_jitter"):
        augment.StainAugmentation(intensity_jitter=1.0)

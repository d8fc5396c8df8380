"""Tests of model/model.py (network, weight adaptation, export) and model/losses.py."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import schemas
from model import losses
from model import model as model_lib
from model.config import ConfigError, DataConfig, ModelConfig, tta_transforms
from model.data import make_eval_dataset
from tests.test_data import write_dataset

MEAN = [100.0, 90.0, 80.0, 70.0]
STD = [50.0, 40.0, 30.0, 20.0]
SMALL = ModelConfig(backbone="small", weights="none", small_filters=4)


def _images(n=3, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, schemas.NUM_STAINS), dtype=np.uint8)


def test_stain_normalization_uses_the_manifest_statistics():
    layer = model_lib.StainNormalization(MEAN, STD)
    x = _images()
    np.testing.assert_allclose(layer(x).numpy(), (x - np.array(MEAN)) / np.array(STD), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="std"):
        model_lib.StainNormalization(MEAN, [1.0, 0.0, 1.0, 1.0])


def test_model_takes_uint8_and_returns_28_probabilities_in_float32_under_mixed_precision():
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model = model_lib.build_model(SMALL, MEAN, STD)
        out = model(_images(), training=False)
        assert model.input.dtype == "uint8"
        assert model.get_layer("backbone").layers[1].compute_dtype == "float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.float32 and out.shape == (3, schemas.NUM_CLASSES)
    assert np.all((out.numpy() >= 0) & (out.numpy() <= 1))


def test_adapt_first_conv_keeps_rgb_and_adds_their_mean():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 5)).astype(np.float32)
    out = model_lib.adapt_first_conv(kernel)
    assert out.shape == (3, 3, 4, 5)
    np.testing.assert_array_equal(out[:, :, :3], kernel)
    np.testing.assert_allclose(out[:, :, 3], kernel.mean(axis=2), rtol=1e-6)
    with pytest.raises(ValueError):
        model_lib.adapt_first_conv(np.zeros((3, 3, 4, 5)))


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_weights_from_a_saved_three_channel_backbone_are_adapted_to_four_stains(tmp_path, suffix):
    # A small trained-looking 3-channel backbone stands in for ImageNet weights (no download here).
    source = model_lib.small_backbone(channels=3, filters=4)
    rng = np.random.default_rng(1)
    for w in source.weights:
        w.assign(rng.normal(size=w.shape).astype(np.float32) * 0.1 + (1.0 if "variance" in w.path else 0.0))
    path = str(tmp_path / f"rgb{suffix}")
    source.save(path) if suffix == ".keras" else source.save_weights(path)

    model = model_lib.build_model(ModelConfig(backbone="small", weights=path, small_filters=4), MEAN, STD)
    backbone = model.get_layer(model_lib.BACKBONE_NAME)
    for s, d in zip(source.weights, backbone.weights, strict=True):
        if s.shape == d.shape:
            np.testing.assert_array_equal(s.numpy(), d.numpy())
    # Functional check: with the yellow stain at zero, the 4-channel backbone computes the RGB model.
    rgb = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    four = np.concatenate([rgb, np.zeros((2, 16, 16, 1), np.float32)], axis=-1)
    np.testing.assert_allclose(backbone(four).numpy(), source(rgb).numpy(), rtol=1e-4, atol=1e-4)
    kernel = backbone.get_layer("block0_conv").kernel.numpy()
    np.testing.assert_allclose(kernel[:, :, 3], kernel[:, :, :3].mean(axis=2), rtol=1e-5)


def test_weights_of_another_architecture_or_a_missing_file_are_rejected(tmp_path):
    other = model_lib.small_backbone(channels=3, filters=8)
    path = str(tmp_path / "other.keras")
    other.save(path)
    with pytest.raises(ConfigError, match="shape"):
        model_lib.build_model(ModelConfig(backbone="small", weights=path, small_filters=4), MEAN, STD)
    with pytest.raises(ConfigError, match="no such file"):
        model_lib.build_model(ModelConfig(backbone="small", weights=str(tmp_path / "nope.keras")), MEAN, STD)


def test_keras_application_backbone_gets_four_channels():
    backbone = model_lib.build_backbone("efficientnetv2b0", schemas.NUM_STAINS)
    assert backbone.input_shape == (None, None, None, schemas.NUM_STAINS)


def test_export_signature_matches_the_keras_model_and_the_model_file_reloads(tmp_path):
    root = str(tmp_path / "data")
    write_dataset(root, per_fold=(5,), shards_per_fold=1)
    model = model_lib.build_model(SMALL, MEAN, STD)
    export_dir = model_lib.export_serving(model, str(tmp_path / "export"), 16)

    serialized = [
        r.numpy() for r in tf.data.TFRecordDataset(tf.io.gfile.glob(schemas.shard_pattern(root, 0)))
    ]
    served = tf.saved_model.load(export_dir).signatures[model_lib.SERVING_SIGNATURE](
        **{model_lib.SERVING_INPUT: tf.constant(serialized)}
    )
    ids, _, scores = model_lib.predict_with_ids(
        model, make_eval_dataset(root, [0], DataConfig(), with_ids=True)
    )
    served_ids = [i.decode() for i in served[schemas.ID_KEY].numpy()]
    order = [served_ids.index(i) for i in ids]
    np.testing.assert_allclose(served[model_lib.PROBABILITIES].numpy()[order], scores, rtol=1e-5, atol=1e-6)

    model.save(str(tmp_path / "m.keras"))
    reloaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    x = _images(2)
    np.testing.assert_allclose(reloaded.predict_on_batch(x), model.predict_on_batch(x), rtol=1e-6)


def test_predict_with_ids_averages_the_requested_test_time_transforms(tmp_path):
    root = str(tmp_path / "data")
    write_dataset(root, per_fold=(4,), shards_per_fold=1)
    model = model_lib.build_model(SMALL, MEAN, STD)
    ds = make_eval_dataset(root, [0], DataConfig(), with_ids=True)
    images = np.concatenate([x.numpy() for x, _, _ in ds])
    _, _, plain = model_lib.predict_with_ids(model, ds)
    _, _, flips = model_lib.predict_with_ids(model, ds, transforms=tta_transforms(2))
    flipped = images[:, :, ::-1, :].copy()  # dihedral(k=4): a left-right flip
    expected = (model.predict_on_batch(images) + model.predict_on_batch(flipped)) / 2
    np.testing.assert_allclose(plain, model.predict_on_batch(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flips, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(flips, plain)  # the random small net is not flip-invariant


def test_class_factors_and_sample_repeats():
    counts = np.zeros(schemas.NUM_CLASSES)
    counts[:3] = [400, 100, 4]
    f = losses.class_factors(counts, power=0.5, max_factor=4.0)
    np.testing.assert_allclose(f[:3], [1.0, 2.0, 4.0])  # (400/4) ** 0.5 = 10 is clipped to 4
    assert np.all(f[3:] == 1.0)
    assert np.all(losses.class_factors(counts, power=0.0) == 1.0)
    labels = np.zeros((3, schemas.NUM_CLASSES))
    labels[0, [0, 2]] = 1
    labels[1, 1] = 1
    np.testing.assert_allclose(losses.sample_repeats(labels, f), [4.0, 2.0, 1.0])
    with pytest.raises(ValueError):
        losses.class_factors(np.ones(3))


def test_losses_bce_matches_keras_and_focal_downweights_easy_examples():
    rng = np.random.default_rng(0)
    y = (rng.random((8, schemas.NUM_CLASSES)) < 0.2).astype(np.float32)
    p = rng.uniform(0.01, 0.99, (8, schemas.NUM_CLASSES)).astype(np.float32)
    bce = float(losses.make_loss("bce")(y, p))
    assert bce == pytest.approx(float(keras.losses.BinaryCrossentropy()(y, p)), rel=1e-5)
    assert float(losses.make_loss("focal", gamma=0.0)(y, p)) == pytest.approx(bce, rel=1e-5)
    easy, hard = np.full_like(p, 0.05), np.full_like(p, 0.95)
    zeros = np.zeros_like(y)
    ratio_focal = float(losses.make_loss("focal")(zeros, hard)) / float(
        losses.make_loss("focal")(zeros, easy)
    )
    ratio_bce = float(losses.make_loss("bce")(zeros, hard)) / float(losses.make_loss("bce")(zeros, easy))
    assert ratio_focal > 10 * ratio_bce
    weights = np.ones(schemas.NUM_CLASSES, np.float32)
    weights[5] = 3.0
    y1 = np.zeros((1, schemas.NUM_CLASSES), np.float32)
    y1[0, 5] = 1
    p1 = np.full((1, schemas.NUM_CLASSES), 0.5, np.float32)
    plain = float(losses.make_loss("bce")(y1, p1))
    weighted = float(losses.make_loss("bce", positive_weights=weights)(y1, p1))
    assert weighted == pytest.approx(plain + 2 * np.log(2) / schemas.NUM_CLASSES, rel=1e-5)

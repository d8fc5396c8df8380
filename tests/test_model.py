"""Tests of model/model.py (network, weight adaptation, export) and model/losses.py."""

from __future__ import annotations

import dataclasses
import urllib.error

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.utils import file_utils as keras_file_utils  # where keras.utils.get_file downloads

import schemas
from model import losses
from model import model as model_lib
from model.config import BACKBONES, ConfigError, DataConfig, ModelConfig, resolve_input_norm, tta_transforms
from model.data import make_eval_dataset
from tests.test_data import write_dataset

MEAN = [100.0, 90.0, 80.0, 70.0]
STD = [50.0, 40.0, 30.0, 20.0]
SMALL = ModelConfig(backbone="small", weights="none", small_filters=4)
RGB = [schemas.STAINS.index(s) for s in schemas.RGB_STAINS]
YELLOW = [i for i in range(schemas.NUM_STAINS) if i not in RGB]
# A keras.applications model of each family as its ImageNet weights are used in Keras, and the preprocessing
# Keras documents for it (EfficientNetV2's is built into the model: include_preprocessing=True).
FAMILIES = {
    "resnet50": (keras.applications.ResNet50, {}, keras.applications.resnet50.preprocess_input),
    "densenet121": (keras.applications.DenseNet121, {}, keras.applications.densenet.preprocess_input),
    "efficientnetv2b0": (
        keras.applications.EfficientNetV2B0,
        {"include_preprocessing": True},
        keras.applications.efficientnet_v2.preprocess_input,
    ),
}


def _keras_application(backbone: str) -> keras.Model:
    fn, extra, _ = FAMILIES[backbone]
    return fn(include_top=False, weights=None, input_shape=(None, None, 3), **extra)


def _first_kernel(model: keras.Model) -> np.ndarray:
    return next(w.numpy() for w in model.weights if len(w.shape) == 4)


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


@pytest.mark.parametrize(
    "backbone,suffix",
    [
        ("small", ".keras"),
        ("small", ".weights.h5"),
        ("resnet50", ".weights.h5"),
        ("densenet121", ".weights.h5"),
        ("efficientnetv2b0", ".weights.h5"),
    ],
)
def test_weights_from_a_saved_three_channel_backbone_are_adapted_to_four_stains(tmp_path, backbone, suffix):
    rng = np.random.default_rng(1)
    if backbone == "small":
        # A small trained-looking 3-channel backbone (random kernels as initialised, random batch norm), fed
        # z-scored stains as the small backbone always is.
        source = model_lib.small_backbone(channels=3, filters=4)
        for w in source.weights:
            if len(w.shape) == 1:
                noise = rng.normal(size=w.shape).astype(np.float32) * 0.1
                w.assign(np.abs(noise) + 1.0 if "variance" in w.path or "gamma" in w.path else noise)

        def preprocess(rgb):
            return (rgb - np.array(MEAN)[RGB]) / np.array(STD)[RGB]

        cfg = ModelConfig(backbone="small", small_filters=4)
    else:
        # The keras.applications model its ImageNet weights go with (random weights stand in for them).
        source = _keras_application(backbone)
        preprocess = FAMILIES[backbone][2]
        cfg = ModelConfig(backbone=backbone)
    path = str(tmp_path / f"rgb{suffix}")
    source.save(path) if suffix == ".keras" else source.save_weights(path)

    model = model_lib.build_model(dataclasses.replace(cfg, weights=path), MEAN, STD)
    backbone_layer = model.get_layer(model_lib.BACKBONE_NAME)
    for s, d in zip(source.weights, backbone_layer.weights, strict=True):
        if s.shape == d.shape:
            np.testing.assert_array_equal(s.numpy(), d.numpy())
    kernel = _first_kernel(backbone_layer)
    np.testing.assert_allclose(kernel[:, :, 3], kernel[:, :, :3].mean(axis=2), rtol=1e-5, atol=1e-7)

    # Functional check: on stains with yellow = 0, the 4-channel model (its normalisation, then the backbone)
    # computes the 3-channel model on Keras' preprocessing of the RGB composite. (z-scored, the yellow that
    # adds nothing is the dataset's yellow mean.)
    stains = rng.integers(0, 256, (2, 32, 32, schemas.NUM_STAINS), dtype=np.uint8)
    stains[..., YELLOW] = np.array(MEAN)[YELLOW] if backbone == "small" else 0
    rgb = stains[..., RGB].astype(np.float32)

    def four_channel(x):
        return backbone_layer(model.get_layer(model_lib.NORMALIZATION_NAME)(x)).numpy()

    expected = source(preprocess(rgb.copy())).numpy()  # preprocess_input works in place: copies
    atol = 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(four_channel(stains), expected, rtol=1e-4, atol=atol)
    # The check can fail: the composite in reversed channel order gives another result; yellow counts.
    assert np.abs(source(preprocess(rgb[..., ::-1].copy())).numpy() - expected).max() > 100 * atol
    stains[..., YELLOW] = 200
    assert np.abs(four_channel(stains) - expected).max() > 100 * atol


@pytest.mark.parametrize(
    "backbone,preprocess,yellow_scale",
    [
        ("resnet50", keras.applications.resnet50.preprocess_input, 1.0),  # caffe: 0..255 units
        (
            "densenet121",
            keras.applications.densenet.preprocess_input,
            1 / (255 * np.mean([0.229, 0.224, 0.225])),
        ),
    ],
)
def test_imagenet_normalisation_is_keras_preprocess_input_and_yellow_in_the_same_units(
    tmp_path, backbone, preprocess, yellow_scale
):
    layer = model_lib.input_normalization(resolve_input_norm(ModelConfig(backbone=backbone)), MEAN, STD)
    x = _images(size=8)
    out = layer(x).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[..., :3], preprocess(x[..., RGB].astype(np.float32)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[..., 3], x[..., YELLOW[0]] * yellow_scale, rtol=1e-6)  # no offset

    # Under mixed precision: computed in float32, then cast once.
    mixed = model_lib.StainNormalization.from_config({**layer.get_config(), "dtype": "mixed_bfloat16"})
    y = mixed(x)
    assert y.dtype == tf.bfloat16
    np.testing.assert_array_equal(y.numpy(), tf.cast(out, tf.bfloat16).numpy())

    # Kept in model.keras.
    inputs = keras.Input((None, None, schemas.NUM_STAINS), dtype="uint8")
    path = str(tmp_path / "norm.keras")
    keras.Model(inputs, layer(inputs)).save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded.predict_on_batch(x), out, rtol=1e-6)
    assert reloaded.layers[-1].get_config()["mode"] == layer.mode


def test_efficientnetv2_s_m_l_normalisation_is_their_builtin_preprocessing():
    reference = keras.applications.EfficientNetV2S(
        include_top=False, weights=None, input_shape=(None, None, 3), include_preprocessing=True
    )
    builtin = keras.Model(reference.input, reference.get_layer("stem_conv").input)  # Keras' preprocessing
    layer = model_lib.input_normalization(
        resolve_input_norm(ModelConfig(backbone="efficientnetv2s")), MEAN, STD
    )
    x = _images(size=8)
    out = layer(x).numpy()
    np.testing.assert_allclose(out[..., :3], builtin(x[..., RGB].astype(np.float32)).numpy(), atol=1e-6)
    np.testing.assert_allclose(out[..., 3], x[..., YELLOW[0]] / 128.0, rtol=1e-6)


def test_a_project_model_trained_on_other_inputs_is_refused_as_weights(tmp_path):
    inputs = keras.Input((None, None, schemas.NUM_STAINS), dtype="uint8")
    x = model_lib.input_normalization("caffe", MEAN, STD)(inputs)
    x = model_lib.small_backbone(schemas.NUM_STAINS, 4)(x)
    path = str(tmp_path / "caffe.keras")
    keras.Model(inputs, x).save(path)
    with pytest.raises(ConfigError, match="trained on caffe inputs, this run would feed zscore"):
        model_lib.build_model(ModelConfig(backbone="small", weights=path, small_filters=4), MEAN, STD)


def go_offline(monkeypatch, home) -> list[str]:
    """An empty Keras cache in KERAS_HOME=home and downloads failing as without network: the URLs tried."""
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    tried = []

    def no_network(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(keras_file_utils, "urlretrieve", no_network)
    return tried


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """(KERAS_HOME, URLs tried) of `go_offline`."""
    home = tmp_path / "keras_home"
    return home, go_offline(monkeypatch, home)


def test_imagenet_weights_not_cached_and_not_downloadable_give_one_clear_line(offline):
    home, tried = offline
    fname, url, _ = model_lib.imagenet_weights_file("densenet121")
    with pytest.raises(ConfigError) as info:
        model_lib.build_model(ModelConfig(backbone="densenet121", weights="imagenet"), MEAN, STD)
    message = str(info.value)
    assert "\n" not in message
    for part in (fname, url, f"KERAS_HOME={home}", "--weights PATH", "Temporary failure in name resolution"):
        assert part in message
    assert tried == [url]  # one attempt, at the file's URL


def test_imagenet_weights_in_the_keras_cache_are_used_without_a_download(offline, monkeypatch):
    home, tried = offline
    fname, url, _ = model_lib.imagenet_weights_file("resnet50")
    cached = _keras_application("resnet50")  # random weights stand in for ImageNet's
    (home / "models").mkdir()
    cached.save(str(home / "models" / fname))  # the legacy HDF5 format of Keras' weight files

    model = model_lib.build_model(ModelConfig(backbone="resnet50", weights="imagenet"), MEAN, STD)
    assert tried == []
    backbone = model.get_layer(model_lib.BACKBONE_NAME)
    for s, d in zip(cached.weights, backbone.weights, strict=True):
        expected = s.numpy() if s.shape == d.shape else model_lib.adapt_first_conv(s.numpy())
        np.testing.assert_array_equal(d.numpy(), expected)

    # keras.applications asks for the same file and URL for its ImageNet weights.
    asked = []

    def get_file(fname, origin, **kwargs):
        asked.append((fname, origin, kwargs.get("file_hash")))
        return str(home / "models" / fname)

    monkeypatch.setattr(keras_file_utils, "get_file", get_file)
    keras_resnet = keras.applications.ResNet50(
        include_top=False, weights="imagenet", input_shape=(None, None, 3)
    )
    assert asked == [model_lib.imagenet_weights_file("resnet50")]
    np.testing.assert_array_equal(_first_kernel(keras_resnet), _first_kernel(cached))


@pytest.mark.parametrize("backbone", ["densenet121", "efficientnetv2b0"])
def test_imagenet_weight_files_are_the_ones_keras_applications_load(backbone, monkeypatch):
    asked = []

    class Asked(Exception):
        pass

    def get_file(fname, origin, **kwargs):
        asked.append((fname, origin, kwargs.get("file_hash")))
        raise Asked

    monkeypatch.setattr(keras_file_utils, "get_file", get_file)
    with pytest.raises(Asked):
        model_lib.build_backbone(backbone, 3, "imagenet")
    assert asked == [model_lib.imagenet_weights_file(backbone)]
    if backbone.startswith("efficientnetv2"):  # the other variants: same rule, Keras' names and hashes
        from keras.src.applications import efficientnet_v2

        for name in (b for b in BACKBONES if b.startswith("efficientnetv2")):
            variant = name[len("efficientnetv2") :]
            fname, url, file_hash = model_lib.imagenet_weights_file(name)
            assert fname == f"efficientnetv2-{variant}_notop.h5"
            assert url == efficientnet_v2.BASE_WEIGHTS_PATH + fname
            assert (
                file_hash
                == efficientnet_v2.WEIGHTS_HASHES[variant if variant[0] == "b" else f"-{variant}"][1]
            )


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

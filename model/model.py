"""The Keras model: uint8 four-stain images in, 28 sigmoid probabilities out.

`build_model(cfg, mean, std)` stacks: a normalisation layer (cast to float, subtract the preprocessing job's
per-stain mean, divide by its std, so the accelerator receives uint8), a `keras.applications` backbone with
four input channels (or a small CNN for CPU runs and tests), global average pooling, dropout and a float32
sigmoid classifier (kept in float32 under mixed precision).

Pretrained weights come from a three-channel copy of the backbone (ImageNet, or a saved file): every
weight is copied as is, except the first convolution's kernel, which keeps its RGB kernels for the red,
green and blue stains and gets their mean for yellow (`adapt_first_conv`, `transfer_weights`).

`export_serving` writes a SavedModel whose `serving_default` signature takes serialized tf.Examples in the
schema and returns the probabilities (and the ids); `predict_with_ids` scores a `make_eval_dataset(...,
with_ids=True)` dataset.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

import schemas
from model import augment as _augment  # noqa: F401 - registers the augmentation layer for loading
from model.config import WEIGHTS_IMAGENET, WEIGHTS_NONE, ConfigError, ModelConfig

SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "examples"
PROBABILITIES = "probabilities"
BACKBONE_NAME = "backbone"

_APPLICATIONS = {
    "resnet50": ("ResNet50", {}),
    "densenet121": ("DenseNet121", {}),
    "efficientnetv2b0": ("EfficientNetV2B0", {"include_preprocessing": False}),
    "efficientnetv2b1": ("EfficientNetV2B1", {"include_preprocessing": False}),
    "efficientnetv2b2": ("EfficientNetV2B2", {"include_preprocessing": False}),
    "efficientnetv2b3": ("EfficientNetV2B3", {"include_preprocessing": False}),
    "efficientnetv2s": ("EfficientNetV2S", {"include_preprocessing": False}),
    "efficientnetv2m": ("EfficientNetV2M", {"include_preprocessing": False}),
    "efficientnetv2l": ("EfficientNetV2L", {"include_preprocessing": False}),
}


@keras.saving.register_keras_serializable(package="hpa")
class StainNormalization(layers.Layer):
    """uint8 (or any numeric) stains -> (x - mean) / std per stain, computed in float32."""

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        x = (x - ops.convert_to_tensor(self.mean, "float32")) / ops.convert_to_tensor(self.std, "float32")
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mean=self.mean, std=self.std)
        return config


def small_backbone(
    channels: int = schemas.NUM_STAINS, filters: int = 16, name: str = BACKBONE_NAME
) -> keras.Model:
    """A small CNN (4 conv-BN-ReLU blocks, pooling) for CPU runs and tests; input [None, None, channels]."""
    inputs = keras.Input((None, None, channels), name="image")
    x = inputs
    for i in range(4):
        x = layers.Conv2D(filters * 2**i, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.Activation("relu", name=f"block{i}_relu")(x)
        if i < 3:
            x = layers.MaxPooling2D(2, padding="same", name=f"block{i}_pool")(x)
    return keras.Model(inputs, x, name=name)


def build_backbone(
    name: str, channels: int, weights: str | None = None, small_filters: int = 16
) -> keras.Model:
    """A headless backbone taking [None, None, channels] inputs.

    Args:
      name: one of config.BACKBONES.
      channels: input channels (3 for an ImageNet source, 4 for the stains).
      weights: None or `imagenet` (keras.applications downloads them; only with 3 channels).
      small_filters: width of the `small` backbone.
    """
    if name == "small":
        if weights not in (None, WEIGHTS_NONE):
            raise ConfigError("the small backbone has no ImageNet weights; use --weights none or a file")
        return small_backbone(channels, small_filters)
    if name not in _APPLICATIONS:
        raise ConfigError(f"unknown backbone {name!r}")
    fn_name, extra = _APPLICATIONS[name]
    fn = getattr(keras.applications, fn_name)
    with warnings.catch_warnings():  # keras.applications warns about 4 channels: adapting them is the point
        warnings.filterwarnings("ignore", message="This model usually expects")
        model = fn(include_top=False, weights=weights, input_shape=(None, None, channels), **extra)
    return keras.Model(model.inputs, model.outputs, name=BACKBONE_NAME)


def adapt_first_conv(kernel: np.ndarray, channels: int = schemas.NUM_STAINS) -> np.ndarray:
    """Kernel [kh, kw, 3, out] -> [kh, kw, channels, out]: RGB kernels kept, extra channels = their mean."""
    kernel = np.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"expected a [kh, kw, 3, out] kernel, got shape {kernel.shape}")
    extra = np.repeat(kernel.mean(axis=2, keepdims=True), channels - 3, axis=2)
    return np.concatenate([kernel, extra], axis=2).astype(kernel.dtype)


def transfer_weights(source: keras.Model, target: keras.Model) -> int:
    """Copies the weights of `source` into `target` (same architecture), adapting 3 -> 4 input channels.

    Weights are matched in order; a 4-D kernel whose input-channel axis is 3 in the source and 4 in the
    target is adapted with `adapt_first_conv`. Returns the number of kernels adapted.

    Raises:
      ConfigError: the two models differ in any other way.
    """
    src, dst = source.weights, target.weights
    if len(src) != len(dst):
        raise ConfigError(
            f"pretrained model has {len(src)} weights, {target.name} has {len(dst)}: "
            "not the same architecture"
        )
    adapted = 0
    values = []
    for s, d in zip(src, dst, strict=True):
        value = np.asarray(s.numpy() if hasattr(s, "numpy") else s)
        if tuple(value.shape) != tuple(d.shape):
            if value.ndim == 4 and value.shape[2] == 3 and d.shape[2] == schemas.NUM_STAINS:
                value = adapt_first_conv(value, schemas.NUM_STAINS)
                adapted += 1
            if tuple(value.shape) != tuple(d.shape):
                raise ConfigError(
                    f"pretrained weight {s.path} has shape {value.shape}, expected {tuple(d.shape)}"
                )
        values.append(value)
    for d, v in zip(dst, values, strict=True):
        d.assign(v)
    return adapted


def _load_weights_source(cfg: ModelConfig) -> keras.Model:
    """The pretrained backbone named by cfg.weights (imagenet, or a .keras / .weights.h5 file)."""
    if cfg.weights == WEIGHTS_IMAGENET:
        return build_backbone(cfg.backbone, 3, WEIGHTS_IMAGENET, cfg.small_filters)
    path = cfg.weights
    if not tf.io.gfile.exists(path):
        raise ConfigError(f"--weights {path!r}: no such file (use imagenet, none, or a saved backbone)")
    if path.endswith(".weights.h5"):
        for channels in (3, schemas.NUM_STAINS):
            source = build_backbone(cfg.backbone, channels, None, cfg.small_filters)
            try:
                source.load_weights(_local_copy(path))
                return source
            except ValueError:
                continue
        raise ConfigError(f"--weights {path}: weights do not fit a 3- or 4-channel {cfg.backbone} backbone")
    try:
        loaded = keras.saving.load_model(_local_copy(path), compile=False)
    except Exception as e:  # noqa: BLE001 - any loading failure is a bad --weights file
        raise ConfigError(f"--weights {path}: cannot load it as a Keras model ({e})") from e
    try:
        return loaded.get_layer(BACKBONE_NAME)  # a full model of this project: take its backbone
    except ValueError:
        return loaded


def _local_copy(path: str) -> str:
    """Keras loads some formats only from local files: copy a remote (gs://) file to a temp dir."""
    if "://" not in path:
        return path
    local = os.path.join(tempfile.mkdtemp(prefix="hpa-weights-"), os.path.basename(path))
    tf.io.gfile.copy(path, local, overwrite=True)
    return local


def build_model(cfg: ModelConfig, mean, std, augmentation: keras.layers.Layer | None = None) -> keras.Model:
    """The classifier: uint8 [B, H, W, NUM_STAINS] -> float32 probabilities [B, NUM_CLASSES].

    Args:
      cfg: backbone, weights, dropout.
      mean, std: per-stain pixel statistics (STAINS order, 0..255 units) from the manifest.
      augmentation: a first layer active in training only (`model.augment.from_data_config`), or None.

    Layers follow the global Keras dtype policy (set it before calling); the classifier stays float32.
    """
    backbone = build_backbone(cfg.backbone, schemas.NUM_STAINS, None, cfg.small_filters)
    if cfg.weights != WEIGHTS_NONE:
        source = _load_weights_source(cfg)
        transfer_weights(source, backbone)
    inputs = keras.Input((None, None, schemas.NUM_STAINS), dtype="uint8", name="image")
    x = inputs if augmentation is None else augmentation(inputs)
    x = StainNormalization(mean, std, name="stain_normalization")(x)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(cfg.dropout, name="dropout")(x)
    outputs = layers.Dense(schemas.NUM_CLASSES, activation="sigmoid", dtype="float32", name=PROBABILITIES)(x)
    return keras.Model(inputs, outputs, name=f"hpa_{cfg.backbone}")


def serving_fn(model: keras.Model, image_size: int):
    """A function serialized tf.Examples [N] -> {PROBABILITIES: float32 [N, NUM_CLASSES], ID_KEY: ids [N]}."""
    image_spec = tf.TensorSpec([image_size, image_size, schemas.NUM_STAINS], tf.uint8)

    def serve(examples):
        features = schemas.parse_example(examples)
        encoded = {schemas.IMAGE_KEYS[s]: features[schemas.IMAGE_KEYS[s]] for s in schemas.STAINS}
        images = tf.map_fn(
            lambda f: schemas.decode_stains(f, image_size), encoded, fn_output_signature=image_spec
        )
        probabilities = tf.cast(model(images, training=False), tf.float32)
        return {PROBABILITIES: probabilities, schemas.ID_KEY: features[schemas.ID_KEY]}

    return serve


def export_serving(model: keras.Model, export_dir: str, image_size: int) -> str:
    """Writes a SavedModel whose `serving_default` signature maps serialized tf.Examples to probabilities.

    Returns export_dir (local or gs://).
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SERVING_SIGNATURE,
        fn=serving_fn(model, image_size),
        input_signature=[tf.TensorSpec([None], tf.string, name=SERVING_INPUT)],
    )
    archive.write_out(export_dir, verbose=False)
    return export_dir


def tta_average(predict, images, transforms: Sequence[int] = (0,)) -> np.ndarray:
    """Mean of `predict(dihedral(images, k))` over the transforms k (`model.data.tta_transforms(n)`).

    Args:
      predict: images [B, H, W, C] -> probabilities [B, NUM_CLASSES] (e.g. `model.predict_on_batch`).
      images: a batch of images (tensor or array).
      transforms: `model.data.dihedral` indices.

    Returns:
      float64 [B, NUM_CLASSES] averaged probabilities.
    """
    from model.data import dihedral

    total = None
    for k in transforms:
        p = np.asarray(predict(dihedral(images, k)), dtype=np.float64)
        total = p if total is None else total + p
    return total / len(transforms)


def predict_with_ids(
    model: keras.Model, dataset: tf.data.Dataset, transforms: Sequence[int] = (0,)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores a dataset of (images, labels, ids) batches, averaged over test-time `transforms`.

    Returns:
      (ids as str [N], labels float32 [N, NUM_CLASSES], scores float32 [N, NUM_CLASSES]) in dataset order.
    """
    ids, labels, scores = [], [], []
    for images, y, batch_ids in dataset:
        scores.append(tta_average(model.predict_on_batch, images, transforms).astype(np.float32))
        labels.append(y.numpy().astype(np.float32))
        ids.extend(i.decode("utf-8") for i in batch_ids.numpy())
    if not scores:
        empty = np.zeros((0, schemas.NUM_CLASSES), np.float32)
        return np.array([], dtype=str), empty, empty
    return np.array(ids, dtype=str), np.concatenate(labels), np.concatenate(scores)

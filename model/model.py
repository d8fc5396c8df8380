"""The Keras model: uint8 four-stain images in, 28 sigmoid probabilities out.

`build_model(cfg, mean, std)` stacks: a normalisation layer (the accelerator receives uint8; it scales in
float32: `input_normalization`), a `keras.applications` backbone with four input channels (or a small CNN for
CPU runs and tests), global average pooling, dropout and a float32 sigmoid classifier (kept in float32 under
mixed precision). The normalisation is the preprocessing job's per-stain z-score, or, for a pretrained
keras.applications backbone, what its ImageNet weights expect for the stains standing for R, G and B
(channel order and value range) and the yellow stain in the same units.

Pretrained weights come from a three-channel copy of the backbone (ImageNet from the Keras cache or its
download, `fetch_imagenet_weights`; or a saved file): every weight is copied as is, except the first
convolution's kernel, which keeps its three kernels for the stains fed as its three channels and gets their
mean for yellow (`adapt_first_conv`, `transfer_weights`).

`export_serving` writes a SavedModel whose `serving_default` signature takes serialized tf.Examples in the
schema and returns the probabilities (and the ids), and whose `serve_images` signature takes decoded uint8
images (for callers that transform them first: test-time augmentation in the Beam prediction job);
`predict_with_ids` scores a `make_eval_dataset(..., with_ids=True)` dataset.
"""

from __future__ import annotations

import os
import urllib.error
import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

import schemas
from model import augment as _augment  # noqa: F401 - registers the augmentation layer for loading
from model import fileio
from model import schedules as _schedules  # noqa: F401 - registers WarmupThen for loading compiled models
from model.config import (
    INPUT_NORM_ZSCORE,
    WEIGHTS_IMAGENET,
    WEIGHTS_NONE,
    ConfigError,
    ModelConfig,
    resolve_input_norm,
)

SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "examples"
IMAGES_SIGNATURE = "serve_images"  # the export's second signature: decoded uint8 images -> probabilities
IMAGES_INPUT = "images"
PROBABILITIES = "probabilities"
BACKBONE_NAME = "backbone"
NORMALIZATION_NAME = "stain_normalization"

# name -> (keras.applications function, extra arguments, ImageNet weights: (folder under _WEIGHTS_URL, file,
# hash)). The weight files are those keras.applications downloads for include_top=False (a test checks the
# names against the ones it asks for); keras.utils.get_file caches them in KERAS_HOME/models/.
_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
_EFFNET2_HASHES = {
    "b0": "893217f2bb855e2983157299931e43ff",
    "b1": "0e80663031ca32d657f9caa404b6ec37",
    "b2": "1dfe2e7a5d45b6632553a8961ea609eb",
    "b3": "f6abf7b5849ac99a89b50dd3fd532856",
    "s": "af0682fb74e8c54910f2d4393339c070",
    "m": "1b8dc055df72dde80d614482840fe342",
    "l": "b0b66b5c863aef5b46e8608fe1711615",
}
_APPLICATIONS = {
    "resnet50": (
        "ResNet50",
        {},
        (
            "resnet",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "4d473c1dd8becc155b73f8504c6f6626",
        ),
    ),
    "densenet121": (
        "DenseNet121",
        {},
        (
            "densenet",
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "30ee3e1110167f948a6b9946edeeb738",
        ),
    ),
    **{
        f"efficientnetv2{v}": (
            f"EfficientNetV2{v.upper()}",
            {"include_preprocessing": False},  # the normalisation layer feeds what the weights expect
            ("efficientnet_v2", f"efficientnetv2-{v}_notop.h5", file_hash),
        )
        for v, file_hash in _EFFNET2_HASHES.items()
    },
}

# What the ImageNet weights were trained on, per channel R, G, B in 0..255 units: (x - offset) / scale, and
# whether the channels go in as BGR. Keras' imagenet_utils (caffe, torch) and EfficientNetV2's built-in
# preprocessing (torch for B0-B3, x / 128 - 1 for S, M, L) do the same.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGENET_INPUTS = {
    "caffe": ((123.68, 116.779, 103.939), (1.0, 1.0, 1.0), True),
    "torch": (tuple(255 * m for m in _IMAGENET_MEAN), tuple(255 * s for s in _IMAGENET_STD), False),
    "pm1": ((128.0, 128.0, 128.0), (128.0, 128.0, 128.0), False),
}


@keras.saving.register_keras_serializable(package="hpa")
class StainNormalization(layers.Layer):
    """uint8 (or any numeric) stains -> (x[..., order] - mean) / std per channel, computed in float32.

    Args:
      mean, std: per output channel, in the input's units.
      order: the input channel each output channel takes (None: the same order).
      mode: the resolved `--input_norm` these numbers implement (config.INPUT_NORMS), kept in model.keras.
    """

    def __init__(self, mean, std, order=None, mode: str = INPUT_NORM_ZSCORE, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.order = None if order is None else [int(i) for i in order]
        self.mode = mode
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.order is not None and sorted(self.order) != list(range(len(self.mean))):
            raise ValueError(f"order must be a permutation of 0..{len(self.mean) - 1}, got {self.order}")

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.order is not None:
            x = ops.take(x, self.order, axis=-1)
        x = (x - ops.convert_to_tensor(self.mean, "float32")) / ops.convert_to_tensor(self.std, "float32")
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mean=self.mean, std=self.std, order=self.order, mode=self.mode)
        return config


def input_normalization(mode: str, mean: Sequence[float], std: Sequence[float]) -> StainNormalization:
    """The first layer of the model for a resolved `--input_norm` (config.resolve_input_norm).

    `zscore`: each stain minus the dataset's mean, over its std. The ImageNet modes feed the stains that stand
    for R, G, B (schemas.RGB_STAINS) as the weights expect (`_IMAGENET_INPUTS`; BGR for caffe), and yellow,
    whose kernel is the mean of the RGB kernels (`adapt_first_conv`), in the same units (the mean of the RGB
    scales) without an offset: so a yellow pixel excites the first layer as a grey pixel of that brightness
    would, and yellow = 0 adds nothing (an offset could not be compensated exactly: zero padding at the
    borders, first convolutions without bias), leaving the pretrained RGB features intact at the start.

    Args:
      mode: one of config.INPUT_NORMS.
      mean, std: the dataset's per-stain statistics (STAINS order, 0..255), used by `zscore` only.
    """
    if mode == INPUT_NORM_ZSCORE:
        return StainNormalization(mean, std, mode=mode, name=NORMALIZATION_NAME)
    if mode not in _IMAGENET_INPUTS:
        raise ConfigError(f"unknown input normalisation {mode!r}")
    offset, scale, bgr = _IMAGENET_INPUTS[mode]
    rgb = [schemas.STAINS.index(s) for s in schemas.RGB_STAINS]
    others = [i for i in range(schemas.NUM_STAINS) if i not in rgb]
    order = (rgb[::-1] if bgr else rgb) + others
    offset, scale = (offset[::-1], scale[::-1]) if bgr else (offset, scale)
    extra_scale = float(np.mean(scale))
    return StainNormalization(
        list(offset) + [0.0] * len(others),
        list(scale) + [extra_scale] * len(others),
        order=order,
        mode=mode,
        name=NORMALIZATION_NAME,
    )


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
      weights: None, `imagenet` (keras.applications downloads them) or a local weights file of
        keras.applications (as `fetch_imagenet_weights` returns); only with 3 channels.
      small_filters: width of the `small` backbone.
    """
    if name == "small":
        if weights not in (None, WEIGHTS_NONE):
            raise ConfigError("the small backbone has no ImageNet weights; use --weights none or a file")
        return small_backbone(channels, small_filters)
    if name not in _APPLICATIONS:
        raise ConfigError(f"unknown backbone {name!r}")
    fn_name, extra, _ = _APPLICATIONS[name]
    fn = getattr(keras.applications, fn_name)
    with warnings.catch_warnings():  # keras.applications warns about 4 channels: adapting them is the point
        warnings.filterwarnings("ignore", message="This model usually expects")
        model = fn(include_top=False, weights=weights, input_shape=(None, None, channels), **extra)
    # model.input/output, not the lists: called on one tensor, the backbone must return one tensor.
    return keras.Model(model.input, model.output, name=BACKBONE_NAME)


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


def keras_cache_dir() -> str:
    """Where keras.utils.get_file caches downloads: $KERAS_HOME, default ~/.keras (files under models/)."""
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def imagenet_weights_file(backbone: str) -> tuple[str, str, str]:
    """(file name, URL, hash) of the ImageNet weights keras.applications loads for a headless `backbone`."""
    if backbone not in _APPLICATIONS:
        raise ConfigError(f"the {backbone} backbone has no ImageNet weights; use --weights none or a file")
    folder, fname, file_hash = _APPLICATIONS[backbone][2]
    return fname, f"{_WEIGHTS_URL}{folder}/{fname}", file_hash


def fetch_imagenet_weights(backbone: str) -> str:
    """The local path of `backbone`'s ImageNet weights: the Keras cache's copy, else downloaded into it.

    A file already in KERAS_HOME/models/ is used as it is (no network access; the cache may be read-only).

    Raises:
      ConfigError: the file is not cached and cannot be downloaded (one line naming the file, its URL,
        KERAS_HOME and --weights PATH as the way out).
    """
    fname, url, file_hash = imagenet_weights_file(backbone)
    home = keras_cache_dir()
    cached = os.path.join(home, "models", fname)
    if os.path.isfile(cached):
        return cached
    try:
        return keras.utils.get_file(fname, url, cache_subdir="models", file_hash=file_hash, cache_dir=home)
    except Exception as e:  # noqa: BLE001 - offline, proxy, disk full, bad hash: all end the same way
        cause = e.__cause__ or e.__context__  # keras.utils.get_file re-raises URL errors with the URL in them
        reason = str(cause) if isinstance(cause, urllib.error.URLError) else str(e)
        reason = " ".join(reason.split()) or type(e).__name__
        raise ConfigError(
            f"--weights imagenet: {fname} is not in the Keras cache {os.path.join(home, 'models')} "
            f"(KERAS_HOME={home}) and downloading it from {url} failed ({reason}); put the file there, "
            f"point KERAS_HOME at a cache holding it, or use --weights PATH (a saved 3-channel {backbone})"
        ) from e


def _load_weights_source(cfg: ModelConfig) -> keras.Model:
    """The pretrained backbone named by cfg.weights (imagenet, or a .keras / .weights.h5 file)."""
    if cfg.weights == WEIGHTS_IMAGENET:
        if cfg.backbone not in _APPLICATIONS:
            return build_backbone(cfg.backbone, 3, WEIGHTS_IMAGENET, cfg.small_filters)  # raises ConfigError
        path = fetch_imagenet_weights(cfg.backbone)
        try:
            return build_backbone(cfg.backbone, 3, path, cfg.small_filters)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--weights imagenet: cannot load {path} ({' '.join(str(e).split())}); "
                "delete it to download it again, or use --weights PATH"
            ) from e
    path = cfg.weights
    if not fileio.exists(path):
        raise ConfigError(f"--weights {path!r}: no such file (use imagenet, none, or a saved backbone)")
    if path.endswith(".weights.h5"):
        for channels in (3, schemas.NUM_STAINS):
            source = build_backbone(cfg.backbone, channels, None, cfg.small_filters)
            try:
                source.load_weights(fileio.local_copy(path, prefix="hpa-weights-"))
                return source
            except ValueError:
                continue
        raise ConfigError(f"--weights {path}: weights do not fit a 3- or 4-channel {cfg.backbone} backbone")
    try:
        loaded = keras.saving.load_model(fileio.local_copy(path, prefix="hpa-weights-"), compile=False)
    except Exception as e:  # noqa: BLE001 - any loading failure is a bad --weights file
        raise ConfigError(f"--weights {path}: cannot load it as a Keras model ({e})") from e
    try:
        backbone = loaded.get_layer(BACKBONE_NAME)  # a full model of this project: take its backbone
    except ValueError:
        return loaded
    _check_input_norm(loaded, cfg)
    return backbone


def _check_input_norm(loaded: keras.Model, cfg: ModelConfig) -> None:
    """A full model of this project given as --weights must have been fed the inputs this run will feed."""
    try:
        trained = loaded.get_layer(NORMALIZATION_NAME).mode
    except (ValueError, AttributeError):
        return
    wanted = resolve_input_norm(cfg)
    if trained != wanted:
        raise ConfigError(
            f"--weights {cfg.weights} was trained on {trained} inputs, this run would feed {wanted}: "
            f"pass --input_norm {INPUT_NORM_ZSCORE if trained == INPUT_NORM_ZSCORE else 'imagenet'}"
        )


def build_model(cfg: ModelConfig, mean, std, augmentation: keras.layers.Layer | None = None) -> keras.Model:
    """The classifier: uint8 [B, H, W, NUM_STAINS] -> float32 probabilities [B, NUM_CLASSES].

    Args:
      cfg: backbone, weights, dropout, input normalisation (`input_normalization`).
      mean, std: per-stain pixel statistics (STAINS order, 0..255 units) from the manifest (for zscore).
      augmentation: a first layer active in training only (`model.augment.from_data_config`), or None.

    Layers follow the global Keras dtype policy (set it before calling); the classifier stays float32.
    """
    source = None if cfg.weights == WEIGHTS_NONE else _load_weights_source(cfg)  # first: fails fast offline
    backbone = build_backbone(cfg.backbone, schemas.NUM_STAINS, None, cfg.small_filters)
    if source is not None:
        transfer_weights(source, backbone)
    inputs = keras.Input((None, None, schemas.NUM_STAINS), dtype="uint8", name="image")
    x = inputs if augmentation is None else augmentation(inputs)
    x = input_normalization(resolve_input_norm(cfg), mean, std)(x)
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


def images_fn(model: keras.Model):
    """A function uint8 images [N, H, W, NUM_STAINS] -> {PROBABILITIES: float32 [N, NUM_CLASSES]}."""

    def serve_images(images):
        return {PROBABILITIES: tf.cast(model(images, training=False), tf.float32)}

    return serve_images


def export_serving(model: keras.Model, export_dir: str, image_size: int) -> str:
    """Writes a SavedModel whose `serving_default` signature maps serialized tf.Examples to probabilities.

    A second signature, IMAGES_SIGNATURE, maps decoded uint8 images of `image_size` to probabilities.

    Returns export_dir (local or gs://).
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SERVING_SIGNATURE,
        fn=serving_fn(model, image_size),
        input_signature=[tf.TensorSpec([None], tf.string, name=SERVING_INPUT)],
    )
    archive.add_endpoint(
        name=IMAGES_SIGNATURE,
        fn=images_fn(model),
        input_signature=[
            tf.TensorSpec([None, image_size, image_size, schemas.NUM_STAINS], tf.uint8, name=IMAGES_INPUT)
        ],
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

"""The input pipeline: fold-tagged TFRecord shards -> batches of uint8 four-stain images and multi-hot labels.

Training: shard files in random order, read with a parallel non-deterministic `interleave`, shuffled as
serialized records (cheap to hold), parsed and decoded with `schemas`, augmented (the 8 flips / right-angle
rotations, optional random crop and intensity jitter), batched with full batches, prefetched; optionally
oversampling rare classes and optionally run by a tf.data service. Images stay uint8: the model normalises
on the device (shipping uint8 was 1.31x faster than float32, ../shared/FACTS.md).

Evaluation / prediction (`make_eval_dataset`): the same decode without randomness, in a deterministic
order, optionally with the sample ids and one fixed dihedral transform (test-time augmentation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

import schemas
from model import fileio
from model.config import ConfigError, DataConfig
from model.losses import class_factors

AUTOTUNE = tf.data.AUTOTUNE
NUM_DIHEDRAL = 8  # 4 rotations x optional flip


def list_shards(data_dir: str, folds: Sequence[int]) -> list[str]:
    """Sorted shard files of the given folds (UNLABELED_FOLD for the test shards) under a dataset directory.

    Raises:
      ConfigError: a fold without any shard file.
    """
    files: list[str] = []
    for fold in folds:
        pattern = schemas.shard_pattern(data_dir, fold)
        found = fileio.glob(pattern)
        if not found:
            raise ConfigError(f"no shard files match {pattern}: fold {fold} is absent from {data_dir}")
        files.extend(found)
    return files


def image_size_of(data_dir: str, manifest: dict | None = None) -> int:
    """The square image side stored in a dataset, from its manifest.

    Raises:
      ConfigError: non-square images (the model's augmentations assume squares).
    """
    manifest = schemas.read_manifest(data_dir) if manifest is None else manifest
    height, width = (int(v) for v in manifest[schemas.MANIFEST_IMAGE_SIZE])
    if height != width:
        raise ConfigError(f"{data_dir} holds {height}x{width} images; training needs square images")
    return height


def dihedral(image: tf.Tensor, k) -> tf.Tensor:
    """One of the 8 symmetries of the square: k % 4 right-angle rotations, then a left-right flip if k >= 4.

    Works on [H, W, C] and [B, H, W, C] tensors.
    """
    k = tf.convert_to_tensor(k, dtype=tf.int32)
    image = tf.image.rot90(image, k % 4)
    return tf.cond(k >= 4, lambda: tf.image.flip_left_right(image), lambda: image)


def _labels(features: dict) -> tf.Tensor:
    return tf.cast(features[schemas.LABELS_KEY], tf.float32)


def _decode_fn(image_size: int, training: bool, cfg: DataConfig, tta: int | None):
    """The per-record map: parsed features -> (uint8 image, float labels[, id])."""
    augment = training and cfg.augment
    crop = cfg.crop_size if training and cfg.crop_size and cfg.crop_size < image_size else None
    jitter = cfg.intensity_jitter if training else 0.0

    def decode(features):
        image = schemas.decode_stains(features, image_size)
        if crop is not None:
            image = tf.image.random_crop(image, [crop, crop, schemas.NUM_STAINS])
        if augment:
            image = dihedral(image, tf.random.uniform([], 0, NUM_DIHEDRAL, dtype=tf.int32))
        elif tta is not None:
            image = dihedral(image, tta)
        if jitter > 0:
            scale = tf.random.uniform([schemas.NUM_STAINS], 1.0 - jitter, 1.0 + jitter)
            image = tf.cast(
                tf.clip_by_value(tf.round(tf.cast(image, tf.float32) * scale), 0.0, 255.0), tf.uint8
            )
        return image, features

    return decode


def _oversample_fn(factors: np.ndarray):
    """flat_map that repeats a parsed record by its largest class factor, rounded stochastically."""
    table = tf.constant(factors, dtype=tf.float32)

    def repeat(features):
        has = features[schemas.LABELS_KEY] > 0
        factor = tf.reduce_max(tf.where(has, table, tf.ones_like(table)))
        whole = tf.floor(factor)
        n = tf.cast(whole, tf.int64) + tf.cast(tf.random.uniform([]) < factor - whole, tf.int64)
        return tf.data.Dataset.from_tensors(features).repeat(n)

    return repeat


def read_labels(data_dir: str, folds: Sequence[int]) -> np.ndarray:
    """Multi-hot labels [N, NUM_CLASSES] (int8) of every record of the given folds (reads only the labels).

    Used for rare-class oversampling or weighting; order follows the shard files.
    """
    files = list_shards(data_dir, folds)
    spec = {schemas.LABELS_KEY: schemas.feature_spec()[schemas.LABELS_KEY]}
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 16),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(1024).map(
        lambda s: tf.io.parse_example(s, spec)[schemas.LABELS_KEY], num_parallel_calls=AUTOTUNE
    )
    chunks = [b.numpy().astype(np.int8) for b in ds]
    return np.concatenate(chunks) if chunks else np.zeros((0, schemas.NUM_CLASSES), np.int8)


def make_dataset(
    data_dir: str,
    folds: Sequence[int],
    cfg: DataConfig,
    training: bool,
    *,
    labels: np.ndarray | None = None,
) -> tf.data.Dataset:
    """The training (or validation) input pipeline.

    Args:
      data_dir: the preprocessing job's output directory (local or gs://).
      folds: folds to read.
      cfg: pipeline settings; `cfg.image_size` None takes the manifest's.
      training: infinite, shuffled, augmented, full batches (and tf.data service / oversampling when
        configured); otherwise one deterministic pass without randomness.
      labels: the folds' labels from `read_labels`, to spare a scan when oversampling.

    Returns:
      A dataset of (uint8 images [B, H, W, NUM_STAINS], float32 labels [B, NUM_CLASSES]).
    """
    if not training:
        return make_eval_dataset(data_dir, folds, cfg)
    image_size = cfg.image_size or image_size_of(data_dir)
    files = list_shards(data_dir, folds)
    seed = cfg.seed
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed).repeat()
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 16),
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        deterministic=False,
    )
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seed)
    ds = ds.map(schemas.parse_example, num_parallel_calls=AUTOTUNE, deterministic=False)
    if cfg.rare_class == "oversample":
        if labels is None:
            labels = read_labels(data_dir, folds)
        factors = class_factors(labels.sum(axis=0), cfg.rare_power, cfg.rare_max_factor)
        ds = ds.flat_map(_oversample_fn(factors))
    decode = _decode_fn(image_size, True, cfg, None)
    ds = ds.map(lambda f: _to_pair(*decode(f)), num_parallel_calls=AUTOTUNE, deterministic=False)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    if cfg.tf_data_service:
        # Every worker runs the whole (infinite, randomly shuffled) pipeline; the trainer takes batches from
        # whichever worker has one ready. Epochs are counted in steps, so nothing is lost by not splitting.
        ds = ds.apply(
            tf.data.experimental.service.distribute(
                processing_mode=tf.data.experimental.service.ShardingPolicy.OFF,
                service=cfg.tf_data_service,
            )
        )
    return ds.prefetch(AUTOTUNE)


def _to_pair(image, features):
    return image, _labels(features)


def make_eval_dataset(
    data_dir: str,
    folds: Sequence[int],
    cfg: DataConfig,
    *,
    with_ids: bool = False,
    tta: int | None = None,
    batch_size: int | None = None,
) -> tf.data.Dataset:
    """One deterministic pass over the given folds, without random augmentation (for validation, prediction).

    Args:
      data_dir: the preprocessing job's output directory (local or gs://).
      folds: folds to read; `[schemas.UNLABELED_FOLD]` reads the test shards (their labels are all zero).
      cfg: pipeline settings (image_size, batch_size; the random augmentations are ignored).
      with_ids: also yield the sample ids (bytes) as a third element.
      tta: apply the fixed dihedral transform `dihedral(image, tta)`, tta in 0..7 (test-time augmentation).
      batch_size: overrides cfg.batch_size.

    Returns:
      A dataset of (uint8 images [B, H, W, NUM_STAINS], float32 labels [B, NUM_CLASSES][, string ids [B]]),
      always in the same order for the same files; the last batch may be smaller.
    """
    if tta is not None and not 0 <= tta < NUM_DIHEDRAL:
        raise ValueError(f"tta must be in 0..{NUM_DIHEDRAL - 1}, got {tta}")
    image_size = cfg.image_size or image_size_of(data_dir)
    files = list_shards(data_dir, folds)
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 16),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    ds = ds.map(schemas.parse_example, num_parallel_calls=AUTOTUNE, deterministic=True)
    decode = _decode_fn(image_size, False, cfg, tta)

    def to_tuple(features):
        image, features = decode(features)
        if with_ids:
            return image, _labels(features), features[schemas.ID_KEY]
        return image, _labels(features)

    ds = ds.map(to_tuple, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size or cfg.batch_size).prefetch(AUTOTUNE)

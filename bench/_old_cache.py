"""The previous `--cache DIR` (cache format 1), kept only as the baseline of the cache benchmarks.

Until issue 18 a directory cache was a `tf.data.Dataset.save` of one fold set's decoded records in 16
files, keyed per fold set (`folds1_2-<hash>`), read back with its 16 files in a random order, interleaved,
then through the 1,024-record shuffle buffer. `old_cached_training` rebuilds that training pipeline so a
benchmark can measure it beside the new cache in one run; `old_order` runs the same steps on record
positions instead of images (the order alone, at any dataset size).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

import schemas

SAVE_SHARDS = 16


def _decoded_pass(files: list[str], image_size: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 16),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.map(schemas.parse_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.map(
        lambda f: (schemas.decode_stains(f, image_size), tf.cast(f[schemas.LABELS_KEY], tf.float32)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def _reader(seed):
    def reader(datasets):
        datasets = datasets.shuffle(SAVE_SHARDS, seed=seed)
        return datasets.interleave(
            lambda d: d, cycle_length=SAVE_SHARDS, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    return reader


def save(ds: tf.data.Dataset, path: str) -> None:
    """Format 1's write: the elements in 16 files by position."""
    ds.enumerate().save(path, shard_func=lambda index, *_: index % SAVE_SHARDS)


def load(path: str, seed: int | None) -> tf.data.Dataset:
    """Format 1's read: the 16 files in a random order per pass, interleaved."""
    return tf.data.Dataset.load(path, reader_func=_reader(seed)).map(lambda index, element: element)


def fill(files: list[str], image_size: int, path: str) -> None:
    """Decodes the files' records into a format-1 cache at `path` (one fold set)."""
    if not os.path.isdir(path):
        save(_decoded_pass(files, image_size), path)


def old_cached_training(path: str, batch_size: int, shuffle_buffer: int = 1024, seed: int | None = None):
    """Format 1's training pipeline: load -> repeat -> shuffle buffer -> batch -> prefetch."""
    ds = load(path, seed).repeat().shuffle(shuffle_buffer, seed=seed)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def old_order(num_shards: int, num_samples: int, work: str, shuffle_buffer: int = 1024, seed: int = 0):
    """Format 1's training order of `num_samples` records (positions in Id order) spread over `num_shards`
    Id-sorted shards, as a dataset of ints: fill order, save, load, repeat, shuffle buffer."""
    bounds = np.array([round(i * num_samples / num_shards) for i in range(num_shards + 1)], np.int64)
    per_shard = tf.data.Dataset.from_tensor_slices((bounds[:-1], bounds[1:]))
    fill_order = per_shard.interleave(
        lambda start, end: tf.data.Dataset.range(start, end), cycle_length=min(num_shards, 16), block_length=1
    )
    path = os.path.join(work, "order-cache")
    if not os.path.isdir(path):
        save(fill_order, path)
    return load(path, seed).repeat().shuffle(shuffle_buffer, seed=seed)

"""The input pipeline: fold-tagged TFRecord shards -> batches of uint8 four-stain images and multi-hot labels.

Training (`make_dataset`), without a cache: shard files -> interleave -> parse -> oversample -> shuffle ->
decode -> batch -> prefetch; the shuffle holds parsed records (PNG bytes) and decoding comes after it.
Rare-class oversampling repeats a record before the shuffle buffer, so its copies land in different
batches; its class counts come from the manifest. With a cache (`model.cache`, `open_cache`): every
labelled record decoded once into one store for every fold, then per epoch a new uniform permutation of
the training folds' records (`model.epoch_order`, oversampled copies included) -> batches of indices ->
records read by index -> prefetch. The host does no random image work: the flips / right-angle rotations,
crop and intensity jitter are the model's first layer (`model.augment`), on the device. Images stay
uint8: the model normalises on the device (shipping uint8 was 1.31x faster than float32,
../shared/FACTS.md). With `deterministic` every tf.data stage keeps its order and every draw is seeded, so
a run can be repeated bit for bit; otherwise stages hand on whatever is ready first (faster).

Evaluation / prediction (`make_eval_dataset`): the same decode without randomness, in a deterministic
order, optionally with the sample ids and one fixed dihedral transform (test-time augmentation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Sequence

import numpy as np
import tensorflow as tf

import schemas
from model import cache as cache_lib
from model import epoch_order as epoch_order_lib
from model import fileio
from model.config import CACHE_MEMORY, CACHE_NONE, ConfigError, DataConfig
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


def _image_and_labels(image_size: int):
    def decode(features):
        return schemas.decode_stains(features, image_size), _labels(features)

    return decode


def fold_sizes(manifest: dict, folds: Sequence[int]) -> int:
    """Records written into the given folds according to the manifest."""
    written = manifest[schemas.MANIFEST_WRITTEN]
    return sum(int(written.get(schemas.written_key(f), 0)) for f in folds)


def class_counts(data_dir: str, folds: Sequence[int], manifest: dict | None = None) -> np.ndarray:
    """Positives per class [NUM_CLASSES] of the given folds, from the manifest's `class_counts_per_fold`.

    A manifest without them (written by an older preprocessing job) falls back to reading the labels of
    every record, with a message.
    """
    manifest = schemas.read_manifest(data_dir) if manifest is None else manifest
    per_fold = manifest.get(schemas.MANIFEST_CLASS_COUNTS)
    if per_fold is None:
        print(f"{data_dir}: the manifest has no class counts; reading the labels of folds {list(folds)} ...")
        return read_labels(data_dir, folds).sum(axis=0).astype(np.int64)
    counts = np.zeros(schemas.NUM_CLASSES, np.int64)
    for f in folds:
        counts += np.asarray(per_fold.get(schemas.written_key(f), [0] * schemas.NUM_CLASSES), np.int64)
    return counts


def oversampled_size(num_samples: int, counts: np.ndarray, factors: np.ndarray) -> int:
    """Estimated records per oversampled pass from class counts alone (no scan of the shards).

    Every positive of class c adds factor_c - 1 expected copies; a sample with several rare classes is
    repeated by its largest factor only, so this is an upper bound (exact for single-label samples), capped
    at num_samples x the largest factor.
    """
    extra = float(np.sum(np.asarray(counts, np.float64) * (np.asarray(factors, np.float64) - 1.0)))
    return int(min(num_samples + extra, num_samples * float(np.max(factors, initial=1.0))))


def _oversample(ds: tf.data.Dataset, factors: np.ndarray, seed: int, labels_of) -> tf.data.Dataset:
    """Repeats each element by its largest class factor, rounded stochastically.

    The rounding draw is stateless, keyed by (seed, position in the stream), so it is reproducible.
    """
    table = tf.constant(factors, dtype=tf.float32)
    seed = tf.constant(seed, tf.int64)

    def repeat(index, element):
        has = labels_of(element) > 0
        factor = tf.reduce_max(tf.where(has, table, tf.ones_like(table)))
        whole = tf.floor(factor)
        draw = tf.random.stateless_uniform([], seed=tf.stack([seed, index]))
        n = tf.cast(whole, tf.int64) + tf.cast(draw < factor - whole, tf.int64)
        return tf.data.Dataset.from_tensors(element).repeat(n)

    return ds.enumerate().flat_map(repeat)


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


def _read_records(files: list[str], deterministic: bool) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 16),
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        deterministic=deterministic,
    )


def labelled_folds(manifest: dict) -> list[int]:
    """The dataset's labelled folds, 0..num_folds-1 (what a cache holds)."""
    return list(range(int(manifest[schemas.MANIFEST_NUM_FOLDS])))


def check_cache_room(cfg: DataConfig, data_dir: str, manifest: dict) -> None:
    """Checks, before any work, that `cfg.cache` can hold every labelled fold of the dataset (one cache
    serves every fold); a complete cache of this data needs no room.

    Raises:
      ConfigError: unwritable directory, not enough disk space or memory (the message gives the size).
    """
    if cfg.cache == CACHE_NONE:
        return
    image_size = cfg.image_size or image_size_of(data_dir, manifest)
    todo = fold_sizes(manifest, labelled_folds(manifest))
    if cfg.cache != CACHE_MEMORY and os.path.isdir(cfg.cache):
        key = cache_lib.cache_key(_cache_identity(data_dir, manifest, image_size))
        if cache_lib.complete_path(cfg.cache, key):
            todo = 0
    cache_lib.check_cache(cfg.cache, todo, image_size)


def _cache_identity(data_dir: str, manifest: dict, image_size: int) -> dict:
    shards = []
    for path in list_shards(data_dir, labelled_folds(manifest)):
        try:
            size = tf.io.gfile.stat(path).length
        except tf.errors.NotFoundError:
            size = -1
        shards.append((path, int(size)))
    return cache_lib.dataset_identity(manifest, shards, image_size)


def _cache_source(data_dir: str, manifest: dict, image_size: int):
    """Batches (images, labels, folds, ids) of every labelled record, fold by fold, each fold in the order
    of `make_eval_dataset` (so a cached validation fold is served in that order)."""
    for fold in labelled_folds(manifest):
        if fold_sizes(manifest, [fold]) == 0:
            continue
        ds = _read_records(list_shards(data_dir, [fold]), True)
        ds = ds.map(schemas.parse_example, num_parallel_calls=AUTOTUNE, deterministic=True)

        @tf.autograph.experimental.do_not_convert
        def record(features):
            return (
                schemas.decode_stains(features, image_size),
                features[schemas.LABELS_KEY],
                features[schemas.FOLD_KEY],
                features[schemas.ID_KEY],
            )

        ds = ds.map(record, num_parallel_calls=AUTOTUNE, deterministic=True).batch(64).prefetch(2)
        yield from ds.as_numpy_iterator()


_STORES: dict[tuple[str, str], cache_lib.Store] = {}  # one per cache and dataset in a process


def open_cache(data_dir: str, cfg: DataConfig, manifest: dict | None = None) -> cache_lib.Store:
    """The decoded records of every labelled fold from `cfg.cache` (filled first when needed; once per
    process, shared by the training and validation pipelines)."""
    manifest = schemas.read_manifest(data_dir) if manifest is None else manifest
    image_size = cfg.image_size or image_size_of(data_dir, manifest)
    identity = _cache_identity(data_dir, manifest, image_size)
    memo = (cfg.cache, cache_lib.cache_key(identity))
    if memo not in _STORES:
        num = fold_sizes(manifest, labelled_folds(manifest))

        def source():
            return _cache_source(data_dir, manifest, image_size)

        if cfg.cache == CACHE_MEMORY:
            _STORES[memo] = cache_lib.memory_store(source(), num, image_size)
        else:
            _STORES[memo] = cache_lib.dir_store(cfg.cache, identity, num, image_size, source, cfg.cache_keep)
    return _STORES[memo]


def _gather(store: cache_lib.Store, block: int):
    labels = store.labels

    def gather(idx: np.ndarray):
        # Each block's records in ascending position: reads go forward through the file. Which records share
        # a block is the epoch order's; their order within it changes nothing.
        idx = _sorted_blocks(idx, block)
        return store.read(idx), labels[idx].astype(np.float32)

    return gather


def _sorted_blocks(idx: np.ndarray, block: int) -> np.ndarray:
    """idx sorted within each run of `block` positions (all of it when it does not split into blocks)."""
    if len(idx) % block:
        return np.sort(idx)
    return np.sort(idx.reshape(-1, block), axis=1).reshape(-1)


def _read_batches(
    indices: tf.data.Dataset, store: cache_lib.Store, batch_size: int, full: bool, block: int | None = None
):
    """Batches of (images, labels) read from the store at the positions `indices` yields, each run of `block`
    positions (default: the batch) read in ascending order."""
    gather = _gather(store, block or batch_size)
    shape = store.images.shape[1:]

    @tf.autograph.experimental.do_not_convert
    def read(idx):
        images, labels = tf.numpy_function(gather, [idx], [tf.uint8, tf.float32], stateful=False)
        images.set_shape([batch_size if full else None, *shape])
        labels.set_shape([batch_size if full else None, schemas.NUM_CLASSES])
        return images, labels

    ds = indices.batch(batch_size, drop_remainder=full)
    return ds.map(read, num_parallel_calls=AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True)
class WorkerSplit:
    """This process's place among the input pipelines of a multi-worker run.

    Attributes:
      index: this worker's input pipeline (0..count-1; the chief, if any, is 0).
      count: workers.
      replicas: replicas in sync over all workers.
      seed: a seed every worker shares (used for the order when the run has no --seed).
    """

    index: int
    count: int
    replicas: int
    seed: int = 0

    def reads_own_part(self, batch_size: int) -> bool:
        """Whether a cached training stream can be split exactly: tf.distribute cuts every worker's global
        batch into equal per-replica pieces only when the batch divides by the replicas."""
        return batch_size % self.replicas == 0


def worker_split(cluster, replicas: int) -> WorkerSplit | None:
    """The WorkerSplit of a `devices.Cluster` (None: one worker); the shared seed from TF_CONFIG's cluster."""
    if cluster is None:
        return None
    index = cluster.task_index + (1 if cluster.has_chief and cluster.task_type != "chief" else 0)
    if cluster.task_type == "chief":
        index = 0
    spec = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    seed = zlib.crc32(json.dumps(spec, sort_keys=True).encode()) % 2**31
    return WorkerSplit(index, cluster.workers, replicas, seed)


def training_shard_policy(cfg: DataConfig, num_files: int, split: WorkerSplit) -> str:
    """The tf.distribute auto-shard policy of the training dataset: OFF when every worker already reads its
    own part of the cache's epoch order, DATA when each makes the whole stream (same order everywhere), FILE
    for shard files when there are enough."""
    if cfg.cache != CACHE_NONE:
        return "OFF" if split.reads_own_part(cfg.batch_size) else "DATA"
    return "FILE" if num_files >= split.count else "DATA"


def _record_factors(labels: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Each record's oversampling factor: the largest factor of its classes (1 without a label)."""
    table = np.where(labels > 0, np.asarray(factors, np.float64)[None, :], 1.0)
    return table.max(axis=1, initial=1.0)


def _cached_training(
    data_dir: str,
    folds: Sequence[int],
    cfg: DataConfig,
    manifest: dict,
    seed: int,
    factors: np.ndarray | None,
    initial_epoch: int,
    steps_per_epoch: int | None,
    split: WorkerSplit | None,
) -> tf.data.Dataset:
    """Batches of the training folds from the cache, a new uniformly random order every epoch
    (`model.epoch_order`), starting at `initial_epoch`'s order."""
    store = open_cache(data_dir, cfg, manifest)
    pool = store.indices(folds)
    record_factors = None if factors is None else _record_factors(store.labels[pool], factors)
    batch = cfg.batch_size
    if steps_per_epoch is not None:
        length = steps_per_epoch * batch
    else:
        expected = len(pool) if record_factors is None else int(record_factors.sum())
        length = max(batch, expected // batch * batch)
    own = split is not None and split.reads_own_part(batch)

    def epoch_indices(epoch):
        order = epoch_order_lib.epoch_order(pool, seed, int(epoch), length, record_factors)
        return epoch_order_lib.worker_part(order, split.index, split.count) if own else order

    @tf.autograph.experimental.do_not_convert
    def indices_of(epoch):
        idx = tf.numpy_function(epoch_indices, [epoch], tf.int64, stateful=False)
        idx.set_shape([None])
        return idx

    epochs = tf.data.Dataset.range(initial_epoch, 2**62).map(indices_of).unbatch()
    # A worker's part of an epoch (steps x batch / workers) need not fill its last batch, which then holds
    # the next epoch's first records; tf.distribute hands the batch out in per-replica pieces, one a step, in
    # order. Sorting across the pieces would move records between steps and epochs (a record seen twice in
    # an epoch, another not at all, tests/test_workers.py), so only each piece is sorted.
    block = batch // split.replicas if own else batch
    return _read_batches(epochs, store, batch, full=True, block=block)


def make_dataset(
    data_dir: str,
    folds: Sequence[int],
    cfg: DataConfig,
    training: bool,
    *,
    manifest: dict | None = None,
    counts: np.ndarray | None = None,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    split: WorkerSplit | None = None,
) -> tf.data.Dataset:
    """The training (or validation) input pipeline.

    Args:
      data_dir: the preprocessing job's output directory (local or gs://).
      folds: folds to read.
      cfg: pipeline settings; `cfg.image_size` None takes the manifest's.
      training: infinite, shuffled, full batches (and tf.data service / oversampling / cache when
        configured); otherwise `make_eval_dataset`.
      manifest: the dataset's manifest (read when None).
      counts: positives per class of the folds for oversampling (None: `class_counts` from the manifest).
      initial_epoch, steps_per_epoch: with a cache, epoch e consumes the first steps x batch records of
        its own random order (a function of seed and e); the stream starts at `initial_epoch`'s (a resumed
        run reads what the uninterrupted one would have). None: one pass per epoch.
      split: this worker's place in a multi-worker run; with a cache each worker then reads its own
        disjoint part of every epoch's order (see `training_shard_policy`).

    Returns:
      A dataset of (uint8 images [B, H, W, NUM_STAINS], float32 labels [B, NUM_CLASSES]).
    """
    if not training:
        return make_eval_dataset(data_dir, folds, cfg, manifest=manifest)
    manifest = schemas.read_manifest(data_dir) if manifest is None else manifest
    image_size = cfg.image_size or image_size_of(data_dir, manifest)
    files = list_shards(data_dir, folds)
    det = cfg.deterministic
    seed = cfg.seed if cfg.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    shuffle_seed = cfg.seed  # None: tf.data draws its own seeds
    factors = None
    if cfg.rare_class == "oversample":
        counts = class_counts(data_dir, folds, manifest) if counts is None else counts
        factors = class_factors(counts, cfg.rare_power, cfg.rare_max_factor)
    if cfg.cache == CACHE_NONE:
        ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=shuffle_seed).repeat()
        ds = ds.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(files), 16),
            block_length=1,
            num_parallel_calls=AUTOTUNE,
            deterministic=det,
        )
        ds = ds.map(schemas.parse_example, num_parallel_calls=AUTOTUNE, deterministic=det)
        if factors is not None:
            ds = _oversample(ds, factors, seed, lambda f: f[schemas.LABELS_KEY])
        # Parsed records (PNG bytes, half the size of decoded stains) wait in the buffer; decode after it.
        ds = ds.shuffle(cfg.shuffle_buffer, seed=shuffle_seed)
        ds = ds.map(_image_and_labels(image_size), num_parallel_calls=AUTOTUNE, deterministic=det)
        ds = ds.batch(cfg.batch_size, drop_remainder=True)
    else:
        if cfg.seed is None and split is not None:
            seed = split.seed  # every worker must draw the same order
        ds = _cached_training(
            data_dir, folds, cfg, manifest, seed, factors, initial_epoch, steps_per_epoch, split
        )
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


def make_eval_dataset(
    data_dir: str,
    folds: Sequence[int],
    cfg: DataConfig,
    *,
    with_ids: bool = False,
    tta: int | None = None,
    batch_size: int | None = None,
    cached: bool = False,
    manifest: dict | None = None,
) -> tf.data.Dataset:
    """One deterministic pass over the given folds, without random augmentation (for validation, prediction).

    Args:
      data_dir: the preprocessing job's output directory (local or gs://).
      folds: folds to read; `[schemas.UNLABELED_FOLD]` reads the test shards (their labels are all zero).
      cfg: pipeline settings (image_size, batch_size, cache; the augmentation settings are ignored).
      with_ids: also yield the sample ids (bytes) as a third element.
      tta: apply the fixed dihedral transform `dihedral(image, tta)`, tta in 0..7 (test-time augmentation).
      batch_size: overrides cfg.batch_size.
      cached: serve the decoded images from `cfg.cache` (the validation fold during training; not with ids).
      manifest: the dataset's manifest (read when needed and None).

    Returns:
      A dataset of (uint8 images [B, H, W, NUM_STAINS], float32 labels [B, NUM_CLASSES][, string ids [B]]),
      always in the same order for the same files; the last batch may be smaller.
    """
    if tta is not None and not 0 <= tta < NUM_DIHEDRAL:
        raise ValueError(f"tta must be in 0..{NUM_DIHEDRAL - 1}, got {tta}")
    image_size = cfg.image_size or image_size_of(data_dir, manifest)
    files = list_shards(data_dir, folds)
    if cached and cfg.cache != CACHE_NONE and not with_ids:
        store = open_cache(data_dir, cfg, manifest)
        indices = tf.data.Dataset.from_tensor_slices(store.indices(folds))
        ds = _read_batches(indices, store, batch_size or cfg.batch_size, full=False)
        if tta is not None:
            ds = ds.map(lambda images, labels: (dihedral(images, tta), labels), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE)
    ds = _read_records(files, True)
    ds = ds.map(schemas.parse_example, num_parallel_calls=AUTOTUNE, deterministic=True)

    def to_tuple(features):
        image = schemas.decode_stains(features, image_size)
        if tta is not None:
            image = dihedral(image, tta)
        if with_ids:
            return image, _labels(features), features[schemas.ID_KEY]
        return image, _labels(features)

    ds = ds.map(to_tuple, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(batch_size or cfg.batch_size).prefetch(AUTOTUNE)


def pad_for_replicas(
    ds: tf.data.Dataset, num_records: int, replicas: int, batch_size: int
) -> tf.data.Dataset:
    """An evaluation dataset of full batches only, so that every replica gets its equal, non-empty share.

    A tf.distribute strategy splits each batch between its replicas; a last batch smaller than the global
    batch may leave a replica an empty batch (MirroredStrategy split a last batch of 4 at batch 8 over 2
    replicas as [4, 0]), which breaks layers such as BatchNormalization. The records are padded with
    `-num_records % batch_size` blank ones (all-zero image and labels) and a third element, the sample weight,
    is added: 0 for a pad, `(num_records + pads) / num_records` for a record. Keras weighs each replica's
    validation loss by its rows, pads included; this constant makes the epoch's mean loss the mean over the
    real records, and leaves F1 and AUC (ratios of weighted counts) as without weights. Every record is
    scored once; nothing is dropped; the number of batches is unchanged.

    Args:
      ds: batches of (uint8 images, float labels) from `make_eval_dataset`, `num_records` records in all.
      num_records: records in `ds` (> 0).
      replicas: replicas in sync; `batch_size` must be a multiple of it.
      batch_size: the (global) batch size of the result.
    """
    if num_records < 1 or batch_size % replicas:
        raise ValueError(f"need records >= 1 and a batch ({batch_size}) that is a multiple of {replicas}")
    pads = -num_records % batch_size
    weight = (num_records + pads) / num_records
    records = ds.unbatch().map(lambda image, labels: (image, labels, tf.constant(weight, tf.float32)))
    if pads:
        image_spec, label_spec, _ = records.element_spec
        blank = (
            tf.zeros(image_spec.shape, image_spec.dtype),
            tf.zeros(label_spec.shape, label_spec.dtype),
            tf.constant(0.0, tf.float32),
        )
        records = records.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pads))
    batches = records.batch(batch_size, drop_remainder=True)
    # unbatch() loses the count; Keras under a strategy cut an evaluation of unknown length short.
    batches = batches.apply(tf.data.experimental.assert_cardinality((num_records + pads) // batch_size))
    return batches.prefetch(AUTOTUNE)

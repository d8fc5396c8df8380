"""The record format shared by the preprocessing job (writer) and the training job (reader).

Every feature key, the class names, the stain order and the dataset layout live here and nowhere else.
One record holds one sample: the four stains as encoded image bytes (the source PNG or JPEG streams kept
as they are, or PNG re-encoded when the job resized or converted them), the image size, the multi-hot
labels, the fold (-1 for unlabeled samples) and the name of the source the sample came from.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Mapping

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "CSV_ID",
    "CSV_PREDICTED",
    "CSV_TARGET",
    "DOWNLOAD_BYTES",
    "DOWNLOAD_DETAIL",
    "DOWNLOAD_REPORT_COLUMNS",
    "DOWNLOAD_REPORT_FILE",
    "DOWNLOAD_STAIN",
    "DOWNLOAD_STATUS",
    "DUPLICATES_COLUMNS",
    "DUPLICATES_FILE",
    "DUPLICATES_GROUP",
    "FOLD_KEY",
    "HEIGHT_KEY",
    "ID_KEY",
    "IMAGE_KEYS",
    "LABELS_KEY",
    "MANIFEST_CLASS_COUNTS",
    "MANIFEST_FILE",
    "MANIFEST_IMAGE_SIZE",
    "MANIFEST_NUM_FOLDS",
    "MANIFEST_SCHEMA_VERSION",
    "MANIFEST_STAIN_STATS",
    "MANIFEST_WRITTEN",
    "NUM_CLASSES",
    "NUM_STAINS",
    "REJECTED_COLUMNS",
    "REJECTED_DETAIL",
    "REJECTED_FILE",
    "REJECTED_REASON",
    "REJECTED_SOURCE",
    "RGB_STAINS",
    "SCHEMA_VERSION",
    "SOURCE_KEY",
    "STAINS",
    "Sample",
    "TEST_SHARD_PREFIX",
    "TFRECORD_DIR",
    "TFRECORD_SUFFIX",
    "TRANSFORM_DIR",
    "UNLABELED_FOLD",
    "WIDTH_KEY",
    "decode_stains",
    "example_to_sample",
    "feature_spec",
    "format_target",
    "labels_to_multi_hot",
    "multi_hot_to_labels",
    "parse_example",
    "read_manifest",
    "shard_name",
    "shard_pattern",
    "shard_prefix",
    "to_example",
    "written_key",
]

SCHEMA_VERSION = 1

# The 28 classes of the Human Protein Atlas Image Classification competition, in label-index order.
CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Peroxisomes",
    "Endosomes",
    "Lysosomes",
    "Intermediate filaments",
    "Actin filaments",
    "Focal adhesion sites",
    "Microtubules",
    "Microtubule ends",
    "Cytokinetic bridge",
    "Mitotic spindle",
    "Microtubule organizing center",
    "Centrosome",
    "Lipid droplets",
    "Plasma membrane",
    "Cell junctions",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Cytoplasmic bodies",
    "Rods & rings",
)
NUM_CLASSES = len(CLASS_NAMES)

# Channel order of the stacked image: red, green, blue as the atlas' RGB composite (so ImageNet RGB kernels
# apply to them), yellow fourth. File names use these words: `{Id}_{stain}.png`.
STAINS: tuple[str, ...] = ("red", "green", "blue", "yellow")
NUM_STAINS = len(STAINS)
# The stains that stand for R, G and B of the composite (what ImageNet-trained kernels see), in that order.
RGB_STAINS: tuple[str, str, str] = ("red", "green", "blue")

UNLABELED_FOLD = -1

# Feature keys of the tf.Example.
ID_KEY = "id"
HEIGHT_KEY = "height"
WIDTH_KEY = "width"
LABELS_KEY = "labels"
FOLD_KEY = "fold"
SOURCE_KEY = "source"
IMAGE_KEYS: dict[str, str] = {stain: f"image/{stain}" for stain in STAINS}

# CSV columns of the competition's files.
CSV_ID = "Id"
CSV_TARGET = "Target"
CSV_PREDICTED = "Predicted"

# Layout of a preprocessed dataset directory (the preprocessing job's --output_dir).
TFRECORD_DIR = "tfrecords"
TRANSFORM_DIR = "transform_output"
MANIFEST_FILE = "manifest.json"
REJECTED_FILE = "rejected.csv"
TFRECORD_SUFFIX = ".tfrecord"
TEST_SHARD_PREFIX = "test"
# Columns of rejected.csv: the sample Id, a short reason code, what was wrong, the input set.
REJECTED_REASON = "reason"
REJECTED_DETAIL = "detail"
REJECTED_SOURCE = "source"
REJECTED_COLUMNS = (CSV_ID, REJECTED_REASON, REJECTED_DETAIL, REJECTED_SOURCE)
# The download job's report (in its --output_dir): one row per stain file requested, with what became of it.
DOWNLOAD_REPORT_FILE = "download_report.csv"
DOWNLOAD_STAIN = "stain"
DOWNLOAD_STATUS = "status"
DOWNLOAD_DETAIL = "detail"
DOWNLOAD_BYTES = "bytes"
DOWNLOAD_REPORT_COLUMNS = (CSV_ID, DOWNLOAD_STAIN, DOWNLOAD_STATUS, DOWNLOAD_DETAIL, DOWNLOAD_BYTES)
# duplicates.csv: one row per sample in a group of two or more near-duplicates (group numbered from 0).
DUPLICATES_FILE = "duplicates.csv"
DUPLICATES_GROUP = "group"
DUPLICATES_COLUMNS = (DUPLICATES_GROUP, CSV_ID, REJECTED_SOURCE)


def shard_prefix(fold: int) -> str:
    """File-name prefix of the shards holding one fold (`fold3`), or unlabeled samples (`test`)."""
    return TEST_SHARD_PREFIX if fold == UNLABELED_FOLD else f"fold{fold}"


def shard_name(fold: int, index: int, num_shards: int) -> str:
    """File name of one shard: `fold{k}-{i:05d}-of-{n:05d}.tfrecord` (`test-...` when unlabeled)."""
    return f"{shard_prefix(fold)}-{index:05d}-of-{num_shards:05d}{TFRECORD_SUFFIX}"


def shard_pattern(data_dir: str, fold: int) -> str:
    """Glob pattern matching every shard of one fold under a dataset directory (local or gs://)."""
    return posixpath.join(data_dir, TFRECORD_DIR, f"{shard_prefix(fold)}-*-of-*{TFRECORD_SUFFIX}")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample as stored in a record.

    Attributes:
      id: the sample Id of the label file.
      images: encoded image bytes (PNG or JPEG) of each stain, keyed by stain name.
      height, width: pixel size shared by the four stains.
      labels: multi-hot int64 vector of length NUM_CLASSES (all zero when unlabeled).
      fold: cross-validation fold, or UNLABELED_FOLD.
      source: name of the input set the sample came from (e.g. `train`, `hpav18`).
    """

    id: str
    images: Mapping[str, bytes]
    height: int
    width: int
    labels: np.ndarray
    fold: int = UNLABELED_FOLD
    source: str = ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (
            self.id == other.id
            and dict(self.images) == dict(other.images)
            and (self.height, self.width, self.fold, self.source)
            == (other.height, other.width, other.fold, other.source)
            and np.array_equal(self.labels, other.labels)
        )

    __hash__ = None  # mutable numpy field: not hashable


def labels_to_multi_hot(indices) -> np.ndarray:
    """Class indices (e.g. `[0, 25]`) -> multi-hot int64 vector of length NUM_CLASSES."""
    vec = np.zeros(NUM_CLASSES, dtype=np.int64)
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= NUM_CLASSES):
        raise ValueError(f"class index out of range 0..{NUM_CLASSES - 1}: {idx.tolist()}")
    vec[idx] = 1
    return vec


def multi_hot_to_labels(vec) -> list[int]:
    """Multi-hot vector -> sorted class indices."""
    return [int(i) for i in np.flatnonzero(np.asarray(vec))]


def format_target(vec) -> str:
    """Multi-hot vector -> the competition's `Target` string (`"0 25"`)."""
    return " ".join(str(i) for i in multi_hot_to_labels(vec))


def to_example(sample: Sample):
    """Serialises a Sample into a `tf.train.Example`."""
    import tensorflow as tf

    def _bytes(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def _ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))

    labels = np.asarray(sample.labels, dtype=np.int64)
    if labels.shape != (NUM_CLASSES,):
        raise ValueError(f"labels must have shape ({NUM_CLASSES},), got {labels.shape}")
    missing = set(STAINS) - set(sample.images)
    if missing:
        raise ValueError(f"sample {sample.id!r} lacks stains {sorted(missing)}")
    feature = {
        ID_KEY: _bytes(sample.id.encode("utf-8")),
        HEIGHT_KEY: _ints([sample.height]),
        WIDTH_KEY: _ints([sample.width]),
        LABELS_KEY: _ints(labels),
        FOLD_KEY: _ints([sample.fold]),
        SOURCE_KEY: _bytes(sample.source.encode("utf-8")),
    }
    for stain in STAINS:
        feature[IMAGE_KEYS[stain]] = _bytes(bytes(sample.images[stain]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def feature_spec() -> dict:
    """The `tf.io` feature spec of a record, for `tf.io.parse_example` and the serving signature."""
    import tensorflow as tf

    spec = {
        ID_KEY: tf.io.FixedLenFeature([], tf.string),
        HEIGHT_KEY: tf.io.FixedLenFeature([], tf.int64),
        WIDTH_KEY: tf.io.FixedLenFeature([], tf.int64),
        LABELS_KEY: tf.io.FixedLenFeature([NUM_CLASSES], tf.int64, default_value=[0] * NUM_CLASSES),
        FOLD_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=UNLABELED_FOLD),
        SOURCE_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    for stain in STAINS:
        spec[IMAGE_KEYS[stain]] = tf.io.FixedLenFeature([], tf.string)
    return spec


def parse_example(serialized):
    """Parses serialized record(s) into a dict of tensors keyed by the feature keys (works batched too)."""
    import tensorflow as tf

    if serialized.shape.rank == 0:
        return tf.io.parse_single_example(serialized, feature_spec())
    return tf.io.parse_example(serialized, feature_spec())


def decode_stains(features: Mapping, image_size: int | None = None):
    """Decodes the four stains of one parsed record into a uint8 tensor [H, W, NUM_STAINS].

    Works on PNG and JPEG bytes. With `image_size`, the static shape is set to
    [image_size, image_size, NUM_STAINS] and a record of another size raises an InvalidArgumentError.
    """
    import tensorflow as tf

    channels = []
    for stain in STAINS:
        img = tf.io.decode_image(features[IMAGE_KEYS[stain]], channels=1, expand_animations=False)
        channels.append(img[:, :, 0])
    image = tf.stack(channels, axis=-1)
    if image_size is not None:
        image = tf.ensure_shape(image, [image_size, image_size, NUM_STAINS])
    return image


def example_to_sample(serialized: bytes) -> Sample:
    """Parses one serialized record into a Sample (eager; for tests and tools)."""
    import tensorflow as tf

    f = parse_example(tf.constant(serialized))
    return Sample(
        id=f[ID_KEY].numpy().decode("utf-8"),
        images={stain: f[IMAGE_KEYS[stain]].numpy() for stain in STAINS},
        height=int(f[HEIGHT_KEY].numpy()),
        width=int(f[WIDTH_KEY].numpy()),
        labels=f[LABELS_KEY].numpy().astype(np.int64),
        fold=int(f[FOLD_KEY].numpy()),
        source=f[SOURCE_KEY].numpy().decode("utf-8"),
    )


# Keys of manifest.json that the training and prediction jobs read (the preprocessing job writes more).
MANIFEST_SCHEMA_VERSION = "schema_version"
MANIFEST_IMAGE_SIZE = "image_size"  # [height, width] shared by every record
MANIFEST_NUM_FOLDS = "num_folds"
MANIFEST_WRITTEN = "written_per_fold"  # {"0": n, ..., "test": n} keyed by shard_prefix without "fold"
MANIFEST_STAIN_STATS = "stain_stats"  # {"mean": [...], "std": [...]} in STAINS order, pixel units 0..255
MANIFEST_CLASS_COUNTS = "class_counts_per_fold"  # {"0": [NUM_CLASSES positives], ...} per labelled fold


def written_key(fold: int) -> str:
    """Key of `manifest[MANIFEST_WRITTEN]` for one fold: `"3"`, or `"test"` for unlabeled samples."""
    return TEST_SHARD_PREFIX if fold == UNLABELED_FOLD else str(fold)


def read_manifest(data_dir: str, command: str = "") -> dict:
    """Reads and checks a dataset's manifest.json (local or gs://).

    `command` (`hpa-predict`...) words the hint when data_dir is another kind of folder (schemas/folders.py).

    Raises:
      FileNotFoundError: no manifest: not a finished preprocessing output.
      ValueError: a manifest of another schema version.
    """
    import json

    import tensorflow as tf

    path = posixpath.join(data_dir, MANIFEST_FILE)
    if not tf.io.gfile.exists(path):
        from schemas import folders

        hint = folders.hint_for_data_dir(data_dir, command) or "run hpa-preprocess first"
        raise FileNotFoundError(
            f"{path} not found: {data_dir!r} is not the output of a finished preprocessing run; {hint}"
        )
    with tf.io.gfile.GFile(path, "r") as f:
        manifest = json.load(f)
    version = manifest.get(MANIFEST_SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema version {version}, this code reads version {SCHEMA_VERSION}: "
            "rerun the preprocessing job"
        )
    return manifest

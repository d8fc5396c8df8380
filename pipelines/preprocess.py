"""The preprocessing job: stain images + label files -> fold-tagged, sharded TFRecords (Apache Beam).

    python -m pipelines.preprocess --labels_csv train.csv --input_dir train/ --output_dir out/ [Beam options]

The graph, each step a named transform:

    ReadLabels[src]   label rows (read and header-checked by the launcher, so a bad file fails before work)
    CheckRows         hostile Ids, malformed Targets -> rejected
    DropDuplicateIds  repeated or conflicting Ids -> rejected
    ListImages[src]   the input folder's stain files (Beam's fileio: local paths and gs:// alike)
    MatchFiles        rows joined with their four stain files by Id; missing stains -> rejected,
                      images without a row -> counted as unlisted
    AssignFolds       iterative stratification over all labels at once (a global step, side input)
    PlanShards        per fold, samples sorted by Id, cut into shards of about --shard_mb
    WriteShards       per shard: read, validate (pipelines.stains), write records; bad images -> rejected
    StainStatistics   per-stain pixel mean and std with tf.Transform analyzers; transform_fn saved
    Summarise         counts for the manifest; rejected.csv

Everything is written under `{output_dir}/.incomplete/` and moved into place only after the job succeeded
and `written + rejected == input rows` holds; manifest.json is written last. Shards are byte-identical for
the same inputs and seed, whatever the order of the label file's rows.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import io
import json
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
from importlib import metadata
from typing import Iterable

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, SetupOptions, StandardOptions

import schemas
from pipelines import folds as folds_lib
from pipelines import labels as labels_lib
from pipelines import stains as stains_lib

INCOMPLETE_DIR = ".incomplete"
_SUMMARY_FILE = "summary.json"
_PROGRESS_DIR = "progress"
# tf.Transform feature names of the per-sample pixel statistics and of the transform's outputs.
STAT_MEAN = "stain_mean"
STAT_SQ_MEAN = "stain_sq_mean"
STAT_STD = "stain_std"
# Preference when one stain exists in several formats (e.g. a PNG and the full-size TIFF).
_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_REFERENCE_SIDE = 512  # competition image side, for estimating shard sizes of resized data


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Flags of the job (everything else goes to Beam's PipelineOptions)."""

    labels_csv: tuple[str, ...]
    input_dir: tuple[str, ...]
    output_dir: str
    sources: tuple[str, ...] = ()
    num_folds: int = 5
    seed: int = 0
    fold_order: int = 2
    groups_csv: str | None = None
    image_size: int | None = None
    shard_mb: float = 150.0
    num_shards: int | None = None
    strict_modes: bool = False
    overwrite: bool = False
    progress_seconds: float = 10.0


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A sample whose row passed the checks and whose four stain files exist."""

    source: str
    id: str
    labels: tuple[int, ...]
    labeled: bool
    paths: tuple[str, ...]  # in schemas.STAINS order
    num_bytes: int


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """One output shard: which samples go into which file."""

    fold: int
    index: int
    num_shards: int
    samples: tuple[Candidate, ...]

    @property
    def name(self) -> str:
        return schemas.shard_name(self.fold, self.index, self.num_shards)


def _rejection(source: str, sample_id: str, reason: str, detail: str) -> tuple[str, str, str, str]:
    """A rejected.csv row, in schemas.REJECTED_COLUMNS order."""
    return (sample_id, reason, detail, source)


# --------------------------------------------------------------------------------------------------------
# Rows


class _CheckRowFn(beam.DoFn):
    REJECTED = "rejected"

    def process(self, row: labels_lib.LabelRow):
        try:
            yield labels_lib.check_row(row)
        except labels_lib.RowRejected as e:
            beam.metrics.Metrics.counter("preprocess", f"rejected_{e.reason}").inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, _rejection(row.source, row.id, e.reason, e.detail))


@beam.ptransform_fn
def CheckRows(rows):  # noqa: N802 (Beam transform names are CamelCase)
    """LabelRow -> CheckedRow; hostile Ids and malformed Targets go to the `rejected` output."""
    return rows | beam.ParDo(_CheckRowFn()).with_outputs(_CheckRowFn.REJECTED, main="valid")


def _resolve_duplicates(item):
    sample_id, rows = item
    kept, rejected = labels_lib.resolve_duplicates(sorted(rows, key=lambda r: (r.source, r.labels)))
    for row, detail in rejected:
        beam.metrics.Metrics.counter("preprocess", f"rejected_{labels_lib.DUPLICATE_ID}").inc()
        yield beam.pvalue.TaggedOutput(
            "rejected", _rejection(row.source, row.id, labels_lib.DUPLICATE_ID, detail)
        )
    if kept is not None:
        yield kept


def _key_by_id(row: labels_lib.CheckedRow):
    return row.id, row


@beam.ptransform_fn
def DropDuplicateIds(rows):  # noqa: N802
    """Keeps one row per Id (see labels.resolve_duplicates); the others go to the `rejected` output."""
    return (
        rows
        | "KeyById" >> beam.Map(_key_by_id)
        | "GroupById" >> beam.GroupByKey()
        | "Resolve" >> beam.FlatMap(_resolve_duplicates).with_outputs("rejected", main="unique")
    )


# --------------------------------------------------------------------------------------------------------
# Files


def _stain_of(path: str) -> tuple[str, str, str] | None:
    """`dir/{Id}_{stain}.{ext}` -> (Id, stain, ext), or None for a file that is not a stain image."""
    stem, ext = posixpath.splitext(posixpath.basename(path))
    ext = ext.lower()
    if ext not in _EXTENSIONS or "_" not in stem:
        return None
    sample_id, stain = stem.rsplit("_", 1)
    if stain not in schemas.STAINS or not sample_id:
        return None
    return sample_id, stain, ext


class _StainFileFn(beam.DoFn):
    def __init__(self, source: str):
        self._source = source

    def process(self, meta):
        parsed = _stain_of(meta.path)
        if parsed is None:
            beam.metrics.Metrics.counter("preprocess", "ignored_files").inc()
            return
        sample_id, stain, ext = parsed
        yield (self._source, sample_id), (stain, ext, meta.path, meta.size_in_bytes)


@beam.ptransform_fn
def ListImages(pbegin, input_dir: str, source: str):  # noqa: N802
    """The stain image files of one input folder, keyed by (source, Id)."""
    pattern = posixpath.join(input_dir, "*")
    return (
        pbegin
        | "Pattern" >> beam.Create([pattern])
        | "Match" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
        | "ParseName" >> beam.ParDo(_StainFileFn(source))
    )


def _join_files(item):
    (source, sample_id), grouped = item
    rows = list(grouped["rows"])
    files = list(grouped["files"])
    if not rows:
        if not list(grouped["listed"]):  # images whose Id has no row at all (a rejected row is no reason)
            beam.metrics.Metrics.counter("preprocess", "unlisted_images").inc()
            yield beam.pvalue.TaggedOutput("unlisted", (source, sample_id))
        return
    (row,) = rows  # DropDuplicateIds left one row per Id
    by_stain: dict[str, list[tuple[str, str, int]]] = collections.defaultdict(list)
    for stain, ext, path, size in files:
        by_stain[stain].append((ext, path, size))
    missing = [s for s in schemas.STAINS if s not in by_stain]
    if missing:
        beam.metrics.Metrics.counter("preprocess", f"rejected_{stains_lib.MISSING_STAIN}").inc()
        detail = f"no {', '.join(missing)} file for Id {sample_id!r} in {row.input_dir}"
        yield beam.pvalue.TaggedOutput(
            "rejected", _rejection(source, sample_id, stains_lib.MISSING_STAIN, detail)
        )
        return
    chosen = [min(by_stain[s], key=lambda f: (_EXTENSIONS.index(f[0]), f[1])) for s in schemas.STAINS]
    yield Candidate(
        source=source,
        id=sample_id,
        labels=row.labels,
        labeled=row.labeled,
        paths=tuple(path for _, path, _ in chosen),
        num_bytes=sum(size for _, _, size in chosen),
    )


def _key_by_source_id(row: labels_lib.CheckedRow):
    return (row.source, row.id), row


def _listed_key(row: labels_lib.LabelRow):
    return (row.source, row.id), None


@beam.ptransform_fn
def MatchFiles(inputs):  # noqa: N802
    """(usable rows, all label rows, files) -> Candidate per usable row with all four stains.

    Side outputs: `rejected` (a stain is missing) and `unlisted` (image files whose Id has no label row).
    """
    rows, all_rows, files = inputs
    keyed_rows = rows | "KeyBySourceId" >> beam.Map(_key_by_source_id)
    listed = all_rows | "KeyListed" >> beam.Map(_listed_key)
    return (
        {"rows": keyed_rows, "listed": listed, "files": files}
        | "JoinById" >> beam.CoGroupByKey()
        | "Join" >> beam.FlatMap(_join_files).with_outputs("rejected", "unlisted", main="candidates")
    )


# --------------------------------------------------------------------------------------------------------
# Folds and shards


def compute_folds(
    samples: Iterable[Candidate], num_folds: int, seed: int, order: int, groups: dict[str, str] | None
) -> dict[str, int]:
    """Id -> fold for every sample (UNLABELED_FOLD for unlabeled ones), independent of input order."""
    labeled = sorted((s for s in samples if s.labeled), key=lambda s: s.id)
    assignment = {}
    if labeled:
        matrix = np.zeros((len(labeled), schemas.NUM_CLASSES), dtype=np.int8)
        for i, s in enumerate(labeled):
            matrix[i, list(s.labels)] = 1
        group_ids = None
        if groups:
            names = [groups.get(s.id, f"\0{s.id}") for s in labeled]  # ungrouped samples: a group each
            _, group_ids = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
        if len(labeled) < num_folds:
            raise ValueError(f"{len(labeled)} labeled samples cannot fill {num_folds} folds")
        fold_of = folds_lib.assign_folds(matrix, num_folds, seed, order=order, groups=group_ids)
        assignment = {s.id: int(f) for s, f in zip(labeled, fold_of)}
    return assignment


class _AssignFoldsFn(beam.DoFn):
    def __init__(self, num_folds, seed, order, groups):
        self._args = (num_folds, seed, order, groups)

    def process(self, samples):
        yield compute_folds(samples, *self._args)


@beam.ptransform_fn
def AssignFolds(candidates, num_folds: int, seed: int, order: int = 2, groups=None):  # noqa: N802
    """All candidates at once -> a single {Id: fold} dict (use as a side input)."""
    return (
        candidates
        | "Collect" >> beam.combiners.ToList()
        | "Stratify" >> beam.ParDo(_AssignFoldsFn(num_folds, seed, order, groups))
    )


def plan_fold_shards(
    fold: int,
    samples: Iterable[Candidate],
    shard_bytes: float,
    num_shards: int | None,
    byte_scale: float = 1.0,
) -> list[ShardSpec]:
    """Cuts one fold's samples (sorted by Id) into contiguous shards of about `shard_bytes` each.

    Args:
      fold: the fold (or UNLABELED_FOLD).
      samples: the fold's samples.
      shard_bytes: target shard size in bytes (ignored when num_shards is given).
      num_shards: exact number of shards for this fold, or None.
      byte_scale: factor from source bytes to written bytes (resizing).
    """
    ordered = sorted(samples, key=lambda s: s.id)
    if not ordered:
        return []
    sizes = np.array([s.num_bytes * byte_scale for s in ordered], dtype=np.float64)
    total = float(sizes.sum())
    n = num_shards if num_shards else max(1, round(total / shard_bytes))
    n = min(n, len(ordered))
    mid = np.cumsum(sizes) - sizes / 2  # each sample goes where its middle byte falls
    index = np.minimum((mid * n / max(total, 1e-9)).astype(np.int64), n - 1)
    return [ShardSpec(fold, i, n, tuple(s for s, k in zip(ordered, index) if k == i)) for i in range(n)]


class _PlanFn(beam.DoFn):
    def __init__(self, shard_bytes, num_shards, byte_scale):
        self._args = (shard_bytes, num_shards, byte_scale)

    def process(self, item):
        fold, samples = item
        yield from plan_fold_shards(fold, samples, *self._args)


def _key_by_fold(sample: Candidate, fold_of: dict[str, int]):
    return (fold_of[sample.id] if sample.labeled else schemas.UNLABELED_FOLD), sample


@beam.ptransform_fn
def PlanShards(candidates, fold_of, shard_bytes, num_shards=None, byte_scale=1.0):  # noqa: N802
    """Candidates + {Id: fold} side input -> ShardSpec per output file."""
    return (
        candidates
        | "KeyByFold" >> beam.Map(_key_by_fold, fold_of=beam.pvalue.AsSingleton(fold_of))
        | "GroupByFold" >> beam.GroupByKey()
        | "Cut" >> beam.ParDo(_PlanFn(shard_bytes, num_shards, byte_scale))
        | "Spread" >> beam.Reshuffle()
    )


# --------------------------------------------------------------------------------------------------------
# Writing


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


class _WriteShardFn(beam.DoFn):
    """Reads, validates and writes the samples of one shard; emits stats, summaries and rejections."""

    STATS, WRITTEN, REJECTED = "stats", "written", "rejected"

    def __init__(self, shard_dir: str, image_size: int | None, strict_modes: bool, progress_dir: str | None):
        self._shard_dir = shard_dir
        self._image_size = image_size
        self._strict = strict_modes
        self._progress_dir = progress_dir

    def setup(self):
        self._written = beam.metrics.Metrics.counter("preprocess", "written")
        self._converted = beam.metrics.Metrics.counter("preprocess", "converted_stains")

    def _report(self, shard: ShardSpec, done: int, rejected: int, final: bool = False):
        if self._progress_dir is None:
            return
        path = os.path.join(self._progress_dir, shard.name + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump({"done": done, "rejected": rejected, "final": final}, f)
        os.replace(path + ".tmp", path)

    def process(self, shard: ShardSpec):
        path = posixpath.join(self._shard_dir, shard.name)
        done = rejected = 0
        last_report = time.monotonic()
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as out:
            for sample in shard.samples:
                try:
                    data = {stain: _read(p) for stain, p in zip(schemas.STAINS, sample.paths)}
                    valid = stains_lib.validate_stains(data, self._image_size, self._strict)
                except stains_lib.Rejected as e:
                    beam.metrics.Metrics.counter("preprocess", f"rejected_{e.reason}").inc()
                    rejected += 1
                    yield beam.pvalue.TaggedOutput(
                        self.REJECTED, _rejection(sample.source, sample.id, e.reason, e.detail)
                    )
                    continue
                except OSError as e:  # a file that was listed but cannot be read (deleted, permissions)
                    rejected += 1
                    detail = f"cannot read a stain file: {e}"
                    yield beam.pvalue.TaggedOutput(
                        self.REJECTED, _rejection(sample.source, sample.id, stains_lib.MISSING_STAIN, detail)
                    )
                    continue
                record = schemas.Sample(
                    id=sample.id,
                    images=valid.images,
                    height=valid.height,
                    width=valid.width,
                    labels=schemas.labels_to_multi_hot(sample.labels),
                    fold=shard.fold,
                    source=sample.source,
                )
                _TFRecordUtil.write_record(out, schemas.to_example(record).SerializeToString())
                done += 1
                self._written.inc()
                notes = [n for n in valid.conversions if n]
                if notes:
                    self._converted.inc(len(notes))
                yield beam.pvalue.TaggedOutput(
                    self.STATS,
                    {
                        STAT_MEAN: np.asarray(valid.mean, dtype=np.float32),
                        STAT_SQ_MEAN: np.asarray(valid.sq_mean, dtype=np.float32),
                    },
                )
                yield beam.pvalue.TaggedOutput(
                    self.WRITTEN, (shard.fold, sample.labels, (valid.height, valid.width), tuple(notes))
                )
                if time.monotonic() - last_report > 2.0:
                    self._report(shard, done, rejected)
                    last_report = time.monotonic()
        self._report(shard, done, rejected, final=True)
        yield shard.name


@beam.ptransform_fn
def WriteShards(shards, shard_dir, image_size=None, strict_modes=False, progress_dir=None):  # noqa: N802
    """ShardSpec -> a written TFRecord file; outputs `stats`, `written`, `rejected` and the file names."""
    fn = _WriteShardFn(shard_dir, image_size, strict_modes, progress_dir)
    return shards | beam.ParDo(fn).with_outputs(fn.STATS, fn.WRITTEN, fn.REJECTED, main="files")


# --------------------------------------------------------------------------------------------------------
# Statistics with tf.Transform


def stats_preprocessing_fn(inputs):
    """tf.Transform preprocessing_fn: dataset-wide per-stain pixel mean and std.

    Every record has the same pixel count, so the mean of per-sample means is the pixel mean, and likewise
    for the mean of squares. Outputs the mean and std, broadcast per instance.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    mean = tft.mean(inputs[STAT_MEAN], reduce_instance_dims=False)
    sq_mean = tft.mean(inputs[STAT_SQ_MEAN], reduce_instance_dims=False)
    std = tf.sqrt(tf.maximum(sq_mean - tf.square(mean), 0.0))
    batch = tf.shape(inputs[STAT_MEAN])[0]
    return {
        STAT_MEAN: tf.broadcast_to(mean, [batch, schemas.NUM_STAINS]),
        STAT_STD: tf.broadcast_to(std, [batch, schemas.NUM_STAINS]),
    }


def _stats_metadata():
    import tensorflow as tf
    from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

    spec = {
        STAT_MEAN: tf.io.FixedLenFeature([schemas.NUM_STAINS], tf.float32),
        STAT_SQ_MEAN: tf.io.FixedLenFeature([schemas.NUM_STAINS], tf.float32),
    }
    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))


@beam.ptransform_fn
def StainStatistics(stats, transform_dir: str, temp_dir: str):  # noqa: N802
    """Per-sample pixel stats -> tf.Transform analysis; the transform_fn is written to transform_dir."""
    import tensorflow_transform.beam as tft_beam

    with tft_beam.Context(temp_dir=temp_dir):
        transform_fn = (stats, _stats_metadata()) | "Analyze" >> tft_beam.AnalyzeDataset(
            stats_preprocessing_fn
        )
        return transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_dir)


def read_stain_stats(transform_dir: str) -> dict[str, list[float]]:
    """Reads the per-stain mean and std back from a written transform_fn."""
    import tensorflow as tf
    import tensorflow_transform as tft

    out = tft.TFTransformOutput(transform_dir).transform_raw_features(
        {
            STAT_MEAN: tf.zeros([1, schemas.NUM_STAINS], tf.float32),
            STAT_SQ_MEAN: tf.zeros([1, schemas.NUM_STAINS], tf.float32),
        },
        drop_unused_features=True,
    )
    return {"mean": out[STAT_MEAN].numpy()[0].tolist(), "std": out[STAT_STD].numpy()[0].tolist()}


# --------------------------------------------------------------------------------------------------------
# Summary


def summarise(written, rejected, unlisted, num_folds: int) -> dict:
    """Builds the counting part of the manifest from the job's small outputs."""
    written = list(written)
    per_fold = collections.Counter(schemas.written_key(f) for f, *_ in written)
    class_counts = {schemas.written_key(k): [0] * schemas.NUM_CLASSES for k in [*range(num_folds)]}
    sizes = collections.Counter()
    conversions = collections.Counter()
    for fold, labels, size, notes in written:
        if fold != schemas.UNLABELED_FOLD:
            for c in labels:
                class_counts[schemas.written_key(fold)][c] += 1
        sizes[f"{size[0]}x{size[1]}"] += 1
        conversions.update(notes)
    reasons = collections.Counter(r[1] for r in rejected)
    unlisted_by_source = collections.Counter(src for src, _ in unlisted)
    quality = None
    labeled = [(f, labels) for f, labels, *_ in written if f != schemas.UNLABELED_FOLD]
    if labeled:
        matrix = np.zeros((len(labeled), schemas.NUM_CLASSES), dtype=np.int8)
        fold_arr = np.array([f for f, _ in labeled])
        for i, (_, labels) in enumerate(labeled):
            matrix[i, list(labels)] = 1
        quality = {
            k: float(v) for k, v in folds_lib.fold_quality(matrix, fold_arr, n_folds=num_folds).items()
        }
    return {
        "written_per_fold": dict(sorted(per_fold.items())),
        "written": len(written),
        "rejected": len(rejected),
        "rejected_per_reason": dict(sorted(reasons.items())),
        "unlisted_images": dict(sorted(unlisted_by_source.items())),
        "unlisted_examples": sorted(i for _, i in unlisted)[:20],
        "class_counts_per_fold": class_counts,
        "image_sizes": dict(sizes),
        "conversions": dict(sorted(conversions.items())),
        "fold_quality": quality,
    }


class _SummaryFn(beam.DoFn):
    def __init__(self, path, rejected_path, num_folds):
        self._path, self._rejected_path, self._num_folds = path, rejected_path, num_folds

    def process(self, _, written, rejected, unlisted):
        summary = summarise(written, rejected, unlisted, self._num_folds)
        with FileSystems.create(self._path) as f:
            f.write(json.dumps(summary, indent=1).encode("utf-8"))
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(schemas.REJECTED_COLUMNS)
        w.writerows(sorted(rejected))
        with FileSystems.create(self._rejected_path) as f:
            f.write(buf.getvalue().encode("utf-8"))
        yield summary["written"]


@beam.ptransform_fn
def Summarise(pbegin, written, rejected, unlisted, summary_path, rejected_path, num_folds):  # noqa: N802
    """Writes summary.json (counts for the manifest) and rejected.csv (sorted) from the job's outputs."""
    side = beam.pvalue.AsList
    return (
        pbegin
        | "Once" >> beam.Create([None])
        | "Write"
        >> beam.ParDo(
            _SummaryFn(summary_path, rejected_path, num_folds), side(written), side(rejected), side(unlisted)
        )
    )


# --------------------------------------------------------------------------------------------------------
# The job


def build_pipeline(
    p: beam.Pipeline, cfg: JobConfig, rows_by_source, groups, work_dir: str, stats_dir: str, progress_dir
):
    """Wires the job's transforms into `p`. Outputs land in work_dir, tf.Transform's in stats_dir."""
    file_parts = []
    all_rows = []
    for source, input_dir, rows in rows_by_source:
        all_rows.append(p | f"ReadLabels[{source}]" >> beam.Create(rows, reshuffle=False))
        file_parts.append(p | f"ListImages[{source}]" >> ListImages(input_dir, source))
    rows = all_rows | "AllRows" >> beam.Flatten()
    checked = rows | "CheckRows" >> CheckRows()
    unique = checked.valid | "DropDuplicateIds" >> DropDuplicateIds()
    files = file_parts | "AllFiles" >> beam.Flatten()
    matched = (unique.unique, rows, files) | "MatchFiles" >> MatchFiles()
    fold_of = matched.candidates | "AssignFolds" >> AssignFolds(
        cfg.num_folds, cfg.seed, cfg.fold_order, groups
    )
    byte_scale = 1.0
    if cfg.image_size:  # written PNGs scale with pixel count; planned from the competition's 512 px
        byte_scale = min(1.0, (cfg.image_size / _REFERENCE_SIDE) ** 2)
    shards = matched.candidates | "PlanShards" >> PlanShards(
        fold_of, cfg.shard_mb * 1e6, cfg.num_shards, byte_scale
    )
    written = shards | "WriteShards" >> WriteShards(
        posixpath.join(work_dir, schemas.TFRECORD_DIR), cfg.image_size, cfg.strict_modes, progress_dir
    )
    _ = written.stats | "StainStatistics" >> StainStatistics(
        posixpath.join(stats_dir, schemas.TRANSFORM_DIR), posixpath.join(stats_dir, "tft_tmp")
    )
    rejected_parts = [checked.rejected, unique.rejected, matched.rejected, written.rejected]
    rejected = rejected_parts | "AllRejected" >> beam.Flatten()
    _ = p | "Summarise" >> Summarise(
        written.written,
        rejected,
        matched.unlisted,
        posixpath.join(work_dir, _SUMMARY_FILE),
        posixpath.join(work_dir, schemas.REJECTED_FILE),
        cfg.num_folds,
    )


def parse_args(argv: list[str] | None) -> tuple[JobConfig, list[str]]:
    """Job flags -> JobConfig; unknown flags are returned for Beam's PipelineOptions."""
    parser = argparse.ArgumentParser(
        prog="run_preprocess.sh",
        description="Merge the four stain images of every sample into fold-tagged, sharded TFRecords. "
        "Any Beam option (--runner DataflowRunner --project P --region R --temp_location gs://...) passes "
        "through.",
    )
    parser.add_argument(
        "--labels_csv",
        action="append",
        required=True,
        help="Id,Target label file (or Id,Predicted for an unlabeled set); repeat with "
        "--input_dir to combine sets",
    )
    parser.add_argument(
        "--input_dir",
        action="append",
        required=True,
        help="folder of {Id}_{red,green,blue,yellow}.{png,jpg,tif} files; one per --labels_csv",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=None,
        help="name of each set in the records (default: the label file's name)",
    )
    parser.add_argument("--output_dir", required=True, help="where tfrecords/, manifest.json etc. go")
    parser.add_argument("--num_folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    parser.add_argument(
        "--fold_order",
        type=int,
        default=2,
        choices=(1, 2),
        help="stratify on labels (1) or label pairs too (2, default)",
    )
    parser.add_argument(
        "--groups_csv",
        default=None,
        help="Id,Group file: samples of one group land in one fold (e.g. near-duplicates)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="resize every stain to N x N (re-encoded as PNG); default: keep source bytes",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard_mb", type=float, default=150.0, help="target shard size in MB (default 150)")
    size.add_argument("--num_shards", type=int, default=None, help="exact number of shards per fold")
    parser.add_argument(
        "--strict_modes",
        action="store_true",
        help="reject stains that are not 8-bit grayscale instead of converting them",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output_dir")
    parser.add_argument("--progress_seconds", type=float, default=10.0, help="progress print interval")
    args, beam_args = parser.parse_known_args(argv)
    if len(args.labels_csv) != len(args.input_dir):
        parser.error("give one --input_dir per --labels_csv")
    sources = args.source or []
    if sources and len(sources) != len(args.labels_csv):
        parser.error("give one --source per --labels_csv, or none")
    if not sources:
        stems = [
            posixpath.splitext(posixpath.basename(p.rstrip("/")))[0] or "labels" for p in args.labels_csv
        ]
        sources = [s if stems.count(s) == 1 else f"{s}{i}" for i, s in enumerate(stems)]
    if len(set(sources)) != len(sources):
        parser.error(f"source names must differ: {sources}")
    if args.num_folds < 2:
        parser.error("--num_folds must be at least 2")
    if args.image_size is not None and args.image_size < 8:
        parser.error("--image_size must be at least 8")
    if args.num_shards is not None and args.num_shards < 1:
        parser.error("--num_shards must be at least 1")
    if args.shard_mb <= 0:
        parser.error("--shard_mb must be positive")
    cfg = JobConfig(
        labels_csv=tuple(args.labels_csv),
        input_dir=tuple(d.rstrip("/") for d in args.input_dir),
        output_dir=args.output_dir.rstrip("/"),
        sources=tuple(sources),
        num_folds=args.num_folds,
        seed=args.seed,
        fold_order=args.fold_order,
        groups_csv=args.groups_csv,
        image_size=args.image_size,
        shard_mb=args.shard_mb,
        num_shards=args.num_shards,
        strict_modes=args.strict_modes,
        overwrite=args.overwrite,
        progress_seconds=args.progress_seconds,
    )
    return cfg, beam_args


def _read_text(path: str, what: str) -> str:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read()
    except Exception as e:  # Beam wraps IO errors in BeamIOError and others
        raise labels_lib.LabelFileError(f"cannot read {what} {path}: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise labels_lib.LabelFileError(f"{what} {path} is not UTF-8 text") from None


def _read_groups(path: str) -> dict[str, str]:
    text = _read_text(path, "groups file")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or "Group" not in header or schemas.CSV_ID not in header:
        raise labels_lib.LabelFileError(f"groups file {path} needs a header `{schemas.CSV_ID},Group`")
    i, g = header.index(schemas.CSV_ID), header.index("Group")
    return {row[i].strip(): row[g].strip() for row in reader if len(row) > max(i, g)}


def _exists_dataset(output_dir: str) -> bool:
    return FileSystems.exists(posixpath.join(output_dir, schemas.MANIFEST_FILE)) or bool(
        FileSystems.match([posixpath.join(output_dir, schemas.TFRECORD_DIR, "*")])[0].metadata_list
    )


def _list_files(root: str) -> list[str]:
    if "://" not in root and not os.path.isdir(root):  # object stores have prefixes, not directories
        return []
    return sorted(m.path for m in FileSystems.match([posixpath.join(root, "**")])[0].metadata_list)


def _move_tree(src: str, dst: str) -> None:
    """Moves every file under src to the same relative path under dst (local and gs://)."""
    files = _list_files(src)
    targets = [posixpath.join(dst, posixpath.relpath(f, src)) for f in files]
    for t in targets:
        parent = posixpath.dirname(t)
        if "://" not in parent:
            os.makedirs(parent, exist_ok=True)
    if files:
        FileSystems.rename(files, targets)


def _upload_tree(src: str, dst: str) -> None:
    """Copies a local folder's files to dst through Beam's FileSystems (any scheme, e.g. gs://)."""
    for dirpath, _, names in os.walk(src):
        for name in names:
            local = os.path.join(dirpath, name)
            target = posixpath.join(dst, os.path.relpath(local, src).replace(os.sep, "/"))
            if "://" not in target:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(local, "rb") as f_in, FileSystems.create(target) as f_out:
                shutil.copyfileobj(f_in, f_out)


def _delete(path: str) -> None:
    if FileSystems.exists(path):
        FileSystems.delete([path])
    elif "://" in path:  # object stores have no directories: delete the prefix's objects
        files = _list_files(path)
        if files:
            FileSystems.delete(files)


def _pipeline_options(beam_args: list[str], cfg: JobConfig) -> tuple[PipelineOptions, bool]:
    options = PipelineOptions(beam_args)
    std = options.view_as(StandardOptions)
    local = std.runner in (None, "DirectRunner", "direct", "FnApiRunner", "PrismRunner")
    if local:
        direct = options.view_as(DirectOptions)
        if direct.direct_num_workers == 1 and "--direct_num_workers" not in " ".join(beam_args):
            direct.direct_num_workers = os.cpu_count() or 1
        if direct.direct_num_workers > 1 and "--direct_running_mode" not in " ".join(beam_args):
            direct.direct_running_mode = "multi_processing"
    else:
        setup = options.view_as(SetupOptions)
        if not setup.setup_file:
            setup.setup_file = os.path.join(
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py"
            )
    return options, local


class _Progress:
    """Prints done/total and rate every `interval` seconds from the workers' progress files (local runs)."""

    def __init__(self, progress_dir: str, total: int, interval: float):
        self._dir, self._total, self._interval = progress_dir, total, interval
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def counts(self) -> tuple[int, int]:
        done = rejected = 0
        for name in os.listdir(self._dir) if os.path.isdir(self._dir) else []:
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self._dir, name)) as f:
                        d = json.load(f)
                except (OSError, ValueError):
                    continue
                done += d["done"]
                rejected += d["rejected"]
        return done, rejected

    def _run(self):
        while not self._stop.wait(self._interval):
            done, rejected = self.counts()
            elapsed = time.monotonic() - self._t0
            rate = (done + rejected) / elapsed if elapsed else 0.0
            pct = 100.0 * (done + rejected) / self._total if self._total else 100.0
            print(
                f"preprocess: {done + rejected}/{self._total} samples ({pct:.0f}%), {rejected} rejected, "
                f"{rate:.1f} samples/s, {elapsed:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("apache-beam", "tensorflow", "tensorflow-transform", "numpy", "pillow", "scikit-multilearn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _read_inputs(cfg: JobConfig) -> list[tuple[str, str, list[labels_lib.LabelRow]]]:
    """Reads and checks every label file and input folder before any work: [(source, input_dir, rows)]."""
    rows_by_source = []
    for csv_path, input_dir, source in zip(cfg.labels_csv, cfg.input_dir, cfg.sources):
        rows = labels_lib.parse_label_table(_read_text(csv_path, "label file"), source, input_dir, csv_path)
        if not FileSystems.match([posixpath.join(input_dir, "*")], limits=[1])[0].metadata_list:
            raise FileNotFoundError(f"input folder {input_dir} holds no files (or does not exist)")
        rows_by_source.append((source, input_dir, rows))
    return rows_by_source


def _check_summary(summary: dict, input_rows: int, work: str) -> tuple[int, int]:
    """The job's own end checks. Returns the (height, width) shared by every record."""
    if summary["written"] + summary["rejected"] != input_rows:
        raise RuntimeError(
            f"invariant broken: {summary['written']} written + {summary['rejected']} rejected "
            f"!= {input_rows} input rows; output left in {work}"
        )
    if summary["written"] == 0:
        raise ValueError(
            f"no sample could be written (all {input_rows} rejected: see {work}/{schemas.REJECTED_FILE})"
        )
    if len(summary["image_sizes"]) > 1:
        raise ValueError(
            f"the written samples differ in size ({summary['image_sizes']}); pass --image_size to resize "
            f"them to one size. Output left in {work}"
        )
    (size,) = summary["image_sizes"]
    height, width = (int(v) for v in size.split("x"))
    return height, width


def _publish(out: str, work: str, transform_dir: str, transform_is_local: bool) -> list[str]:
    """Moves the finished dataset from work/ into out/ (replacing an old one). Returns the shard names."""
    for name in (schemas.MANIFEST_FILE, schemas.TFRECORD_DIR, schemas.TRANSFORM_DIR, schemas.REJECTED_FILE):
        _delete(posixpath.join(out, name))
    _move_tree(posixpath.join(work, schemas.TFRECORD_DIR), posixpath.join(out, schemas.TFRECORD_DIR))
    if transform_is_local:
        _upload_tree(transform_dir, posixpath.join(out, schemas.TRANSFORM_DIR))
    else:
        _move_tree(transform_dir, posixpath.join(out, schemas.TRANSFORM_DIR))
    FileSystems.rename(
        [posixpath.join(work, schemas.REJECTED_FILE)], [posixpath.join(out, schemas.REJECTED_FILE)]
    )
    return sorted(posixpath.basename(f) for f in _list_files(posixpath.join(out, schemas.TFRECORD_DIR)))


def run(argv: list[str] | None = None):
    """Runs the job. Returns the PipelineResult; raises on bad input or a broken invariant."""
    cfg, beam_args = parse_args(argv)
    t0 = time.time()
    out = cfg.output_dir
    if _exists_dataset(out) and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset (manifest.json or tfrecords/); pass --overwrite"
        )
    rows_by_source = _read_inputs(cfg)
    input_rows = sum(len(rows) for _, _, rows in rows_by_source)
    groups = _read_groups(cfg.groups_csv) if cfg.groups_csv else None

    work = posixpath.join(out, INCOMPLETE_DIR)
    _delete(work)  # leftovers of a failed run
    options, local = _pipeline_options(beam_args, cfg)
    # Local runs keep progress files and the tf.Transform output (which TensorFlow's own file system writes)
    # in a local staging folder and upload the output at the end; remote workers write it in place.
    stage = tempfile.mkdtemp(prefix="hpa-preprocess-") if local else None
    stats_dir = stage if local else work
    transform_dir = posixpath.join(stats_dir, schemas.TRANSFORM_DIR)
    _log(
        f"{input_rows} label rows from {len(rows_by_source)} set(s) -> {out} "
        f"({cfg.num_folds} folds, seed {cfg.seed}, image size {cfg.image_size or 'as is'})"
    )
    try:
        p = beam.Pipeline(options=options)
        progress_dir = os.path.join(stage, _PROGRESS_DIR) if local else None
        if progress_dir:
            os.makedirs(progress_dir)
        build_pipeline(p, cfg, rows_by_source, groups, work, stats_dir, progress_dir)
        if local:
            with _Progress(progress_dir, input_rows, cfg.progress_seconds):
                result = p.run()
                result.wait_until_finish()
        else:
            result = p.run()
            result.wait_until_finish()

        with FileSystems.open(posixpath.join(work, _SUMMARY_FILE)) as f:
            summary = json.loads(f.read().decode("utf-8"))
        height, width = _check_summary(summary, input_rows, work)
        stain_stats = read_stain_stats(transform_dir)
        shards = _publish(out, work, transform_dir, transform_is_local=local)
        manifest = {
            schemas.MANIFEST_SCHEMA_VERSION: schemas.SCHEMA_VERSION,
            schemas.MANIFEST_IMAGE_SIZE: [height, width],
            schemas.MANIFEST_NUM_FOLDS: cfg.num_folds,
            schemas.MANIFEST_WRITTEN: summary["written_per_fold"],
            schemas.MANIFEST_STAIN_STATS: stain_stats,
            "stains": list(schemas.STAINS),
            "class_names": list(schemas.CLASS_NAMES),
            "input_rows": input_rows,
            "input_rows_per_source": {s: len(r) for s, _, r in rows_by_source},
            "written": summary["written"],
            "rejected": summary["rejected"],
            "rejected_per_reason": summary["rejected_per_reason"],
            "unlisted_images": summary["unlisted_images"],
            "unlisted_examples": summary["unlisted_examples"],
            "converted_stains": summary["conversions"],
            schemas.MANIFEST_CLASS_COUNTS: summary["class_counts_per_fold"],
            "fold_quality": summary["fold_quality"],
            "shards": shards,
            "arguments": dataclasses.asdict(cfg),
            "beam_args": beam_args,
            "package_versions": _versions(),
            "wall_time_s": round(time.time() - t0, 2),
        }
        with FileSystems.create(posixpath.join(out, schemas.MANIFEST_FILE)) as f:  # last: marks completion
            f.write(json.dumps(manifest, indent=1).encode("utf-8"))
        _delete(work)
    finally:
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
    _log(
        f"done in {manifest['wall_time_s']:.1f} s ({input_rows / max(manifest['wall_time_s'], 1e-9):.1f} "
        f"samples/s): {summary['written']} written {summary['written_per_fold']}, {summary['rejected']} "
        f"rejected {summary['rejected_per_reason']}, {sum(summary['unlisted_images'].values())} unlisted "
        f"image sets; stain mean {[round(v, 2) for v in stain_stats['mean']]} "
        f"std {[round(v, 2) for v in stain_stats['std']]} -> {out}"
    )
    return result


def _log(msg: str) -> None:
    print(f"preprocess: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: clear one-line errors for bad input instead of tracebacks."""
    try:
        run(argv)
    except (labels_lib.LabelFileError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run through the package's module, not __main__, so that pickled classes resolve on Beam's workers.
    from pipelines import preprocess

    sys.exit(preprocess.main())

"""Shards: cutting each fold into files of about --shard_mb (PlanShards) and writing them (WriteShards)."""

from __future__ import annotations

import posixpath
from typing import Iterable

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines import tfrecord
from pipelines.progress import ProgressFile
from pipelines.transforms.images import checksums, read_stains
from pipelines.transforms.samples import Candidate, ShardSpec, rejection
from schemas import stains as stains_lib

COUNTERS = "preprocess"
WRITE_PHASE = "written"
# tf.Transform feature names of the per-sample pixel statistics (see transforms.stats).
STAT_MEAN = "stain_mean"
STAT_SQ_MEAN = "stain_sq_mean"


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
      samples: the fold's samples; `num_bytes` is what each will take in the shard.
      shard_bytes: target shard size in bytes (ignored when num_shards is given).
      num_shards: exact number of shards for this fold, or None.
      byte_scale: factor applied to every sample's num_bytes.
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
    def __init__(self, shard_bytes, num_shards):
        self._args = (shard_bytes, num_shards)

    def process(self, item):
        fold, samples = item
        yield from plan_fold_shards(fold, samples, *self._args)


def _key_by_fold(sample: Candidate, fold_of: dict[str, int] | None):
    if fold_of is None:  # the job stopped before the fold assignment (a group too large): write nothing
        return
    yield (fold_of[sample.id] if sample.labeled else schemas.UNLABELED_FOLD), sample


@beam.ptransform_fn
def PlanShards(candidates, fold_of, shard_bytes, num_shards=None):  # noqa: N802
    """Inspected candidates + {Id: fold} side input -> ShardSpec per output file (none if it is None)."""
    return (
        candidates
        | "KeyByFold" >> beam.FlatMap(_key_by_fold, fold_of=beam.pvalue.AsSingleton(fold_of))
        | "GroupByFold" >> beam.GroupByKey()
        | "Cut" >> beam.ParDo(_PlanFn(shard_bytes, num_shards))
        | "Spread" >> beam.Reshuffle()
    )


class _WriteShardFn(beam.DoFn):
    """Writes the samples of one shard; emits stats, summaries and rejections.

    The inspection pass decoded and validated every sample; here a stain stored as it is only needs its
    bytes read again (checked against the inspection's CRC-32C). Converted or resized samples, and files
    that changed in between, go through the full validation again.
    """

    STATS, WRITTEN, REJECTED = "stats", "written", "rejected"

    def __init__(self, shard_dir: str, image_size: int | None, strict_modes: bool, progress_dir: str | None):
        self._shard_dir = shard_dir
        self._image_size = image_size
        self._strict = strict_modes
        self._progress_dir = progress_dir

    def setup(self):
        self._written = beam.metrics.Metrics.counter(COUNTERS, "written")
        self._converted = beam.metrics.Metrics.counter(COUNTERS, "converted_stains")
        self._progress = ProgressFile(self._progress_dir, WRITE_PHASE)

    def finish_bundle(self):
        self._progress.flush()

    def _prepare(self, sample: Candidate):
        data = read_stains(sample)
        if not sample.reencode and checksums(data) == sample.checksums:
            return data, sample.mean, sample.sq_mean, (sample.height, sample.width), sample.conversions
        valid = stains_lib.validate_stains(data, self._image_size, self._strict)
        return valid.images, valid.mean, valid.sq_mean, (valid.height, valid.width), valid.conversions

    def process(self, shard: ShardSpec):
        path = posixpath.join(self._shard_dir, shard.name)
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as out:
            for sample in shard.samples:
                try:
                    images, mean, sq_mean, (height, width), notes = self._prepare(sample)
                except stains_lib.Rejected as e:
                    beam.metrics.Metrics.counter(COUNTERS, f"rejected_{e.reason}").inc()
                    self._progress.add(rejected=1)
                    yield beam.pvalue.TaggedOutput(
                        self.REJECTED, rejection(sample.source, sample.id, e.reason, e.detail)
                    )
                    continue
                except OSError as e:  # a file that was listed but cannot be read (deleted, permissions)
                    self._progress.add(rejected=1)
                    yield beam.pvalue.TaggedOutput(
                        self.REJECTED, rejection(sample.source, sample.id, stains_lib.MISSING_STAIN, str(e))
                    )
                    continue
                record = schemas.Sample(
                    id=sample.id,
                    images=images,
                    height=height,
                    width=width,
                    labels=schemas.labels_to_multi_hot(sample.labels),
                    fold=shard.fold,
                    source=sample.source,
                )
                tfrecord.write_record(out, schemas.to_example(record).SerializeToString(deterministic=True))
                self._progress.add(done=1)
                self._written.inc()
                notes = tuple(n for n in notes if n)
                if notes:
                    self._converted.inc(len(notes))
                yield beam.pvalue.TaggedOutput(
                    self.STATS,
                    {
                        STAT_MEAN: np.asarray(mean, dtype=np.float32),
                        STAT_SQ_MEAN: np.asarray(sq_mean, dtype=np.float32),
                    },
                )
                yield beam.pvalue.TaggedOutput(
                    self.WRITTEN, (shard.fold, sample.labels, (height, width), notes)
                )
        yield shard.name


@beam.ptransform_fn
def WriteShards(shards, shard_dir, image_size=None, strict_modes=False, progress_dir=None):  # noqa: N802
    """ShardSpec -> a written TFRecord file; outputs `stats`, `written`, `rejected` and the file names."""
    fn = _WriteShardFn(shard_dir, image_size, strict_modes, progress_dir)
    return shards | beam.ParDo(fn).with_outputs(fn.STATS, fn.WRITTEN, fn.REJECTED, main="files")

"""The job's own account of itself: summary.json (counts for the manifest) and rejected.csv (Summarise)."""

from __future__ import annotations

import collections
import csv
import io
import json

import apache_beam as beam
import numpy as np

import schemas
from pipelines import folds as folds_lib
from pipelines import storage

SUMMARY_FILE = "summary.json"


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


def rejected_csv(rejected) -> bytes:
    """rejected.csv's bytes: a header and the rows sorted."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(schemas.REJECTED_COLUMNS)
    w.writerows(sorted(rejected))
    return buf.getvalue().encode("utf-8")


class _SummaryFn(beam.DoFn):
    def __init__(self, path, rejected_path, num_folds):
        self._path, self._rejected_path, self._num_folds = path, rejected_path, num_folds

    def process(self, _, written, rejected, unlisted, size_error, duplicates, shards, input_rows):
        summary = summarise(written, rejected, unlisted, self._num_folds)
        summary["input_rows"] = input_rows
        summary["size_error"] = size_error
        summary["duplicates"] = duplicates
        summary["shards"] = sorted(shards)
        storage.write_bytes(self._rejected_path, rejected_csv(rejected))
        storage.write_bytes(self._path, json.dumps(summary, indent=1).encode("utf-8"))  # last: marks the end
        yield summary["written"]


@beam.ptransform_fn
def Summarise(  # noqa: N802
    pbegin,
    written,
    rejected,
    unlisted,
    size_check,
    duplicates,
    shards,
    input_rows,
    summary_path,
    rejected_path,
    num_folds,
):
    """Writes rejected.csv (sorted) and then summary.json (counts for the manifest) from the job's outputs.

    `size_check`, `duplicates` and `input_rows` are one-element PCollections (the size error or None; the
    duplicate groups' counts; the job's count of label rows); `shards` holds the written shards' names.
    Every shard is closed before this runs (its outputs are side inputs here), so summary.json marks a
    finished job.
    """
    side = beam.pvalue.AsList
    one = beam.pvalue.AsSingleton
    return (
        pbegin
        | "Once" >> beam.Create([None])
        | "Write"
        >> beam.ParDo(
            _SummaryFn(summary_path, rejected_path, num_folds),
            side(written),
            side(rejected),
            side(unlisted),
            one(size_check),
            one(duplicates),
            side(shards),
            one(input_rows),
        )
    )

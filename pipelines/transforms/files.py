"""Stain files: listing the input folders and joining files with label rows (ListImages, MatchFiles)."""

from __future__ import annotations

import collections
import posixpath

import apache_beam as beam
from apache_beam.io import fileio

import schemas
from pipelines.transforms.samples import Candidate, rejection
from schemas import labels as labels_lib
from schemas import stains as stains_lib

COUNTERS = "preprocess"


class _StainFileFn(beam.DoFn):
    def __init__(self, source: str):
        self._source = source

    def process(self, meta):
        parsed = stains_lib.stain_of(meta.path)
        if parsed is None:
            beam.metrics.Metrics.counter(COUNTERS, "ignored_files").inc()
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
            beam.metrics.Metrics.counter(COUNTERS, "unlisted_images").inc()
            yield beam.pvalue.TaggedOutput("unlisted", (source, sample_id))
        return
    (row,) = rows  # DropDuplicateIds left one row per Id
    by_stain: dict[str, list[tuple[str, str, int]]] = collections.defaultdict(list)
    for stain, ext, path, size in files:
        by_stain[stain].append((ext, path, size))
    missing = [s for s in schemas.STAINS if s not in by_stain]
    if missing:
        beam.metrics.Metrics.counter(COUNTERS, f"rejected_{stains_lib.MISSING_STAIN}").inc()
        detail = f"no {', '.join(missing)} file for Id {sample_id!r} in {row.input_dir}"
        yield beam.pvalue.TaggedOutput(
            "rejected", rejection(source, sample_id, stains_lib.MISSING_STAIN, detail)
        )
        return
    paths = tuple(
        stains_lib.choose_file([(ext, path) for ext, path, _ in by_stain[s]]) for s in schemas.STAINS
    )
    sizes = {path: size for files_of in by_stain.values() for _, path, size in files_of}
    yield Candidate(
        source=source,
        id=sample_id,
        labels=row.labels,
        labeled=row.labeled,
        paths=paths,
        num_bytes=sum(sizes[p] for p in paths),
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
